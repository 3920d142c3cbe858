"""CPU per task, by thread of the caller's process and by worker, for many
tiny tasks of a ``__main__`` function with pandas imported by the caller.

    .venv/bin/python -W ignore benches/task_cpu.py map      # map(chunksize=1)
    .venv/bin/python -W ignore benches/task_cpu.py submit   # submit + result
    .venv/bin/python -W ignore benches/task_cpu.py as_completed  # submit, as_completed
    R=25 ...                                                 # rounds of 20,000

Python threads are named by their Python name (``MainThread``,
``ironpool-results``), the engine's by their OS name.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import as_completed

import ironpool
import pandas  # noqa: F401  (the caller's real imports)

TICKS = os.sysconf("SC_CLK_TCK")
N = 20_000


def square(x: int) -> int:
    return x * x


def _cpu(stat: str) -> float:
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def threads() -> dict[tuple[str, str], float]:
    """CPU seconds by (thread id, name); Python threads by their Python name."""
    python_names = {str(t.native_id): t.name for t in threading.enumerate()}
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = python_names.get(tid) or stat[stat.index("(") + 1:stat.rindex(")")]
        out[(tid, name)] = _cpu(stat)
    return out


def process(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        return _cpu(f.read())


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "map"
    rounds = int(os.environ.get("R", 5))
    with ironpool.Pool(2) as pool:
        list(pool.map(square, range(2000), chunksize=1))
        pool.template_info(timeout=60)  # the background warm-up would take CPU from the rounds
        pids = [w.pid for w in pool.stats()]
        before, workers_before = threads(), [process(p) for p in pids]
        start = time.perf_counter()
        for _ in range(rounds):
            if mode == "map":
                list(pool.map(square, range(N), chunksize=1))
            elif mode == "as_completed":
                futures = [pool.submit(square, i) for i in range(N)]
                [f.result() for f in as_completed(futures)]
            else:
                futures = [pool.submit(square, i) for i in range(N)]
                [f.result() for f in futures]
        wall = time.perf_counter() - start
        after, workers_after = threads(), [process(p) for p in pids]
    n = N * rounds
    print(f"{mode}: {n / wall:,.0f} tasks/s, {wall / n * 1e6:.1f} µs of wall time per task")
    by_name: dict[str, float] = {}
    for key, cpu in after.items():
        by_name[key[1]] = by_name.get(key[1], 0.0) + cpu - before.get(key, 0.0)
    for name, cpu in by_name.items():
        if cpu:
            print(f"  {name:24s} {cpu / n * 1e6:6.1f} µs/task")
    for pid, a, b in zip(pids, workers_before, workers_after, strict=True):
        print(f"  worker {pid:<17d} {(b - a) / n * 1e6:6.1f} µs/task")


if __name__ == "__main__":
    main()
