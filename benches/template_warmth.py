"""What a fresh worker costs when the caller has imported pandas and its
tasks are ``__main__`` functions, as users write them: each figure from a
fresh process, runs interleaved, medians printed.

    .venv/bin/python benches/template_warmth.py [--runs 5] [--files 48]

Run it with another checkout's interpreter (``/work/main/.venv/bin/python
benches/template_warmth.py``) for a before/after pair taken the same way.

  first_pool_ms     Pool(2) created -> first result, first pool of the process
  later_pool_ms     the same for a pool created after the first one closed
                    (and, where there is one, after its template's warm-up)
  fresh_task_extra_ms  a pandas task on a worker recycled after every task,
                    minus the same task on a warm worker
  recycle_s         60 small pandas tasks, max_tasks_per_worker=1, vs
                    multiprocessing.Pool(maxtasksperchild=1) (fork)
  file_job_s        the seed-000 file job in a fresh process (pool start
                    included) vs ProcessPoolExecutor (fork)
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r'''
import sys, time
import pandas as pd
import ironpool

def f(x):
    return x + 1

def pandas_task(x):
    return int(pd.DataFrame({"k": [x % 3] * 50, "v": range(50)}).groupby("k")["v"].sum().iloc[0])

def wait_warm(pool):
    if hasattr(pool, "template_info"):
        pool.template_info(timeout=120)

def per_task(pool, n):
    t = time.perf_counter()
    for i in range(n):
        pool.submit(pandas_task, i).result()
    return (time.perf_counter() - t) / n

if __name__ == "__main__":
    what = sys.argv[1]
    if what == "pools":
        t = time.perf_counter()
        with ironpool.Pool(2) as p:
            p.submit(f, 1).result()
            first = time.perf_counter() - t
            wait_warm(p)
        t = time.perf_counter()
        with ironpool.Pool(2) as p:
            p.submit(f, 1).result()
            later = time.perf_counter() - t
        with ironpool.Pool(1) as p:
            wait_warm(p)
            per_task(p, 3)
            warm = per_task(p, 20)
        with ironpool.Pool(1, max_tasks_per_worker=1) as p:
            per_task(p, 3)
            fresh = per_task(p, 20)
        print(f"first_pool_ms={first * 1e3:.1f} later_pool_ms={later * 1e3:.1f} "
              f"fresh_task_extra_ms={(fresh - warm) * 1e3:.1f}")
    elif what == "recycle":
        import multiprocessing as mp
        with ironpool.Pool(2) as p:  # a template that holds pandas, as in any later pool
            wait_warm(p)
        t = time.perf_counter()
        with ironpool.Pool(2, max_tasks_per_worker=1) as p:
            list(p.map(pandas_task, range(60), chunksize=1))
        ours = time.perf_counter() - t
        t = time.perf_counter()
        with mp.get_context("fork").Pool(2, maxtasksperchild=1) as p:
            p.map(pandas_task, range(60), chunksize=1)
        theirs = time.perf_counter() - t
        print(f"recycle_s={ours:.3f} recycle_mp_s={theirs:.3f}")
    elif what in ("file_ironpool", "file_ironpool_preload", "file_ppe"):
        from ironpool.demo import job as csvjob
        from concurrent.futures import ProcessPoolExecutor
        paths = sorted(os.path.join(sys.argv[2], n) for n in os.listdir(sys.argv[2]))
        t = time.perf_counter()
        if what == "file_ppe":
            pool = ProcessPoolExecutor(2)
        else:
            pool = ironpool.Pool(2, preload=("pandas",) if what.endswith("preload") else ())
        with pool:
            csvjob.combine(list(pool.map(csvjob.process_file, paths)))
        print(f"{what}_s={time.perf_counter() - t:.3f}")
'''


def child(*args: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", "import os\n" + CHILD, *args], capture_output=True, text=True,
                         check=True).stdout.split()
    return {k: float(v) for k, v in (item.split("=") for item in out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--files", type=int, default=48)
    args = ap.parse_args()
    from ironpool.demo import job as csvjob

    figures: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="ironpool-warmth-") as tmp:
        csvjob.make_files(tmp, args.files, 100_000)
        for _ in range(args.runs):
            for what in ("pools", "recycle", "file_ironpool", "file_ironpool_preload", "file_ppe"):
                for k, v in child(what, tmp).items():
                    figures.setdefault(k, []).append(v)
    print(f"{sys.executable}: medians of {args.runs} fresh processes, load average {os.getloadavg()[0]:.1f}")
    for k, v in figures.items():
        print(f"  {k:28} {statistics.median(v):9.3f}   ({' '.join(f'{x:.3f}' for x in v)})")


if __name__ == "__main__":
    main()
