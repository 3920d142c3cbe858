"""Where the time of sending one big array to many tasks goes.

    .venv/bin/python benches/send_once_costs.py [--mib 256] [--tasks 8]

Prints, for each route (``pool.share()``, the array passed as it is, and
read-only), the caller's time to submit every task, the time until all
results are in, and each task's own time to sum its argument (the first
task on a worker maps the pages in; later ones find them warm). Also the
digest that proves a re-sent array unchanged, and a local sum for scale.
Medians of --runs runs; a noisy 2-core machine, so compare within a run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import ironpool
import numpy as np
from ironpool import _core
from ironpool._serialize import dumps


def timed_sum(a) -> tuple[float, float, int]:
    t = time.perf_counter()
    s = float(a.sum())
    return s, time.perf_counter() - t, os.getpid()


def ms(x: float) -> str:
    return f"{x * 1e3:.0f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    arr = np.random.default_rng(0).random(args.mib * 2**20 // 8)
    frozen = arr.copy()
    frozen.flags.writeable = False
    parts = dumps(arr, 65536)
    digests = []
    for _ in range(7):
        t = time.perf_counter()
        _core.digest(parts)
        digests.append(time.perf_counter() - t)
    t = time.perf_counter()
    arr.sum()
    print(f"{args.mib} MiB array, {args.tasks} tasks, 2 workers; digest {ms(statistics.median(digests))} "
          f"(median of 7), local sum {ms(time.perf_counter() - t)}")
    with ironpool.Pool(2, preload=("numpy",)) as pool:
        list(pool.map(timed_sum, [np.zeros(1)] * 4))
        for route in ("share", "plain", "read-only"):
            share_t, submit_t, total_t, sums = [], [], [], []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                arg = pool.share(arr) if route == "share" else frozen if route == "read-only" else arr
                share_t.append(time.perf_counter() - t0)
                futs = [pool.submit(timed_sum, arg) for _ in range(args.tasks)]
                submit_t.append(time.perf_counter() - t0)
                got = [f.result() for f in futs]
                total_t.append(time.perf_counter() - t0)
                sums.append([g[1] for g in got])
                del arg, futs, got
            per_task = [statistics.median(col) for col in zip(*sums, strict=True)]
            print(f"  {route:9}  share() {ms(statistics.median(share_t)):>7}  all submitted "
                  f"{ms(statistics.median(submit_t)):>7}  all done {ms(statistics.median(total_t)):>7}  "
                  f"task sums {' '.join(f'{x * 1e3:.0f}' for x in per_task)} ms")


if __name__ == "__main__":
    main()
