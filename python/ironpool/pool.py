"""``ironpool.Pool``: a ``concurrent.futures.Executor`` over a backend
(the Rust process engine, or threads; see ``ironpool.backends``)."""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Any, Literal

from . import _core, backends
from ._checkpoint import Checkpoint, Resumed
from ._map import MapRun, common_len, sliceable
from ._options import check_map, check_timeout, pool_options
from ._send_once import Shared, call_started
from .backends import Call, PoolStats, WorkerInfo, no_counts

if TYPE_CHECKING:
    from ._zygote import TemplateInfo

__all__ = ["Pool", "PoolStats", "Shared", "WorkerInfo"]


class Pool(Executor):
    """A process pool with a Rust engine.

    Example::

        import ironpool

        with ironpool.Pool() as pool:
            squares = list(pool.map(pow, range(10), [2] * 10))
            future = pool.submit(sum, [1, 2, 3])
            assert future.result() == 6

    Args:
        workers: number of worker processes; default: the CPUs this process may
            use, capped by a cgroup CPU quota.
        initializer, initargs: called in each worker before its first task
            (give each worker its own parser, connection, configuration);
            what it returns is that worker's :func:`ironpool.worker_state`.
        preload: modules imported once in the template process that workers are
            forked from (e.g. ``("numpy", "pandas")``), so no worker pays for them;
            the pool waits for these imports, and a failing one is an error.
        warm: also let the template import, in the background, the packages
            this process has imported (numpy, pandas, your own modules: not
            the standard library), so replacement, recycled and later pools'
            workers start with them. A module whose import fails, hangs,
            prints or starts threads is skipped; :meth:`template_info` says
            what the template holds. ``False``: only ``preload``.
        task_timeout: seconds a task may run before its worker is killed and the
            task fails with :class:`TaskTimeout`; overridable per call.
        max_tasks_per_worker: replace a worker after this many tasks.
        max_memory_per_worker: bytes or ``"2GB"``; a worker above it after a task
            is replaced; one above ``hard_memory_factor`` times it during a task
            is killed (:class:`MemoryLimitExceeded`).
        hard_memory_factor: how far above ``max_memory_per_worker`` a worker
            may go during a task before it is killed (default 1.5).
        retries: re-runs of a task whose worker crashed or timed out, or that
            raised one of the ``retry_on`` types; one budget for all three.
        retry_on: exception types after which a task is run again (within
            ``retries``); default none: a task's own exception is final.
        thread_limit: threads for BLAS/OpenMP in each worker (default 1, so
            workers do not oversubscribe the cores); ``None`` leaves them alone.
        buffer_threshold: buffers of at least this many bytes travel through
            shared memory instead of the pipe.
        forward_output: copy what workers print to this process's stdout and
            stderr (default), else drop it.
        backend: what runs the tasks. ``"processes"`` (the default):
            supervised worker processes. ``"threads"``: worker threads of this
            process, for I/O-bound work and libraries that release the GIL;
            nothing is pickled (tasks get the objects themselves, exceptions
            keep their tracebacks). A thread cannot be killed, so at its
            ``task_timeout`` a task fails with :class:`TaskTimeout` and its
            thread is abandoned to finish unseen while a new one takes its
            place; a crash in native code ends the whole process; and
            ``max_memory_per_worker``, ``preload``, ``thread_limit`` and
            ``forward_output=False`` are refused with ``ValueError``. In
            ``stats()`` a thread's ``pid`` is its native thread id and its
            ``rss`` is 0. See ``docs/guide.md``, "Threads backend"::

                with ironpool.Pool(32, backend="threads") as pool:
                    pages = list(pool.map(fetch, urls))

            ``"dask"`` or ``"ray"``: a cluster, each of whose workers runs the
            tasks in its own ironpool process pool with these options (see
            ``docs/scaling-out.md``).
        address: for ``backend="dask"``, a scheduler address or a
            ``distributed.Client``; for ``"ray"``, what ``ray.init`` takes.
            None: the pool starts a local cluster of ``workers`` and stops it at
            shutdown (Ray: uses the Ray this process already initialised, if
            any). With an address the cluster's size rules: give no ``workers``.
        max_workers, max_tasks_per_child, mp_context: ``ProcessPoolExecutor``'s
            names, accepted so that code written for it runs unchanged:
            ``max_workers`` is ``workers``, ``max_tasks_per_child`` is
            ``max_tasks_per_worker``. ``mp_context`` is accepted and not used:
            workers are always forks of a clean template process, so, as with
            ``"spawn"``, they inherit nothing from the caller.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple = (),
        preload: Iterable[str] = (),
        warm: bool = True,
        task_timeout: float | None = None,
        max_tasks_per_worker: int | None = None,
        max_memory_per_worker: int | str | None = None,
        hard_memory_factor: float = 1.5,
        retries: int = 0,
        retry_on: tuple[type[BaseException], ...] = (),
        thread_limit: int | None = 1,
        buffer_threshold: int = 64 * 1024,
        forward_output: bool = True,
        backend: str = "processes",
        address: Any = None,
        max_workers: int | None = None,
        max_tasks_per_child: int | None = None,
        mp_context: Any = None,
    ) -> None:
        self._backend: backends.Backend | None = None
        self._started = time.monotonic()
        options = pool_options(
            workers,
            default_workers=_core.default_workers,
            initializer=initializer,
            initargs=initargs,
            preload=preload,
            warm=warm,
            task_timeout=task_timeout,
            max_tasks_per_worker=max_tasks_per_worker,
            max_memory_per_worker=max_memory_per_worker,
            hard_memory_factor=hard_memory_factor,
            retries=retries,
            retry_on=retry_on,
            thread_limit=thread_limit,
            buffer_threshold=buffer_threshold,
            forward_output=forward_output,
            max_workers=max_workers,
            max_tasks_per_child=max_tasks_per_child,
            address=address,
        )
        self._retries = options.retries
        self._backend = backends.create(backend, options)
        self._max_workers = self._backend.workers  # read by dask's get_scheduler; a cluster's is its own
        weakref.finalize(self, self._backend.shutdown, False, False)

    # Executor API ---------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedules ``fn(*args, **kwargs)``; returns a ``concurrent.futures.Future``.

        Pickling failures of the function or the arguments are delivered
        through the future as :class:`SerializationError`, naming the task
        and the object::

            future = pool.submit(pow, 2, 10)
            assert future.result() == 1024
        """
        return self.submit_with(fn, args, kwargs)

    def submit_with(
        self,
        fn: Callable[..., Any],
        args: tuple = (),
        kwargs: dict | None = None,
        *,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> Future:
        """Like :meth:`submit`, with this task's own ``timeout`` (seconds it
        may run before its worker is killed) and ``retries``::

            future = pool.submit_with(fetch, (url,), timeout=30, retries=2)
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if not isinstance(args, tuple):
            args = tuple(args)
        if kwargs is not None and not isinstance(kwargs, dict):
            raise TypeError(f"kwargs must be a dict, got {type(kwargs).__name__}")
        check_timeout(timeout, "timeout")
        if retries is None:
            retries = self._retries
        elif isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a non-negative int, got {retries!r}")
        call = Call(fn, args, kwargs or None, timeout=timeout, retries=retries, since=call_started())
        return self._running().submit(call)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        task_timeout: float | None = None,
        return_exceptions: bool = False,
        progress: Any = None,
        checkpoint: str | os.PathLike[str] | None = None,
    ) -> Iterator[Any]:
        """Ordered results of ``fn`` over ``iterables``, consumed lazily::

            for row in pool.map(score, rows):
                ...

        ``chunksize=None`` lets the pool size batches from measured task times.
        ``timeout`` bounds the whole iteration, as in the stdlib; ``task_timeout``
        bounds each chunk's run time on a worker. Input is read lazily, a
        chunk at a time, and each item is sent as it is when its chunk is
        pickled: a generator that changes an object between yields of the
        same chunk gives that chunk's items the last state (as the stdlib's
        chunks do); use ``chunksize=1`` when every item must be a separate
        snapshot. An item whose worker crashes fails alone: the rest of its
        chunk is run again one item at a time.

        ``return_exceptions=True`` yields a failing item's exception (its own,
        :class:`WorkerCrashed`, :class:`TaskTimeout`, :class:`SerializationError`)
        in its place and goes on with the rest, instead of ending the map::

            for row, out in zip(rows, pool.map(parse, rows, return_exceptions=True)):
                if isinstance(out, Exception):
                    log.warning("row %s failed: %r", row, out)

        ``progress=True`` draws a tqdm bar (``pip install 'ironpool[progress]'``;
        the notebook widget under Jupyter); ``progress=`` also takes your own
        tqdm instance, or a callable ``(done, total)`` (total is None for an
        input without a length), called as chunks finish (at most once per
        chunk), from the thread that delivers results. A bar or callback
        that raises ends the map with its error.

        ``checkpoint=path`` records each result in ``path`` as it is handed
        out; run the same map again after a crash, Ctrl-C or a killed process
        and only the missing items are computed (see ``docs/guide.md``)::

            for out in pool.map(convert, files, checkpoint="convert.ckpt", progress=True):
                ...

        A checkpoint written by a changed function, or for changed items,
        raises :class:`CheckpointMismatch` instead of mixing results. Failed
        items are not recorded, so a rerun tries them again."""
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        check_map(fn, chunksize, timeout, task_timeout, progress)
        total = common_len(iterables)
        if len(iterables) == 1:
            items, single = sliceable(iterables[0]), True
        else:
            items, single = zip(*iterables, strict=False), False
        return self._map(
            fn, items, total, timeout, chunksize, task_timeout, True, single, return_exceptions, progress, "map",
            checkpoint,
        )

    def starmap(
        self,
        fn: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        *,
        timeout: float | None = None,
        chunksize: int | None = None,
        task_timeout: float | None = None,
        return_exceptions: bool = False,
        progress: Any = None,
        checkpoint: str | os.PathLike[str] | None = None,
    ) -> Iterator[Any]:
        """Ordered ``fn(*args)`` for each ``args`` in ``iterable``::

            totals = list(pool.starmap(add, [(1, 2), (3, 4)]))  # [3, 7]

        ``return_exceptions``, ``progress`` and ``checkpoint`` work as in :meth:`map`.
        """
        check_map(fn, chunksize, timeout, task_timeout, progress)
        total = common_len((iterable,))
        items = (tuple(a) for a in iterable)
        return self._map(
            fn, items, total, timeout, chunksize, task_timeout, True, False, return_exceptions, progress, "starmap",
            checkpoint,
        )

    def imap_unordered(
        self,
        fn: Callable[..., Any],
        iterable: Iterable[Any],
        *,
        timeout: float | None = None,
        chunksize: int | None = None,
        task_timeout: float | None = None,
        return_exceptions: bool = False,
        progress: Any = None,
    ) -> Iterator[Any]:
        """Results of ``fn`` over ``iterable`` in the order they finish::

            for path in pool.imap_unordered(convert, paths):
                print("done", path)

        ``return_exceptions`` and ``progress`` work as in :meth:`map`.
        """
        check_map(fn, chunksize, timeout, task_timeout, progress)
        total = common_len((iterable,))
        return self._map(
            fn, sliceable(iterable), total, timeout, chunksize, task_timeout, False, True, return_exceptions, progress,
            "imap_unordered",
        )

    def _map(
        self, fn, items, total, timeout, chunksize, task_timeout, ordered, single, return_exceptions, progress, name,
        checkpoint=None,
    ) -> Iterator[Any]:
        resumed = None
        if checkpoint is not None:
            resumed = Resumed(Checkpoint(checkpoint, name, fn, total), items)
            items = resumed.todo()
        try:
            run = MapRun(
                self._running(), fn, items, total=total, timeout=timeout, chunksize=chunksize,
                task_timeout=task_timeout, retries=self._retries, ordered=ordered, single=single,
                keep_going=bool(return_exceptions), progress=progress, name=name,
                recorded=0 if resumed is None else resumed.recorded,
            )
        except BaseException:
            if resumed is not None:
                resumed.checkpoint.close()
            raise
        if resumed is None:
            return run.results()
        return resumed.merge(run.results())

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stops the pool once queued work is done (pending work is dropped with
        ``cancel_futures=True``). Safe to call more than once."""
        if self._backend is not None:
            self._backend.shutdown(wait, cancel_futures)

    def terminate(self) -> None:
        """Stops now: cancels every unfinished task and kills the workers."""
        if self._backend is not None:
            self._backend.terminate()

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.terminate()
        else:
            self.shutdown(wait=True)
        return False

    def share(self, value: Any, *, reuse: bool = False) -> Shared:
        """Sends ``value`` to each worker once; pass the returned handle to
        tasks instead of the object. See :class:`Shared`::

            table = pool.share(big_frame)
            results = list(pool.map(score, [table] * 100, range(100)))

        With ``reuse=True`` a worker unpickles the object once and hands that
        same object to each of its tasks: faster for a large pure-Python
        structure, but a task's changes to it (a new key, a new column) are
        then seen by later tasks on that worker, as with a global set by an
        ``initializer``. The default builds a fresh object per task over the
        same shared buffers, which costs only reading its pickle stream."""
        return self._running().share(value, bool(reuse))

    # Introspection -------------------------------------------------------

    def stats(self) -> PoolStats:
        """The pool's figures and each worker's (pid, tasks done, resident
        memory, restarts and why); see :class:`PoolStats`::

            s = pool.stats()
            print(f"{s.done} done, {s.failed} failed, {s.utilisation:.0%} busy")
            for w in s:
                print(w.pid, w.tasks_done, w.rss)
        """
        elapsed = time.monotonic() - self._started
        if self._backend is None:
            return PoolStats([], no_counts(), elapsed)
        return PoolStats(self._backend.stats(), self._backend.counts(), elapsed)

    def template_info(self, timeout: float = 0.0) -> TemplateInfo | None:
        """What the template this pool's workers are forked from holds: the
        ``preload`` modules, those it imported automatically (``warm``),
        those it skipped and why, and those still being imported (it waits
        up to ``timeout`` seconds for them). None for a backend without a
        template. Example::

            import pandas, ironpool
            with ironpool.Pool(2) as pool:
                info = pool.template_info(timeout=30)
                assert "pandas" in info.warm   # new workers start with it
        """
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise ValueError(f"timeout must be a non-negative number of seconds, got {timeout!r}")
        return None if self._backend is None else self._backend.template_info(float(timeout))

    @property
    def workers(self) -> int:
        """Number of workers."""
        return self._max_workers

    def _running(self) -> backends.Backend:
        if self._backend is None:  # __init__ failed part-way
            from .errors import PoolClosed

            raise PoolClosed("pool is not running")
        return self._backend
