"""Where a backend plugs in.

``Pool`` checks its arguments, builds :class:`Call` records and hands them to
a backend through the small :class:`Backend` protocol below; it never knows
which backend runs them. A backend is one module in this package, named in
``_BACKENDS`` and imported only when a pool asks for it. Today:
``processes`` (``process.py``: the Rust engine and its supervised workers),
``dask`` and ``ray`` (``dask.py``, ``ray.py`` over ``_cluster.py``: each
cluster worker runs the calls in an ironpool process pool, ``_node.py``).

A backend's futures are :class:`ironpool._futures.TaskFuture` objects bound
to it (``TaskFuture.bind``); it resolves each with the task's value, or with
its exception as ``_outcomes`` builds it. A ``map`` chunk (``Call.chunk``
non-zero) resolves to ``(values, error)``: the values of the items that ran,
in order, and the exception that stopped the chunk, or None.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .._worker import CHUNK, SINGLE  # the task flags workers read

if TYPE_CHECKING:
    from .._futures import TaskFuture
    from .._options import PoolOptions
    from .._send_once import Shared

__all__ = ["CHUNK", "SINGLE", "Backend", "Call", "Function", "WorkerInfo", "create"]


@dataclass(frozen=True)
class WorkerInfo:
    """One worker's figures, from :meth:`ironpool.Pool.stats`."""

    slot: int
    pid: int
    tasks_done: int
    busy: bool
    rss: int
    restarts: int
    last_exit: str
    busy_seconds: float


@dataclass(slots=True, eq=False)
class Call:
    """One unit of work: a call, or a chunk of a ``map``."""

    fn: Callable[..., Any]
    #: A call's argument tuple, or a chunk's list of items.
    args: Any
    kwargs: dict | None
    #: 0 for a call; CHUNK (| SINGLE) for a map chunk.
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

    def stats(self) -> list[WorkerInfo]: ...

    def shutdown(self, wait: bool, cancel_futures: bool) -> None: ...

    def terminate(self) -> None: ...


#: Backend name -> the module that holds it; its ``start(options)`` returns the backend.
_BACKENDS = {
    "processes": "ironpool.backends.process",
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
