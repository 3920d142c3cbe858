"""The threads backend: tasks run on worker threads of this process, and
nothing is pickled (``Pool(backend="threads")``).

For I/O-bound work and libraries that release the GIL. Arguments, results
and exceptions are the objects themselves; an exception keeps its
traceback, as with ``concurrent.futures.ThreadPoolExecutor``. Each worker
thread runs the pool's ``initializer`` and keeps what it returned as its
``ironpool.worker_state()``.

What a thread cannot do, and so this backend does not pretend to:

* **kill a hung task.** At its ``task_timeout`` a task's future fails with
  ``TaskTimeout`` (or it is retried), its thread is *abandoned* (it runs the
  task to its end, and the result is dropped) and a new thread takes its
  place, so the pool keeps its size. The abandoned thread still holds the
  GIL when it runs Python code, and what it holds stays held.
* **isolate a crash.** A segfault or ``os._exit`` in a task ends this whole
  process; there is no ``WorkerCrashed``.
* **cap memory, import in a template, limit BLAS threads or silence
  output** per worker: ``max_memory_per_worker``, ``preload``,
  ``thread_limit`` and ``forward_output=False`` are refused (``start``).

``stats()`` reports each worker thread with ``pid`` = its native thread id
(as ``top -H`` shows it) and ``rss`` = 0: threads share one process's memory.
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from .. import _state
from .._futures import TaskFuture, settle
from .._options import PoolOptions
from .._outcomes import attempts_text, with_attempt_records
from .._send_once import Shared, call_started
from .._serialize import serialization_error
from .._worker import run_chunk
from ..errors import Attempt, PoolClosed, TaskTimeout, WorkerStartError
from . import Call, WorkerInfo, no_counts, refuse_closed

#: A map chunk aims to run this long (items of unknown duration go one at a time).
_CHUNK_SECONDS = 2e-3
_MAX_CHUNK = 1024
#: Longest a map waiting for any entry sleeps before it looks again.
_ANY_SLICE = 0.05
#: Tells a worker thread to exit (one per worker, queued behind the work).
_STOP: Any = object()


def start(options: PoolOptions) -> ThreadBackend:
    """The threads backend, or ``ValueError`` naming each option it cannot honour."""
    cannot = []
    if options.max_memory is not None:
        cannot.append("max_memory_per_worker (threads share this process's memory: there is no per-thread figure)")
    if options.preload:
        cannot.append("preload (there is no template process: import the modules in this process)")
    if options.thread_limit not in (None, 1):
        cannot.append(
            f"thread_limit={options.thread_limit} (BLAS and OpenMP pools are per process, shared by this "
            "process and every thread: set them here, e.g. with threadpoolctl or OMP_NUM_THREADS)"
        )
    if not options.forward_output:
        cannot.append("forward_output=False (threads write to this process's own stdout and stderr)")
    if cannot:
        raise ValueError(
            "backend='threads' cannot honour " + "; ".join(cannot) + ". Use backend='processes' for these."
        )
    return ThreadBackend(options)


class ThreadShared(Shared):
    """``pool.share(value)`` of a threads pool: tasks receive ``value``
    itself in place of the handle, with no copy, so treat it as read-only
    (a task's change is seen by every other task; ``reuse`` changes
    nothing). The handle is replaced in a task's arguments and inside the
    tuples, lists and dicts among them; it cannot be pickled, and works
    only with the pool that made it, until it is released."""

    def __init__(self, value: Any, pool: int) -> None:
        self.value = value
        self._pool = pool
        self._released = 0  # the call_started() mark when released; 0: not
        _handles.add(self)

    def for_task(self, pool: int, since: int) -> Any:
        """The object, for a task of pool ``pool`` begun at ``since``."""
        if self._pool != pool:
            raise serialization_error(
                "an ironpool.Shared handle belongs to another pool: pass it only in the arguments of "
                "tasks of the pool whose share() made it"
            )
        if self._released and self._released < since:
            raise serialization_error("an ironpool.Shared handle was released: share() the object again")
        return self.value

    def release(self) -> None:
        """Refuses calls made after this (a ``map`` already running keeps it)."""
        if not self._released:
            self._released = call_started()

    def __reduce__(self):
        raise serialization_error(
            "an ironpool.Shared handle of a threads pool cannot be pickled: pass it only in the "
            "arguments of that pool's tasks"
        )

    def __repr__(self) -> str:
        return f"<ironpool.Shared of {type(self.value).__name__} (threads)>"


#: Every threads-pool handle alive: arguments are searched for handles only
#: while there is one.
_handles: weakref.WeakSet[ThreadShared] = weakref.WeakSet()


def _with_values(value: Any, pool: int, since: int, path: set[int]) -> Any:
    """``value`` with each handle inside it replaced by its object (``path``:
    the containers being searched, so that a list holding itself ends)."""
    if isinstance(value, Shared):
        if isinstance(value, ThreadShared):
            return value.for_task(pool, since)
        raise serialization_error(
            "an ironpool.Shared handle of a processes pool was passed to a threads pool: pass it only "
            "in the arguments of tasks of the pool whose share() made it"
        )
    kind = type(value)
    if kind not in (tuple, list, dict) or id(value) in path:
        return value
    path.add(id(value))
    try:
        if kind is dict:
            new_values = [_with_values(v, pool, since, path) for v in value.values()]
            if all(a is b for a, b in zip(new_values, value.values(), strict=True)):
                return value
            return dict(zip(value.keys(), new_values, strict=True))
        items = [_with_values(v, pool, since, path) for v in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return kind(items)
    finally:
        path.discard(id(value))


class _Use:
    """A ``map``'s function, with the measured run time of its items."""

    __slots__ = ("fn", "per_item")

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.per_item: float | None = None

    def release(self, _future: Any = None) -> None:
        pass


