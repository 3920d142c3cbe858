"""Why joblib's big_input figure is not comparable with ironpool's default:
a ``Parallel`` kept open (``with Parallel(...) as par``, as the bench's
joblib adapter does) memory-maps an array once, finds it again by identity
on later calls, and does not look at its bytes, so a caller that changed
the array gets results computed on the old contents.

    .venv/bin/python benches/joblib_stale_memmap.py
"""

import numpy as np
from joblib import Parallel, delayed


def total(a: np.ndarray) -> float:
    return float(a.sum())


def main() -> None:
    arr = np.ones(1_000_000)
    with Parallel(n_jobs=2, backend="loky") as par:
        print("first:", par(delayed(total)(arr) for _ in range(2)))
        arr[:] = 2.0
        print("after arr[:] = 2:", par(delayed(total)(arr) for _ in range(2)), "expected", float(arr.sum()))


if __name__ == "__main__":
    main()
