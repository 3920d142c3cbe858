"""Items per second of every way to run many tiny tasks on one pool: each
``map`` variant (and ``starmap``) at ``chunksize=1``, ``progress=``, ``submit`` with
``result()``, ``as_completed`` and ``wait``, for a ``__main__`` function
with pandas imported by the caller (median of 5 rounds of 20,000 items).

    .venv/bin/python -W ignore benches/map_variants.py                 # every variant
    .venv/bin/python -W ignore benches/map_variants.py map imap_unordered
"""

from __future__ import annotations

import statistics
import sys
import time
from concurrent.futures import as_completed, wait

import ironpool
import pandas  # noqa: F401  (the caller's real imports)

N = 20_000


def square(x: int) -> int:
    return x * x


def total(row: dict) -> float:
    return row["qty"] * row["price"]


def priced(row: dict) -> dict:
    return {"id": row["id"], "total": row["qty"] * row["price"]}


PAIRS = [(i, 7) for i in range(N)]
ROWS = [{"id": i, "qty": i % 7, "price": 2.5} for i in range(N)]


def _quiet(done: int, total: int | None) -> None:
    pass


VARIANTS = {
    "map": lambda pool: list(pool.map(square, range(N), chunksize=1)),
    "imap_unordered": lambda pool: list(pool.imap_unordered(square, range(N), chunksize=1)),
    "map_progress": lambda pool: list(pool.map(square, range(N), chunksize=1, progress=_quiet)),
    "map_dicts": lambda pool: list(pool.map(len, [{"a": i} for i in range(N)], chunksize=1)),
    "imap_unordered_dicts": lambda pool: list(pool.imap_unordered(len, [{"a": i} for i in range(N)], chunksize=1)),
    "map_rows": lambda pool: list(pool.map(total, ROWS, chunksize=1)),
    "map_rows_to_dicts": lambda pool: list(pool.map(priced, ROWS, chunksize=1)),
    "imap_unordered_rows": lambda pool: list(pool.imap_unordered(total, ROWS, chunksize=1)),
    "submit_rows": lambda pool: [f.result() for f in [pool.submit(total, row) for row in ROWS]],
    "starmap": lambda pool: list(pool.starmap(divmod, PAIRS, chunksize=1)),
    "map_default": lambda pool: list(pool.map(square, range(N))),
    "submit": lambda pool: [f.result() for f in [pool.submit(square, i) for i in range(N)]],
    "as_completed": lambda pool: [f.result() for f in as_completed([pool.submit(square, i) for i in range(N)])],
    "wait": lambda pool: wait([pool.submit(square, i) for i in range(N)]).done,
}


def main() -> None:
    names = sys.argv[1:] or list(VARIANTS)
    with ironpool.Pool(2) as pool:
        list(pool.map(square, range(2000), chunksize=1))
        pool.template_info(timeout=60)  # the background warm-up would take CPU from the rounds
        rates: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(5):
            for name in names:
                start = time.perf_counter()
                assert len(VARIANTS[name](pool)) == N
                rates[name].append(N / (time.perf_counter() - start))
    for name in names:
        runs = ", ".join(f"{r / 1000:.0f}" for r in rates[name])
        print(f"{name:22s} {statistics.median(rates[name]) / 1000:6.0f}k items/s  ({runs})")


if __name__ == "__main__":
    main()