class _Task:
    __slots__ = ("args", "attempts", "call", "future", "kwargs", "retries", "started", "use")

    def __init__(self, call: Call, future: TaskFuture, args: Any, kwargs: dict | None, use: _Use | None) -> None:
        self.call = call
        self.future = future
        self.args = args  # with shared handles replaced by their objects
        self.kwargs = kwargs
        self.use = use
        self.retries = call.retries
        self.attempts: list[Attempt] = []
        self.started = False  # its future was marked running


class _Worker:
    """One worker thread and its figures; a slot's replacement is a new one."""

    __slots__ = (
        "abandoned", "busy_seconds", "current", "deadline", "first", "limit", "slot", "tasks_done", "thread", "tid",
    )

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.thread: threading.Thread | None = None
        self.tid = 0
        self.tasks_done = 0
        self.busy_seconds = 0.0
        self.current: _Task | None = None
        self.first: _Task | None = None  # a timed-out task to run again before taking from the queue
        self.deadline: float | None = None  # when the current task's time is up
        self.limit = 0.0
        self.abandoned = False  # its task timed out: it no longer serves the pool


def _own_traceback(exc: BaseException) -> BaseException:
    """``exc`` with its traceback starting at the task's frame (the frame
    that caught it is ours, and would keep its locals alive)."""
    tb = exc.__traceback__
    if tb is not None:
        exc.__traceback__ = tb.tb_next
    return exc


def _call(call: Call, args: Any, kwargs: dict | None) -> tuple[bool, Any]:
    """Runs a call or a chunk: ``(True, value)`` or ``(False, exception)``.
    Holds no future: its frame stays in the traceback of what it raised."""
    if call.chunk:
        values, failure = run_chunk(call.fn, args, call.chunk, _own_traceback)
        if isinstance(failure, list):  # KEEP_GOING: each failed item's exception in its place
            for index, exc in failure:
                values[index] = exc
            failure = None
        return True, (values, failure)
    try:
        return True, call.fn(*args, **(kwargs or {}))
    except BaseException as exc:  # SystemExit too: it ends the task, not the thread
        return False, _own_traceback(exc)


