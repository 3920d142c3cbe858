"""Where a backend plugs in.

``Pool`` checks its arguments, builds :class:`Call` records and hands them to
a backend through the small :class:`Backend` protocol below; it never knows
which backend runs them. A backend is one module in this package, named in
``_BACKENDS`` and imported only when a pool asks for it. Today:
``processes`` (``process.py``: the Rust engine and its supervised workers),
``threads`` (``threads.py``: worker threads in this process, nothing
pickled), ``dask`` and ``ray`` (``dask.py``, ``ray.py`` over
``_cluster.py``: each cluster worker runs the calls in an ironpool process
pool, ``_node.py``).

A backend's futures are :class:`ironpool._futures.TaskFuture` objects bound
to it (``TaskFuture.bind``); it resolves each with the task's value, or with
its exception as ``_outcomes`` builds it. A ``map`` chunk (``Call.chunk``
non-zero) resolves to ``(values, error)``: the values of the items that ran,
in order, and the exception that stopped the chunk, or None. With
``KEEP_GOING`` in ``Call.chunk`` every item runs and a failing item's
exception stands in its place among the values (``_worker.run_chunk`` runs
a chunk either way).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .._serialize import describe_call
from .._worker import CHUNK, KEEP_GOING, SINGLE  # the task flags workers read
from ..errors import PoolClosed

if TYPE_CHECKING:
    from .._futures import TaskFuture
    from .._options import PoolOptions
    from .._send_once import Shared
    from .._zygote import TemplateInfo

__all__ = [
    "CHUNK", "KEEP_GOING", "SINGLE", "Backend", "Call", "Function", "PoolStats", "WorkerInfo", "create", "no_counts",
]


@dataclass(frozen=True)
class WorkerInfo:
    """One worker's figures, from :meth:`ironpool.Pool.stats`. For a worker
    thread (``backend="threads"``), ``pid`` is its native thread id and
    ``rss`` is 0: threads share one process's memory. A worker process
    still starting (its fork not yet reported) has ``pid`` 0::

        for w in pool.stats():
            print(w.slot, w.pid, w.tasks_done, f"{w.rss / 2**20:.0f} MiB", w.restarts, w.last_exit)
    """

    slot: int
    pid: int
    tasks_done: int
    busy: bool
    rss: int
    restarts: int
    last_exit: str
    busy_seconds: float


#: The keys of ``Backend.counts()``.
COUNT_KEYS = ("submitted", "queued", "running", "returned", "failed", "retried", "items_done", "task_seconds")


def no_counts() -> dict[str, Any]:
    """``Backend.counts()`` of a pool that ran nothing."""
    return dict.fromkeys(COUNT_KEYS, 0)


class PoolStats(list):
    """What :meth:`ironpool.Pool.stats` returns: the list of each worker's
    :class:`WorkerInfo` (as before), with the pool's figures as attributes::

        s = pool.stats()
        print(s.done, s.failed, f"{s.throughput:.0f} items/s", f"{s.utilisation:.0%} busy")
        print(max(w.rss for w in s))

    Attributes:
        submitted: tasks submitted (a ``map`` chunk counts once).
        queued: tasks waiting for a worker.
        running: tasks sent to a worker and not finished.
        done: tasks finished, either way; ``failed`` of them did not return
            (raised, crashed, timed out or never started).
        retried: runs started again (crash, timeout, ``retry_on``).
        items_done: ``map`` items and calls finished.
        elapsed: seconds since the pool started.
        throughput: ``items_done`` per second since the pool started.
        mean_task_seconds: mean run time of a finished task (a chunk: all its items).
        utilisation: the share of the workers' time spent running tasks.
    """

    submitted: int
    queued: int
    running: int
    done: int
    failed: int
    retried: int
    items_done: int
    elapsed: float
    throughput: float
    mean_task_seconds: float
    utilisation: float

    def __init__(self, workers: list[WorkerInfo], counts: dict, elapsed: float) -> None:
        super().__init__(workers)
        self.submitted = counts["submitted"]
        self.queued = counts["queued"]
        self.running = counts["running"]
        self.failed = counts["failed"]
        self.done = counts["returned"] + self.failed
        self.retried = counts["retried"]
        self.items_done = counts["items_done"]
        self.elapsed = elapsed
        self.throughput = self.items_done / elapsed if elapsed > 0 else 0.0
        self.mean_task_seconds = counts["task_seconds"] / self.done if self.done else 0.0
        busy = sum(w.busy_seconds for w in workers)
        self.utilisation = min(1.0, busy / (elapsed * len(workers))) if workers and elapsed > 0 else 0.0

    def __repr__(self) -> str:
        return (
            f"PoolStats(workers={len(self)}, submitted={self.submitted}, queued={self.queued}, "
            f"running={self.running}, done={self.done}, failed={self.failed}, retried={self.retried}, "
            f"items_done={self.items_done}, throughput={self.throughput:.1f}/s, "
            f"mean_task_seconds={self.mean_task_seconds:.6f}, utilisation={self.utilisation:.2f})"
        )


@dataclass(slots=True, eq=False)
class Call:
    """One unit of work: a call, or a chunk of a ``map``."""

    fn: Callable[..., Any]
    #: A call's argument tuple, or a chunk's list of items.
    args: Any
    kwargs: dict | None
    #: 0 for a call; CHUNK (| SINGLE | KEEP_GOING) for a map chunk.
    chunk: int = 0
    #: Seconds the task may run; None: the pool's ``task_timeout``.
    timeout: float | None = None
    #: Re-runs left after a crash, a timeout or a ``retry_on`` exception.
    retries: int = 0
    #: When the call began (``_send_once.call_started``): the rest of a map
    #: may still send the handles it began with.
    since: int = 0
    #: For a chunk's item run again alone: the chunk it came from, whose
    #: arguments it must receive as they were sent then.
    rerun_of: Call | None = None
    #: What the backend kept to send a rerun alike (the processes backend:
    #: the objects it sent once, and their handles).
    sent: Any = None

    def describe(self) -> str:
        """The call, or the chunk, in a few words for error messages."""
        if self.chunk:
            first = describe_call(self.fn, self.first_args())
            return f"a map chunk of {len(self.args)} items starting with {first}"
        return describe_call(self.fn, self.args, self.kwargs)

    def pickling_culprit(self) -> str:
        """Where an argument that failed to pickle may be, for its error."""
        where = describe_call(self.fn, self.first_args(), self.kwargs)
        return where + " (or a neighbour in its chunk)" if self.chunk else where

    def first_args(self) -> tuple:
        """The arguments of the call, or of a chunk's first item."""
        if not self.chunk:
            return self.args
        if not self.args:
            return ()
        return (self.args[0],) if self.chunk & SINGLE else self.args[0]


