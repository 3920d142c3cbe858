"""The demo's runner (see ``ironpool.demo``): generates the files, runs each
way in a fresh process, and prints the table."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from . import __doc__ as ABOUT

WAYS = {
    "loop": "plain loop, one process",
    "ppe": "ProcessPoolExecutor, DataFrames",
    "records": 'ProcessPoolExecutor, to_dict("records")',
    "ironpool": "ironpool.Pool, DataFrames",
}


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# In the child: one way, timed -------------------------------------------------


def run_one(way: str, directory: str, workers: int, progress: bool) -> dict[str, Any]:
    import pandas as pd  # noqa: F401 - imported before the pool, as scripts do

    from . import job

    paths = sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".csv"))
    started = time.perf_counter()
    if way == "loop":
        result = job.combine([job.process_file(p) for p in paths])
    elif way in ("ppe", "records"):
        from concurrent.futures import ProcessPoolExecutor

        fn = job.process_file if way == "ppe" else job.process_file_records
        combine = job.combine if way == "ppe" else job.combine_records
        with ProcessPoolExecutor(workers) as ex:
            result = combine(list(ex.map(fn, paths)))
    elif way == "ironpool":
        import ironpool

        with ironpool.Pool(workers) as pool:
            result = job.combine(list(pool.map(job.process_file, paths, progress=progress or None)))
    else:
        raise ValueError(f"unknown way {way!r}")
    seconds = time.perf_counter() - started
    summary, full = result
    return {
        "seconds": seconds,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "values": _digest(summary, full, dtypes=False),
        "exact": _digest(summary, full, dtypes=True),
        "dtypes": {c: str(t) for c, t in full.dtypes.items()},
        "rows": len(full),
    }


def _digest(summary: Any, full: Any, dtypes: bool) -> str:
    """A digest of both frames: of their values alone, or with their dtypes."""
    import pandas as pd

    h = hashlib.blake2b(digest_size=16)
    for frame in (summary, full):
        if dtypes:
            h.update(repr(list(frame.dtypes.items())).encode())
            h.update(pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes())
        else:
            for name in frame.columns:
                column = frame[name]
                if column.dtype.kind == "M":  # the same instants whatever the unit
                    column = column.astype("datetime64[ns]")
                elif column.dtype.kind not in "biuf":
                    column = column.astype(str)
                h.update(name.encode())
                h.update(pd.util.hash_pandas_object(column, index=False).to_numpy().tobytes())
    return h.hexdigest()


# In the caller: the whole demo -----------------------------------------------


def _child(way: str, directory: str, workers: int, progress: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "ironpool", "demo", "--one", way, "--dir", directory, "--workers", str(workers)]
    if progress:
        cmd.append("--progress")
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {WAYS[way]!r} run failed (exit status {done.returncode}); its errors are above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ironpool demo", description=(ABOUT or "").splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a quick size (for CI): 6 files x 20,000 rows, one run")
    ap.add_argument("--files", type=int, default=24)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=max(2, min(cpu_count(), 8)))
    ap.add_argument("--one", choices=sorted(WAYS), help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--progress", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.dir, args.workers, args.progress)))
        return 0
    if args.small:
        args.files, args.rows, args.runs = 6, 20_000, 1
    try:
        import pandas  # noqa: F401
        import pyarrow  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as exc:
        print(f"the demo needs pandas, pyarrow and tqdm ({exc}): pip install 'ironpool[demo]'", file=sys.stderr)
        return 2
    from . import job

    with tempfile.TemporaryDirectory(prefix="ironpool-demo-") as tmp:
        started = time.perf_counter()
        _, nbytes = job.make_files(tmp, args.files, args.rows)
        print("ironpool demo: seed 000's per-file pandas job")
        print(f"  {args.files} CSV files x {args.rows:,} rows ({nbytes / 1e6:.0f} MB, made in "
              f"{time.perf_counter() - started:.1f} s); per file: read_csv, per-key features (7-day rolling mean,")
        print("  z-score), groupby(key) -> (summary, full frame); the caller concatenates both.")
        print(f"  {args.workers} workers; {cpu_count()} CPUs; each way in a fresh process, median of {args.runs} "
              "run(s) (the to_dict way: one), pool start-up and shutdown included.", flush=True)
        results: dict[str, list[dict]] = {w: [] for w in WAYS}
        ways = list(WAYS)
        for run in range(args.runs):
            for way in ways[run % len(ways):] + ways[: run % len(ways)]:  # rotated: no way always goes first
                if way == "records" and run > 0:
                    continue  # once is enough to see it: it is an order of magnitude slower
                results[way].append(_child(way, tmp, args.workers, progress=way == "ironpool" and run == 0))
    return _report(results)


def _report(results: dict[str, list[dict]]) -> int:
    base = results["loop"][0]
    seconds = {w: statistics.median(r["seconds"] for r in runs) for w, runs in results.items()}
    print()
    print(f"  {'':40} {'seconds':>8} {'vs loop':>8} {'peak MB':>8}   result")
    problems = []
    for way, runs in results.items():
        same = {r["exact"] for r in runs} == {base["exact"]}
        if same:
            verdict = "identical to the loop's"
        elif {r["values"] for r in runs} == {base["values"]}:
            changed = {c: t for c, t in runs[0]["dtypes"].items() if base["dtypes"].get(c) != t}
            verdict = "same values, other dtypes: " + ", ".join(
                f"{c} {base['dtypes'].get(c)} -> {t}" for c, t in changed.items()
            )
        else:
            verdict = "DIFFERENT values"
            problems.append(way)
        peak = max(r["peak_mb"] for r in runs)
        print(f"  {WAYS[way]:40} {seconds[way]:8.2f} {seconds['loop'] / seconds[way]:7.2f}x {peak:8.0f}   {verdict}")
    print("  (seconds: median; peak MB: the calling process's peak resident memory)")
    print()
    best_pool = min(("ppe", "records", "ironpool"), key=seconds.__getitem__)
    ratio = seconds["ppe"] / seconds["ironpool"]
    print(f"  ironpool vs ProcessPoolExecutor: {ratio:.2f}x; vs the to_dict workaround: "
          f"{seconds['records'] / seconds['ironpool']:.2f}x (their seconds / ironpool's)")
    if seconds["loop"] <= seconds[best_pool]:
        print(f"  Parallelism does not pay here: with {cpu_count()} CPUs, the loop's {seconds['loop']:.2f} s beats "
              "every pool. Each file's work is short next to what moving its full frame back and concatenating "
              "costs; on more cores, heavier files, or when workers return only summaries, it does.")
    load = os.getloadavg()[0]
    if load > cpu_count() * 0.75:
        print(f"  note: load average {load:.1f} on {cpu_count()} CPUs: other processes competed, timings are noisy")
    if problems:
        print(f"  results differ for: {', '.join(problems)}")
        return 1
    return 0
