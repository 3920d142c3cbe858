"""One adapter per library, so that scenarios can say ``pool.submit(fn, x)``
for all of them. Every pool gets ``WORKERS`` (2) workers. Each adapter maps
onto the library's own closest call and says so in ``how``.

Options understood by ``make``: ``task_timeout`` (seconds), ``max_tasks``
(recycle a worker after this many tasks), ``max_memory`` (bytes, ironpool
only), ``shared`` (mpire ``shared_objects``), ``preload`` (ironpool only),
``chunksize`` (used by ``map``).
"""

from __future__ import annotations

import time
from typing import Any

from common import WORKERS

LABELS = {
    "ironpool": "ironpool",
    "ppe": "ProcessPoolExecutor",
    "mp": "multiprocessing.Pool",
    "joblib": "joblib (loky)",
    "ironpool_joblib": "joblib (ironpool backend)",
    "loky": "loky reusable",
    "mpire": "mpire",
    "mpire_shared": "mpire shared_objects",
    "ironpool_share": "ironpool pool.share()",
    "ironpool_shm": "ironpool shared_memory()",
    "ironpool_readonly": "ironpool read-only array",
    "pebble": "pebble",
    "ray": "ray Pool",
    "ironpool_dask": "ironpool dask backend",
    "ironpool_dask_submit": "ironpool dask backend, submit per item",
    "dask_client": "dask client.submit/map",
    "ironpool_ray": "ironpool ray backend",
    "ironpool_ray_submit": "ironpool ray backend, submit per item",
    "ray_remote": "ray.remote",
}

ALL = ["ironpool", "ppe", "mp", "joblib", "loky", "mpire", "pebble", "ray"]


def ray_available() -> str | None:
    """None if ray imports, else why not."""
    try:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            return "ray is not installed (pip install ray)"
        return None
    except Exception as exc:
        return f"ray unusable: {exc}"


def label(case: str) -> str:
    name, _, extra = case.partition(":")
    base = LABELS.get(name, name)
    return f"{base} {extra}" if extra else base


class NotReady(Exception):
    """Waiting for a result ran out of time (the task may still be running)."""


class Handle:
    """A pending result over an object with ``ready()``/``get(timeout)``
    (multiprocessing, mpire, ray) or a ``concurrent.futures.Future``."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.finished_at: float | None = None

    def done(self) -> bool:
        d = self.obj.done() if hasattr(self.obj, "done") else self.obj.ready()
        if d and self.finished_at is None:
            self.finished_at = time.perf_counter()
        return d

    def result(self, timeout: float | None = None) -> Any:
        if timeout is not None:
            deadline = time.perf_counter() + timeout
            while not self.done():
                if time.perf_counter() >= deadline:
                    raise NotReady
                time.sleep(0.001)
        if hasattr(self.obj, "done"):
            return self.obj.result()
        return self.obj.get()


class _Lazy:
    """joblib has no submit: the call runs as a one-item Parallel call when
    its result is asked for."""

    def __init__(self, run) -> None:
        self.run = run

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Any:
        return self.run()


class Peer:
    name = "?"
    how_submit = "submit"
    how_map = "map"
    how_unordered = "as_completed(submit)"

    def submit(self, fn, *args) -> Handle:
        raise NotImplementedError

    def map(self, fn, items, chunksize: int | None = None) -> list:
        raise NotImplementedError

    def close(self, force: bool = False) -> None:
        pass

    def again(self) -> Peer:
        """The pool to use after a failure (loky/joblib: the library's own reuse idiom)."""
        return self

    def pids(self) -> list[int]:
        import os

        from common import tree_pids

        return tree_pids(os.getpid())[1:]

    def batch(self, fn, arglist: list[tuple], deadline: float, timeout: float | None = None) -> list[tuple]:
        """Submits every call, then waits (until ``deadline``, a perf_counter
        time) for outcomes: ("ok", value, t) / ("err", "Type: message", t) /
        ("none", None, None) for calls with no outcome by then."""
        handles = [self.submit_timeout(fn, args, timeout) for args in arglist]
        out: list = [None] * len(handles)
        pending = set(range(len(handles)))
        while pending and time.perf_counter() < deadline:
            for i in list(pending):
                h = handles[i]
                if h.done():
                    pending.discard(i)
                    try:
                        out[i] = ("ok", h.result(), h.finished_at)
                    except BaseException as exc:
                        out[i] = ("err", describe(exc), h.finished_at)
            time.sleep(0.002)
        for i in pending:
            out[i] = ("none", None, None)
        return out

    def submit_timeout(self, fn, args: tuple, timeout: float | None) -> Handle:
        return self.submit(fn, *args)

    def calls(self, fn, arglist: list[tuple]) -> list:
        """``[fn(*a) for a in arglist]``, all submitted at once, results in order."""
        handles = [self.submit(fn, *a) for a in arglist]
        return [h.result() for h in handles]

    def unordered(self, fn, items, chunksize: int | None = None) -> list:
        """``fn`` over ``items``, results as they finish: the library's
        unordered map, or (futures only) ``as_completed`` over a submit per item."""
        from concurrent.futures import as_completed

        futures = [self.submit(fn, x).obj for x in items]
        return [f.result() for f in as_completed(futures)]


def describe(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:80] if msg else ''}"


