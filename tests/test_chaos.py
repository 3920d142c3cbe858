"""Chaos: a seeded mix of tasks that return, raise, segfault, exit, hang past
their time limit, eat memory past the hard limit or return large numpy arrays,
all through one pool. Every task must end with exactly its own outcome, run
exactly once, and the pool must still work and leave nothing behind.

Quick size by default; IRONPOOL_FULL=1 runs thousands of tasks.
IRONPOOL_CHAOS_SEED picks another mix.
"""

from __future__ import annotations

import collections
import gc
import os
import random
import signal
import time
from concurrent.futures import as_completed

import faultlib
import ironpool
import numpy as np
import pytest
from conftest import stray_workers, wait_until

FULL = os.environ.get("IRONPOOL_FULL") == "1"
TASKS = 4000 if FULL else 300
SEED = int(os.environ.get("IRONPOOL_CHAOS_SEED", "20240604"))
HANG_LIMIT = 0.4
MEMORY = "200MB"
HARD = 300 * 2**20


def make_plan(n: int, seed: int) -> list[tuple[int, str, int]]:
    rng = random.Random(seed)
    kinds = rng.choices(list(faultlib.CHAOS_MIX), weights=list(faultlib.CHAOS_MIX.values()), k=n)
    plan = []
    for i, kind in enumerate(kinds):
        if kind == "ok":
            arg = rng.randrange(1, 1000)
        elif kind == "exit":
            arg = rng.randrange(1, 100)
        elif kind == "big":
            arg = rng.randrange(20_000, 600_000)  # 160 KB to 4.8 MB: through shared memory
        else:
            arg = 0
        plan.append((i, kind, arg))
    return plan


def judge(i: int, kind: str, arg: int, future) -> tuple[str, str | None]:
    """(observed outcome label, problem or None)."""
    exc = future.exception()
    if exc is None:
        value = future.result()
        if isinstance(value, np.ndarray):
            label = "ndarray"
            ok = kind == "big" and value.shape == (arg,) and value.dtype == np.int64 and bool((value == i).all())
        else:
            label = "result"
            ok = kind == "ok" and value == (i, i * arg)
        return label, None if ok else f"task {i} ({kind}, {arg}) returned {str(value)[:80]}"
    label = type(exc).__name__
    if isinstance(exc, ironpool.WorkerCrashed) and not isinstance(exc, ironpool.MemoryLimitExceeded):
        label += f"({'SIGSEGV' if exc.signal == signal.SIGSEGV else 'exit'})"
    own = f"({i}, '{kind}'" in str(exc) or (isinstance(exc, faultlib.ChaosError) and exc.args == (i,))
    if kind == "raise":
        ok = type(exc) is faultlib.ChaosError and exc.args == (i,)
    elif kind == "segv":
        ok = type(exc) is ironpool.WorkerCrashed and exc.signal == signal.SIGSEGV and own
    elif kind == "exit":
        ok = type(exc) is ironpool.WorkerCrashed and exc.exitcode == arg and exc.signal is None and own
    elif kind == "hang":
        ok = isinstance(exc, ironpool.TaskTimeout) and exc.limit == HANG_LIMIT and own
    elif kind == "hog":
        ok = isinstance(exc, ironpool.MemoryLimitExceeded) and exc.limit == HARD and exc.rss > HARD and own
    else:
        ok = False
    return label, None if ok else f"task {i} ({kind}, {arg}) failed with {exc!r}"[:300]


def _strays() -> set[int]:
    return {int(line.split()[0]) for line in stray_workers()}


@pytest.mark.slow
@pytest.mark.timeout(3600 if FULL else 120)
def test_chaos(tmp_path):
    # The template process and its keeper thread live as long as this
    # interpreter: start them before taking the baseline.
    with ironpool.Pool(2, preload=("numpy",)) as warm:
        assert warm.submit(pow, 2, 2).result(timeout=60) == 4
    del warm
    gc.collect()
    fds_before = faultlib.fd_table()
    strays_before = _strays()

    plan = make_plan(TASKS, SEED)
    runs = tmp_path / "runs"
    t0 = time.monotonic()
    labels: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    with ironpool.Pool(
        2, preload=("numpy",), task_timeout=60, max_memory_per_worker=MEMORY, hard_memory_factor=1.5
    ) as pool:
        futures = {}
        for i, kind, arg in plan:
            args = (i, kind, arg, str(runs))
            if kind == "hang":
                fut = pool.submit_with(faultlib.chaos_task, args, timeout=HANG_LIMIT)
            else:
                fut = pool.submit(faultlib.chaos_task, *args)
            futures[fut] = (i, kind, arg)
        settled = 0
        for fut in as_completed(futures, timeout=(1800 if FULL else 90)):
            label, problem = judge(*futures[fut], fut)
            labels[label] += 1
            settled += 1
            if problem:
                problems.append(problem)
        del fut
        futures.clear()
        assert settled == TASKS

        # Still works, with every worker slot filled.
        assert list(pool.map(pow, range(200), [2] * 200)) == [i * i for i in range(200)]
        assert pool.submit(faultlib.chaos_task, -1, "ok", 3, None).result(timeout=30) == (-1, -3)
        assert wait_until(lambda p=pool: len([w for w in p.stats() if w.pid]) == 2, timeout=10), pool.stats()
        restarts = sum(w.restarts for w in pool.stats())
    elapsed = time.monotonic() - t0
    # A shut-down pool that is still referenced is test_faults' business
    # (test_shutdown_releases_fds); here the pool is dropped like any other.
    del pool

    runs_per_task = collections.Counter(int(x) for x in faultlib.read_log(runs))
    # A time limit counts from the moment a worker is handed the task, which
    # includes unpickling its function (an import, on a fresh worker): under
    # load a 0.4 s "hang" can time out before its body logs. It still ended
    # with its own TaskTimeout (checked above); every other kind must have run.
    lost = [i for i, kind, _ in plan if runs_per_task[i] == 0 and kind != "hang"]
    repeated = {i: n for i, n in runs_per_task.items() if n > 1}
    planned = collections.Counter(kind for _, kind, _ in plan)
    print(f"\nchaos seed={SEED} tasks={TASKS} in {elapsed:.1f} s, worker restarts={restarts}")
    print("planned: " + ", ".join(f"{k}={planned[k]}" for k in faultlib.CHAOS_MIX))
    print("outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(labels.items())))

    assert not problems, f"{len(problems)} tasks got the wrong outcome:\n" + "\n".join(problems[:20])
    assert not lost, f"tasks never ran: {lost[:20]}"
    assert not repeated, f"tasks ran more than once: {dict(list(repeated.items())[:20])}"

    # Nothing left behind: processes, fds, shared memory.
    gc.collect()
    assert wait_until(lambda: _strays() <= strays_before, timeout=10), stray_workers()
    extra = {}

    def no_extra_fds() -> bool:
        nonlocal extra
        now = faultlib.fd_table()
        extra = {fd: target for fd, target in now.items() if fds_before.get(fd) != target}
        return not extra

    assert wait_until(no_extra_fds, timeout=5), f"fds left open: {extra}"
    assert not faultlib.ironpool_memfds(), faultlib.ironpool_memfds()[:10]
