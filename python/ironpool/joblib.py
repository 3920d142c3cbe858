"""A joblib backend named ``"ironpool"``: ``joblib.Parallel`` (and every
scikit-learn ``n_jobs``) on an :class:`ironpool.Pool`.

Importing this module registers the backend (``import ironpool`` alone does
not import joblib)::

    import ironpool.joblib  # noqa: F401  (registers backend="ironpool")
    from joblib import Parallel, delayed, parallel_config

    with parallel_config(backend="ironpool"):
        squares = Parallel(n_jobs=2)(delayed(pow)(x, 2) for x in range(10))

What changes against joblib's default ``"loky"`` backend:

* a task that kills its worker (segfault, abort, ``os._exit``) fails with
  :class:`ironpool.WorkerCrashed` naming the task; the other workers and the
  pool live on for the next call;
* ``Parallel(timeout=T)`` is also each task's time limit in the engine: the
  worker of a task running past ``T`` is killed and replaced, and the call
  raises :class:`ironpool.TaskTimeout` (a ``TimeoutError``);
* large numpy arguments travel through ironpool's shared memory, not through
  joblib's temporary memmap files: an array over ``max_nbytes`` is sent to
  each worker once per call and arrives read-only (as loky's default
  ``mmap_mode="r"`` memmaps do); no file is written;
* nested ``Parallel`` calls inside a task run sequentially in that worker.

Pool options (``task_timeout``, ``retries``, ``max_memory_per_worker``,
``initializer``...) can be given to the backend::

    with parallel_config(backend="ironpool", max_memory_per_worker="2GB", retries=1):
        ...
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from joblib import cpu_count, register_parallel_backend
from joblib._parallel_backends import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
)

from ._serialize import describe_call

__all__ = ["IronpoolBackend", "shutdown"]

#: ``Parallel`` hands these to every backend's ``configure``. Of joblib's
#: memmapping options, ``max_nbytes`` and ``mmap_mode`` keep their meaning
#: (see ``_Sharing``); ``temp_folder`` is unused: no file is written.
_JOBLIB_OPTIONS = frozenset({"max_nbytes", "temp_folder", "mmap_mode", "prefer", "require", "verbose", "context"})

#: ``ironpool.Pool`` options the backend takes from ``parallel_config`` or
#: ``Parallel`` keywords (the worker count comes from ``n_jobs``).
_POOL_OPTIONS = frozenset({
    "task_timeout", "max_tasks_per_worker", "max_memory_per_worker", "hard_memory_factor", "retries",
    "retry_on", "initializer", "initargs", "preload", "buffer_threshold", "forward_output",
})

#: Imported once in the template process workers are forked from, so that no
#: worker pays for importing joblib (and numpy) when its first batch arrives.
_PRELOAD = ("ironpool.joblib",)

#: How long an aborting call waits for the engine to see the workers it
#: killed die (it notices within a few ms: their channels close).
_KILL_NOTICE_SECONDS = 5.0


def _pool_options(options: dict[str, Any]) -> dict[str, Any]:
    """The ``Pool`` options among ``options``; a name neither joblib nor
    ``Pool`` knows is an error (a typo must not be dropped silently)."""
    unknown = sorted(set(options) - _POOL_OPTIONS - _JOBLIB_OPTIONS)
    if unknown:
        raise TypeError(
            f"the ironpool joblib backend got unknown option(s) {', '.join(map(repr, unknown))}; "
            f"it takes ironpool.Pool's {', '.join(sorted(_POOL_OPTIONS))}"
        )
    return {k: v for k, v in options.items() if k in _POOL_OPTIONS}


# The pools Parallel calls share -------------------------------------------------


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for key, value in a.items():
        other = b[key]
        if value is other:
            continue
        try:
            if not bool(value == other):
                return False
        except Exception:  # e.g. numpy arrays in initargs: only the same object is the same
            return False
    return True


class _Reused:
    """A pool kept for the ``Parallel`` calls that ask for the same settings
    (as loky keeps its reusable executor), and how many calls hold it now."""

    __slots__ = ("pool", "settings", "users")

    def __init__(self, settings: dict[str, Any]) -> None:
        from .pool import Pool  # here: the template that preloads this module needs no executor

        self.settings = settings
        self.pool = Pool(**settings)
        self.users = 0


_lock = threading.Lock()
_pools: list[_Reused] = []


def _acquire(settings: dict[str, Any]) -> tuple[_Reused, bool]:
    """The pool for ``settings`` (started if none has them; True if so). Idle
    pools with other settings are shut down: one set of workers at a time,
    as loky resizes its one executor."""
    with _lock:
        found = next((r for r in _pools if _same(r.settings, settings)), None)
        for idle in [r for r in _pools if r is not found and r.users == 0]:
            _pools.remove(idle)
            idle.pool.shutdown(wait=False)
        started = found is None
        if found is None:
            found = _Reused(settings)
            _pools.append(found)
        found.users += 1
        return found, started


def _release(reused: _Reused) -> None:
    with _lock:
        reused.users -= 1


def _stop_running(reused: _Reused) -> bool:
    """Kills the workers running tasks of ``reused`` once its one user has
    aborted (their results would be dropped, and loky kills them too); idle
    workers are left alone and the engine replaces the killed ones. With
    ``retries`` the engine would run a killed task again, so the pool is
    terminated instead (True: the caller must let go of it). Nothing is
    killed while another ``Parallel`` call uses the pool."""
    with _lock:
        if reused.users > 1:
            return False
        if reused.settings.get("retries"):
            reused.users -= 1
            if reused in _pools:
                _pools.remove(reused)
            terminate = True
        else:
            terminate = False
    if terminate:
        reused.pool.terminate()
        return True
    killed = set()
    for worker in reused.pool.stats():
        if worker.busy and worker.pid:
            try:
                os.kill(worker.pid, signal.SIGKILL)
                killed.add(worker.pid)
            except ProcessLookupError:  # it ended meanwhile
                pass
    # Until the engine has seen them die it may hand them the next call's
    # batches (a prefetch, or a worker that had just answered), which would
    # then fail as crashed: return once no killed worker is listed.
    give_up = time.monotonic() + _KILL_NOTICE_SECONDS
    while killed & {w.pid for w in reused.pool.stats()} and time.monotonic() < give_up:
        time.sleep(0.001)
    return False


def shutdown(wait: bool = True) -> None:
    """Stops the pools the backend keeps between ``Parallel`` calls (the next
    call starts a new one). They also stop at interpreter exit; call this to
    give their workers back sooner::

        ironpool.joblib.shutdown()
    """
    with _lock:
        stopping = list(_pools)
        _pools.clear()
    for reused in stopping:
        reused.pool.shutdown(wait=wait)


def _forget_after_fork() -> None:
    # A pool inherited by fork refuses work; the child starts its own.
    _pools.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


# What a worker runs --------------------------------------------------------------


class _Batch:
    """A joblib batch as the pool sends it: joblib's ``BatchedCalls`` itself,
    described by its calls in ironpool's errors (``f(3)``, not an address)."""

    __slots__ = ("calls",)

    def __init__(self, calls: Callable[[], list]) -> None:
        self.calls = calls

    def __reduce__(self) -> tuple:
        return (_Batch, (self.calls,))

    def __repr__(self) -> str:
        items = getattr(self.calls, "items", None)
        if not items:
            return repr(self.calls)
        func, args, kwargs = items[0]
        first = describe_call(func, args, kwargs)
        module = getattr(func, "__module__", None)
        if module and first.startswith(f"{module}."):  # the name first: errors show 40 characters
            first = first[len(module) + 1:]
        return first if len(items) == 1 else f"{first} and {len(items) - 1} more calls"


