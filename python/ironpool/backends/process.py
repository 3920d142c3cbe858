"""The processes backend: tasks run in worker processes forked from a
template and supervised by the Rust engine (``_core.PoolCore``).

This module pickles each call once (``_send_once.encode``), hands it to the
engine, and turns the engine's completions into settled futures
(``_outcomes.resolve``): in the thread that waits for one (``collect_until``
drives the engine directly), or in the ``ironpool-results`` thread for
futures nobody waits on.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from .. import _core, _logging, _zygote
from .._futures import ChunkTicket, TaskFuture, settle
from .._options import PoolOptions
from .._outcomes import argument_error, resolve, sharing_hint, unpickling_error
from .._remote_exception import unpack_exception
from .._send_once import (
    AutoShare,
    Shared,
    SharedRef,
    dumps_shared,
    encode,
    encode_plain,
    share_large_bytes,
    unhold_all,
)
from .._serialize import FRESH, REUSE, dumps, loads
from ..errors import PoolClosed, SerializationError, WorkerStartError
from . import Call, WorkerInfo, current_pid, no_counts, refuse_closed
from ._functions import Function, Functions

if TYPE_CHECKING:
    from .._progress import Progress

#: How long a caller waiting in ``result()`` polls the workers itself before
#: sleeping. Tiny tasks answer within this, saving two thread wake-ups.
_SPIN_SECONDS = 200e-6
#: Longest uninterruptible wait inside the engine.
_WAIT_SLICE = 0.05
#: Why a task in flight failed with PoolClosed.
_STOPPED = "the pool stopped before this task finished"
_TERMINATED = "the pool was terminated while this task ran"
#: A map's chunk, queued or running, when its pool is terminated (either
#: way the map cannot finish: the same error for both).
_MAP_TERMINATED = "the pool was terminated before this map finished"


def start(options: PoolOptions) -> ProcessBackend | Unstarted:
    """A running backend, or one that fails every call with why it could not start."""
    if options.address is not None:
        raise TypeError(
            f"address={options.address!r} names a cluster: give it with backend='dask' or backend='ray', "
            "not with the processes backend"
        )
    init = {
        "sys_path": list(sys.path),
        "cwd": os.getcwd(),
        "initializer": options.initializer,
        "initargs": options.initargs,
        "threshold": options.buffer_threshold,
        "retry_on": options.retry_on,
        "logging": _logging.levels(),
        **_caller_identity(),
    }
    try:
        init_parts = dumps(init, 1 << 62)
    except Exception as exc:
        raise SerializationError(
            "initializer, initargs or retry_on could not be pickled: "
            f"{type(exc).__name__}: {exc}{sharing_hint(exc)}"
        ) from exc
    try:
        zygote = _zygote.get(options.preload, options.thread_limit, options.warm)
    except (OSError, WorkerStartError) as exc:
        return Unstarted(options.workers, WorkerStartError(f"workers could not start: {exc}"))
    core = _core.PoolCore(
        zygote,
        options.workers,
        init_parts,
        options.buffer_threshold,
        task_timeout=options.task_timeout,
        max_tasks_per_worker=options.max_tasks_per_worker,
        max_memory=options.max_memory,
        hard_memory_factor=options.hard_memory_factor,
        forward_output=options.forward_output,
    )
    if options.warm:  # after the first fork requests, which the template serves first
        _zygote.warm(options.preload, options.thread_limit)
    return ProcessBackend(core, options)


def _caller_identity() -> dict:
    """What workers take on from the caller for ``multiprocessing`` code: the
    main script (a stdlib spawn pool in a task re-imports it) and the authkey
    (``Manager()`` proxies authenticate with it; ``multiprocessing`` is
    already loaded here, by ``concurrent.futures.process``)."""
    from multiprocessing import process

    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    spec = getattr(main, "__spec__", None)
    return {
        "main_file": os.path.abspath(main_file) if isinstance(main_file, str) else None,
        "main_spec": getattr(spec, "name", None),
        "authkey": bytes(process.current_process().authkey),
    }


def _unhold_when_done(held: list[SharedRef], _future: Future) -> None:
    unhold_all(held)


class _Use:
    """A ``map``'s hold on its function and on the handles its chunks sent:
    the rest of the map may send them again (a rerun, a later chunk), so
    they are let go of when the map ends, not when a chunk does."""

    __slots__ = ("function", "held")

    def __init__(self, function: Function) -> None:
        self.function = function
        self.held: list[SharedRef] = []

    def release(self, _future: Any = None) -> None:
        unhold_all(self.held)
        self.function.release()


class ProcessBackend:
    """One pool's engine and the futures of its tasks. Holds no reference to
    the ``Pool``, so an unreferenced pool can be collected and shut down."""

    def __init__(self, core: Any, options: PoolOptions) -> None:
        self.core = core
        self.workers = options.workers
        self.threshold = options.buffer_threshold
        self.template_key = (options.preload, options.thread_limit, options.warm)
        # What workers' tasks imported, for the template once it serves
        # new workers (see warm_imported).
        self.recycles = options.max_tasks_per_worker is not None
        self.imported: dict[str, None] = {}
        # Task id -> its future; the future carries its Call (``_call``), so
        # a task in flight costs no object of its own.
        self.tasks: dict[int, TaskFuture | ChunkTicket] = {}
        self.task_ids = itertools.count(1)
        self.closed = False
        self.pid = os.getpid()
        self.object_ids = itertools.count(1)  # ids of registered functions and shared objects
        self.functions = Functions(core, self.object_ids)
        self.token = next(_pool_tokens)  # which pool a Shared handle belongs to
        self.auto_share = AutoShare(self._register_digested)
        self.thread = threading.Thread(target=self._deliver, name="ironpool-results", daemon=True)
        self.thread.start()
        _live.add(self)

    # Submitting ----------------------------------------------------------

    def check_open(self) -> None:
        refuse_closed(self.pid, _exiting, self.closed)

    def function(self, fn: Callable[..., Any]) -> _Use:
        return _Use(self.functions.acquire(fn))

    def submit(self, call: Call, function: Any = None) -> TaskFuture:
        use = function  # a map's _Use, or None: this call holds the function itself
        future = TaskFuture()
        self.check_open()
        if use is None:
            try:
                registered = self.functions.acquire(call.fn)
            except SerializationError as exc:
                future.set_exception(exc)
                return future
            if registered.counted:
                future.add_done_callback(registered.release)
        else:
            assert isinstance(use, _Use)
            registered = use.function
        encoded = self._encode(call, future)
        if encoded is None:
            return future
        parts, needs, held = encoded
        task_id = self._track(call, future)
        if use is not None:
            use.held.extend(held)
        elif held:
            future.add_done_callback(functools.partial(_unhold_when_done, held))
        items = len(call.args) if call.chunk else 1
        try:
            self.core.submit(task_id, registered.id, parts, call.timeout, call.retries, items, call.chunk, needs=needs)
        except BaseException:
            self._untrack(task_id)
            if use is None:
                unhold_all(held)  # never submitted, so never settled
            raise
        return future

    def submit_many(self, calls: list[Call], function: Any) -> list[ChunkTicket]:
        """Schedules a ``map``'s chunks (alike in function, flags, time limit
        and retries) with one call into the engine, which can then send
        those bound for one worker in one frame."""
        self.check_open()
        use = function
        assert isinstance(use, _Use)
        tickets = []
        batch = []
        for call in calls:
            ticket = ChunkTicket()
            tickets.append(ticket)
            encoded = self._encode(call, ticket)
            if encoded is None:
                continue
            parts, needs, held = encoded
            use.held.extend(held)
            batch.append((self._track(call, ticket), parts, len(call.args), needs))
        if batch:
            first = calls[0]
            try:
                self.core.submit_many(use.function.id, batch, first.timeout, first.retries, first.chunk)
            except BaseException:
                for task_id, *_ in batch:
                    self._untrack(task_id)
                raise
        return tickets

    def submit_lane(
        self, function: Any, items: Any, chunk: int, timeout: float | None, retries: int, flags: int,
        ordered: bool = True, progress: Progress | None = None,
    ) -> Lane | None:
        """Schedules ``items`` of a ``map`` as chunks of ``chunk`` items in
        one lane (one call into the engine, no ticket per chunk), to be
        taken in order or, unless ``ordered``, as they finish, with the
        items of chunks that return counted in ``progress`` as they come
        in; None, with nothing scheduled, unless every item is an atom or a
        tuple of plain arguments (``_core.plain_items``)."""
        self.check_open()
        assert isinstance(function, _Use)
        count = None if progress is None else progress.advance
        lane = self.core.submit_lane(function.function.id, items, chunk, timeout, retries, flags, ordered, count)
        return None if lane is None else Lane(self, lane, items, chunk, progress)

    def _encode(self, call: Call, future: Any) -> tuple[list, Sequence[int], list[SharedRef]] | None:
        """The call's payload, the registered objects it needs and the handles
        it holds; None once its future holds why it could not be pickled."""
        what: Any = call.args if call.chunk else (call.args, call.kwargs or {})
        pinned = call.rerun_of.sent if call.rerun_of is not None else None
        if not pinned and (plain := encode_plain(what, self.threshold)) is not None:
            return [plain], (), []  # nothing sent once, nothing held
        if not call.chunk:
            what = (share_large_bytes(call.args, self.auto_share, self.threshold), call.kwargs or {})
        try:
            encoded = encode(
                what, pool=self.token, threshold=self.threshold, since=call.since, auto=self.auto_share, pinned=pinned
            )
        except Exception as exc:
            future.set_exception(argument_error(exc, call.pickling_culprit()))
            return None
        # Kept while the task lives: the handles of objects sent once stay
        # valid for the burst of tasks using them, and a rerun of one of a
        # chunk's items sends the same ones.
        call.sent = encoded.pinned
        return encoded.parts, encoded.needs, encoded.held

    def _track(self, call: Call, future: Any) -> int:
        """A new task id, bound to ``future`` and remembered until it settles."""
        task_id = next(self.task_ids)
        future.bind(self, task_id)
        future._call = call
        self.tasks[task_id] = future
        return task_id

    def _untrack(self, task_id: int) -> TaskFuture | ChunkTicket | None:
        """Forgets a task that will not be settled through ``_settle_all``."""
        future = self.tasks.pop(task_id, None)
        if future is not None:
            future._call = None  # a future the caller keeps must not keep the arguments
        return future

    def _untrack_all(self) -> list[TaskFuture | ChunkTicket]:
        futures = list(self.tasks.values())
        self.tasks.clear()
        for future in futures:
            future._call = None
        return futures

    def chunk_size(self, function: Any, remaining: int | None) -> int:
        assert isinstance(function, _Use)
        return self.core.chunk_size(function.function.id, remaining)

    def share(self, value: Any, reuse: bool) -> Shared:
        self.check_open()
        parts = dumps_shared(value, self.threshold)
        ref_id = next(self.object_ids)
        self.core.register_object(ref_id, parts)
        return Shared(SharedRef(ref_id, self.token, REUSE if reuse else FRESH, self.core.unregister), value)

    def _register_digested(self, parts: list, mode: int) -> tuple[Shared, bytes | None]:
        ref_id = next(self.object_ids)
        digest = self.core.register_digested(ref_id, parts)
        return Shared(SharedRef(ref_id, self.token, mode, self.core.unregister), None), digest

    def stats(self) -> list[WorkerInfo]:
        return [WorkerInfo(**d) for d in self.core.stats()]

    def counts(self) -> dict[str, Any]:
        return self.core.counts()

    def warm_imported(self, names: list[str]) -> None:
        """A worker's tasks imported ``names`` (installed packages): its template imports them
        too, in the background, unless this pool opted out (``warm=False``),
        so that later workers start with them. A pool that recycles its
        workers asks at once; any other asks once it is shut down (for the
        next pool), so the imports never take a CPU from its own tasks."""
        if not self.template_key[2]:
            return
        self.imported.update(dict.fromkeys(names))
        if self.recycles or self.closed:
            # Not from here (the results thread, records lock held): asking
            # may wait for another template's start-up.
            threading.Thread(target=self._warm_imported, name="ironpool-warm", daemon=True).start()

    def _warm_imported(self) -> None:
        names = list(self.imported)
        for name in names:  # not clear(): a report may come in meanwhile
            self.imported.pop(name, None)
        if names:
            preload, thread_limit, _ = self.template_key
            _zygote.warm(preload, thread_limit, tuple(names))

    def template_info(self, timeout: float) -> _zygote.TemplateInfo:
        return _zygote.info(*self.template_key, timeout)

    # Futures (the TaskDriver protocol) ------------------------------------

    def cancel_task(self, task_id: int) -> bool:
        if not self.core.cancel(task_id):
            return False
        self._untrack(task_id)
        return True

    def task_started(self, task_id: int) -> bool:
        return self.core.is_dispatched(task_id)

    def wait_any(self, entries: Any, timeout: float | None) -> None:
        """Collects completions until any of a map's ``entries`` in flight
        (lanes and ``(ticket or future, call)`` pairs) is done or
        ``timeout`` passes; with many chunks to come, without spinning."""
        waited = _AnyDone(entries)
        if not waited.done():
            self.collect_until(waited, timeout, spin=waited.outstanding() <= self.workers)

    def collect_until(self, future: Any, timeout: float | None, spin: bool | None = None) -> None:
        """Collects completions in this thread until ``future`` (anything
        with ``done()``) is done or ``timeout`` passes (the caller then
        reads it as usual). ``spin``: whether to poll the workers before
        sleeping; by default, if no more tasks are in flight than workers."""
        if self.pid != current_pid():
            raise PoolClosed(
                f"this future belongs to a pool of process {self.pid} and was inherited by fork; "
                "its result will never reach this process"
            )
        if threading.current_thread() is self.thread:
            return
        core = self.core
        deadline = None if timeout is None else time.monotonic() + timeout
        while not future.done():
            generation = core.generation()
            if future.done():
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            # Sleep in slices: Ctrl-C is handled between them (the wait itself
            # runs detached in Rust, where Python cannot see signals).
            step = _WAIT_SLICE if remaining is None else min(remaining, _WAIT_SLICE)
            # Spinning pays off for a lone task; with more in flight than
            # workers, it would take a core from the workers (on a machine
            # with as many cores as workers), and results come in batches.
            spinning = spin
            if spinning is None:  # a map's lane chunks are in flight too
                spinning = len(self.tasks) + core.lane_chunks_pending() <= self.workers
            batch = core.wait_driving(generation, _SPIN_SECONDS if spinning else 0.0, step)
            if batch is None:
                return
            _handle_records(core, self.warm_imported)
            if batch:
                self._settle_all(batch)
                core.kick()

    # Results -------------------------------------------------------------

    def _deliver(self) -> None:
        core = self.core
        while True:
            batch = core.wait_completions(None)
            if batch is None:
                break
            _handle_records(core, self.warm_imported)
            if not batch:  # woken for logging records only
                continue
            self._settle_all(batch)
            del batch  # do not pin the last results' segments while asleep
            core.kick()
            self.functions.forget_dead()
        for future in self._untrack_all():
            settle(future, error=PoolClosed(_STOPPED))

    def _settle_all(self, batch: list) -> None:
        tasks = self.tasks
        for completion in batch:
            future = tasks.pop(completion.task_id, None)
            if future is None:
                continue
            call, future._call = future._call, None
            if call is None or future.done():  # None: _untrack_all took it, and settles it
                continue
            _settle_one(future, call, completion)

    # Stopping ------------------------------------------------------------

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        if self.pid != os.getpid():
            return
        interrupted: KeyboardInterrupt | None = None
        try:
            self.closed = True
            if cancel_futures:
                self.cancel_pending()
            self.core.shutdown()
            self._warm_imported()
        except KeyboardInterrupt as exc:  # the first Ctrl-C, before the wait began
            interrupted = exc
            self.cancel_pending()
            self.core.shutdown()
        if wait:
            self._join(interrupted)
        elif interrupted is not None:
            raise interrupted

    def cancel_pending(self) -> None:
        """Cancels every task not yet handed to a worker."""
        for task_id in self.core.cancel_pending():
            future = self._untrack(task_id)
            if future is not None:
                future.withdrawn()  # already withdrawn from the engine

    def _join(self, interrupted: KeyboardInterrupt | None) -> None:
        """Waits for the workers to stop, in slices so that Ctrl-C is seen:
        the first cancels what has not started and raises once the running
        tasks are done; a second kills the workers and raises at once."""
        while True:
            try:
                while not self.core.join(_WAIT_SLICE):
                    pass
                if threading.current_thread() is not self.thread:
                    self.thread.join()
                break
            except KeyboardInterrupt as exc:
                if interrupted is not None:
                    self.terminate()
                    raise
                interrupted = exc
                self.cancel_pending()
        if interrupted is not None:
            raise interrupted

    def terminate(self) -> None:
        """Cancels every unfinished task and kills the workers now."""
        if self.pid != os.getpid():
            return
        self.closed = True
        for future in self._untrack_all():
            if isinstance(future, ChunkTicket):
                settle(future, error=PoolClosed(_MAP_TERMINATED))
            elif not future.withdrawn():
                settle(future, error=PoolClosed(_TERMINATED))
        self.core.terminate()
        self.core.join()
        if threading.current_thread() is not self.thread:
            self.thread.join()

    def orphan(self) -> None:
        """In a forked child: this copy's futures will never settle, so fail
        them now (a lock another thread held at the fork is left alone)."""
        # Their done callbacks release functions: under a fresh lock, since
        # another thread of the parent may have held the old one.
        self.functions.lock = threading.RLock()
        for future in self._untrack_all():
            # No condition: a ChunkTicket, or a future no thread has waited on.
            condition = getattr(future, "_made_condition", None)
            if condition is None or condition.acquire(blocking=False):
                if condition is not None:
                    condition.release()
                settle(future, error=PoolClosed(
                    f"this task was submitted by process {self.pid}; this process is a fork of it "
                    "and will never receive its result"
                ))


def _handle_records(core: Any, imported: Callable[[list[str]], None]) -> None:
    """Workers' logging records (and reports of what their tasks imported),
    then the lane completions that came with them: a task's records are
    handled before its result is."""
    try:
        _logging.handle_records(core.take_logs, imported)
    finally:
        core.publish_lanes()


def _settle_one(future: TaskFuture | ChunkTicket, call: Call, completion: Any) -> None:
    try:
        value, error = resolve(completion.outcome, completion.attempts, call.describe)
        if error is None and call.chunk:
            value = _chunk_value(*value)
    except BaseException as exc:  # never lose a result
        value, error = None, exc
    settle(future, value, error)


class _AnyDone:
    """Done once any of a map's entries in flight is (``wait_any``)."""

    __slots__ = ("entries",)

    def __init__(self, entries: Any) -> None:
        self.entries = entries

    def done(self) -> bool:
        return any(entry[0].done() if type(entry) is tuple else entry.done() for entry in self.entries)

    def outstanding(self) -> int:
        return sum(1 if type(entry) is tuple else entry.core.outstanding() for entry in self.entries)