class ThreadBackend:
    """A pool's worker threads, its queue and the watch on time limits.
    Holds no reference to the ``Pool``, so an unreferenced pool can be
    collected and shut down."""

    def __init__(self, options: PoolOptions) -> None:
        self.workers = options.workers
        self.initializer = options.initializer
        self.initargs = options.initargs
        self.task_timeout = options.task_timeout
        self.max_tasks = options.max_tasks_per_worker
        self.retry_on = options.retry_on
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)  # the deadline watch's
        #: Told of each task's end while a map waits for any of its entries.
        self.ended = threading.Condition(threading.Lock())
        self.waiting_any = 0
        self.pid = os.getpid()
        self.token = next(_pool_tokens)  # which pool a ThreadShared belongs to
        self.closed = False
        self.stopping = False  # the workers' _STOPs are queued
        self.terminated = False
        self.broken: WorkerStartError | None = None
        self.slots = [_Worker(slot) for slot in range(self.workers)]
        self.restarts = [0] * self.workers
        self.last_exit = [""] * self.workers
        self.threads: set[threading.Thread] = set()  # the threads serving the queue
        self.watch: threading.Thread | None = None
        self.next_deadline = math.inf
        #: For counts() (its queued and running are read off the state).
        self.totals: dict[str, float] = no_counts()
        self.totals_lock = threading.Lock()
        with self.lock:
            for worker in self.slots:
                self._start(worker, None)
        _live.add(self)

    # Submitting ------------------------------------------------------------

    def check_open(self) -> None:
        refuse_closed(self.pid, _exiting, self.closed)

    def function(self, fn: Callable[..., Any]) -> _Use:
        return _Use(fn)

    def submit(self, call: Call, function: Any = None) -> TaskFuture:
        future = TaskFuture()
        args, kwargs = call.args, call.kwargs
        if _handles:
            try:
                args = _with_values(args, self.token, call.since, set())
                if kwargs:
                    kwargs = _with_values(kwargs, self.token, call.since, set())
            except Exception as exc:
                self.check_open()
                future.set_exception(exc)
                return future
        task = _Task(call, future, args, kwargs, function)
        with self.lock:
            self.check_open()
            self.queue.put(task)
        with self.totals_lock:
            self.totals["submitted"] += 1
        return future

    def chunk_size(self, function: Any, remaining: int | None) -> int:
        per_item = function.per_item
        if per_item is None:
            return 1  # until an item has been timed
        n = _MAX_CHUNK if per_item <= 0 else int(_CHUNK_SECONDS / per_item)
        if remaining is not None:
            n = min(n, remaining // (4 * self.workers))  # every thread gets some
        return max(1, min(n, _MAX_CHUNK))

    def share(self, value: Any, reuse: bool) -> Shared:
        self.check_open()
        return ThreadShared(value, self.token)

    def stats(self) -> list[WorkerInfo]:
        return [
            WorkerInfo(
                slot=w.slot, pid=w.tid, tasks_done=w.tasks_done, busy=w.current is not None, rss=0,
                restarts=self.restarts[w.slot], last_exit=self.last_exit[w.slot], busy_seconds=w.busy_seconds,
            )
            for w in self.slots
        ]

    def counts(self) -> dict[str, Any]:
        with self.totals_lock:
            counts = dict(self.totals)
        running = sum(w.current is not None for w in self.slots)
        counts["running"] = running
        counts["queued"] = max(0, counts["submitted"] - counts["returned"] - counts["failed"] - running)
        return counts

    def _count(self, ok: bool, items: int, seconds: float) -> None:
        with self.totals_lock:
            totals = self.totals
            totals["returned" if ok else "failed"] += 1
            totals["items_done"] += items
            totals["task_seconds"] += seconds

    # Worker threads ----------------------------------------------------------

    def _start(self, worker: _Worker, first: _Task | None) -> None:
        """Starts ``worker``'s thread in its slot; it runs ``first`` (a retry
        of a timed-out task) before taking from the queue. Lock held."""
        name = f"ironpool-thread-{worker.slot}"
        thread = threading.Thread(target=self._serve, args=(worker,), name=name, daemon=True)
        worker.thread, worker.first = thread, first
        self.slots[worker.slot] = worker
        self.threads.add(thread)
        thread.start()

    def _serve(self, worker: _Worker) -> None:
        # This frame is in the traceback of every exception a task raises
        # (as its frames' f_back): it lets go of each task once settled.
        worker.tid = threading.get_native_id()
        task: Any = worker.first
        worker.first = None
        try:
            try:
                state = _state.NO_INITIALIZER if self.initializer is None else self.initializer(*self.initargs)
            except BaseException as exc:
                self._break(exc)
                state = _state.NO_INITIALIZER
            _state.set_thread_state(state)
            del state
            get = self.queue.get
            while True:
                if task is None:
                    task = get()
                    if task is _STOP:
                        return
                future = task.future
                if self.broken is not None or self.terminated:
                    self._settle(future, error=self.broken or PoolClosed("the pool was terminated"))
                    task = future = None
                    continue
                if not task.started:
                    if not future.set_running_or_notify_cancel():
                        task = future = None  # cancelled while queued
                        continue
                    task.started = True
                call = task.call
                limit = call.timeout if call.timeout is not None else self.task_timeout
                worker.current = task
                while True:
                    if limit is not None:
                        self._watch(worker, limit)
                    began = time.perf_counter()
                    ok, value = _call(call, task.args, task.kwargs)
                    elapsed = time.perf_counter() - began
                    if limit is not None and not self._finished(worker):
                        return  # timed out: the watch settled the task and replaced this thread
                    worker.busy_seconds += elapsed
                    if ok or not self._retry(task, value):
                        break
                worker.current = None
                worker.tasks_done += 1
                self._count(ok, len(task.args) if call.chunk else 1, elapsed)
                if ok:
                    if task.use is not None and call.chunk and task.args:
                        self._measured(task.use, elapsed / len(task.args))
                    self._settle(future, value)
                else:
                    if task.attempts:
                        value.add_note(attempts_text(task.attempts))
                    future._task_traceback = value.__traceback__
                    self._settle(future, error=value)
                task = future = call = value = None
                if self.max_tasks is not None and worker.tasks_done >= self.max_tasks:
                    with self.lock:
                        self._replace(worker, "recycled: task limit", None)
                    return
        finally:
            task = future = call = value = None
            with self.lock:
                self.threads.discard(threading.current_thread())

    def _settle(self, future: TaskFuture, value: Any = None, error: BaseException | None = None) -> None:
        settle(future, value, error)
        if self.waiting_any:  # read after settling: a waiter counted later sees the future done
            with self.ended:
                self.ended.notify_all()

    def wait_any(self, entries: Any, timeout: float | None) -> None:
        """Returns once any of a map's ``(future, call)`` entries is done or
        ``timeout`` passes: one wait, where the stdlib's ``wait`` would lock
        every future of the window twice."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.ended:
            self.waiting_any += 1
            try:
                while not any(future.done() for future, _ in entries):
                    remaining = _ANY_SLICE if deadline is None else min(_ANY_SLICE, deadline - time.monotonic())
                    if remaining <= 0:
                        return
                    # In slices: a future cancelled by another thread ends no task here.
                    self.ended.wait(remaining)
            finally:
                self.waiting_any -= 1

    @staticmethod
    def _measured(use: _Use, per_item: float) -> None:
        old = use.per_item
        use.per_item = per_item if old is None else 0.7 * old + 0.3 * per_item

    def _retry(self, task: _Task, exc: BaseException) -> bool:
        """Whether ``exc`` (a task's own) earns another run in this thread;
        a chunk's exceptions are its items' and never retried whole."""
        if task.retries <= 0 or not self.retry_on or task.call.chunk or self.terminated:
            return False
        if not isinstance(exc, self.retry_on):
            return False
        task.retries -= 1
        task.attempts.append(Attempt("raised", error=exc, description=f"raised {type(exc).__name__}: {exc}"))
        with self.totals_lock:
            self.totals["retried"] += 1
        return True

    def _replace(self, worker: _Worker, why: str, first: _Task | None) -> None:
        """Starts a new thread in ``worker``'s slot. Lock held."""
        self.last_exit[worker.slot] = why
        if not self.closed:
            self.restarts[worker.slot] += 1
        self._start(_Worker(worker.slot), first)

    def _break(self, exc: BaseException) -> None:
        err = WorkerStartError(f"workers could not start: the initializer raised {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        with self.lock:
            if self.broken is None:
                self.broken = err

    # Time limits -------------------------------------------------------------

    def _watch(self, worker: _Worker, limit: float) -> None:
        deadline = time.monotonic() + limit
        with self.lock:
            worker.deadline, worker.limit = deadline, limit
            if self.watch is None:
                self.watch = threading.Thread(target=self._watch_deadlines, name="ironpool-deadlines", daemon=True)
                self.watch.start()
            elif deadline < self.next_deadline:
                self.wake.notify()

    def _finished(self, worker: _Worker) -> bool:
        """The run ended in time: False if its time was up (it was abandoned)."""
        with self.lock:
            worker.deadline = None
            return not worker.abandoned

    def _watch_deadlines(self) -> None:
        """Abandons each thread whose task ran past its limit, while any may."""
        while True:
            expired: list[tuple[TaskFuture, TaskTimeout]] = []
            with self.lock:
                now = time.monotonic()
                nearest = math.inf
                for worker in list(self.slots):
                    if worker.deadline is None:
                        continue
                    if worker.deadline > now:
                        nearest = min(nearest, worker.deadline)
                        continue
                    timeout = self._abandon(worker)
                    if timeout is not None:
                        expired.append(timeout)
                if not expired:
                    if nearest == math.inf and self.closed:
                        self.watch = None
                        return
                    self.next_deadline = nearest
                    self.wake.wait(None if nearest == math.inf else nearest - now)
                    self.next_deadline = math.inf
            for future, error in expired:  # outside the lock: callbacks may submit
                self._settle(future, error=error)

    def _abandon(self, worker: _Worker) -> tuple[TaskFuture, TaskTimeout] | None:
        """Leaves ``worker``'s thread to its task and starts another in its
        slot, which runs the task again while its retries last; else the
        future and its TaskTimeout. Lock held."""
        task = worker.current
        assert task is not None
        worker.abandoned, worker.deadline = True, None
        if worker.thread is not None:
            self.threads.discard(worker.thread)  # shutdown does not wait for it
        limit, tid = worker.limit, worker.tid
        why = f"timeout: thread {tid} abandoned after {limit:g} s, still running its task"
        if task.retries > 0 and not self.terminated:
            task.retries -= 1
            task.attempts.append(Attempt("timeout", tid, description=f"timeout (thread {tid}, {limit:g} s)"))
            with self.totals_lock:
                self.totals["retried"] += 1
            self._replace(worker, why, task)
            return None
        self._replace(worker, why, None)
        what = task.call.describe()
        error = TaskTimeout(
            f"{what} ran longer than its {limit:g} s limit; a thread cannot be killed, so thread {tid} "
            "was abandoned (it runs the task to its end, and its result is dropped) and a new thread "
            "took its place. Use backend='processes' to kill hung tasks",
            task=what, limit=limit, pid=tid,
        )
        with_attempt_records(error, task.attempts)
        self._count(False, len(task.args) if task.call.chunk else 1, limit)
        return task.future, error

    # Stopping ----------------------------------------------------------------

    def _stop_workers(self) -> None:
        """Queues one _STOP per worker, behind the work. Lock held."""
        if not self.stopping:
            self.stopping = True
            for _ in range(self.workers):
                self.queue.put(_STOP)
        self.wake.notify()

    def _withdraw_queued(self) -> None:
        """Cancels every task no thread has taken (keeping the _STOPs)."""
        stops = 0
        while True:
            try:
                task = self.queue.get(block=False)
            except queue.Empty:
                break
            if task is _STOP:
                stops += 1
            else:
                task.future.withdrawn()  # notified too: cf.wait and as_completed count it done
        for _ in range(stops):
            self.queue.put(_STOP)

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        if self.pid != os.getpid():
            return
        with self.lock:
            self.closed = True
        if cancel_futures:
            self._withdraw_queued()
        with self.lock:
            self._stop_workers()
        if wait:
            me = threading.current_thread()
            while True:
                with self.lock:
                    serving = [t for t in self.threads if t is not me]
                if not serving:
                    break
                for thread in serving:
                    thread.join()

    def terminate(self) -> None:
        """Cancels what has not started and fails what runs with
        ``PoolClosed``; the threads running tasks finish them unseen (a
        thread cannot be stopped)."""
        if self.pid != os.getpid():
            return
        with self.lock:
            self.closed = self.terminated = True
        self._withdraw_queued()
        with self.lock:
            self._stop_workers()
            running = [w.current for w in self.slots if w.current is not None]
        for task in running:
            self._settle(task.future, error=PoolClosed(
                "the pool was terminated while this task ran; its thread cannot be stopped, so it runs "
                "the task to its end and the result is dropped"
            ))


_live: weakref.WeakSet[ThreadBackend] = weakref.WeakSet()
_pool_tokens = itertools.count(1)

#: Set once the interpreter is exiting: no pool takes new work then.
_exiting = False


def _shutdown_all() -> None:
    """At exit, as the stdlib's thread pool: queued work runs, then the
    threads end (abandoned ones are daemons and do not hold the exit)."""
    global _exiting
    _exiting = True
    for backend in list(_live):
        backend.shutdown(wait=True, cancel_futures=False)


threading._register_atexit(_shutdown_all)  # type: ignore[attr-defined]