class Ironpool(Peer):
    name = "ironpool"

    def __init__(self, task_timeout=None, max_tasks=None, max_memory=None, preload=(), **_: Any) -> None:
        import ironpool

        self.pool = ironpool.Pool(WORKERS, task_timeout=task_timeout, max_tasks_per_worker=max_tasks,
                                  max_memory_per_worker=max_memory, preload=preload)

    def submit(self, fn, *args) -> Handle:
        return Handle(self.pool.submit(fn, *args))

    def map(self, fn, items, chunksize=None) -> list:
        return list(self.pool.map(fn, items, chunksize=chunksize))

    how_unordered = "imap_unordered"

    def unordered(self, fn, items, chunksize=None) -> list:
        return list(self.pool.imap_unordered(fn, items, chunksize=chunksize))

    def close(self, force=False) -> None:
        if force:
            self.pool.terminate()
        else:
            self.pool.shutdown(wait=True)


class PPE(Peer):
    name = "ppe"

    def __init__(self, max_tasks=None, **_: Any) -> None:
        from concurrent.futures import ProcessPoolExecutor

        # max_tasks_per_child makes the stdlib use 'spawn' (it refuses 'fork').
        self.pool = ProcessPoolExecutor(WORKERS, max_tasks_per_child=max_tasks)

    def submit(self, fn, *args) -> Handle:
        return Handle(self.pool.submit(fn, *args))

    def map(self, fn, items, chunksize=None) -> list:
        return list(self.pool.map(fn, items, chunksize=chunksize or 1))

    def close(self, force=False) -> None:
        if force:
            procs = list((self.pool._processes or {}).values())
            self.pool.shutdown(wait=False, cancel_futures=True)
            for p in procs:
                p.kill()
        else:
            self.pool.shutdown(wait=True)


class MP(Peer):
    name = "mp"
    how_submit = "apply_async().get()"

    def __init__(self, max_tasks=None, **_: Any) -> None:
        import multiprocessing

        self.pool = multiprocessing.Pool(WORKERS, maxtasksperchild=max_tasks)

    def submit(self, fn, *args) -> Handle:
        return Handle(self.pool.apply_async(fn, args))

    def map(self, fn, items, chunksize=None) -> list:
        return self.pool.map(fn, items, chunksize=chunksize)

    how_unordered = "imap_unordered"

    def unordered(self, fn, items, chunksize=None) -> list:
        return list(self.pool.imap_unordered(fn, items, chunksize=chunksize or 1))

    def close(self, force=False) -> None:
        if force:
            self.pool.terminate()
        else:
            self.pool.close()
        self.pool.join()


class Joblib(Peer):
    name = "joblib"
    how_submit = "Parallel([delayed(f)(x)]) per call"
    how_map = "Parallel()(delayed(f)(x) for x in items)"

    def __init__(self, task_timeout=None, **_: Any) -> None:
        from joblib import Parallel

        self.timeout = task_timeout
        self.par = Parallel(n_jobs=WORKERS, backend="loky", timeout=task_timeout)
        self.par.__enter__()

    def submit(self, fn, *args) -> Handle:
        from joblib import delayed

        return _Lazy(lambda: self.par([delayed(fn)(*args)])[0])

    def map(self, fn, items, chunksize=None) -> list:
        from joblib import delayed

        self.par.batch_size = chunksize or "auto"  # joblib's chunksize
        return self.par(delayed(fn)(x) for x in items)

    def calls(self, fn, arglist: list[tuple]) -> list:
        from joblib import delayed

        return self.par(delayed(fn)(*a) for a in arglist)

    how_unordered = "Parallel(return_as='generator_unordered', batch_size)"

    def unordered(self, fn, items, chunksize=None) -> list:
        from joblib import Parallel, delayed

        par = Parallel(n_jobs=WORKERS, backend="loky", return_as="generator_unordered", batch_size=chunksize or "auto")
        return list(par(delayed(fn)(x) for x in items))

    def batch(self, fn, arglist, deadline, timeout=None) -> list[tuple]:
        """One Parallel call returning a generator: results up to the first
        failure arrive; the call raises there and the rest fail with it."""
        import threading

        from joblib import Parallel, delayed

        out: list = [("none", None, None)] * len(arglist)

        def consume() -> None:
            par = Parallel(n_jobs=WORKERS, backend="loky", timeout=timeout, return_as="generator")
            n = 0
            try:
                for value in par(delayed(fn)(*a) for a in arglist):
                    out[n] = ("ok", value, time.perf_counter())
                    n += 1
            except BaseException as exc:
                # The call raised: none of the remaining results is delivered.
                failure = ("err", describe(exc), time.perf_counter())
                out[n:] = [failure] * (len(out) - n)

        t = threading.Thread(target=consume, daemon=True)
        t.start()
        t.join(max(0.0, deadline - time.perf_counter()))
        return out

    def again(self) -> Peer:
        self.close()
        return Joblib(task_timeout=self.timeout)

    def close(self, force=False) -> None:
        self.par.__exit__(None, None, None)


