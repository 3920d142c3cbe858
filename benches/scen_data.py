"""Scenarios that move data: ``big_input``, ``big_output``, ``file_job``.

Each reports seconds (median of up to 3 runs on a started pool) and, from
one more run, peak memory of the whole process tree (parent and every
child), sampled every 20 ms; see ``common.MemWatch``."""

from __future__ import annotations

import os

import peers
import workloads
from common import WORKERS, Column, Ctx, MemWatch, Scenario, median, repeat

MEM_COLUMNS = [Column("peak PSS MiB", "pss_mib", "{:,.0f}"), Column("PSS+shm MiB", "total_mib", "{:,.0f}")]
MEM_NOTE = ("seconds: median of up to 3 runs; memory: one more run, sampled. "
            "peak PSS MiB: largest sum of PSS over the process tree (parent + all children), sampled every 20 ms. "
            "PSS+shm MiB: the same without shared-memory pages, plus each memfd or /dev/shm file that a process "
            "of the tree holds open or mapped, once, at its allocated size (PSS misses shared memory that is "
            "written but not mapped).")

DATA_CASES = ["ironpool", "ppe", "mp", "joblib", "loky", "mpire", "pebble", "ray"]


def _measure(fn, budget: float) -> tuple[dict, object]:
    """Seconds: median of up to 3 unwatched runs. Memory: one more run with
    the sampler on (so that sampling does not slow the timed runs)."""
    times = repeat(fn, runs=3, budget=budget)[0]  # the last value is dropped before the watched run
    with MemWatch() as mw:
        value = fn()
    return {"seconds": median(times), "runs": len(times), **mw.figures()}, value


def _warm(pool: peers.Peer, modules: tuple = ("numpy",)) -> None:
    """Starts every worker and imports ``modules`` in it, outside the timed part."""
    pool.calls(workloads.warm, [(0.2, modules)] * (2 * WORKERS))


# big_input ------------------------------------------------------------------------


