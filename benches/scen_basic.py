"""Scenarios ``roundtrip``, ``startup`` and ``tiny_map``."""

from __future__ import annotations

import importlib
import sys
import time

import peers
import workloads
from common import WORKERS, Column, Ctx, Scenario, median, percentile, repeat

# roundtrip ------------------------------------------------------------------------


def roundtrip(case: str, ctx: Ctx) -> dict:
    n = 500 if ctx.quick else 2000
    pool = peers.make(case)
    for i in range(50):
        assert pool.submit(workloads.identity, i).result() == i
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        value = pool.submit(workloads.identity, i).result()
        lat.append(time.perf_counter() - t0)
        assert value == i
    pool.close()
    return {"median_us": median(lat) * 1e6, "p99_us": percentile(lat, 99) * 1e6, "n": n, "call": pool.how_submit}


ROUNDTRIP = Scenario(
    name="roundtrip",
    title="roundtrip: one task at a time, submit(identity, i).result(), after 50 warm-up calls",
    run=roundtrip,
    cases=lambda quick: list(peers.ALL),
    columns=[Column("median µs", "median_us", "{:.0f}"), Column("p99 µs", "p99_us", "{:.0f}"),
             Column("calls", "n", "int"), Column("call used", "call", "text")],
    ratio_key="median_us",
    timeout=lambda quick: 150.0,
)


# startup --------------------------------------------------------------------------

IMPORTS = {
    "ironpool": ["ironpool", "ironpool.pool"],
    "ppe": ["concurrent.futures.process"],
    "mp": ["multiprocessing.pool"],
    "joblib": ["joblib"],
    "loky": ["loky"],
    "mpire": ["mpire"],
    "pebble": ["pebble"],
    "ray": ["ray", "ray.util.multiprocessing"],
}

REUSED = ("joblib", "loky")  # their idiom keeps the workers of the first pool for the next


def startup(case: str, ctx: Ctx) -> dict:
    t0 = time.perf_counter()
    for mod in IMPORTS[case]:
        importlib.import_module(mod)
    t_import = time.perf_counter() - t0

    t0 = time.perf_counter()
    pool = peers.make(case)
    assert pool.submit(workloads.identity, 1).result() == 1
    first = time.perf_counter() - t0
    if case not in REUSED:
        pool.close()

    t0 = time.perf_counter()
    pool = peers.make(case)
    assert pool.submit(workloads.identity, 2).result() == 2
    second = time.perf_counter() - t0
    pool.close()
    return {"import_s": t_import, "first_s": first, "second_s": second,
            "note": "reused warm workers" if case in REUSED else ""}


STARTUP = Scenario(
    name="startup",
    title="startup: pool creation to first result (fresh process per run); then close it and create a second pool",
    run=startup,
    cases=lambda quick: list(peers.ALL),
    columns=[Column("import s", "import_s"), Column("first pool s", "first_s"),
             Column("second pool s", "second_s"), Column("", "note", "text")],
    ratio_key="first_s",
    timeout=lambda quick: 90.0,
    repeats=lambda quick: 3 if quick else 5,
    notes=["import s is the library's own import, not included in 'first pool s'.",
           "joblib and loky are not closed between the two: their reusable executor is how they are meant to be "
           "used, so their second pool is a reuse of warm workers."],
)


# tiny_map -------------------------------------------------------------------------


def tiny_map_cases(quick: bool) -> list[str]:
    n = 50_000 if quick else 200_000
    tuned = n // (4 * WORKERS)  # what multiprocessing.Pool.map would pick
    cases = list(peers.ALL)
    cases.insert(2, f"ppe:chunksize={tuned}")
    cases[1] = "ppe:chunksize=1 (default)"
    return cases


def tiny_map(case: str, ctx: Ctx) -> dict:
    n = 50_000 if ctx.quick else 200_000
    chunksize = None
    if case.startswith("ppe:chunksize="):
        chunksize = int(case.split("=")[1].split()[0])
    pool = peers.make(case)
    pool.map(workloads.square, range(200), chunksize=min(chunksize or 50, 50))  # start the workers
    return _time_squares(pool, pool.map, workloads.square, n, chunksize, ctx)


def _time_squares(pool, call, square, n: int, chunksize: int | None, ctx: Ctx) -> dict:
    """Times ``call(square, range(n), chunksize=chunksize)`` (``pool.map``,
    ``pool.unordered``) on a started pool, checks the values in any order,
    and closes the pool."""
    expected = sum(x * x for x in range(n))
    times, out = repeat(lambda: call(square, range(n), chunksize=chunksize), runs=3,
                        budget=8.0 if ctx.quick else 25.0)
    ok = len(out) == n and sum(out) == expected
    pool.close()
    sec = median(times)
    return {"seconds": sec, "per_s": n / sec, "runs": len(times), "ok": ok}


