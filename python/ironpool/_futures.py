"""The futures ``Pool.submit`` returns: ``concurrent.futures.Future`` objects
that a backend can withdraw, mark running and resolve in the waiting thread;
and :class:`ChunkTicket`, the lighter handle a ``map`` gets for each chunk."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, LOGGER, PENDING, RUNNING
from types import TracebackType
from typing import Any, Protocol

from ._remote_exception import copy_exception


class TaskDriver(Protocol):
    """What a future asks of the backend that runs its task."""

    def cancel_task(self, task_id: int) -> bool:
        """Withdraws a task not yet handed to a worker; False if it was."""
        ...

    def task_started(self, task_id: int) -> bool:
        """Whether a worker has taken the task."""
        ...

    def collect_until(self, future: Future, timeout: float | None) -> None:
        """Resolves futures in the calling thread until ``future`` is done or
        ``timeout`` passes (a backend with nothing to drive returns at once)."""
        ...


#: Guards making a ``TaskFuture``'s condition, and the changes of state made
#: before one exists, so that the two never interleave.
_UNCONDITIONED = threading.Lock()


def _unlock_after_fork() -> None:
    # Another thread (the results thread) may have held it at the fork; a
    # forked child settles its inherited futures (backends.process.orphan).
    global _UNCONDITIONED
    _UNCONDITIONED = threading.Lock()


# Registered before the backends' own hooks, which run after it.
os.register_at_fork(after_in_child=_unlock_after_fork)
_DONE = frozenset({CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED})
#: States no future leaves (a cancelled one is still to be notified).
_FINAL = frozenset({CANCELLED_AND_NOTIFIED, FINISHED})


class _FinalCondition:
    """The condition of a ``TaskFuture`` that was in a final state before any
    thread asked for one: its state never changes again and no thread waits
    on it (the stdlib waits only on a future not yet done), so there is
    nothing to lock or to wake. One object serves every such future."""

    __slots__ = ()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return True

    def release(self) -> None:
        pass

    def __enter__(self) -> bool:
        return True

    def __exit__(self, *exc: object) -> None:
        pass

    def wait(self, timeout: float | None = None) -> bool:
        return True

    def notify(self, n: int = 1) -> None:
        pass

    def notify_all(self) -> None:
        pass


_FINAL_CONDITION = _FinalCondition()


class TaskFuture(Future):
    """A ``concurrent.futures.Future`` that withdraws its task when cancelled
    and whose ``result()``/``exception()`` let the backend deliver results in
    the calling thread instead of a thread hop away.

    Its condition is made only when a thread needs one (to wait, or through
    the stdlib's ``wait``/``as_completed``): a task submitted, settled and
    read without waiting never builds one, which is most of what a stdlib
    ``Future`` costs. Until then its state changes under one module lock."""

    _driver: TaskDriver | None = None
    _task_id: int = 0
    #: The task's own traceback, for a backend whose tasks run in this
    #: process (threads); raised with the task's exception, as the stdlib's
    #: thread pool does. (A worker process's traceback travels as text, in
    #: the exception's ``__cause__``.)
    _task_traceback: TracebackType | None = None
    # Made on first use, like the condition: a future in flight holds no
    # lists. Thousands of futures in flight, each holding a few containers,
    # make the collector sweep the caller's whole heap again and again
    # (with pandas imported, a quarter of what a burst of submits cost).
    _made_condition: threading.Condition | None = None
    _made_waiters: list | None = None
    _made_callbacks: list | None = None
    #: The call it is the outcome of (set by the backend that runs it).
    _call: Any = None

    def __init__(self) -> None:
        # ``Future.__init__`` but the condition and lists (see above).
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        made = self._made_condition
        if made is None:
            with _UNCONDITIONED:
                made = self._made_condition
                if made is None:
                    if self._state in _FINAL:
                        # wait() and as_completed() lock every future they
                        # are given, most of them done: ~4 µs a future.
                        return _FINAL_CONDITION  # type: ignore[return-value]
                    made = self._made_condition = threading.Condition()
        return made

    @property
    def _waiters(self) -> list:  # type: ignore[override]  # wait() and as_completed() add theirs
        made = self._made_waiters
        if made is None:
            made = self._made_waiters = []
        return made

    @property
    def _done_callbacks(self) -> list:
        made = self._made_callbacks
        if made is None:
            made = self._made_callbacks = []
        return made

    def _invoke_callbacks(self) -> None:
        if self._made_callbacks:
            super()._invoke_callbacks()  # type: ignore[misc]
            # Run once, in a final state (no callback is added after one):
            # a future the caller keeps does not keep what they hold (a map).
            self._made_callbacks = None

    def _finish_unconditioned(self, value: Any, error: BaseException | None) -> bool:
        """Settles a future no thread has taken the condition of (so none
        waits on it); False if one has (the stdlib's way then applies)."""
        with _UNCONDITIONED:
            if self._made_condition is not None:
                return False
            state = self._state
            if state in _DONE:
                settled_already = True
            else:
                settled_already = False
                if error is None:
                    self._result = value
                else:
                    self._exception = error
                self._state = FINISHED
        if settled_already:  # raised outside the lock: repr() takes the condition, which takes the lock
            raise InvalidStateError(f"{state}: {self!r}")
        self._invoke_callbacks()  # outside the lock, as the stdlib does
        return True

    def set_result(self, result: Any) -> None:
        if self._made_condition is not None or not self._finish_unconditioned(result, None):
            super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        if exception is None:
            raise TypeError("set_exception needs an exception")
        if self._made_condition is not None or not self._finish_unconditioned(None, exception):
            super().set_exception(exception)

    def set_running_or_notify_cancel(self) -> bool:
        # The stdlib's takes the condition, which would make one for every
        # task a thread backend starts (~0.7 µs, a third of its worker's cost).
        if self._made_condition is None:
            with _UNCONDITIONED:
                if self._made_condition is None:
                    if self._state == CANCELLED:
                        self._state = CANCELLED_AND_NOTIFIED
                        return False  # no condition: nobody waits to be told
                    if self._state == PENDING:
                        self._state = RUNNING
                        return True
                    raise RuntimeError(f"Future in unexpected state: {self._state}")
        return super().set_running_or_notify_cancel()

    def add_done_callback(self, fn: Callable[[Future], object]) -> None:
        if self._made_condition is None:
            with _UNCONDITIONED:
                if self._made_condition is None and self._state not in _DONE:
                    self._done_callbacks.append(fn)
                    return
            if self._state in _DONE:
                try:
                    fn(self)
                except Exception:
                    LOGGER.exception("exception calling callback for %r", self)
                return
        super().add_done_callback(fn)

    def done(self) -> bool:
        return self._state in _DONE  # final states: no lock needed to see one

    def cancelled(self) -> bool:
        return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)

    def bind(self, driver: TaskDriver, task_id: int) -> None:
        """Ties the future to task ``task_id`` of ``driver`` (again, for a rerun)."""
        self._driver = driver
        self._task_id = task_id

    def cancel(self) -> bool:
        """Cancels a task not yet handed to a worker (as in the stdlib, a task
        a worker has taken is running and cannot be cancelled)."""
        driver = self._driver
        if driver is not None and not self.done() and not driver.cancel_task(self._task_id):
            self.running()  # mark it so
            return False
        cancelled = super().cancel()
        if cancelled and driver is not None:
            self._notify_cancelled()
        return cancelled

    def _notify_cancelled(self) -> None:
        """Moves a cancelled future to the state the stdlib's ``wait`` and
        ``as_completed`` count as done. A stdlib executor does this when it
        dequeues the task; a backend that binds its futures dropped the
        task already, so nothing would."""
        with self._condition:
            if self._state == CANCELLED:
                self.set_running_or_notify_cancel()

    def running(self) -> bool:
        driver = self._driver
        if driver is not None and self._state == PENDING and driver.task_started(self._task_id):
            with self._condition:
                if self._state == PENDING:
                    self._state = RUNNING
        return super().running()

    def _collect(self, timeout: float | None) -> float | None:
        """Lets the backend deliver until done or ``timeout``; returns what is
        left of ``timeout`` for the stdlib's own wait."""
        driver = self._driver
        if driver is None or self.done():
            return timeout
        if timeout is None:
            driver.collect_until(self, None)
            return None
        deadline = time.monotonic() + timeout
        driver.collect_until(self, timeout)
        return max(0.0, deadline - time.monotonic())

    def result(self, timeout: float | None = None) -> Any:
        if self._state == FINISHED and self._exception is None:  # set before the state
            return self._result
        timeout = self._collect(timeout)
        try:
            return super().result(timeout)
        except BaseException as exc:
            if exc is not self._exception:  # TimeoutError, CancelledError
                raise
            # Raise a copy: the stored exception would otherwise carry the
            # caller's frames, which hold this future, which holds the
            # exception -- the cycle that keeps pools alive (pitfall P4).
            # (No local may hold the copy either: this frame is in its traceback.)
            exc.__traceback__ = self._task_traceback
            raise (copy_exception(exc) or exc).with_traceback(self._task_traceback) from exc.__cause__

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == FINISHED:
            return self._exception
        return super().exception(self._collect(timeout))

    def withdrawn(self) -> bool:
        """Marks it cancelled for a task its backend has already dropped."""
        cancelled = Future.cancel(self)
        if cancelled:
            self._notify_cancelled()
        return cancelled


_PENDING, _FINISHED, _CANCELLED = 0, 1, 2


class ChunkTicket:
    """What a ``map`` holds for one chunk in flight: the part of the
    ``Future`` interface it uses, for one consumer thread, without the lock
    and condition a ``Future`` builds (several µs a chunk, when chunks are
    single items). The backend settles it through ``set_result`` and
    ``set_exception`` in whichever thread collects; ``exception`` and
    ``result`` let it collect in the caller's thread, as ``TaskFuture`` does."""

    __slots__ = ("_call", "_callback", "_driver", "_error", "_state", "_task_id", "_value")

    def __init__(self) -> None:
        self._call: Any = None  # the chunk it is the outcome of (set by the backend)
        self._driver: TaskDriver | None = None
        self._task_id = 0
        self._state = _PENDING
        self._value: Any = None
        self._error: BaseException | None = None
        self._callback: Callable[[ChunkTicket], None] | None = None

    def bind(self, driver: TaskDriver, task_id: int) -> None:
        self._driver = driver
        self._task_id = task_id

    def done(self) -> bool:
        return self._state != _PENDING

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def cancel(self) -> bool:
        """Withdraws the chunk if no worker has taken it."""
        if self._state != _PENDING:
            return self._state == _CANCELLED
        driver = self._driver
        if driver is not None and not driver.cancel_task(self._task_id):
            return False
        return self.withdrawn()

    def withdrawn(self) -> bool:
        return self._finish(_CANCELLED)

    def set_result(self, value: Any) -> None:
        self._settled()
        self._value = value
        self._finish(_FINISHED)

    def set_exception(self, error: BaseException) -> None:
        self._settled()
        self._error = error
        self._finish(_FINISHED)

    def _settled(self) -> None:
        if self._state != _PENDING:
            raise InvalidStateError("the chunk has already been settled")

    def _finish(self, state: int) -> bool:
        if self._state != _PENDING:
            return False
        self._state = state
        self._driver = None  # a settled chunk keeps no pool alive
        callback, self._callback = self._callback, None
        if callback is not None:
            callback(self)
        return True

    def add_done_callback(self, fn: Callable[[ChunkTicket], None]) -> None:
        """One callback (a map's progress count), run once settled."""
        if self._state != _PENDING:
            fn(self)
        else:
            self._callback = fn

    def exception(self, timeout: float | None = None) -> BaseException | None:
        driver = self._driver
        if self._state == _PENDING and driver is not None:
            driver.collect_until(self, timeout)  # type: ignore[arg-type]
        if self._state == _PENDING:
            raise TimeoutError
        if self._state == _CANCELLED:
            raise CancelledError
        return self._error

    def result(self, timeout: float | None = None) -> Any:
        """The value, or raises the error; the error is handed over, not
        kept: its traceback will hold the caller's frames (pitfall P4)."""
        error = self.exception(timeout)
        if error is not None:
            self._error = None
            raise error
        return self._value


def settle(future: Future | ChunkTicket, value: Any = None, error: BaseException | None = None) -> None:
    """Resolves ``future`` unless it was cancelled meanwhile."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except InvalidStateError:
        pass
