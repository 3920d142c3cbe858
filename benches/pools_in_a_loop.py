"""Pools made in a loop whose tasks import pandas themselves (the caller
never does): each pool's time from creation to the end of its 4 tasks.
Until the template holds what the tasks import, every new worker imports
it again.

    .venv/bin/python -W ignore benches/pools_in_a_loop.py [pools]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import ironpool

TASK_MODULE = '''
def pandas_task(i):
    import pandas as pd
    return int(pd.Series(range(100)).sum()) + i
'''


def main() -> None:
    pools = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    with tempfile.TemporaryDirectory() as where:
        with open(os.path.join(where, "ip_bench_tasks.py"), "w") as f:
            f.write(TASK_MODULE)
        sys.path.insert(0, where)
        from ip_bench_tasks import pandas_task  # type: ignore[import-not-found]

        assert "pandas" not in sys.modules
        times = []
        for _ in range(pools):
            start = time.perf_counter()
            with ironpool.Pool(2) as pool:
                assert list(pool.map(pandas_task, range(4), chunksize=1)) == [4950 + i for i in range(4)]
            times.append((time.perf_counter() - start) * 1e3)
    print("pools in a loop, tasks import pandas themselves: " + " ".join(f"{t:.0f}" for t in times) + " ms")


if __name__ == "__main__":
    main()
