"""Time a burst of tiny tasks spends in Python's cyclic collector, by
generation, with pandas imported by the caller (its objects are what a
full collection walks):

    .venv/bin/python -W ignore benches/collector_cost.py

Every container a task in flight holds survives into the old generation
and brings the next full collection closer (docs/decisions.md, session 22).
"""

from __future__ import annotations

import gc
import time

import ironpool
import pandas  # noqa: F401  (the caller's real imports)

N, ROUNDS = 20_000, 5


def square(x: int) -> int:
    return x * x


class Collections:
    """Counts and times collections through ``gc.callbacks``."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._began = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.count[info["generation"]] += 1
            self.seconds[info["generation"]] += time.perf_counter() - self._began


def measure(label: str, job) -> None:
    seen = Collections()
    gc.callbacks.append(seen)
    began = time.perf_counter()
    try:
        for _ in range(ROUNDS):
            job()
    finally:
        gc.callbacks.remove(seen)
    total = time.perf_counter() - began
    by_generation = enumerate(zip(seen.count, seen.seconds, strict=True))
    spent = ", ".join(f"gen{g}: {n} in {s:.3f} s" for g, (n, s) in by_generation)
    print(f"{label}: {ROUNDS * N:,} tasks in {total:.2f} s, {sum(seen.seconds):.3f} s collecting ({spent})")


def main() -> None:
    print(f"objects the collector tracks at start: {len(gc.get_objects()):,}")
    with ironpool.Pool(2) as pool:
        list(pool.map(square, range(2000), chunksize=1))

        def burst() -> None:
            futures = [pool.submit(square, i) for i in range(N)]
            for f in futures:
                f.result()

        measure("submit burst", burst)
        measure("map(chunksize=1)", lambda: list(pool.map(square, range(N), chunksize=1)))


if __name__ == "__main__":
    main()
