"""Exceptions raised by ironpool.

Each one subclasses the stdlib type that code written for
``concurrent.futures.ProcessPoolExecutor`` already catches, so existing
``except BrokenProcessPool:`` or ``except TimeoutError:`` handlers keep working.
"""

from __future__ import annotations

import pickle
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

__all__ = [
    "Attempt",
    "EngineError",
    "IronpoolError",
    "MemoryLimitExceeded",
    "NoWorkerState",
    "PoolClosed",
    "ProtocolError",
    "RemoteError",
    "SerializationError",
    "TaskTimeout",
    "WorkerCrashed",
    "WorkerStartError",
]


class IronpoolError(Exception):
    """Base of ironpool's own errors (mixed into each stdlib-derived class)::

        try:
            result = pool.submit(work, item).result()
        except ironpool.IronpoolError as err:  # the pool's errors, not the task's own
            log.error("ironpool failed the task: %s", err)
    """


def _python_stack(stderr_tail: str) -> str | None:
    """The faulthandler dump in a dead worker's stderr, if it wrote one."""
    marker = "Fatal Python error"
    at = stderr_tail.find(marker)
    if at < 0:
        at = stderr_tail.find("Current thread")
    return stderr_tail[at:] if at >= 0 else None


@dataclass(frozen=True)
class Attempt:
    """An earlier run of a task that gave no result (in ``err.attempts`` of
    the error it finally failed with, oldest first)::

        except ironpool.WorkerCrashed as err:
            for attempt in getattr(err, "attempts", []):
                print(attempt.what, attempt.pid, attempt.description)
    """

    #: "crashed", "timeout", "memory", "protocol" or "raised".
    what: str
    #: The worker that ran it (0 for "raised": the worker lived on).
    pid: int = 0
    exitcode: int | None = None
    signal: int | None = None
    #: For "raised": the exception it raised.
    error: BaseException | None = None
    #: One line, as the error's message shows it.
    description: str = ""


class WorkerCrashed(BrokenProcessPool, IronpoolError):
    """The worker running a task died (segfault, abort, ``os._exit``, OOM kill).

    Only that task fails; the worker is replaced and the pool keeps going.

    Attributes:
        exitcode: the worker's exit code, or None if a signal ended it.
        signal: the signal that ended the worker, or None.
        pid: the dead worker's process id.
        stderr_tail: the last lines the worker wrote to stderr.
        python_stack: the worker's Python stack as faulthandler dumped it, if any.
        task: a short description of the task (function and arguments).
        oom_killed: True if the kernel's out-of-memory killer ended the worker
            (its memory cgroup counted the kill), False if the kernel counted
            no such kill, None where the kernel keeps no count (no memory
            cgroup) or the worker's end is unknown.

    Example::

        try:
            pool.submit(build_index, path).result()
        except ironpool.WorkerCrashed as err:
            if err.oom_killed:
                ...  # retry with fewer workers, or a smaller chunk
    """

    def __init__(
        self,
        message: str,
        *,
        exitcode: int | None = None,
        signal: int | None = None,
        pid: int = 0,
        stderr_tail: str = "",
        task: str = "",
        oom_killed: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.signal = signal
        self.pid = pid
        self.stderr_tail = stderr_tail
        self.python_stack = _python_stack(stderr_tail)
        self.task = task
        self.oom_killed = oom_killed

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls, args, state):
    obj = cls.__new__(cls)
    Exception.__init__(obj, *args)
    obj.__dict__.update(state)
    return obj


class MemoryLimitExceeded(WorkerCrashed):
    """A worker passed the hard memory ceiling during a task and was killed.

    Attributes ``rss`` (bytes seen) and ``limit`` (the ceiling) report the figure::

        except ironpool.MemoryLimitExceeded as err:
            print(f"used {err.rss / 2**30:.1f} GiB of {err.limit / 2**30:.1f}")
    """

    rss: int = 0
    limit: int = 0


class TaskTimeout(TimeoutError, IronpoolError):
    """A task ran past its time limit; its worker was killed and replaced.

    Attributes: ``task`` (description), ``limit`` (seconds), ``pid``::

        try:
            page = pool.submit_with(fetch, (url,), timeout=30).result()
        except ironpool.TaskTimeout as err:
            print(f"{err.task} hung past {err.limit} s")
    """

    def __init__(self, message: str, *, task: str = "", limit: float = 0.0, pid: int = 0) -> None:
        super().__init__(message)
        self.task = task
        self.limit = limit
        self.pid = pid

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, self.__dict__))


class SerializationError(pickle.PicklingError, IronpoolError):
    """An argument or result could not be pickled or unpickled.

    Delivered through the task's future; the message names the task and the
    type of the object that failed::

        future = pool.submit(len, threading.Lock())
        future.exception()  # SerializationError naming len(...) and the lock
    """


class PoolClosed(RuntimeError, IronpoolError):
    """Work was submitted to a pool that is shut down (or was inherited by fork)::

        pool.shutdown()
        pool.submit(abs, -1)  # raises PoolClosed: create a new pool
    """


class WorkerStartError(BrokenProcessPool, IronpoolError):
    """Workers could not start: the initializer raised, or a ``preload`` module
    failed to import. Raised for every task of the pool; the pool does not retry
    forever::

        try:
            pool.submit(work, 1).result()
        except ironpool.WorkerStartError as err:
            print("fix the initializer:", err.__cause__)
    """


class NoWorkerState(LookupError, IronpoolError):
    """``ironpool.worker_state()`` was called outside a task, or in a task of
    a pool without an ``initializer``. A ``LookupError``, as ``ContextVar.get``
    raises for a variable that has no value::

        try:
            parser = ironpool.worker_state()
        except ironpool.NoWorkerState:
            parser = Parser()  # called outside a pool's task
    """


class EngineError(RuntimeError, IronpoolError):
    """ironpool's compiled engine failed in a way no task outcome describes
    (its own state broke, or numpy refused its allocator). A RuntimeError,
    as these were before they had a type of their own."""


class ProtocolError(EngineError):
    """A frame or payload from the other end of a pool channel did not add
    up. The engine reports a worker's bad frames as that task's crash; this
    is raised where there is no task to fail (inside a worker, or for a
    result the caller could not decode)."""


class RemoteError(Exception):
    """Stands in for a task's exception that could not itself be pickled.

    Attributes: ``type_name``, ``message``, ``traceback`` (remote text)::

        except ironpool.RemoteError as err:
            print("the task raised a", err.type_name)
    """

    def __init__(self, type_name: str, message: str, traceback: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __reduce__(self):
        return (type(self), (self.type_name, self.message, self.traceback))
