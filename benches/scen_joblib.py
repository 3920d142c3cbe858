"""Scenarios ``joblib_tiny``, ``joblib_roundtrip`` and ``joblib_big_input``:
``Parallel(backend="ironpool")`` against ``Parallel(backend="loky")``, the
same joblib call with only the backend name changed.

The tasks are defined in ``__main__`` (as users write them in a script or a
notebook), so both backends pickle them by value. Every ``Parallel`` call is
a fresh one, as users write ``Parallel(n_jobs=2)(...)``; both backends reuse
their workers between calls."""

from __future__ import annotations

import sys
import time

from common import WORKERS, Column, Ctx, Scenario, median, percentile, repeat

CASES = ["ironpool_joblib", "joblib"]
BACKENDS = {"ironpool_joblib": "ironpool", "joblib": "loky"}

# Compiled into the child's __main__, so that their module is "__main__".
MAIN_SOURCE = """
def jl_square(x):
    return x * x

def jl_identity(x):
    return x

def jl_array_sum(arr):
    return float(arr.sum())
"""


def _main_functions() -> dict:
    main = sys.modules["__main__"].__dict__
    if "jl_square" not in main:
        exec(compile(MAIN_SOURCE, "<benchmark script>", "exec"), main)
    return main


def _parallel(case: str, **kwargs):
    from joblib import Parallel

    if case == "ironpool_joblib":
        import ironpool.joblib  # noqa: F401  (registers the backend)
    return Parallel(n_jobs=WORKERS, backend=BACKENDS[case], **kwargs)


def _warm(case: str, fn, n: int = 200) -> None:
    from joblib import delayed

    assert _parallel(case)(delayed(fn)(i) for i in range(n)) == [fn(i) for i in range(n)]


def tiny(case: str, ctx: Ctx) -> dict:
    from joblib import delayed

    fn = _main_functions()["jl_square"]
    n = 50_000 if ctx.quick else 200_000
    _warm(case, fn)
    expected = sum(x * x for x in range(n))
    times, out = repeat(lambda: _parallel(case)(delayed(fn)(i) for i in range(n)), runs=3,
                        budget=10.0 if ctx.quick else 30.0)
    sec = median(times)
    return {"seconds": sec, "per_s": n / sec, "runs": len(times), "ok": sum(out) == expected}


def roundtrip(case: str, ctx: Ctx) -> dict:
    from joblib import delayed

    fn = _main_functions()["jl_identity"]
    n = 200 if ctx.quick else 1000
    _warm(case, fn, 20)
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        value = _parallel(case)([delayed(fn)(i)])[0]
        lat.append(time.perf_counter() - t0)
        assert value == i
    return {"median_us": median(lat) * 1e6, "p99_us": percentile(lat, 99) * 1e6, "n": n}


def big_input(case: str, ctx: Ctx) -> dict:
    import numpy as np
    from joblib import delayed

    fn = _main_functions()["jl_array_sum"]
    mib = 64 if ctx.quick else 256
    n_tasks = 8
    _warm(case, fn.__globals__["jl_identity"])
    arr = np.random.default_rng(0).random(mib * 2**20 // 8)
    expected = float(arr.sum())
    times, out = repeat(lambda: _parallel(case)(delayed(fn)(arr) for _ in range(n_tasks)), runs=3,
                        budget=20.0 if ctx.quick else 60.0)
    return {"seconds": median(times), "runs": len(times), "mib": mib, "ok": out == [expected] * n_tasks}


TINY = Scenario(
    name="joblib_tiny",
    title="joblib_tiny: Parallel(n_jobs=2)(delayed(square)(i) for i in range(N)), square from __main__",
    run=tiny,
    cases=lambda quick: list(CASES),
    columns=[Column("seconds", "seconds"), Column("items/s", "per_s", "{:,.0f}"), Column("runs", "runs", "int"),
             Column("correct", "ok")],
    ratio_key="seconds",
    timeout=lambda quick: 90.0 if quick else 180.0,
    notes=["N = 200,000 (50,000 with --quick); batch_size='auto' for both."],
)

ROUNDTRIP = Scenario(
    name="joblib_roundtrip",
    title="joblib_roundtrip: one-task Parallel(n_jobs=2)([delayed(identity)(i)]) calls, one after another",
    run=roundtrip,
    cases=lambda quick: list(CASES),
    columns=[Column("median µs", "median_us", "{:.0f}"), Column("p99 µs", "p99_us", "{:.0f}"),
             Column("calls", "n", "int")],
    ratio_key="median_us",
    timeout=lambda quick: 120.0,
    notes=["Includes joblib's own cost per call (configure, dispatch, its 10 ms polling of the first result)."],
)

BIG_INPUT = Scenario(
    name="joblib_big_input",
    title="joblib_big_input: Parallel(n_jobs=2)(delayed(array_sum)(arr) for 8 tasks), arr a float64 array",
    run=big_input,
    cases=lambda quick: list(CASES),
    columns=[Column("seconds", "seconds"), Column("MiB", "mib", "int"), Column("runs", "runs", "int"),
             Column("correct", "ok")],
    ratio_key="seconds",
    timeout=lambda quick: 120.0 if quick else 240.0,
    notes=["256 MiB (64 with --quick). loky memmaps the array into a temporary file once per call (max_nbytes "
           "default 1M); ironpool sends it through shared memory."],
)

SCENARIOS = [TINY, ROUNDTRIP, BIG_INPUT]
