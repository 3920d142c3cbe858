"""The futures ``Pool.submit`` returns: ``concurrent.futures.Future`` objects
that a backend can withdraw, mark running and resolve in the waiting thread."""

from __future__ import annotations

import time
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import PENDING, RUNNING
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


class TaskFuture(Future):
    """A ``concurrent.futures.Future`` that withdraws its task when cancelled
    and whose ``result()``/``exception()`` let the backend deliver results in
    the calling thread instead of a thread hop away."""

    _driver: TaskDriver | None = None
    _task_id: int = 0
    #: The task's own traceback, for a backend whose tasks run in this
    #: process (threads); raised with the task's exception, as the stdlib's
    #: thread pool does. (A worker process's traceback travels as text, in
    #: the exception's ``__cause__``.)
    _task_traceback: TracebackType | None = None

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
        return super().cancel()

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
        return super().exception(self._collect(timeout))


def settle(future: Future, value: Any = None, error: BaseException | None = None) -> None:
    """Resolves ``future`` unless it was cancelled meanwhile."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except InvalidStateError:
        pass
