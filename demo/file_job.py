"""The main demo (``make demo``): seed 000's per-file pandas job, three ways.

48 CSV files of 100,000 rows are generated into a temporary directory. For each
file a worker reads it with pandas, aggregates it by key and returns both the
small summary and the full DataFrame; the parent concatenates the results.
The same job runs serially, with ``concurrent.futures.ProcessPoolExecutor`` and
with ``ironpool.Pool``; the three results must be identical (exit status 1 if
not). Each timing includes creating and shutting down the pool; both pools use
their default ``map`` chunking; the order of the three is rotated every round.

A second, short part shows the zero-copy data plane: one large numpy array
passed to 8 tasks, with ProcessPoolExecutor (pickled through a pipe for
every task) and with ironpool, the array made inside
``ironpool.shared_memory()`` (no task copies it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import csvjob
import pandas as pd  # the parent concatenates; forked stdlib workers inherit it


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_serial(paths, workers):
    return csvjob.combine([csvjob.process_file(p) for p in paths])


def run_stdlib(paths, workers):
    with ProcessPoolExecutor(max_workers=workers) as ex:
        return csvjob.combine(list(ex.map(csvjob.process_file, paths)))


def run_ironpool(paths, workers):
    import ironpool

    with ironpool.Pool(workers, preload=("pandas",)) as pool:
        return csvjob.combine(list(pool.map(csvjob.process_file, paths)))


MODES = [
    ("serial (one process)", run_serial),
    ("concurrent.futures.ProcessPoolExecutor", run_stdlib),
    ("ironpool.Pool", run_ironpool),
]


def array_sum(a) -> float:
    return float(a.sum())


def big_array_part(mib: int, workers: int) -> list[str]:
    """One ``mib`` MiB array summed by 8 tasks: stdlib vs ironpool. Returns problems."""
    import ironpool
    import numpy as np

    n = mib * 2**20 // 8
    plain = np.random.default_rng(1).random(n)
    with ironpool.shared_memory():
        shared = plain.copy()  # the same values, born in shared memory
    expected = float(plain.sum())
    print()
    print(f"big input: one {mib} MiB float64 array passed to each of 8 tasks that sum it "
          "(timed once the pools are up)")
    rows = []
    with ProcessPoolExecutor(max_workers=workers) as ex:
        list(ex.map(array_sum, [np.zeros(1)] * workers))
        t0 = time.perf_counter()
        got = list(ex.map(array_sum, [plain] * 8))
        rows.append(("concurrent.futures.ProcessPoolExecutor", time.perf_counter() - t0, got))
    with ironpool.Pool(workers, preload=("numpy",)) as pool:
        list(pool.map(array_sum, [np.zeros(1)] * workers))
        t0 = time.perf_counter()
        got = list(pool.map(array_sum, [plain] * 8))
        rows.append(("ironpool.Pool, the same array", time.perf_counter() - t0, got))
        t0 = time.perf_counter()
        got = list(pool.map(array_sum, [shared] * 8))
        rows.append(("ironpool.Pool + ironpool.shared_memory()", time.perf_counter() - t0, got))
    base = rows[0][1]
    problems = []
    for name, secs, got in rows:
        print(f"  {name:40} {secs:7.2f}s  {base / secs:8.1f}x")
        if got != [expected] * 8:
            problems.append(f"big input: {name} summed wrong")
    return problems


def same(a, b) -> str | None:
    """None if the two (summary, full) results are identical, else why not."""
    for name, x, y in (("summary", a[0], b[0]), ("full frame", a[1], b[1])):
        if x.equals(y) and list(x.columns) == list(y.columns) and x.index.equals(y.index):
            continue  # exact: same dtypes, values, labels
        try:
            pd.testing.assert_frame_equal(x, y, check_exact=True)
        except AssertionError as exc:
            return f"{name} differs: {str(exc).splitlines()[0]}"
        return f"{name} differs"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=48)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=max(2, min(cpu_count(), 8)))
    ap.add_argument("--array-mib", type=int, default=256, help="size of the big-input array (0 skips that part)")
    args = ap.parse_args()

    t_total = time.perf_counter()
    times: dict[str, list[float]] = {name: [] for name, _ in MODES}
    reference = None
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ironpool-demo-") as tmp:
        t0 = time.perf_counter()
        paths, nbytes = csvjob.make_files(tmp, args.files, args.rows)
        t_gen = time.perf_counter() - t0
        print("ironpool demo: per-file pandas job (seed 000)")
        print(f"  {args.files} CSV files x {args.rows:,} rows = {args.files * args.rows:,} rows, "
              f"{nbytes / 1e6:.1f} MB on disk (generated in {t_gen:.1f} s)")
        print("  per file, in a worker: read_csv -> groupby(key): counts, sums, means, max, min")
        print("    -> returns (summary of 50 rows, full DataFrame); parent: pd.concat of both")
        print(f"  {args.workers} workers per pool; median of {args.runs} runs, each including pool start-up "
              "and shutdown", flush=True)
        for r in range(args.runs):
            order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
            for name, fn in order:
                t0 = time.perf_counter()
                result = fn(paths, args.workers)
                times[name].append(time.perf_counter() - t0)
                if reference is None:
                    reference = (name, result)
                else:
                    why = same(reference[1], result)
                    if why is not None:
                        problems.append(f"{name} vs {reference[0]} (run {r + 1}): {why}")
                del result
    summary, full = reference[1]
    print(f"  result: summary {summary.shape[0]:,} x {summary.shape[1]}, full frame {full.shape[0]:,} x "
          f"{full.shape[1]} ({full.memory_usage(deep=True).sum() / 1e6:.0f} MB in memory)")
    print()
    med = {name: statistics.median(v) for name, v in times.items()}
    serial = med[MODES[0][0]]
    print(f"  {'':40} {'median':>8}  {'vs serial':>9}   runs")
    for name, _ in MODES:
        runs = " ".join(f"{t:.2f}" for t in times[name])
        print(f"  {name:40} {med[name]:7.2f}s  {serial / med[name]:8.2f}x   {runs}")
    ratio = med[MODES[1][0]] / med[MODES[2][0]]
    print()
    print(f"  ironpool vs ProcessPoolExecutor: {ratio:.2f}x "
          f"({'faster' if ratio >= 1 else 'slower'}; ProcessPoolExecutor time / ironpool time)")
    if problems:
        print("  results identical: NO")
        for p in problems:
            print(f"    {p}")
    else:
        print(f"  results identical across the three ({args.runs} runs each): yes")
    if args.array_mib > 0:
        big_problems = big_array_part(args.array_mib, args.workers)
        for p in big_problems:
            print(f"  {p}")
        problems += big_problems
    print(f"  total demo time {time.perf_counter() - t_total:.1f} s")
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1) * 0.75:
        print(f"  note: load average {load:.1f} on {os.cpu_count()} CPUs: other processes competed for the CPUs,")
        print("        so these timings are noisy; run again on a quiet machine to compare")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
