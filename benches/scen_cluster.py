"""Scenarios for the cluster backends, each next to the engine's own API on
the same cluster: ``dask_roundtrip``, ``dask_tiny``, ``dask_big_input`` and
the same for Ray. The tasks are functions defined in ``__main__`` (as in a
user's script: pickled by value), and every case starts its own engine with
2 worker slots (Dask: ``LocalCluster(n_workers=2, threads_per_worker=1)``;
Ray: ``ray.init(num_cpus=2)``)."""

from __future__ import annotations

import sys
import time

from common import WORKERS, Column, Ctx, Scenario, median, percentile, repeat

#: Defined in the child's ``__main__``, as a user's script defines its tasks.
_MAIN_SOURCE = '''
def bench_identity(x):
    return x

def bench_array_sum(a):
    return float(a.sum())
'''


def _main_functions():
    main = sys.modules["__main__"]
    if not hasattr(main, "bench_identity"):
        exec(_MAIN_SOURCE, main.__dict__)
    return main.bench_identity, main.bench_array_sum


class _Engine:
    """One engine started for one case, the ironpool pool over it, and the
    engine's own calls for the same work."""

    def __init__(self, engine: str, through_ironpool: bool) -> None:
        import ironpool

        self.engine = engine
        if engine == "dask":
            import distributed

            self.cluster = distributed.LocalCluster(
                n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=":0"
            )
            self.client = distributed.Client(self.cluster)
            self.pool = ironpool.Pool(backend="dask", address=self.client) if through_ironpool else None
        else:
            import ray

            ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
            self.pool = ironpool.Pool(backend="ray") if through_ironpool else None
            self.remote: dict = {}

    def _ray_remote(self, fn):
        import ray

        if fn not in self.remote:
            self.remote[fn] = ray.remote(num_cpus=1, max_retries=0)(fn)
        return self.remote[fn]

    def submit(self, fn, arg):
        """One call; returns something with ``result()``."""
        if self.pool is not None:
            return self.pool.submit(fn, arg)
        if self.engine == "dask":
            return self.client.submit(fn, arg, pure=False)
        return self._ray_remote(fn).remote(arg).future()

    def many(self, fn, args: list, how: str) -> list:
        if self.pool is not None:
            if how == "map":
                return list(self.pool.map(fn, args))
            return [f.result() for f in [self.pool.submit(fn, a) for a in args]]
        if self.engine == "dask":
            return self.client.gather(self.client.map(fn, args, pure=False))
        import ray

        return ray.get([self._ray_remote(fn).remote(a) for a in args])

    def store(self, value):
        """What the engine's own users pass for a large argument used many times."""
        if self.pool is not None:
            return value  # ironpool puts it in the store itself, once
        if self.engine == "dask":
            return self.client.scatter([value], hash=False)[0]
        import ray

        return ray.put(value)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        if self.engine == "dask":
            self.client.close()
            self.cluster.close()
        else:
            import ray

            ray.shutdown()


def _split(case: str) -> tuple[str, bool, str]:
    """(engine, through ironpool, how) for a case name."""
    engine = "dask" if "dask" in case else "ray"
    return engine, case.startswith("ironpool"), "submit" if case.endswith("_submit") else "map"


def roundtrip(case: str, ctx: Ctx) -> dict:
    engine, through, _ = _split(case)
    identity, _ = _main_functions()
    n = 200 if ctx.quick else 1000
    e = _Engine(engine, through)
    try:
        for i in range(20):
            assert e.submit(identity, i).result() == i
        lat = []
        for i in range(n):
            t0 = time.perf_counter()
            assert e.submit(identity, i).result() == i
            lat.append(time.perf_counter() - t0)
    finally:
        e.close()
    return {"median_us": median(lat) * 1e6, "p99_us": percentile(lat, 99) * 1e6, "n": n}


def tiny(case: str, ctx: Ctx) -> dict:
    engine, through, how = _split(case)
    identity, _ = _main_functions()
    n = 1000 if ctx.quick else 5000
    e = _Engine(engine, through)
    try:
        e.many(identity, list(range(50)), how)
        times, values = repeat(lambda: e.many(identity, list(range(n)), how), runs=3, budget=60)
        assert values == list(range(n))
    finally:
        e.close()
    return {"seconds": median(times), "per_task_us": median(times) / n * 1e6, "n": n}


def big_input(case: str, ctx: Ctx) -> dict:
    import numpy as np

    engine, through, _ = _split(case)
    _, array_sum = _main_functions()
    mib = 64 if ctx.quick else 256
    n_tasks = 8
    e = _Engine(engine, through)
    try:
        e.many(array_sum, [np.ones(4)] * (2 * WORKERS), "submit")  # workers up, numpy imported
        arr = np.random.default_rng(0).random(mib * 2**20 // 8)
        expected = float(arr.sum())

        def run() -> list:
            stored = e.store(arr)
            return [f.result() for f in [e.submit(array_sum, stored) for _ in range(n_tasks)]]

        times, values = repeat(run, runs=3, budget=90)
        # Equal up to rounding: numpy's pairwise sum depends on the buffer's alignment.
        assert all(abs(v - expected) <= 1e-9 * abs(expected) for v in values), (values, expected)
    finally:
        e.close()
    return {"seconds": median(times), "mib": mib, "tasks": n_tasks}


def _scenarios(engine: str, direct: str) -> list[Scenario]:
    ours = f"ironpool_{engine}"
    return [
        Scenario(
            name=f"{engine}_roundtrip",
            title=f"{engine}_roundtrip: one task at a time, submit(identity, i).result(), after 20 warm-up calls",
            run=roundtrip,
            cases=lambda quick: [ours, direct],
            columns=[Column("median µs", "median_us", "{:.0f}"), Column("p99 µs", "p99_us", "{:.0f}"),
                     Column("calls", "n", "int")],
            ratio_key="median_us",
            timeout=lambda quick: 180.0,
        ),
        Scenario(
            name=f"{engine}_tiny",
            title=f"{engine}_tiny: identity over n items: pool.map, or one submit per item, or the engine's own",
            run=tiny,
            cases=lambda quick: [ours, f"{ours}_submit", direct],
            columns=[Column("seconds", "seconds"), Column("µs per item", "per_task_us", "{:.0f}"),
                     Column("items", "n", "int")],
            ratio_key="seconds",
            timeout=lambda quick: 240.0,
        ),
        Scenario(
            name=f"{engine}_big_input",
            title=f"{engine}_big_input: 8 tasks summing one large float64 array (the engine's own: stored once "
                  "by hand)",
            run=big_input,
            cases=lambda quick: [ours, direct],
            columns=[Column("seconds", "seconds"), Column("MiB", "mib", "int"), Column("tasks", "tasks", "int")],
            ratio_key="seconds",
            timeout=lambda quick: 240.0,
        ),
    ]


SCENARIOS = _scenarios("dask", "dask_client") + _scenarios("ray", "ray_remote")