def _run_batch(batch: _Batch) -> list:
    """Runs one joblib batch in a worker (``BatchedCalls`` sets the nested backend)."""
    return batch.calls()


class _Sharing:
    """What loky's memmapping does, through ironpool's shared memory: each
    numpy array over ``max_nbytes`` among a call's arguments is sent to each
    worker once per ``Parallel`` call (``pool.share``) and arrives read-only,
    as loky's ``mmap_mode="r"`` memmaps do. Like loky, an array is taken by
    identity for the rest of the call (changing it mid-call is not seen).
    ``max_nbytes=None`` or ``mmap_mode=None``/``"c"`` turn this off: arrays
    then go as ordinary arguments (still through shared memory, writable)."""

    def __init__(self) -> None:
        self.max_nbytes: int | None = None
        self._handles: dict[int, tuple[Any, Any]] = {}  # id(array) -> (array, handle)
        self._lock = threading.Lock()

    def configure(self, max_nbytes: int | None, mmap_mode: str | None) -> None:
        if mmap_mode in ("r+", "w+"):
            raise ValueError(
                f"mmap_mode={mmap_mode!r} lets workers write into the caller's arrays through a file; the "
                "ironpool backend sends arrays through shared memory that workers cannot write back to "
                "(use mmap_mode='r' or 'c', or return the results)"
            )
        self.max_nbytes = max_nbytes if mmap_mode == "r" else None

    def batch(self, pool: Any, calls: Any) -> None:
        """Puts handles in place of ``calls``' large array arguments."""
        items = getattr(calls, "items", None)
        numpy = sys.modules.get("numpy")
        if self.max_nbytes is None or numpy is None or not items:
            return
        ndarray, limit = numpy.ndarray, self.max_nbytes

        def swap(value: Any) -> Any:
            if type(value) is not ndarray or value.nbytes <= limit or value.dtype.hasobject:
                return value
            with self._lock:
                held = self._handles.get(id(value))
                if held is None or held[0] is not value:
                    held = self._handles[id(value)] = (value, pool.share(value))
            return held[1]

        # Most batches hold no large array: look before rebuilding (a batch
        # of tiny tasks has thousands of calls).
        for i, (func, args, kwargs) in enumerate(items):
            if ndarray in map(type, args) or (kwargs and ndarray in map(type, kwargs.values())):
                items[i] = (func, tuple(map(swap, args)), {k: swap(v) for k, v in kwargs.items()})

    def release(self) -> None:
        """End of a call: workers drop each array once no task needs it."""
        with self._lock:
            held, self._handles = self._handles, {}
        for _, handle in held.values():
            handle.release()