def big_input(case: str, ctx: Ctx) -> dict:
    import numpy as np

    mib = 64 if ctx.quick else 256
    n_tasks = 8
    if case == "mpire_shared":
        # shared_objects must be given before the workers start (they inherit it by fork).
        arr = np.random.default_rng(0).random(mib * 2**20 // 8)
        pool = peers.make(case, shared=arr)
        pool.calls(workloads.array_sum_shared, [(i,) for i in range(2 * WORKERS)])
        fn, arglist = workloads.array_sum_shared, [(i,) for i in range(n_tasks)]
    elif case == "ironpool_shm":
        # The array is born in shared memory (made inside ironpool.shared_memory()).
        import ironpool

        pool = peers.make(case)
        _warm(pool)
        with ironpool.shared_memory():
            arr = np.random.default_rng(0).random(mib * 2**20 // 8)
        fn, arglist = workloads.array_sum, [(arr,)] * n_tasks
    else:
        pool = peers.make(case)
        _warm(pool)
        arr = np.random.default_rng(0).random(mib * 2**20 // 8)
        if case == "ironpool_readonly":
            arr.flags.writeable = False  # sent once automatically, checked by digest on every re-send
        fn, arglist = workloads.array_sum, [(arr,)] * n_tasks
    expected = float(arr.sum())
    if case == "ironpool_share":
        # The explicit send-once API: sharing is inside the timed call.
        def run():
            handle = pool.pool.share(arr)
            try:
                return pool.calls(fn, [(handle,)] * n_tasks)
            finally:
                handle.release()

        res, values = _measure(run, budget=40.0)
    else:
        res, values = _measure(lambda: pool.calls(fn, arglist), budget=40.0)
    res["ok"] = values == [expected] * n_tasks
    pool.close()
    return res


BIG_INPUT = Scenario(
    name="big_input",
    title="big_input: one 256 MiB float64 array passed to each of 8 tasks that sum it",
    run=big_input,
    cases=lambda quick: ["ironpool", "ironpool_share", "ironpool_readonly", "ironpool_shm", "ppe", "mp", "joblib",
                         "loky", "mpire", "mpire_shared", "pebble", "ray"],
    columns=[Column("seconds", "seconds"), *MEM_COLUMNS, Column("runs", "runs", "int"), Column("correct", "ok")],
    ratio_key="seconds",
    timeout=lambda quick: 120.0 if quick else 240.0,
    notes=["64 MiB with --quick. The array is made after the pool started (fork-based pools do not inherit it), "
           "except for 'mpire shared_objects', whose workers inherit it at start. joblib memory-maps it "
           "(default max_nbytes='1M'). 'ironpool' passes the (writable) array itself: it is shared on its first "
           "send, and later tasks reuse that copy after a digest shows it unchanged; "
           "'ironpool pool.share()' shares it once inside the timed call. 'ironpool read-only array' passes it "
           "with writeable=False: sent once automatically, and each re-send takes a digest to prove it unchanged "
           "(the timed runs after the first reuse the first run's copy). 'ironpool shared_memory()' makes the "
           "array inside `with ironpool.shared_memory():`, so it lives in a memfd and no task copies it.", MEM_NOTE],
)


# big_output -----------------------------------------------------------------------


def big_output(case: str, ctx: Ctx) -> dict:
    n_tasks, rows = (8, 250_000) if ctx.quick else (16, 1_000_000)
    strings = ctx.variant == "strings"
    pool = peers.make(case)
    _warm(pool, ("numpy", "pandas"))
    arglist = [(i, rows, strings) for i in range(n_tasks)]
    res, frames = _measure(lambda: pool.calls(workloads.make_frame, arglist), budget=60.0)
    res["ok"] = len(frames) == n_tasks and frames[-1].equals(workloads.make_frame(n_tasks - 1, rows, strings))
    del frames
    pool.close()
    return res


BIG_OUTPUT = Scenario(
    name="big_output",
    title="big_output: 16 tasks each return a 1,000,000 x 8 float64 DataFrame; time to collect all 16",
    run=big_output,
    cases=lambda quick: list(DATA_CASES),
    columns=[Column("seconds", "seconds"), *MEM_COLUMNS, Column("runs", "runs", "int"), Column("correct", "ok")],
    ratio_key="seconds",
    timeout=lambda quick: 120.0 if quick else 300.0,
    variants=["", "strings"],
    notes=["8 tasks x 250,000 rows with --quick. Variant 'strings' adds two string columns (pandas 'str' dtype). "
           "Time includes building the frames in the workers; no concatenation.", MEM_NOTE],
)


# file_job -------------------------------------------------------------------------


def _csv_paths(ctx: Ctx) -> list[str]:
    return sorted(os.path.join(ctx.files_dir, f) for f in os.listdir(ctx.files_dir) if f.endswith(".csv"))


def file_job(case: str, ctx: Ctx) -> dict:
    import pandas  # noqa: F401 - the parent needs it; fork-based workers then inherit it
    from ironpool.demo import job as csvjob

    paths = _csv_paths(ctx)
    opts = {"preload": ("pandas",)} if case == "ironpool" else {}
    pool = peers.make(case, **opts)
    _warm(pool, ("pandas",))
    res, result = _measure(lambda: csvjob.combine(pool.map(csvjob.process_file, paths)), budget=60.0)
    res["ok"] = result[1].shape[0] == int(result[0]["rows"].sum())
    res["rows"] = result[1].shape[0]
    del result
    pool.close()
    return res


FILE_JOB = Scenario(
    name="file_job",
    title=("file_job: the demo's job (read CSV, per-key features, groupby, return summary + full DataFrame; "
           "parent concatenates)"),
    run=file_job,
    cases=lambda quick: list(DATA_CASES),
    columns=[Column("seconds", "seconds"), *MEM_COLUMNS, Column("rows", "rows", "int"), Column("runs", "runs", "int"),
             Column("correct", "ok")],
    ratio_key="seconds",
    timeout=lambda quick: 120.0 if quick else 240.0,
    needs_files=True,
    notes=["48 files x 100,000 rows (16 files with --quick), each library's map() with default chunking; "
           "ironpool gets preload=('pandas',), the fork-based pools inherit pandas from the parent, and every "
           "pool imports it in a warm-up before timing.", MEM_NOTE],
)


def file_job_fresh(case: str, ctx: Ctx) -> dict:
    """The job as a script runs it: pandas imported, then one pool started,
    used and closed, all timed (no preload, no warm-up: what each library
    does by default)."""
    import time

    import pandas  # noqa: F401 - imported before the pool, as scripts do
    from ironpool.demo import job as csvjob

    paths = _csv_paths(ctx)
    t0 = time.perf_counter()
    pool = peers.make(case)
    result = csvjob.combine(pool.map(csvjob.process_file, paths))
    pool.close()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "ok": result[1].shape[0] == int(result[0]["rows"].sum())}


FILE_JOB_FRESH = Scenario(
    name="file_job_fresh",
    title="file_job_fresh: the same job in a fresh process, pool start and shutdown included",
    run=file_job_fresh,
    cases=lambda quick: list(DATA_CASES),
    columns=[Column("seconds", "seconds"), Column("correct", "ok")],
    ratio_key="seconds",
    timeout=lambda quick: 120.0 if quick else 240.0,
    repeats=lambda quick: 3,
    needs_files=True,
    notes=["Median of 3 fresh processes. Fork-based pools' workers inherit the parent's pandas; ironpool's "
           "workers fork from its template, which imports pandas in the background once the pool has started."],
)

SCENARIOS = [BIG_INPUT, BIG_OUTPUT, FILE_JOB, FILE_JOB_FRESH]
