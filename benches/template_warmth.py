"""A __main__ function on a first pool, a second pool and a worker recycled
after every task, with the template importing cloudpickle ("on") or not
("off"), interleaved in one session. Run: .venv/bin/python benches/template_warmth.py"""
import statistics
import subprocess
import sys

CHILD = r'''
import sys, time
import ironpool, ironpool._zygote as z
if sys.argv[1] == "off":
    z._main_defines_functions = lambda: False
def f(x):
    return x + 1
if __name__ == "__main__":
    t1 = time.perf_counter()
    with ironpool.Pool(2) as p:
        p.submit(f, 1).result()
    t2 = time.perf_counter()
    with ironpool.Pool(2) as p:
        p.submit(f, 1).result()
    t3 = time.perf_counter()
    with ironpool.Pool(2, max_tasks_per_worker=1) as p:
        list(p.map(f, range(20), chunksize=1))
    t4 = time.perf_counter()
    print(f"{(t2-t1)*1e3:.1f} {(t3-t2)*1e3:.1f} {(t4-t3)*1e3/20:.2f}")
'''
res = {"off": [], "on": []}
for _ in range(7):
    for mode in ("off", "on"):
        cmd = [sys.executable, "-c", CHILD, mode]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
        res[mode].append([float(x) for x in out])
names = ["first_pool_ms", "second_pool_ms", "recycle_ms_per_task"]
for mode, rows in res.items():
    print(mode, " ".join(f"{n}={statistics.median(r[i] for r in rows):.1f}" for i, n in enumerate(names)))