class Function(Protocol):
    """A backend's hold on a function for the calls that use it."""

    def release(self, _future: Any = None) -> None: ...


class Backend(Protocol):
    """What ``Pool`` asks of the engine that runs its tasks."""

    workers: int

    def check_open(self) -> None:
        """Raises ``PoolClosed`` (or the start error) if no call may be submitted."""
        ...

    def function(self, fn: Callable[..., Any]) -> Function:
        """Holds ``fn`` for calls (``release`` it when they are done)."""
        ...

    def submit(self, call: Call, function: Function | None = None) -> TaskFuture:
        """Schedules ``call`` (of ``function``, held by the caller, or of
        ``call.fn``, held for this call); a failure to send it (a function or
        an argument that cannot be pickled, a pool that could not start) is
        delivered through the future."""
        ...

    def chunk_size(self, function: Function, remaining: int | None) -> int:
        """Items for the next chunk of a ``map`` of ``function``."""
        ...

    def share(self, value: Any, reuse: bool) -> Shared:
        """A handle to ``value`` sent to each worker once."""
        ...

    def stats(self) -> list[WorkerInfo]:
        """One entry per worker."""
        ...

    def counts(self) -> dict[str, Any]:
        """The pool's task figures (the keys :class:`PoolStats` reads)."""
        ...

    def template_info(self, timeout: float) -> TemplateInfo | None:
        """What the process its workers fork from holds (None: no such process)."""
        ...

    def shutdown(self, wait: bool, cancel_futures: bool) -> None: ...

    def terminate(self) -> None: ...


#: This process's id, kept current by a fork hook: ``os.getpid()`` is a
#: system call, and in some virtual machines one costs several µs per task.
_pid = os.getpid()


def current_pid() -> int:
    """``os.getpid()``, without the system call (valid in any child made by
    ``os.fork``, which runs Python's fork hooks; workers are made so)."""
    return _pid


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


def refuse_closed(pid: int, exiting: bool, closed: bool) -> None:
    """A backend's ``check_open``: ``PoolClosed`` for a pool of process
    ``pid`` seen from a fork, at interpreter exit, or after shutdown."""
    if pid != _pid:
        raise PoolClosed(
            f"this pool belongs to process {pid} and was inherited by fork; create a new ironpool.Pool in this process"
        )
    if exiting:
        raise PoolClosed("cannot schedule new futures after interpreter shutdown")
    if closed:
        raise PoolClosed("cannot submit to a pool after shutdown()")


#: Backend name -> the module that holds it; its ``start(options)`` returns the backend.
_BACKENDS = {
    "processes": "ironpool.backends.process",
    "threads": "ironpool.backends.threads",
    "dask": "ironpool.backends.dask",
    "ray": "ironpool.backends.ray",
}


def create(name: str, options: PoolOptions) -> Backend:
    """Starts backend ``name`` for a pool with ``options``."""
    module = _BACKENDS.get(name)
    if module is None:
        known = ", ".join(repr(n) for n in _BACKENDS)
        raise ValueError(f"backend must be one of {known}, got {name!r}")
    return importlib.import_module(module).start(options)
