"""The per-file job of the demo (and of ``benches`` scenario ``file_job``).

Seed 000's scenario: each worker reads one CSV with pandas, builds per-key
features and aggregates them by ``key``, and returns both the small summary
and the full DataFrame; the parent concatenates everything. ``process_file_records`` is the article's
workaround for ``BufferError: memoryview has 1 exported buffer``: return
``df.to_dict(orient="records")`` and rebuild the frame in the parent. The
functions live in an importable module so that every pool (stdlib, ironpool,
joblib, ...) can pickle them by reference.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

N_KEYS = 50


def make_files(directory: str, n_files: int, rows: int, seed: int = 0) -> tuple[list[str], int]:
    """Writes ``n_files`` CSVs of ``rows`` rows; returns their paths and total size in bytes.

    Columns: key (string, 50 distinct), price/a/b (float), qty (int), day (date).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pcsv

    keys = np.array([f"key_{i:02d}" for i in range(N_KEYS)])
    start = np.datetime64("2024-01-01")

    def one(i: int) -> str:
        rng = np.random.default_rng(seed * 100_003 + i)
        table = pa.table({
            "key": keys[rng.integers(0, N_KEYS, rows)],
            "price": np.round(rng.random(rows) * 100.0, 2),
            "qty": rng.integers(1, 1000, rows),
            "a": np.round(rng.normal(size=rows), 4),
            "b": np.round(rng.exponential(size=rows), 4),
            "day": (start + rng.integers(0, 366, rows)).astype("datetime64[D]"),
        })
        path = os.path.join(directory, f"part_{i:03d}.csv")
        pcsv.write_csv(table, path, pcsv.WriteOptions(quoting_style="none"))
        return path

    # Threads: pyarrow's writer releases the GIL. Not part of what is measured.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as ex:
        paths = list(ex.map(one, range(n_files)))
    return paths, sum(os.path.getsize(p) for p in paths)


def process_file(path: str):
    """Reads one CSV and builds per-key features (amount, a 7-day rolling
    mean per key, a per-key z-score); returns ``(summary, full_frame)``."""
    import pandas as pd

    df = pd.read_csv(path, parse_dates=["day"])
    df["amount"] = df["price"] * df["qty"]
    df = df.sort_values(["key", "day"], kind="stable", ignore_index=True)
    by_key = df.groupby("key", sort=False)  # in row order: the frame is sorted by key
    df["amount_7d"] = by_key.rolling("7D", on="day")["amount"].mean().to_numpy()
    df["a_z"] = (df["a"] - by_key["a"].transform("mean")) / by_key["a"].transform("std")
    summary = df.groupby("key", sort=True).agg(
        rows=("qty", "size"),
        qty_sum=("qty", "sum"),
        amount_sum=("amount", "sum"),
        amount_p90=("amount", lambda s: s.quantile(0.9)),
        amount_7d_max=("amount_7d", "max"),
        price_mean=("price", "mean"),
        a_z_max=("a_z", "max"),
        b_max=("b", "max"),
        first_day=("day", "min"),
    )
    summary.insert(0, "file", os.path.basename(path))
    return summary, df


def process_file_records(path: str):
    """The workaround: the same work, the full frame returned as a list of dicts."""
    summary, df = process_file(path)
    return summary.to_dict(orient="index"), df.to_dict(orient="records")


def combine_records(results):
    """The workaround's parent side: DataFrames rebuilt from the dicts."""
    import pandas as pd

    summaries = pd.concat([pd.DataFrame.from_dict(s, orient="index") for s, _ in results])
    summaries.index.name = "key"
    records: list = []
    for _, rows in results:
        records.extend(rows)
    return summaries, pd.DataFrame(records)


def combine(results):
    """The parent's side: concatenates the summaries and the full frames."""
    import pandas as pd

    summaries = pd.concat([s for s, _ in results])
    full = pd.concat([f for _, f in results], ignore_index=True)
    return summaries, full


def warm(seconds: float = 0.2) -> int:
    """Imports pandas in a worker (pools that spawn workers pay it here, outside the timed part)."""
    import time

    import pandas  # noqa: F401

    time.sleep(seconds)
    return os.getpid()
