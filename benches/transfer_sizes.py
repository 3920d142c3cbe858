"""Cost of moving one buffer through ironpool, by size and direction.

    .venv/bin/python benches/transfer_sizes.py

One worker; median of 1,000 round trips per row, after 100 warm-up calls.
Also times writing 1 MB into a fresh memfd against copying 1 MB into memory
already faulted in (the difference is what a pool of reusable segments could
save), and first touch and a full read of 256 MiB made by numpy's allocator
against one made inside ``ironpool.shared_memory()`` (memfd pages). See
docs/benchmarks.md and docs/decisions.md.
"""

from __future__ import annotations

import os
import statistics
import time

import ironpool
import numpy as np


def ident(x):
    return x


def nothing(_x):
    return None


def make(nbytes: int):
    return np.ones(nbytes // 8)


def median_us(pool: ironpool.Pool, fn, arg, n: int = 1000) -> float:
    for _ in range(100):
        pool.submit(fn, arg).result()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        pool.submit(fn, arg).result()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    with ironpool.Pool(1, preload=("numpy",)) as pool:
        print(f"empty task: {median_us(pool, nothing, 1):.0f} us")
        print(f"{'bytes':>10} {'in only us':>11} {'out only us':>12} {'both us':>8}")
        for size in (60_000, 66_000, 1_000_000, 4_000_000):
            a = make(size)
            print(f"{size:>10,} {median_us(pool, nothing, a):>11.0f} {median_us(pool, make, size):>12.0f} "
                  f"{median_us(pool, ident, a):>8.0f}")
    src = make(1_000_000)
    t = time.perf_counter()
    for _ in range(1000):
        fd = os.memfd_create("probe")
        os.ftruncate(fd, src.nbytes)
        os.pwrite(fd, src.data, 0)
        os.close(fd)
    fresh = (time.perf_counter() - t) * 1000
    dst = np.empty_like(src)
    t = time.perf_counter()
    for _ in range(1000):
        dst[:] = src
    warm = (time.perf_counter() - t) * 1000
    print(f"1 MB into a fresh memfd: {fresh:.0f} us; into warm memory: {warm:.0f} us")
    n = 256 * 2**20 // 8
    for label, ctx in (("numpy's allocator", None), ("shared_memory()", ironpool.shared_memory)):
        touch, read = [], []
        for _ in range(3):
            t = time.perf_counter()
            if ctx is None:
                a = np.ones(n)
            else:
                with ctx():
                    a = np.ones(n)
            touch.append(time.perf_counter() - t)
            a.sum()
            t = time.perf_counter()
            a.sum()
            read.append(time.perf_counter() - t)
            del a
        print(f"256 MiB, {label}: first touch {statistics.median(touch) * 1e3:.0f} ms, "
              f"warm sum {statistics.median(read) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