class Lane:
    """A ``map``'s handle on a window of its chunks submitted as one lane
    (``_core.MapLane``): their completions wait in the engine's binding
    until ``take`` unpickles the values of those finished, in order (or,
    for ``imap_unordered``, as they finish)."""

    __slots__ = ("backend", "chunk", "core", "items", "progress")

    def __init__(self, backend: ProcessBackend, core: Any, items: Any, chunk: int, progress: Progress | None) -> None:
        self.backend = backend
        self.core = core
        self.items = items  # kept to run a failed chunk's items again
        self.chunk = chunk
        self.progress = progress

    @property
    def left(self) -> int:
        """Chunks not taken yet."""
        return self.core.left

    def done(self) -> bool:
        """Whether a chunk can be taken: the next one, or, out of order, any."""
        return self.core.done()

    def wait(self, timeout: float | None) -> None:
        """Collects completions until a chunk can be taken or ``timeout``
        passes; with many chunks to come, without spinning."""
        if not self.core.done():
            spin = self.core.outstanding() <= self.backend.workers
            self.backend.collect_until(self.core, timeout, spin=spin)

    def take(self, make_call: Callable[[Any], Call]) -> tuple[list, int, tuple[ChunkTicket, Call] | None]:
        """``(values, taken, stuck)``: the values of the finished chunks at
        the front (out of order: of every finished chunk), how many chunks
        they were, and, for one that did not
        simply return, a settled ticket and a ``Call`` (made by
        ``make_call`` from its items) to handle as any chunk's."""
        values, taken, stuck = self.core.take(loads)
        if stuck is None:
            return values, taken, None
        index, kind, what = stuck
        start = index * self.chunk
        call = make_call(list(self.items[start:start + self.chunk]))
        ticket = ChunkTicket()
        if kind == "completion":
            _settle_one(ticket, call, what)
        elif kind == "returned":  # read already: not unpickled twice
            try:
                settle(ticket, _chunk_value(*what))
            except BaseException as exc:  # never lose a result
                settle(ticket, error=exc)
        elif kind == "unpicklable":
            settle(ticket, error=unpickling_error(what, call.describe))
            if self.progress is not None:  # counted as it returned; its reruns count it again
                self.progress.owe(len(call.args))
        elif kind == "withdrawn":
            ticket.withdrawn()
        else:
            settle(ticket, error=PoolClosed(_MAP_TERMINATED if kind == "terminated" else _STOPPED))
        return values, taken, (ticket, call)

    def cancel(self) -> None:
        """Withdraws the chunks no worker has taken (not from a forked
        child: its copy of the engine has no threads, and may hold a lock)."""
        if self.backend.pid == current_pid():
            self.backend.core.cancel_lane(self.core)


