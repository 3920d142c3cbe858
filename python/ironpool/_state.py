"""Each worker's state: the value the pool's ``initializer`` returned, for
that worker's tasks (``ironpool.worker_state()``).

A worker process holds one state for all its threads (set by
``_worker.Handler.init``); a threads-backend worker holds its own, per
thread. Kept tiny: worker processes import it on their start-up path.
"""

from __future__ import annotations

import _thread

TYPE_CHECKING = False  # workers never import typing (see _worker)
if TYPE_CHECKING:
    from typing import Any

#: The state of a worker whose pool has no initializer.
NO_INITIALIZER: Any = object()
_NOT_A_WORKER: Any = object()

#: This worker process's state (processes backend).
_process_state: Any = _NOT_A_WORKER
#: Each threads-backend worker thread's state.
_per_thread = _thread._local()


def set_process_state(value: Any) -> None:
    global _process_state
    _process_state = value


def set_thread_state(value: Any) -> None:
    _per_thread.value = value


def worker_state() -> Any:
    """What the pool's ``initializer`` returned in the worker running this task.

    Each worker (a process, or a thread of ``backend="threads"``) runs the
    initializer once before its first task and keeps what it returned; a
    worker that is replaced (recycled by ``max_tasks_per_worker``, crashed,
    timed out) runs it again and gets a fresh state. Give each worker its
    own parser, connection or model that way::

        def open_parser(dialect):
            return Parser(dialect)          # one per worker, never shared

        def parse(text):
            return ironpool.worker_state().parse(text)

        with ironpool.Pool(4, initializer=open_parser, initargs=("strict",)) as pool:
            trees = list(pool.map(parse, texts))

    Raises:
        ironpool.NoWorkerState: (a ``LookupError``) outside a task, or in a
            task of a pool that has no initializer.
    """
    value = getattr(_per_thread, "value", _NOT_A_WORKER)
    if value is _NOT_A_WORKER:
        value = _process_state
    if value is NO_INITIALIZER or value is _NOT_A_WORKER:
        from .errors import NoWorkerState

        if value is NO_INITIALIZER:
            raise NoWorkerState(
                "ironpool.worker_state(): this worker's pool has no initializer; create the pool "
                "with Pool(initializer=make_state, initargs=(...)) and worker_state() returns what "
                "make_state returned in this worker"
            )
        raise NoWorkerState(
            "ironpool.worker_state() is only available inside a task of a pool (this code is not "
            "running in a worker process or a worker thread)"
        )
    return value
