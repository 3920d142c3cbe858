"""Fault scenarios: ``segfault``, ``hang``, ``leak``, ``parent_kill``,
``respawn``, ``recycle_throughput``. Each runs in its own child process with a
time limit, since several libraries hang on some of them."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import tempfile
import time

import peers
import workloads
from common import WORKERS, Column, Ctx, Scenario, median, pid_alive

MB = 10**6


def _works_after(pool: peers.Peer) -> str:
    """Can the pool (or, for joblib/loky, the library's reuse idiom) still run a task?"""
    try:
        p2 = pool.again()
        value = p2.submit(workloads.identity, 7).result(timeout=10)
        return "yes" if value == 7 else f"wrong result {value!r}"
    except peers.NotReady:
        return "hangs"
    except BaseException as exc:
        return f"no: {type(exc).__name__}"


def _counts(outs: list, t0: float) -> dict:
    ok = sum(1 for o in outs if o[0] == "ok")
    failed = sum(1 for o in outs if o[0] == "err")
    lost = sum(1 for o in outs if o[0] == "none")
    times = [o[2] for o in outs if o[2] is not None]
    return {"ok": ok, "failed": failed, "lost": lost, "seconds": (max(times) - t0) if times else None}


# segfault -------------------------------------------------------------------------


def segfault(case: str, ctx: Ctx) -> dict:
    pool = peers.make(case)
    pool.submit(workloads.identity, 0).result()
    t0 = time.perf_counter()
    outs = pool.batch(workloads.crash_at, [(i, 50) for i in range(100)], deadline=t0 + 20.0)
    res = _counts(outs, t0)
    bad = outs[50]
    res["error"] = bad[1] if bad[0] == "err" else ("no outcome (lost)" if bad[0] == "none" else "returned?!")
    ctx.emit(**res)
    res["after"] = _works_after(pool)
    ctx.emit(**res)
    pool.close(force=True)
    return res


FAULT_CASES = ["ironpool", "ppe", "mp", "joblib", "loky", "mpire", "pebble", "ray"]

SEGFAULT = Scenario(
    name="segfault",
    title="segfault: 100 tasks (5 ms each), task #50 segfaults (ctypes.string_at(0)); outcomes within 20 s",
    run=segfault,
    cases=lambda quick: list(FAULT_CASES),
    columns=[Column("ok", "ok", "int"), Column("failed", "failed", "int"), Column("no outcome", "lost", "int"),
             Column("seconds", "seconds"), Column("works after", "after", "text"),
             Column("error of task #50", "error", "text")],
    timeout=lambda quick: 60.0,
    notes=["seconds: until the last outcome that arrived. 'no outcome': still pending after 20 s (lost). "
           "joblib runs the 100 calls as one Parallel(return_as='generator') call. 'works after' submits one more "
           "task (joblib/loky: through their reusable executor, as they are meant to be used)."],
)


# hang -----------------------------------------------------------------------------

TIMEOUT_SUPPORT = ("ironpool", "pebble", "mpire", "joblib")


def hang(case: str, ctx: Ctx) -> dict:
    supported = case in TIMEOUT_SUPPORT
    limit = 2.0 if supported else None
    pool = peers.make(case, task_timeout=limit)
    pool.submit(workloads.identity, 0).result()
    t0 = time.perf_counter()
    outs = pool.batch(workloads.hang_at, [(i, 5) for i in range(20)], deadline=t0 + 12.0, timeout=limit)
    res = _counts(outs, t0)
    bad = outs[5]
    res["others_ok"] = sum(1 for i, o in enumerate(outs) if i != 5 and o[0] == "ok")
    res["limit"] = "2 s per task" if supported else "none available"
    res["timeout_s"] = bad[2] - t0 if bad[0] == "err" else None
    res["error"] = bad[1] if bad[0] == "err" else "no error within 12 s"
    ctx.emit(**res)
    res["after"] = _works_after(pool)
    ctx.emit(**res)
    pool.close(force=True)
    return res


HANG = Scenario(
    name="hang",
    title="hang: 20 tasks, task #5 sleeps an hour; per-task time limit 2 s where the library has one",
    run=hang,
    cases=lambda quick: list(FAULT_CASES),
    columns=[Column("time limit", "limit", "text"), Column("error after s", "timeout_s", "{:.2f}"),
             Column("other 19 ok", "others_ok", "int"), Column("works after", "after", "text"),
             Column("error of task #5", "error", "text")],
    ratio_key="timeout_s",
    timeout=lambda quick: 45.0,
    notes=["'error after s': from submitting the 20 tasks to the hung task's error. Without a per-task limit "
           "the caller can only stop waiting; the worker stays busy (and such pools block interpreter exit)."],
)


# leak -----------------------------------------------------------------------------

LEAK_CASES = {
    "ironpool:max_tasks_per_worker=5": ("ironpool", {"max_tasks": 5}),
    "ironpool:max_memory_per_worker=150MB": ("ironpool", {"max_memory": "150MB"}),
    "ironpool:(no recycling)": ("ironpool", {}),
    "ppe:max_tasks_per_child=5": ("ppe", {"max_tasks": 5}),
    "mp:maxtasksperchild=5": ("mp", {"max_tasks": 5}),
    "loky:(built-in leak check)": ("loky", {}),
    "mpire:worker_lifespan=5": ("mpire", {"max_tasks": 5}),
    "pebble:max_tasks=5": ("pebble", {"max_tasks": 5}),
    "ray:maxtasksperchild=5": ("ray", {"max_tasks": 5}),
}


def leak(case: str, ctx: Ctx) -> dict:
    n = 20 if ctx.quick else 40
    name, opts = LEAK_CASES[case]
    pool = peers.make(name, **opts)
    t0 = time.perf_counter()
    if name == "mpire":  # worker_lifespan only applies to map calls
        outs = pool.map(workloads.leak, [20 * MB] * n, chunksize=1)
        seconds = time.perf_counter() - t0
    else:
        got = pool.batch(workloads.leak, [(20 * MB,)] * n, deadline=t0 + 30.0)
        outs = [o[1] for o in got if o[0] == "ok"]
        seconds = _counts(got, t0)["seconds"]
    pool.close(force=True)
    if not outs:
        return {"ok": 0, "status": "no task finished within 30 s"}
    return {"peak_rss_mib": max(r for _, r in outs) / 2**20, "workers": len({p for p, _ in outs}),
            "ok": f"{len(outs)}/{n}" if len(outs) < n else len(outs), "seconds": seconds}


LEAK = Scenario(
    name="leak",
    title="leak: 40 tasks each keep 20 MB alive in their worker; recycling on",
    run=leak,
    cases=lambda quick: list(LEAK_CASES),
    columns=[Column("peak worker RSS MiB", "peak_rss_mib", "{:,.0f}"), Column("worker pids", "workers", "int"),
             Column("tasks ok", "ok", "int"), Column("seconds", "seconds")],
    ratio_key="peak_rss_mib",
    timeout=lambda quick: 60.0,
    notes=["20 tasks with --quick. Peak RSS is what each task reads from /proc/self/statm right after leaking. "
           "'no recycling' shows the leak unchecked; loky restarts a worker whose memory grew by 300 MB. "
           "'tasks ok' below the total: the rest had no outcome within 30 s (e.g. CPython 3.11's "
           "ProcessPoolExecutor deadlocks with max_tasks_per_child, fixed in later versions)."],
)


# parent_kill ----------------------------------------------------------------------


def parent_kill(case: str, ctx: Ctx) -> dict:
    import threading

    directory = tempfile.mkdtemp(prefix="ironpool-bench-pk-")
    pool = peers.make(case)
    args = [(30.0, directory, i) for i in range(2 * WORKERS)]
    if case == "joblib":
        threading.Thread(target=pool.calls, args=(workloads.sleep_marker, args), daemon=True).start()
    else:
        for a in args:
            pool.submit(workloads.sleep_marker, *a)
    deadline = time.monotonic() + 60
    while len(os.listdir(directory)) < WORKERS and time.monotonic() < deadline:
        time.sleep(0.05)
    started = len(os.listdir(directory))
    shutil.rmtree(directory, ignore_errors=True)
    ctx.emit(pids=pool.pids(), started=started)
    time.sleep(3600)  # the runner SIGKILLs this process now
    return {}


def parent_kill_driver(proc, partials: queue.Queue, timeout: float) -> dict:
    """Runs in the runner: waits for the child's list of descendants, SIGKILLs
    the child, waits 3 s and counts which descendants are still alive."""
    try:
        info = partials.get(timeout=timeout)
    except queue.Empty:
        return {"status": "timeout (tasks never started)"}
    pids = info["pids"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3.0)
    left = [p for p in pids if pid_alive(p)]
    for p in left:  # our own leftovers: end them by pid
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    return {"procs": len(pids), "left": len(left), "started": info.get("started")}


PARENT_KILL = Scenario(
    name="parent_kill",
    title="parent_kill: SIGKILL the parent while its 2 workers run 30 s tasks; processes left after 3 s",
    run=parent_kill,
    cases=lambda quick: list(FAULT_CASES),
    columns=[Column("child processes", "procs", "int"), Column("left after 3 s", "left", "int"),
             Column("tasks started", "started", "int")],
    ratio_key=None,
    timeout=lambda quick: 90.0,
    driver=parent_kill_driver,
    notes=["child processes: every descendant of the killed parent (workers, ironpool's template, loky's "
           "resource tracker, ray's daemons...). Leftovers are killed by pid afterwards."],
)


# respawn --------------------------------------------------------------------------


def respawn(case: str, ctx: Ctx) -> dict:
    iters = 3 if ctx.quick else 5
    directory = tempfile.mkdtemp(prefix="ironpool-bench-rs-")
    pool = peers.make(case)
    pool.calls(workloads.warm, [(0.2, ())] * (2 * WORKERS))
    spawn, nxt, note = [], [], ""
    try:
        for k in range(iters):
            marker, stamp = os.path.join(directory, f"m{k}"), os.path.join(directory, f"s{k}")
            blocker = pool.submit(workloads.block, 3.0, marker)
            deadline = time.monotonic() + 15
            while not os.path.exists(marker) and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(0.01)
            if not os.path.exists(marker):
                note = "blocker task never started"
                break
            with open(marker) as f:
                blocker_pid = int(f.read())
            pool.submit(workloads.crash_stamp, stamp)
            probe = pool.submit(workloads.pid_time)
            try:
                pid, t_start = probe.result(timeout=15)
            except peers.NotReady:
                note = "no result within 15 s"
                break
            except BaseException as exc:
                note = f"pool broken: {type(exc).__name__}"
                break
            t_recv = time.time()
            with open(stamp) as f:
                crashed = float(f.read())
            if pid == blocker_pid:
                note = "probe ran on the surviving worker: no replacement within 3 s"
                break
            else:
                spawn.append((t_start - crashed) * 1e3)
                nxt.append((t_recv - crashed) * 1e3)
            ctx.emit(spawn=spawn, next=nxt)
            try:
                blocker.result(timeout=15)
            except BaseException:
                pass
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    pool.close(force=True)
    return {"spawn_ms": median(spawn), "next_ms": median(nxt), "n": len(spawn), "note": note}


RESPAWN = Scenario(
    name="respawn",
    title="respawn: a worker segfaults; time until its replacement starts the next queued task",
    run=respawn,
    cases=lambda quick: [c for c in FAULT_CASES if c != "joblib"],
    columns=[Column("replacement runs task ms", "spawn_ms", "{:.1f}"), Column("next result ms", "next_ms", "{:.1f}"),
             Column("samples", "n", "int"), Column("", "note", "text")],
    ratio_key="next_ms",
    timeout=lambda quick: 120.0,
    notes=["One worker is held by a 3 s task; the other writes the time and segfaults; a probe task queued right "
           "after must run on the replacement. Median of 5 (3 with --quick). joblib has no submit: not run."],
)


# recycle_throughput ---------------------------------------------------------------

RECYCLE_CASES = {
    "ironpool:max_tasks_per_worker=1": ("ironpool", {"max_tasks": 1}),
    "ironpool:(no recycling, reference)": ("ironpool", {}),
    "ppe:max_tasks_per_child=1": ("ppe", {"max_tasks": 1}),
    "mp:maxtasksperchild=1": ("mp", {"max_tasks": 1}),
    "mpire:worker_lifespan=1": ("mpire", {"max_tasks": 1}),
    "pebble:max_tasks=1": ("pebble", {"max_tasks": 1}),
    "ray:maxtasksperchild=1": ("ray", {"max_tasks": 1}),
}


def _recycle(case: str, fn, n: int) -> dict:
    name, opts = RECYCLE_CASES[case]
    pool = peers.make(name, **opts)
    pool.submit(workloads.identity, 0).result()
    t0 = time.perf_counter()
    if name == "mpire":  # worker_lifespan only applies to map calls
        pids = pool.map(fn, range(n), chunksize=1)
        seconds = time.perf_counter() - t0
    else:
        outs = pool.batch(fn, [(i,) for i in range(n)], deadline=t0 + 45.0)
        pids = [o[1] for o in outs if o[0] == "ok"]
        seconds = _counts(outs, t0)["seconds"]
    pool.close(force=True)
    return {"per_s": len(pids) / seconds, "ms_per_task": seconds * 1e3 / max(1, len(pids)), "ok": len(pids),
            "n": n, "workers": len(set(pids))}


def recycle_throughput(case: str, ctx: Ctx) -> dict:
    return _recycle(case, workloads.getpid, 100 if ctx.quick else 300)


def recycle_pandas(case: str, ctx: Ctx) -> dict:
    import pandas  # noqa: F401  (the caller imported it before creating the pool)

    return _recycle(case, workloads.frame_pid, 30 if ctx.quick else 60)


RECYCLE = Scenario(
    name="recycle_throughput",
    title="recycle_throughput: trivial tasks with a new worker for every task",
    run=recycle_throughput,
    cases=lambda quick: list(RECYCLE_CASES),
    columns=[Column("tasks/s", "per_s", "{:,.1f}"), Column("ms/task", "ms_per_task", "{:.2f}"),
             Column("tasks ok", "ok", "int"), Column("worker pids", "workers", "int")],
    ratio_key="ms_per_task",
    timeout=lambda quick: 90.0,
    notes=["300 tasks (100 with --quick), at most 45 s. ProcessPoolExecutor's max_tasks_per_child needs 'spawn'."],
)

RECYCLE_PANDAS = Scenario(
    name="recycle_pandas",
    title="recycle_pandas: small pandas tasks with a new worker for every task, pandas imported by the caller",
    run=recycle_pandas,
    cases=lambda quick: list(RECYCLE_CASES),
    columns=RECYCLE.columns,
    ratio_key="ms_per_task",
    timeout=lambda quick: 120.0,
    notes=["60 tasks (30 with --quick), at most 45 s; each builds and sums a 100-row DataFrame."],
)

SCENARIOS = [SEGFAULT, HANG, LEAK, PARENT_KILL, RESPAWN, RECYCLE, RECYCLE_PANDAS]