def _nothing() -> None:
    return None


# The backend ----------------------------------------------------------------------


class IronpoolBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's ``ParallelBackendBase`` over an :class:`ironpool.Pool`.

    Registered as ``"ironpool"`` when ``ironpool.joblib`` is imported::

        with joblib.parallel_config(backend="ironpool", n_jobs=-1):
            search.fit(X, y)

    ``n_jobs`` means what it means for loky (``-1``: every CPU, ``-2``: all
    but one; ``1`` runs in the caller). Calls with the same ``n_jobs`` and
    options reuse one pool; :func:`shutdown` stops it.
    """

    supports_retrieve_callback = True
    supports_inner_max_num_threads = True
    supports_sharedmem = False
    uses_threads = False

    #: Batches are grown until one takes this long (loky: 0.2 s). ironpool's
    #: cost per batch is a fraction of loky's, so shorter batches lose no
    #: throughput and balance the end of a call better.
    MIN_IDEAL_BATCH_DURATION = 0.05

    def __init__(self, nesting_level: int | None = None, inner_max_num_threads: int | None = None,
                 **options: Any) -> None:
        _pool_options(options)  # reject unknown names now, where the user wrote them
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads, **options)
        self._reused: _Reused | None = None
        self._timeout: float | None = None
        self._timed: Callable[[], Any] = _nothing  # the Parallel whose timeout is ours
        self._futures: set[Future] = set()
        self._futures_lock = threading.Lock()
        self._sharing = _Sharing()

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None or self.nesting_level:
            return 1  # inside a task: see get_nested_backend
        if n_jobs < 0:
            return max(cpu_count() + 1 + n_jobs, 1)
        return n_jobs

    def configure(self, n_jobs: int = 1, parallel: Any = None, prefer: str | None = None,
                  require: str | None = None, **options: Any) -> int:
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        options = {**self.backend_kwargs, **options}
        self._sharing.configure(options.get("max_nbytes", 2**20), options.get("mmap_mode", "r"))
        pool_options = _pool_options(options)
        preload = tuple(pool_options.pop("preload", ()))
        threads = self.inner_max_num_threads or max(cpu_count() // n_jobs, 1)  # loky's default
        settings = {"workers": n_jobs, "thread_limit": threads, "preload": _PRELOAD + preload, **pool_options}
        if self._reused is not None and not _same(self._reused.settings, settings):
            _release(self._reused)
            self._reused = None
        if self._reused is None:
            self._reused, started = _acquire(settings)
            if started and parallel is not None and parallel.verbose >= 10:
                parallel._print(f"ironpool: started a pool of {n_jobs} workers ({threads} BLAS threads each)")
        self.parallel = parallel
        self._take_timeout(parallel)
        return n_jobs

    def _take_timeout(self, parallel: Any) -> None:
        """``Parallel(timeout=T)`` becomes each batch's time limit in the
        engine, which kills the worker of a batch running past it; joblib's
        own timer (which only stops waiting) is off while the call runs, so
        the error is always the engine's ``TaskTimeout`` naming the task."""
        if parallel is None or parallel is self._timed():
            return
        self._give_back_timeout()
        self._timeout = parallel.timeout
        if self._timeout is not None:
            parallel.timeout = None
            self._timed = weakref.ref(parallel)

    def _give_back_timeout(self) -> None:
        parallel = self._timed()
        if parallel is not None:
            parallel.timeout = self._timeout
        self._timed = _nothing
        self._timeout = None

    def submit(self, func: Callable[[], list], callback: Callable[[Future], Any] | None = None) -> Future:
        if self._reused is None:
            raise RuntimeError("the ironpool joblib backend was used before configure() or after terminate()")
        pool = self._reused.pool
        self._sharing.batch(pool, func)
        future = pool.submit_with(_run_batch, (_Batch(func),), timeout=self._timeout)
        with self._futures_lock:
            self._futures.add(future)
        future.add_done_callback(self._settled)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    apply_async = submit  # joblib < 1.5 calls it by this name

    def _settled(self, future: Future) -> None:
        with self._futures_lock:
            self._futures.discard(future)

    def retrieve_result_callback(self, future: Future) -> list:
        return future.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A task failed (or the caller stopped): withdraw this call's queued
        batches and kill the ones still running (see ``_stop_running``)."""
        with self._futures_lock:
            futures = list(self._futures)
        for future in futures:
            future.cancel()
        reused = self._reused
        if reused is None or all(f.done() for f in futures):
            return
        if _stop_running(reused):
            self._reused = None
            if ensure_ready and self.parallel is not None:
                self.configure(n_jobs=self.parallel.n_jobs, parallel=self.parallel, **self.parallel._backend_kwargs)

    def stop_call(self) -> None:
        self._sharing.release()

    def terminate(self) -> None:
        """End of a ``Parallel`` call: the pool stays for the next one."""
        self._sharing.release()
        if self._reused is not None:
            _release(self._reused)
            self._reused = None
        self._give_back_timeout()
        with self._futures_lock:
            self._futures.clear()
        self.reset_batch_stats()

    def get_nested_backend(self) -> tuple[ParallelBackendBase, int | None]:
        """``Parallel`` inside a task runs sequentially in its worker: the
        pool already has a process per core, and waiting on workers from a
        worker could deadlock the pool (loky nests threads instead, which the
        native code ironpool isolates may not survive)."""
        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None


register_parallel_backend("ironpool", IronpoolBackend)
