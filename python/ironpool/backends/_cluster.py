"""The caller's side of the Dask and Ray backends, shared by both.

A :class:`ClusterBackend` pickles each call once (function, arguments, the
chunk flags as ``Pool`` set them, time limit, retries) and hands it to an
:class:`Engine` (``dask.py``, ``ray.py``), which runs ``_node.run`` on a
cluster worker: there the call runs in an ironpool process pool with this
pool's options, so a hung task is killed, a segfault fails only its task,
and retries happen once, in that node pool's engine (the cluster engine is
told never to re-run a task itself).

Large numpy, pandas and Arrow arguments and ``pool.share()`` objects go
through the engine's own store once (:class:`_Store`): the call's pickle
refers to them by persistent id, and the engine delivers them to the worker
next to the call.

At most ``window`` tasks are with the engine at once; the rest wait here, so
``cancel()`` withdraws a task that has not started, exactly: a task handed
to the engine counts as started, as a task a local worker has prefetched
does.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import queue
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any, Protocol

from .. import _core
from .._futures import TaskFuture, settle
from .._options import PoolOptions
from .._outcomes import argument_error
from .._remote_exception import unpack_exception
from .._send_once import Shared, _policy
from .._serialize import describe_call, dumps
from ..errors import PoolClosed, SerializationError
from . import Call, WorkerInfo, no_counts
from ._node import AUTO, ERROR, FRESH_SHARE, OK, REUSE_SHARE, Packed

#: Arguments at least this large go through the engine's store, once.
STORE_THRESHOLD = 1 << 20
#: Objects the store cache remembers by identity.
_STORED = 16
#: Tasks handed to the engine per slot (the rest wait, withdrawable).
WINDOW_PER_SLOT = 4


class Engine(Protocol):
    """What a cluster backend asks of Dask or Ray."""

    #: Tasks the cluster runs at once (its threads or CPUs).
    slots: int

    def store(self, value: Any) -> tuple[str, Any]:
        """Puts ``value`` in the engine's store: its key and the engine's reference."""
        ...

    def submit(self, key: bytes, options: bytes, spec: bytes, keys: list[str], refs: list,
               done: Callable[[], None]) -> Any:
        """Runs ``_node.run`` with these on a worker; calls ``done`` once finished."""
        ...

    def outcome(self, handle: Any, task: str) -> tuple:
        """What ``_node.run`` returned, or ``(ERROR, exception)`` for a task the
        engine lost (its worker died, it was cancelled)."""
        ...

    def cancel(self, handle: Any) -> None: ...

    def node_stats(self, key: bytes) -> list[dict]:
        """The figures of every node pool with options ``key``."""
        ...

    def close(self) -> None:
        """Lets go of the engine (stops it if the pool started it)."""
        ...


def node_options(options: PoolOptions) -> dict:
    """What each node pool is made with: the caller's options, but its size
    (a cluster worker's own slots)."""
    return {
        "initializer": options.initializer,
        "initargs": options.initargs,
        "preload": options.preload,
        "task_timeout": options.task_timeout,
        "max_tasks_per_worker": options.max_tasks_per_worker,
        "max_memory_per_worker": options.max_memory,
        "hard_memory_factor": options.hard_memory_factor,
        "retries": options.retries,
        "retry_on": options.retry_on,
        "thread_limit": options.thread_limit,
        "buffer_threshold": options.buffer_threshold,
        "forward_output": options.forward_output,
    }


class StoreRef:
    """A ``pool.share()`` object in the engine's store."""

    __slots__ = ("id", "owner", "ref", "released", "reuse")

    def __init__(self, owner: ClusterBackend, key: str, ref: Any, reuse: bool) -> None:
        self.owner = owner
        self.id = key  # the engine's key, as Shared's repr shows it
        self.ref = ref
        self.reuse = reuse
        self.released = False

    def release(self) -> None:
        """Lets the engine free it once the tasks using it are done."""
        self.released = True
        self.ref = None

    def __reduce__(self):
        raise SerializationError(
            f"ironpool.Shared handle {self.id} can only be pickled as a task argument of the pool that made it"
        )


class _Store:
    """Large arguments in the engine's store, remembered by identity while
    their content stays the same (a digest of their pickled bytes)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.entries: OrderedDict[int, tuple] = OrderedDict()  # id -> (weakref, digest, key, ref)

    def put(self, value: Any) -> tuple[str, Any]:

        digest = _core.digest(dumps(value, 1))
        with self.lock:
            hit = self.entries.get(id(value))
            if hit is not None and hit[0]() is value and hit[1] == digest:
                self.entries.move_to_end(id(value))
                return hit[2], hit[3]
        key, ref = self.engine.store(value)
        try:
            alive = weakref.ref(value, functools.partial(self._drop, id(value)))
        except TypeError:
            return key, ref
        with self.lock:
            self.entries[id(value)] = (alive, digest, key, ref)
            while len(self.entries) > _STORED:
                self.entries.popitem(last=False)
        return key, ref

    def _drop(self, ident: int, _ref: Any = None) -> None:
        with self.lock:
            entry = self.entries.get(ident)
            if entry is not None and entry[0]() is None:
                del self.entries[ident]


@functools.cache
def _pickler_class() -> Any:
    """The pickler of calls (made on first use: cloudpickle is imported then)."""
    import cloudpickle

    class CallPickler(cloudpickle.Pickler):
        """Pickles one call, replacing stored objects by persistent ids
        (``keys``/``refs`` list them, in order)."""

        def __init__(self, backend: ClusterBackend) -> None:
            self.out = io.BytesIO()
            super().__init__(self.out, protocol=5)
            self.backend = backend
            self.keys: list[str] = []
            self.refs: list[Any] = []
            self.index: dict[tuple, int] = {}

        def dumps(self, obj: Any) -> bytes:
            self.dump(obj)
            return self.out.getvalue()

        def persistent_id(self, obj: Any) -> tuple | None:
            if isinstance(obj, Shared):
                ref = obj._ref
                if not isinstance(ref, StoreRef) or ref.owner is not self.backend:
                    raise SerializationError(
                        f"{obj!r} belongs to another pool: pass it only to tasks of the pool whose share() made it"
                    )
                if ref.released:
                    raise SerializationError(f"{obj!r} was released: workers no longer hold its object")
                return self._refer(ref.id, ref.ref, REUSE_SHARE if ref.reuse else FRESH_SHARE)
            mode = None if type(obj) is bytes else _policy(obj, STORE_THRESHOLD)
            if mode is None:
                return None
            key, ref = self.backend.store.put(obj)
            return self._refer(key, ref, AUTO, mode)  # the mode: writable here, writable there

        def _refer(self, key: str, ref: Any, how: int, mode: int | None = None) -> tuple:
            index = self.index.get((key, how))
            if index is None:
                index = len(self.keys)
                self.keys.append(key)
                self.refs.append(ref)
                self.index[(key, how)] = index
            return (index, how, mode)

    return CallPickler


class _Task:
    __slots__ = ("call", "future", "handle", "keys", "refs", "sent_at", "spec")

    def __init__(self, future: TaskFuture, call: Call, spec: bytes, keys: list[str], refs: list) -> None:
        self.future = future
        self.call = call
        self.spec = spec
        self.keys = keys
        self.refs = refs  # held until the task is done, so the engine keeps them
        self.handle: Any = None
        self.sent_at = 0.0  # when it was handed to the engine

    def describe(self) -> str:
        call = self.call
        if call.chunk:
            return f"a map chunk of {len(call.args)} items starting with {describe_call(call.fn, call.first_args())}"
        return describe_call(call.fn, call.args, call.kwargs)


class _Held:
    """``Backend.function``: a cluster pickles the function with each call."""

    def release(self, _future: Any = None) -> None:
        pass


_HELD = _Held()


class ClusterBackend:
    """Runs a pool's calls on a cluster ``engine``, one node pool per worker
    process. Holds no reference to the ``Pool``."""

    def __init__(self, engine: Engine, options: PoolOptions) -> None:
        import cloudpickle

        try:
            self.options = cloudpickle.dumps(node_options(options), protocol=5)
        except Exception as exc:
            raise SerializationError(
                f"initializer, initargs or retry_on could not be pickled for the cluster: {type(exc).__name__}: {exc}"
            ) from exc
        self.key = hashlib.blake2b(self.options, digest_size=16).digest()
        self.engine = engine
        self.workers = max(1, engine.slots)
        self.window = WINDOW_PER_SLOT * self.workers
        self.store = _Store(engine)
        self.lock = threading.Lock()
        self.waiting: OrderedDict[int, _Task] = OrderedDict()  # not handed to the engine yet
        self.running: dict[int, _Task] = {}
        self.finished: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.task_ids = itertools.count(1)
        self.closed = False
        self.engine_closed = False
        #: For counts(); a task's seconds are from its hand-over to its outcome.
        self.totals: dict[str, float] = no_counts()
        self.thread = threading.Thread(target=self._deliver, name="ironpool-cluster", daemon=True)
        self.thread.start()

    # Submitting ----------------------------------------------------------

    def check_open(self) -> None:
        if self.closed:
            raise PoolClosed("cannot submit to a pool after shutdown()")

    def function(self, fn: Callable[..., Any]) -> _Held:
        return _HELD

    def submit(self, call: Call, function: Any = None) -> TaskFuture:
        self.check_open()
        future = TaskFuture()
        pickler = _pickler_class()(self)
        try:
            spec = pickler.dumps((call.fn, call.args, call.kwargs, call.chunk, call.timeout, call.retries))
        except Exception as exc:
            future.set_exception(argument_error(exc, call.pickling_culprit()))
            return future
        task_id = next(self.task_ids)
        task = _Task(future, call, spec, pickler.keys, pickler.refs)
        future.bind(self, task_id)
        with self.lock:
            self.waiting[task_id] = task
            self.totals["submitted"] += 1
        self._admit()
        return future

    def _admit(self) -> None:
        """Hands waiting tasks to the engine while the window has room."""
        while True:
            with self.lock:
                if not self.waiting or len(self.running) >= self.window:
                    return
                task_id, task = self.waiting.popitem(last=False)
                self.running[task_id] = task
                task.sent_at = time.monotonic()
            try:
                task.handle = self.engine.submit(
                    self.key, self.options, task.spec, task.keys, task.refs,
                    functools.partial(self.finished.put, task_id),
                )
            except BaseException as exc:
                with self.lock:
                    self.running.pop(task_id, None)
                settle(task.future, error=exc)
                self._close_if_drained()

    def chunk_size(self, function: Any, remaining: int | None) -> int:
        if remaining is None:
            return 16
        return max(1, min(256, -(-remaining // (4 * self.workers))))

    def share(self, value: Any, reuse: bool) -> Shared:
        self.check_open()
        key, ref = self.engine.store(value)
        return Shared(StoreRef(self, key, ref, reuse), value)  # type: ignore[arg-type]

    def stats(self) -> list[WorkerInfo]:
        """The workers of every node pool of this pool's options, numbered in turn."""
        if self.engine_closed:
            return []
        infos = self.engine.node_stats(self.key)
        return [WorkerInfo(**{**info, "slot": slot}) for slot, info in enumerate(infos)]

    def counts(self) -> dict[str, Any]:
        with self.lock:
            return {**self.totals, "queued": len(self.waiting), "running": len(self.running)}

    def _count(self, task: _Task, returned: bool) -> None:
        call = task.call
        with self.lock:
            totals = self.totals
            totals["returned" if returned else "failed"] += 1
            totals["items_done"] += len(call.args) if call.chunk else 1
            totals["task_seconds"] += time.monotonic() - task.sent_at

    # Futures (the TaskDriver protocol) ------------------------------------

    def cancel_task(self, task_id: int) -> bool:
        with self.lock:
            return self.waiting.pop(task_id, None) is not None

    def task_started(self, task_id: int) -> bool:
        with self.lock:
            return task_id not in self.waiting

    def collect_until(self, future: Future, timeout: float | None) -> None:
        return None  # results arrive in the delivery thread

    # Results -------------------------------------------------------------

    def _deliver(self) -> None:
        while True:
            task_id = self.finished.get()
            if task_id is None:
                return
            with self.lock:
                task = self.running.pop(task_id, None)
            if task is not None:
                try:
                    value, error = self._resolve(task)
                except BaseException as exc:  # never lose a result
                    value, error = None, exc
                self._count(task, error is None)
                settle(task.future, value, error)
                del task, value, error
            self._admit()
            self._close_if_drained()

    def _resolve(self, task: _Task) -> tuple[Any, BaseException | None]:
        kind, data = self.engine.outcome(task.handle, task.describe())
        if kind == OK:
            if task.call.chunk:
                values, failure = data
                return ([_arrive(v) for v in values], _arrive(failure)), None
            return data, None
        if kind == ERROR:
            return None, data
        return None, unpack_exception(data)

    # Stopping ------------------------------------------------------------

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        with self.lock:
            self.closed = True
            if cancel_futures:
                withdrawn = list(self.waiting.values())
                self.waiting.clear()
            else:
                withdrawn = []
            pending = [t.future for t in (*self.waiting.values(), *self.running.values())]
        for task in withdrawn:
            task.future.withdrawn()
        if not pending:
            self._close_engine()
        elif wait:
            wait_futures(pending)
            if threading.current_thread() is not self.thread:
                self.thread.join()  # it closes the engine once drained

    def terminate(self) -> None:
        """Cancels every unfinished task and lets go of the engine now (a task
        already running on a node finishes there; its result is dropped)."""
        with self.lock:
            self.closed = True
            tasks = [*self.waiting.values(), *self.running.values()]
            self.waiting.clear()
            self.running.clear()
        for task in tasks:
            if task.handle is not None:
                self.engine.cancel(task.handle)
            if not task.future.withdrawn():
                settle(task.future, error=PoolClosed("the pool was terminated while this task ran"))
        self._close_engine()

    def _close_if_drained(self) -> None:
        """After shutdown: lets go of the engine once the last task is settled."""
        with self.lock:
            drained = self.closed and not self.running and not self.waiting
        if drained:
            self._close_engine()

    def _close_engine(self) -> None:
        with self.lock:
            if self.engine_closed:
                return
            self.engine_closed = True
        self.finished.put(None)
        self.engine.close()


def _arrive(value: Any) -> Any:
    """A value that crossed the engine, with its exceptions rebuilt."""
    return unpack_exception(value.data) if isinstance(value, Packed) else value