def _chunk_value(values: list, failure: Any) -> tuple[list, BaseException | None]:
    """A chunk's ``(values, error)`` from what its worker sent: the packed
    error that stopped it, or (KEEP_GOING) the failed items' packed errors,
    which take their places among the values."""
    if failure is None:
        return values, None
    if isinstance(failure, list):
        for index, packed in failure:
            values[index] = unpack_exception(packed)
        return values, None
    return values, unpack_exception(failure)


class Unstarted:
    """A backend whose workers could not start: every call fails with why."""

    def __init__(self, workers: int, error: BaseException) -> None:
        self.workers = workers
        self.error = error

    def check_open(self) -> None:
        raise self.error

    def function(self, fn: Callable[..., Any]) -> Any:
        raise self.error

    def submit(self, call: Call, function: Any = None) -> TaskFuture:
        future = TaskFuture()
        future.set_exception(self.error)
        return future

    def chunk_size(self, function: Any, remaining: int | None) -> int:
        return 1

    def share(self, value: Any, reuse: bool) -> Shared:
        raise self.error

    def stats(self) -> list[WorkerInfo]:
        return []

    def counts(self) -> dict[str, Any]:
        return no_counts()

    def template_info(self, timeout: float) -> None:
        return None

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        pass

    def terminate(self) -> None:
        pass


_live: weakref.WeakSet[ProcessBackend] = weakref.WeakSet()
_pool_tokens = itertools.count(1)

#: Set once the interpreter is exiting: no pool takes new work then.
_exiting = False


def _shutdown_all() -> None:
    global _exiting
    _exiting = True
    for backend in list(_live):
        try:
            backend.shutdown(wait=True, cancel_futures=False)
        except Exception:
            pass


def _forget_after_fork() -> None:
    # The child keeps the parent's pools as inert copies (check_open refuses
    # them); their engines' threads do not exist here.
    for backend in list(_live):
        backend.orphan()
    _live.clear()


# Runs before threads are joined at interpreter exit, like the stdlib's.
threading._register_atexit(_shutdown_all)  # type: ignore[attr-defined]
os.register_at_fork(after_in_child=_forget_after_fork)