_ITEM_COLUMNS = [Column("seconds", "seconds"), Column("items/s", "per_s", "{:,.0f}"), Column("runs", "runs", "int"),
                 Column("correct", "ok")]


TINY_MAP = Scenario(
    name="tiny_map",
    title="tiny_map: list(map(square, range(N))) on a started pool, library defaults for chunking",
    run=tiny_map,
    cases=tiny_map_cases,
    columns=_ITEM_COLUMNS,
    ratio_key="seconds",
    timeout=lambda quick: 75.0 if quick else 150.0,
    notes=["N = 200,000 (50,000 with --quick). Defaults: ProcessPoolExecutor, loky and pebble chunksize=1; "
           "multiprocessing.Pool and mpire split into 4 chunks per worker; joblib batch_size='auto'; "
           "ironpool sizes chunks from measured task times. Fewer than 3 runs when one run is slow."],
)


# tiny_c1 and submit_many: the per-task path, one task per message ------------------

#: Compiled into the child's ``__main__``, so that the task pickles by value the
#: way a user's script function does.
_MAIN_SOURCE = """
def main_square(x):
    return x * x
"""

PER_TASK_N = 20_000


def _main_square():
    main = sys.modules["__main__"]
    if not hasattr(main, "main_square"):
        exec(compile(_MAIN_SOURCE, "<benchmark script>", "exec"), main.__dict__)
    return main.main_square


def tiny_c1(case: str, ctx: Ctx) -> dict:
    square = _main_square()
    pool = peers.make(case)
    pool.map(square, range(200), chunksize=1)  # start the workers
    return _time_squares(pool, pool.map, square, PER_TASK_N, 1, ctx)


TINY_C1 = Scenario(
    name="tiny_c1",
    title="tiny_c1: list(map(square, range(20_000), chunksize=1)), square defined in __main__",
    run=tiny_c1,
    cases=lambda quick: list(peers.ALL),
    columns=_ITEM_COLUMNS,
    ratio_key="seconds",
    timeout=lambda quick: 120.0,
    notes=["One item per message for every library (joblib: batch_size=1; it was 'auto' up to session 25)."],
)


def tiny_unordered(case: str, ctx: Ctx) -> dict:
    square = _main_square()
    pool = peers.make(case)
    # Start the workers with the same call (mpire's kept-alive workers fail
    # an imap_unordered after a map).
    pool.unordered(square, range(200), chunksize=1)
    return {**_time_squares(pool, pool.unordered, square, PER_TASK_N, 1, ctx), "call": pool.how_unordered}


TINY_UNORDERED = Scenario(
    name="tiny_unordered",
    title="tiny_unordered: 20,000 squares as they finish, chunksize=1, square defined in __main__",
    run=tiny_unordered,
    cases=lambda quick: list(peers.ALL),
    columns=[*_ITEM_COLUMNS, Column("call used", "call", "text")],
    ratio_key="seconds",
    timeout=lambda quick: 120.0,
    notes=["Each library's unordered map; ProcessPoolExecutor, loky and pebble have none: as_completed over a "
           "submit per item. joblib: batch_size=1."],
)


def submit_many(case: str, ctx: Ctx) -> dict:
    square = _main_square()
    pool = peers.make(case)
    pool.calls(square, [(i,) for i in range(200)])  # start the workers
    args = [(i,) for i in range(PER_TASK_N)]
    expected = [i * i for i in range(PER_TASK_N)]
    times, out = repeat(lambda: pool.calls(square, args), runs=3, budget=8.0 if ctx.quick else 25.0)
    ok = out == expected
    pool.close()
    sec = median(times)
    return {"seconds": sec, "per_s": PER_TASK_N / sec, "runs": len(times), "ok": ok, "call": pool.how_submit}


SUBMIT_MANY = Scenario(
    name="submit_many",
    title="submit_many: 20,000 submit(square, i), then result() of each in order; square defined in __main__",
    run=submit_many,
    cases=lambda quick: list(peers.ALL),
    columns=[Column("seconds", "seconds"), Column("tasks/s", "per_s", "{:,.0f}"), Column("runs", "runs", "int"),
             Column("correct", "ok"), Column("call used", "call", "text")],
    ratio_key="seconds",
    timeout=lambda quick: 120.0,
    notes=["joblib has no submit: its row is one Parallel call over the 20,000 calls."],
)

SCENARIOS = [ROUNDTRIP, STARTUP, TINY_MAP, TINY_C1, TINY_UNORDERED, SUBMIT_MANY]
