"""What ``progress=`` costs on a 200k tiny-task map (the goal: < 2%).

Interleaves the same map without and with a tqdm bar (drawn to /dev/null)
and with a callback, on one started pool, and prints the medians and
ratios. The task is defined here, in ``__main__``, as users write it::

    .venv/bin/python benches/progress_cost.py [--items 200000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import ironpool
from tqdm import tqdm


def square(x):
    return x * x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    times: dict[str, list[float]] = {"none": [], "tqdm": [], "callback": []}
    with ironpool.Pool(2) as pool, open(os.devnull, "w") as sink:
        list(pool.map(square, range(args.items)))  # chunk sizes measured, workers warm
        for _ in range(args.rounds):
            for kind in times:
                progress = None
                if kind == "tqdm":
                    progress = tqdm(file=sink)
                elif kind == "callback":
                    progress = lambda done, total: None  # noqa: E731
                started = time.perf_counter()
                n = sum(1 for _ in pool.map(square, range(args.items), progress=progress))
                times[kind].append(time.perf_counter() - started)
                assert n == args.items
    base = statistics.median(times["none"])
    print(f"{args.items:,} items, median of {args.rounds} interleaved rounds, load {os.getloadavg()[0]:.1f}")
    for kind, ts in times.items():
        med = statistics.median(ts)
        print(f"  progress={kind:9} {med:.4f} s  {med / base:.3f}x")


if __name__ == "__main__":
    main()