class Loky(Peer):
    name = "loky"

    def __init__(self, **_: Any) -> None:
        from loky import get_reusable_executor

        self.pool = get_reusable_executor(max_workers=WORKERS)

    def submit(self, fn, *args) -> Handle:
        return Handle(self.pool.submit(fn, *args))

    def map(self, fn, items, chunksize=None) -> list:
        return list(self.pool.map(fn, items, chunksize=chunksize or 1))

    def again(self) -> Peer:
        return Loky()

    def close(self, force=False) -> None:
        self.pool.shutdown(wait=not force, kill_workers=force)


class Mpire(Peer):
    name = "mpire"
    how_submit = "apply_async().get()"

    def __init__(self, task_timeout=None, max_tasks=None, shared=None, **_: Any) -> None:
        from mpire import WorkerPool

        # keep_alive: reuse the workers across calls (by default mpire starts
        # new workers for every map call).
        self.pool = WorkerPool(n_jobs=WORKERS, shared_objects=shared, keep_alive=True)
        self.timeout = task_timeout
        self.lifespan = max_tasks

    def submit(self, fn, *args) -> Handle:
        return Handle(self.pool.apply_async(fn, args, task_timeout=self.timeout))

    def map(self, fn, items, chunksize=None) -> list:
        return self.pool.map(fn, items, chunk_size=chunksize, worker_lifespan=self.lifespan,
                             task_timeout=self.timeout)

    how_unordered = "imap_unordered"

    def unordered(self, fn, items, chunksize=None) -> list:
        return list(self.pool.imap_unordered(fn, items, chunk_size=chunksize, worker_lifespan=self.lifespan,
                                             task_timeout=self.timeout))

    def close(self, force=False) -> None:
        if force:
            self.pool.terminate()
        else:
            self.pool.stop_and_join()


class Pebble(Peer):
    name = "pebble"
    how_submit = "schedule().result()"

    def __init__(self, task_timeout=None, max_tasks=None, **_: Any) -> None:
        from pebble import ProcessPool

        self.pool = ProcessPool(max_workers=WORKERS, max_tasks=max_tasks or 0)
        self.timeout = task_timeout

    def submit(self, fn, *args) -> Handle:
        return Handle(self.pool.schedule(fn, args=args, timeout=self.timeout))

    def map(self, fn, items, chunksize=None) -> list:
        return list(self.pool.map(fn, items, chunksize=chunksize or 1, timeout=self.timeout).result())

    def close(self, force=False) -> None:
        if force:
            self.pool.stop()
        else:
            self.pool.close()
        self.pool.join(timeout=30)


class Ray(Peer):
    name = "ray"
    how_submit = "apply_async().get()"

    def __init__(self, max_tasks=None, **_: Any) -> None:
        import logging

        import ray
        from ray.util.multiprocessing import Pool

        if not ray.is_initialized():
            ray.init(num_cpus=WORKERS, include_dashboard=False, logging_level=logging.ERROR,
                     log_to_driver=False)
        self.pool = Pool(WORKERS, maxtasksperchild=max_tasks)

    def submit(self, fn, *args) -> Handle:
        return Handle(self.pool.apply_async(fn, args))

    def map(self, fn, items, chunksize=None) -> list:
        return self.pool.map(fn, items, chunksize=chunksize)

    how_unordered = "imap_unordered"

    def unordered(self, fn, items, chunksize=None) -> list:
        return list(self.pool.imap_unordered(fn, items, chunksize=chunksize or 1))

    def close(self, force=False) -> None:
        # The ray runtime stays up (a second pool reuses it); finish() stops it.
        self.pool.terminate()


def finish() -> None:
    """End of a child process: stops the ray runtime if one was started."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


CLASSES = {"ironpool": Ironpool, "ppe": PPE, "mp": MP, "joblib": Joblib, "loky": Loky, "mpire": Mpire,
           "mpire_shared": Mpire, "pebble": Pebble, "ray": Ray}


def make(case: str, **opts: Any) -> Peer:
    if case in ("ironpool_share", "ironpool_shm", "ironpool_readonly"):
        case = "ironpool"
    name = case.partition(":")[0]
    return CLASSES[name](**opts)
