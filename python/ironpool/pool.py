"""``ironpool.Pool``: a ``concurrent.futures.Executor`` over the Rust engine."""

from __future__ import annotations

import functools
import itertools
import os
import sys
import threading
import time
import types
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, CancelledError, Executor, Future, InvalidStateError
from concurrent.futures import wait as _wait
from concurrent.futures._base import PENDING as _PENDING
from concurrent.futures._base import RUNNING as _RUNNING
from dataclasses import dataclass
from typing import Any

from . import _core, _zygote
from ._remote_exception import copy_exception, unpack_exception
from ._send_once import AutoShare, Shared, any_candidate, dumps_shared
from ._serialize import (
    FRESH,
    REUSE,
    call_started,
    describe_call,
    dumps,
    dumps_function,
    dumps_task,
    loads,
    unhold_all,
)
from ._worker import CHUNK, SINGLE
from .errors import (
    PoolClosed,
    SerializationError,
    TaskTimeout,
    WorkerCrashed,
    WorkerStartError,
    describe_crash,
)

__all__ = ["Pool", "Shared", "WorkerInfo"]

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}


def parse_bytes(value: int | str | None, name: str) -> int | None:
    """``2GB``, ``512 MiB``, ``1_000_000`` or an int, as bytes."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number of bytes or a string like '2GB', not a bool")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        text = value.strip().upper().replace("_", "")
        digits = text.rstrip("KMGTIB ")
        unit = text[len(digits):].strip()
        try:
            n = int(float(digits) * _UNITS[unit])
        except (ValueError, KeyError):
            raise ValueError(f"{name}={value!r} is not a size such as '2GB' or '512MiB'") from None
    else:
        raise TypeError(f"{name} must be an int or a string like '2GB', not {type(value).__name__}")
    if n <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return n


@dataclass(frozen=True)
class WorkerInfo:
    """One worker's figures, from :meth:`Pool.stats`."""

    slot: int
    pid: int
    tasks_done: int
    busy: bool
    rss: int
    restarts: int
    last_exit: str
    busy_seconds: float


#: How long a caller waiting in ``result()`` polls the workers itself before
#: sleeping. Tiny tasks answer within this, saving two thread wake-ups.
_SPIN_SECONDS = 200e-6
#: Longest uninterruptible wait inside the engine.
_WAIT_SLICE = 0.05


class _TaskFuture(Future):
    """A ``concurrent.futures.Future`` that withdraws its task from the engine
    queue when cancelled, and whose ``result()``/``exception()`` collect
    results in the calling thread instead of waiting for the results thread."""

    _pool_state: Any = None
    _task_id = 0

    def cancel(self) -> bool:
        """Cancels a task not yet handed to a worker (as the stdlib, a task a
        worker has taken is running and cannot be cancelled)."""
        pool = self._pool_state
        if pool is not None and not self.done():
            if not pool.core.cancel(self._task_id):
                self.running()  # mark it so
                return False
            pool.entries.pop(self._task_id, None)
        return super().cancel()

    def running(self) -> bool:
        pool = self._pool_state
        if pool is not None and self._state == _PENDING and pool.core.is_dispatched(self._task_id):
            with self._condition:
                if self._state == _PENDING:
                    self._state = _RUNNING
        return super().running()

    def _collect(self, timeout: float | None) -> float | None:
        """Collects results in this thread until done or ``timeout``; returns
        what is left of ``timeout`` for the stdlib's own wait."""
        state = self._pool_state
        if state is None or self.done():
            return timeout
        if state.pid != os.getpid():
            raise PoolClosed(
                f"this future belongs to a pool of process {state.pid} and was inherited by fork; "
                "its result will never reach this process"
            )
        if timeout is None:
            state.collect_until(self, None)
            return None
        deadline = time.monotonic() + timeout
        state.collect_until(self, timeout)
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
            exc.__traceback__ = None
            raise _copy_exception(exc) from exc.__cause__

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return super().exception(self._collect(timeout))


class _Entry:
    __slots__ = ("args", "chunk", "fn", "fn_id", "future", "keep", "kwargs", "retries", "timeout")

    def __init__(self, future, fn, fn_id, args, kwargs, retries, chunk=0, keep=(), timeout=None):
        self.future = future
        self.fn = fn
        self.fn_id = fn_id
        self.args = args
        self.kwargs = kwargs
        self.retries = retries  # the engine's budget of re-runs, whatever ends an attempt
        self.timeout = timeout
        self.chunk = chunk  # task flags: 0, or CHUNK (| SINGLE) for a map chunk
        # The arguments as sent (or ()): their shared handles, which the send-once
        # cache holds only weakly, live while the task is queued or running.
        self.keep = keep

    def describe(self) -> str:
        if self.chunk:
            first = describe_call(self.fn, _first_args(self.args, self.chunk))
            return f"a map chunk of {len(self.args)} items starting with {first}"
        return describe_call(self.fn, self.args, self.kwargs)


def _first_args(batch: list, flags: int) -> tuple:
    """The arguments of the first item of a map chunk."""
    if not batch:
        return ()
    return (batch[0],) if flags & SINGLE else batch[0]


def _copy_exception(exc: BaseException) -> BaseException:
    return copy_exception(exc) or exc


def _settle(future: Future, value: Any = None, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except InvalidStateError:  # cancelled meanwhile
        pass


class _Function:
    """A function registered with a pool (sent to each worker once). The pool
    holds it weakly -- a bound method by its object and function -- so it keeps
    nothing of the caller's alive; once it dies, workers forget it. A callable
    that cannot be weakly referenced is held while calls use it, then
    forgotten."""

    __slots__ = ("__weakref__", "forgotten", "holds", "id", "key", "owner", "refs", "strong")

    def __init__(self, owner: _Functions, key: Any, fid: int, parts: tuple) -> None:
        self.owner = owner
        self.key = key
        self.id = fid
        self.holds = 0
        self.forgotten = False
        self.strong: tuple | None = None
        died = functools.partial(_function_died, weakref.ref(owner.dead), weakref.ref(self))
        try:
            self.refs: tuple | None = tuple(weakref.ref(p, died) for p in parts)
        except TypeError:
            self.refs = None
            self.strong = parts

    def is_for(self, parts: tuple) -> bool:
        held = self.strong if self.refs is None else tuple(r() for r in self.refs)
        return held is not None and len(held) == len(parts) and all(a is b for a, b in zip(held, parts, strict=True))

    def release(self, _future: Any = None) -> None:
        """One call is done with it."""
        self.owner.release(self)


def _function_died(dead_ref: Callable, function_ref: Callable, _ref: Any) -> None:
    # A weakref callback: runs in whichever thread dropped the last reference,
    # maybe inside the pool's own locks, so it only leaves a note.
    dead, function = dead_ref(), function_ref()
    if dead is not None and function is not None:
        dead.append(function)


def _callable_parts(fn: Any) -> tuple:
    """What identifies a callable: a bound method by its object and function
    (a fresh method object is made at each attribute access)."""
    if isinstance(fn, types.MethodType):
        return (fn.__self__, fn.__func__)
    return (fn,)


class _Functions:
    """The functions a pool has registered, by identity: submitting the same
    function again is a cache hit while it lives."""

    def __init__(self, core: Any, ids: Iterator[int]) -> None:
        self.core = core
        self.ids = ids
        self.pid = os.getpid()
        # Reentrant: a garbage collection while a function is pickled may
        # close an abandoned map, which releases its function.
        self.lock = threading.RLock()
        self.by_key: dict[tuple, _Function] = {}
        self.dead: deque[_Function] = deque()

    def acquire(self, fn: Any) -> _Function:
        """The registration of ``fn``, held for one call (``release`` it)."""
        self.forget_dead()
        parts = _callable_parts(fn)
        key = tuple(map(id, parts))
        with self.lock:
            function = self.by_key.get(key)
            if function is None or not function.is_for(parts):
                try:
                    payload = dumps_function(fn)
                except Exception as exc:
                    raise SerializationError(
                        f"function {describe_call(fn)} could not be pickled: {type(exc).__name__}: {exc}"
                    ) from exc
                function = _Function(self, key, next(self.ids), parts)
                self.core.register_fn(function.id, payload)
                self.by_key[key] = function
            function.holds += 1
            return function

    def release(self, function: _Function) -> None:
        with self.lock:
            function.holds -= 1
            if function.holds or function.refs is not None:
                return
        self._forget(function)

    def forget_dead(self) -> None:
        """Forgets the functions whose callables were collected."""
        while True:
            try:
                function = self.dead.popleft()
            except IndexError:  # empty, or another thread took the last
                return
            self._forget(function)

    def _forget(self, function: _Function) -> None:
        with self.lock:
            if function.forgotten or (function.holds and function.refs is None):
                return
            function.forgotten = True
            if self.by_key.get(function.key) is function:
                del self.by_key[function.key]
        if os.getpid() == self.pid:  # a forked child's copy has no engine
            self.core.unregister(function.id)


class _State:
    """Everything the result thread needs; holds no reference to the Pool, so
    an unreferenced pool can be collected and shut down."""

    def __init__(self, core: Any, workers: int, threshold: int) -> None:
        self.core = core
        self.workers = workers
        self.threshold = threshold
        self.entries: dict[int, _Entry] = {}
        self.ids = itertools.count(1)
        self.closed = False
        self.pid = os.getpid()
        self.next_fn = itertools.count(1)  # ids of registered functions and shared objects
        self.functions = _Functions(core, self.next_fn)
        self.token = next(_pool_tokens)  # which pool a Shared handle belongs to
        self.auto_share = AutoShare(self._register_digested)
        self.thread = threading.Thread(target=self._deliver, name="ironpool-results", daemon=True)
        self.thread.start()

    # Results -----------------------------------------------------------

    def _deliver(self) -> None:
        core = self.core
        while True:
            batch = core.wait_completions(None)
            if batch is None:
                break
            self._process(batch)
            del batch  # do not pin the last results' segments while asleep
            core.kick()
            self.functions.forget_dead()
        for entry in list(self.entries.values()):
            _settle(entry.future, error=PoolClosed("the pool stopped before this task finished"))
        self.entries.clear()

    def _process(self, batch: list) -> None:
        entries = self.entries
        for completion in batch:
            entry = entries.pop(completion.task_id, None)
            if entry is None or entry.future.done():
                continue
            try:
                self._resolve(entry, completion.outcome, completion.attempts)
            except BaseException as exc:  # never lose a result
                _settle(entry.future, error=exc)

    def collect_until(self, future: Future, timeout: float | None) -> None:
        """Collects completions in this thread until ``future`` is done or
        ``timeout`` passes (the caller then reads the future as usual)."""
        if threading.current_thread() is self.thread or self.pid != os.getpid():
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
            batch = core.pump(generation, _SPIN_SECONDS, step)
            if batch is None:
                return
            if batch:
                self._process(batch)
                core.kick()

    def _resolve(self, entry: _Entry, outcome: Any, attempts: list) -> None:
        """Settles ``entry``'s future from its outcome (the engine has run
        every retry its budget allowed; ``attempts`` are the earlier runs)."""
        if isinstance(outcome, _core.Returned):
            try:
                value = loads(outcome.parts)
            except BaseException as exc:
                err = SerializationError(
                    f"the result of {entry.describe()} could not be unpickled: {type(exc).__name__}: {exc}"
                )
                err.__cause__ = exc
                _settle(entry.future, error=err)
                return
            _settle(entry.future, value)
        elif isinstance(outcome, _core.Raised):
            exc = unpack_exception(loads(outcome.parts))
            if attempts:
                exc.add_note("earlier attempts:\n" + "\n".join(_describe_attempt(a) for a in attempts))
            _settle(entry.future, error=exc)
        elif isinstance(outcome, _core.TimedOut):
            pid = outcome.crash.pid
            err = TaskTimeout(
                f"{entry.describe()} ran longer than its {outcome.limit:g} s limit; worker pid {pid} "
                f"was killed and replaced",
                task=entry.describe(),
                limit=outcome.limit,
                pid=pid,
            )
            _settle(entry.future, error=_with_attempts(err, attempts))
        elif isinstance(outcome, _core.Crashed):
            _settle(entry.future, error=_with_attempts(describe_crash(outcome.crash, entry.describe()), attempts))
        elif isinstance(outcome, _core.StartFailed):
            _settle(entry.future, error=_start_error(outcome.parts, outcome.crash))
        else:
            _settle(entry.future, error=RuntimeError(f"unknown outcome {outcome!r}"))

    def enqueue(self, entry: _Entry, fn_id: int, parts: list, needs: list, items: int = 1, flags: int = 0) -> None:
        """Hands a pickled task to the engine under a fresh id (its retries
        are the engine's: same id, same message)."""
        task_id = next(self.ids)
        future = entry.future
        future._pool_state = self  # type: ignore[attr-defined]
        future._task_id = task_id  # type: ignore[attr-defined]
        self.entries[task_id] = entry
        self.core.submit(task_id, fn_id, parts, entry.timeout, entry.retries, items, flags, needs=needs)

    # Submitting ----------------------------------------------------------

    def check_open(self) -> None:
        if self.pid != os.getpid():
            raise PoolClosed(
                f"this pool belongs to process {self.pid} and was inherited by fork; "
                "create a new ironpool.Pool in this process"
            )
        if _exiting:
            raise PoolClosed("cannot schedule new futures after interpreter shutdown")
        if self.closed:
            raise PoolClosed("cannot submit to a pool after shutdown()")

    def share(self, value: Any, threshold: int, mode: int) -> Shared:
        parts = dumps_shared(value, threshold)
        ref_id = next(self.next_fn)
        self.core.register_fn(ref_id, parts)
        return Shared(self.core, self.token, value, ref_id, mode)

    def _register_digested(self, parts: list, mode: int) -> tuple[Shared, bytes | None]:
        ref_id = next(self.next_fn)
        digest = self.core.register_shared(ref_id, parts)
        return Shared(self.core, self.token, None, ref_id, mode), digest

    def dumps_args(
        self, args: Any, kwargs: Any, threshold: int, since: int, single: bool = False
    ) -> tuple[list, list, list, tuple]:
        """Pickles the arguments of a call that began at ``since`` (a call's
        tuple, or a map chunk: a list of argument tuples, or with ``single``
        of single arguments), sending large ones once. Returns the parts,
        the shared ids they refer to, the handles held for the call (see
        ``dumps_task``) and the arguments as sent (with handles; or ``()``)."""
        keep: tuple = ()
        if isinstance(args, tuple):
            # A call: its few arguments are looked at before pickling, so
            # that the call is pickled once.
            if any_candidate(args) or (kwargs and any_candidate(kwargs.values())):
                swapped = self._swap(args, kwargs, threshold)
                if swapped is not None:
                    args, kwargs = keep = swapped
            call = (args, kwargs) if kwargs is not None else args
            return (*dumps_task(call, threshold, self.token, since), keep)
        # A map chunk may hold thousands of small items: look for large ones
        # only if pickling found large buffers (out of band; a chunk's stream
        # is large just for holding many items, so its size says nothing).
        call = (args, kwargs) if kwargs is not None else args
        parts, needs, held = dumps_task(call, threshold, self.token, since)
        if len(parts) > 1:
            if single:
                rows = self.auto_share.swap([(x,) for x in args], threshold)
                swapped = None if rows is None else ([row[0] for row in rows], kwargs)
            else:
                swapped = self._swap(args, kwargs, threshold)
            if swapped is not None:
                args, kwargs = keep = swapped
                call = (args, kwargs) if kwargs is not None else args
                first = held
                try:
                    parts, needs, held = dumps_task(call, threshold, self.token, since)
                finally:
                    unhold_all(first)
        return parts, needs, held, keep

    def _swap(self, args: Any, kwargs: Any, threshold: int) -> tuple[Any, Any] | None:
        """``(args, kwargs)`` with large objects replaced by shared handles,
        or None if there are none."""
        new_args = self.auto_share.swap(args, threshold)
        new_kwargs = self.auto_share.swap(kwargs, threshold) if kwargs else None
        if new_args is None and new_kwargs is None:
            return None
        return (args if new_args is None else new_args, kwargs if new_kwargs is None else new_kwargs)

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        if self.pid != os.getpid():
            return
        interrupted: KeyboardInterrupt | None = None
        try:
            self.closed = True
            if cancel_futures:
                self.cancel_pending()
            self.core.shutdown()
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
            entry = self.entries.pop(task_id, None)
            if entry is not None:
                Future.cancel(entry.future)  # already withdrawn from the engine

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
        for entry in list(self.entries.values()):
            if not Future.cancel(entry.future):
                _settle(entry.future, error=PoolClosed("the pool was terminated while this task ran"))
        self.entries.clear()
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
        for entry in list(self.entries.values()):
            condition = entry.future._condition
            if condition.acquire(blocking=False):
                condition.release()
                _settle(entry.future, error=PoolClosed(
                    f"this task was submitted by process {self.pid}; this process is a fork of it "
                    "and will never receive its result"
                ))
        self.entries.clear()


def _argument_error(exc: Exception, where: str) -> SerializationError:
    if isinstance(exc, SerializationError):
        return exc
    err = SerializationError(
        f"the arguments of {where} could not be pickled: {type(exc).__name__}: {exc}{_sharing_hint(exc)}"
    )
    err.__cause__ = exc
    return err


def _sharing_hint(exc: Exception) -> str:
    """How to share what ``multiprocessing`` lets only children inherit."""
    if not (isinstance(exc, RuntimeError) and "through inheritance" in str(exc)):
        return ""
    return (
        "; ironpool's workers are not children of this process, so multiprocessing locks, values, "
        "queues and pipes cannot reach them (in initargs either): use a multiprocessing.Manager() "
        "proxy instead (manager.Lock(), manager.Value(), manager.Queue(), manager.dict()), or "
        "pool.share() for read-only data"
    )


def _safe_str(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:
        return f"{type(exc).__name__} (its str() failed)"


def _describe_attempt(a: Any) -> str:
    """One line for an earlier attempt (a ``Crashed``, ``TimedOut`` or ``Raised``)."""
    if isinstance(a, _core.Raised):
        try:
            return f"raised {_safe_str(unpack_exception(loads(a.parts)))}"
        except Exception as exc:
            return f"raised an exception that could not be unpickled here ({_safe_str(exc)})"
    c = a.crash
    return f"{c.killed_by or 'crashed'} (pid {c.pid}, exitcode {c.exitcode}, signal {c.signal})"


def _with_attempts(err: BaseException, attempts: list) -> BaseException:
    if attempts:
        lines = [f"attempt {i + 1}: {_describe_attempt(a)}" for i, a in enumerate(attempts)]
        err.args = (f"{err.args[0]}\nearlier attempts:\n" + "\n".join(lines),)
        err.attempts = attempts  # type: ignore[attr-defined]
    return err


def _start_error(parts: list | None, crash: Any) -> WorkerStartError:
    if parts is not None:
        exc = unpack_exception(loads(parts))
        err = WorkerStartError(f"workers could not start: the initializer raised {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return err
    why = crash.protocol_error or describe_crash(crash, "its set-up").args[0]
    return WorkerStartError(f"workers could not start: {why}")


_live: weakref.WeakSet[_State] = weakref.WeakSet()
_pool_tokens = itertools.count(1)


#: Set once the interpreter is exiting: no pool takes new work then.
_exiting = False


def _shutdown_all() -> None:
    global _exiting
    _exiting = True
    for state in list(_live):
        try:
            state.shutdown(wait=True, cancel_futures=False)
        except Exception:
            pass


def _forget_after_fork() -> None:
    # The child keeps the parent's pools as inert copies (check_open refuses
    # them); their engines' threads do not exist here.
    for state in list(_live):
        state.orphan()
    _live.clear()


# Runs before threads are joined at interpreter exit, like the stdlib's.
threading._register_atexit(_shutdown_all)  # type: ignore[attr-defined]
os.register_at_fork(after_in_child=_forget_after_fork)


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
            (give each worker its own parser, connection, configuration).
        preload: modules imported once in the template process that workers are
            forked from (e.g. ``("numpy", "pandas")``), so no worker pays for them.
        task_timeout: seconds a task may run before its worker is killed and the
            task fails with :class:`TaskTimeout`; overridable per call.
        max_tasks_per_worker: replace a worker after this many tasks.
        max_memory_per_worker: bytes or ``"2GB"``; a worker above it after a task
            is replaced; one above ``hard_memory_factor`` times it during a task
            is killed (:class:`MemoryLimitExceeded`).
        retries: re-runs of a task whose worker crashed or timed out (and, with
            ``retry_on``, that raised one of those exception types).
        thread_limit: threads for BLAS/OpenMP in each worker (default 1, so
            workers do not oversubscribe the cores); ``None`` leaves them alone.
        buffer_threshold: buffers of at least this many bytes travel through
            shared memory instead of the pipe.
        forward_output: copy what workers print to this process's stdout and
            stderr (default), else drop it.
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
        task_timeout: float | None = None,
        max_tasks_per_worker: int | None = None,
        max_memory_per_worker: int | str | None = None,
        hard_memory_factor: float = 1.5,
        retries: int = 0,
        retry_on: tuple[type[BaseException], ...] = (),
        thread_limit: int | None = 1,
        buffer_threshold: int = 64 * 1024,
        forward_output: bool = True,
        max_workers: int | None = None,
        max_tasks_per_child: int | None = None,
        mp_context: Any = None,
    ) -> None:
        self._state: _State | None = None
        workers_name = "workers"
        if max_workers is not None:
            if workers is not None:
                raise TypeError("give workers or max_workers, not both")
            workers, workers_name = max_workers, "max_workers"
        if max_tasks_per_child is not None:
            if max_tasks_per_worker is not None:
                raise TypeError("give max_tasks_per_worker or max_tasks_per_child, not both")
            max_tasks_per_worker = max_tasks_per_child
        if workers is None:
            workers = _core.default_workers()
        if isinstance(workers, bool) or not isinstance(workers, int):
            raise TypeError(f"{workers_name} must be an int, got {type(workers).__name__}")
        if workers < 1:
            raise ValueError(f"{workers_name} must be greater than 0, got {workers!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, got {type(initializer).__name__}")
        if not isinstance(initargs, tuple):
            raise TypeError(f"initargs must be a tuple, got {type(initargs).__name__}")
        if isinstance(preload, str):
            preload = (preload,)
        preload = tuple(preload)
        for name in preload:
            if not isinstance(name, str) or not name:
                raise TypeError(f"preload must list module names, got {name!r}")
        _check_timeout(task_timeout, "task_timeout")
        if max_tasks_per_worker is not None and (not isinstance(max_tasks_per_worker, int) or max_tasks_per_worker < 1):
            raise ValueError(f"max_tasks_per_worker must be a positive int, got {max_tasks_per_worker!r}")
        max_memory = parse_bytes(max_memory_per_worker, "max_memory_per_worker")
        if not hard_memory_factor >= 1.0:
            raise ValueError(f"hard_memory_factor must be >= 1, got {hard_memory_factor!r}")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a non-negative int, got {retries!r}")
        retry_on = tuple(retry_on)
        for t in retry_on:
            if not (isinstance(t, type) and issubclass(t, BaseException)):
                raise TypeError(f"retry_on must hold exception types, got {t!r}")
        if not isinstance(buffer_threshold, int) or buffer_threshold < 1:
            raise ValueError(f"buffer_threshold must be a positive int, got {buffer_threshold!r}")

        self._max_workers = workers  # read by dask's get_scheduler
        self._retries = retries
        self._threshold = buffer_threshold
        self._start_error: BaseException | None = None
        init = {
            "sys_path": list(sys.path),
            "cwd": os.getcwd(),
            "initializer": initializer,
            "initargs": initargs,
            "threshold": buffer_threshold,
            "retry_on": retry_on,  # matched in workers; the engine decides the retry
            **_caller_identity(),
        }
        try:
            init_parts = dumps(init, 1 << 62)
        except Exception as exc:
            raise SerializationError(
                f"initializer or initargs could not be pickled: {type(exc).__name__}: {exc}{_sharing_hint(exc)}"
            ) from exc
        try:
            zygote = _zygote.get(preload, thread_limit)
        except (OSError, WorkerStartError) as exc:
            # Reported on every task, like any other start failure.
            self._start_error = WorkerStartError(f"workers could not start: {exc}")
            zygote = None
        if zygote is not None:
            core = _core.PoolCore(
                zygote,
                workers,
                init_parts,
                buffer_threshold,
                task_timeout=task_timeout,
                max_tasks_per_worker=max_tasks_per_worker,
                max_memory=max_memory,
                hard_memory_factor=float(hard_memory_factor),
                forward_output=forward_output,
            )
            self._state = _State(core, workers, buffer_threshold)
            _live.add(self._state)
            self._finalizer = weakref.finalize(self, self._state.shutdown, False, False)

    # Executor API ---------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedules ``fn(*args, **kwargs)``; returns a ``concurrent.futures.Future``.

        Pickling failures of the arguments are delivered through the future as
        :class:`SerializationError`, naming the task and the object."""
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
        """Like :meth:`submit`, with a per-task ``timeout`` (seconds) and ``retries``."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        kwargs = kwargs or {}
        future = _TaskFuture()
        state = self._state
        if state is None:
            future.set_exception(self._start_error or PoolClosed("pool is not running"))
            return future
        state.check_open()
        _check_timeout(timeout, "timeout")
        retries = self._retries if retries is None else retries
        since = call_started()
        try:
            function = state.functions.acquire(fn)
        except SerializationError as exc:
            future.set_exception(exc)
            return future
        future.add_done_callback(function.release)
        try:
            parts, needs, held, keep = state.dumps_args(args, kwargs, self._threshold, since)
        except Exception as exc:
            future.set_exception(_argument_error(exc, describe_call(fn, args, kwargs)))
            return future
        entry = _Entry(future, fn, function.id, args, kwargs, retries, keep=keep, timeout=timeout)
        if held:  # until every retry is done: the engine re-sends the same handles
            future.add_done_callback(lambda _f, held=held: unhold_all(held))
        try:
            state.enqueue(entry, function.id, parts, needs)
        except BaseException:
            unhold_all(held)  # never submitted, so never settled
            raise
        return future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        task_timeout: float | None = None,
    ) -> Iterator[Any]:
        """Ordered results of ``fn`` over ``iterables``, consumed lazily.

        ``chunksize=None`` lets the pool size batches from measured task times.
        ``timeout`` bounds the whole iteration, as in the stdlib; ``task_timeout``
        bounds each chunk's run time on a worker. Input is read lazily, a
        chunk at a time, and each item is sent as it is when its chunk is
        pickled: a generator that changes an object between yields of the
        same chunk gives that chunk's items the last state (as the stdlib's
        chunks do); use ``chunksize=1`` when every item must be a separate
        snapshot."""
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        total = _common_len(iterables)
        if len(iterables) == 1:
            items, single = iter(iterables[0]), True
        else:
            items, single = zip(*iterables, strict=False), False
        return _MapRun(self, fn, items, total, timeout, chunksize, task_timeout, True, single).results()

    def starmap(
        self,
        fn: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        *,
        timeout: float | None = None,
        chunksize: int | None = None,
    ) -> Iterator[Any]:
        """Ordered ``fn(*args)`` for each ``args`` in ``iterable``."""
        total = _common_len((iterable,))
        items = (tuple(a) for a in iterable)
        return _MapRun(self, fn, items, total, timeout, chunksize, None, True, False).results()

    def imap_unordered(
        self,
        fn: Callable[..., Any],
        iterable: Iterable[Any],
        *,
        timeout: float | None = None,
        chunksize: int | None = None,
    ) -> Iterator[Any]:
        """Results of ``fn`` over ``iterable`` in the order they finish."""
        total = _common_len((iterable,))
        return _MapRun(self, fn, iter(iterable), total, timeout, chunksize, None, False, True).results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stops the pool once queued work is done (pending work is dropped with
        ``cancel_futures=True``). Safe to call more than once."""
        if self._state is not None:
            self._state.shutdown(wait, cancel_futures)

    def terminate(self) -> None:
        """Stops now: cancels every unfinished task and kills the workers."""
        if self._state is not None:
            self._state.terminate()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.terminate()
        else:
            self.shutdown(wait=True)
        return False

    def share(self, value: Any, *, reuse: bool = False) -> Shared:
        """Sends ``value`` to each worker once; pass the returned handle to
        tasks instead of the object. See :class:`Shared`.

        With ``reuse=True`` a worker unpickles the object once and hands that
        same object to each of its tasks: faster for a large pure-Python
        structure (a dict of 100,000 strings took 27 ms to unpickle here),
        but a task's changes to it (a new key, a new column) are
        then seen by later tasks on that worker, as with a global set by an
        ``initializer``. The default builds a fresh object per task over the
        same shared buffers, which costs only reading its pickle stream
        (~0.3 ms for a DataFrame)."""
        state = self._state
        if state is None:
            raise self._start_error or PoolClosed("pool is not running")
        state.check_open()
        return state.share(value, self._threshold, REUSE if reuse else FRESH)

    # Introspection -------------------------------------------------------

    def stats(self) -> list[WorkerInfo]:
        """Per-worker figures: pid, tasks done, resident memory, restarts and why."""
        if self._state is None:
            return []
        return [WorkerInfo(**d) for d in self._state.core.stats()]

    @property
    def workers(self) -> int:
        """Number of worker processes."""
        return self._max_workers


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


def _check_timeout(value: float | None, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def _common_len(iterables: tuple) -> int | None:
    try:
        return min(len(it) for it in iterables)  # type: ignore[arg-type]
    except TypeError:
        return None


class _Results:
    """The iterator ``map`` returns. Iterating it runs at C speed over whole
    chunks (``__iter__`` hands out a ``chain`` over them); ``close()``, or
    dropping it, withdraws the chunks not yet started."""

    __slots__ = ("_chunks", "_items", "_run")

    def __init__(self, run: _MapRun, chunks: Generator[list, None, None]) -> None:
        self._run = run
        self._chunks = chunks
        self._items = itertools.chain.from_iterable(chunks)
        # Dropped without ever being started, a generator skips its finally:
        # let go of the run's handles when the generator goes, however it is
        # iterated (a for loop keeps only the chain, not this object).
        weakref.finalize(chunks, run.close)

    def __iter__(self) -> Iterator[Any]:
        return self._items

    def __next__(self) -> Any:
        return next(self._items)

    def close(self) -> None:
        self._chunks.close()
        self._run.close()  # the generator's own close() skips that if it never started


class _MapRun:
    """The iterator behind ``map``/``starmap``/``imap_unordered``: keeps a
    bounded window of chunks in flight and refills it as results are taken."""

    def __init__(self, pool: Pool, fn, items, total, timeout, chunksize, task_timeout, ordered, single) -> None:
        state = pool._state
        if state is None:
            raise pool._start_error or PoolClosed("pool is not running")
        state.check_open()
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if chunksize is not None and (not isinstance(chunksize, int) or chunksize < 1):
            raise ValueError(f"chunksize must be a positive int, got {chunksize!r}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0):
            raise ValueError(f"timeout must be a non-negative number of seconds, got {timeout!r}")
        _check_timeout(task_timeout, "task_timeout")
        self.pool = pool
        self.state = state
        self.fn = fn
        self.function = state.functions.acquire(fn)
        self.fn_id = self.function.id
        self.items = iter(items)
        self.remaining = total
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.chunksize = chunksize
        self.task_timeout = task_timeout
        self.ordered = ordered
        self.flags = CHUNK | SINGLE if single else CHUNK  # single: items are arguments, not tuples
        self.window = max(4, 4 * state.workers)
        self.inflight: deque[Future] = deque()
        self.error: BaseException | None = None
        self.exhausted = False
        self.since = call_started()  # every chunk is part of this one call
        self.held: list = []  # handles its chunks held, let go of at close()
        try:
            self._fill()
        except BaseException:
            self.close()
            raise

    def _submit_chunk(self, batch: list) -> Future:
        state = self.state
        future = _TaskFuture()
        future._batch = batch  # type: ignore[attr-defined]
        try:
            parts, needs, held, keep = state.dumps_args(
                batch, None, self.pool._threshold, self.since, bool(self.flags & SINGLE)
            )
        except Exception as exc:
            where = f"{describe_call(self.fn, _first_args(batch, self.flags))} (or a neighbour in its chunk)"
            future.set_exception(_argument_error(exc, where))
            return future
        # Re-run one by one after a crash, large items are sent as the
        # handles of their copies, so they read what this chunk read.
        future._rerun = keep[0] if keep else batch  # type: ignore[attr-defined]
        self.held.extend(held)
        entry = _Entry(
            future, self.fn, self.fn_id, batch, None, self.pool._retries, chunk=self.flags, keep=keep,
            timeout=self.task_timeout,
        )
        state.enqueue(entry, self.fn_id, parts, needs, len(batch), self.flags)
        return future

    def _fill(self) -> None:
        while not self.exhausted and len(self.inflight) < self.window:
            n = self.chunksize or self.state.core.chunk_size(self.fn_id, self.remaining)
            batch = list(itertools.islice(self.items, n))
            if not batch:
                self.exhausted = True
                break
            if self.remaining is not None:
                self.remaining -= len(batch)
            self.inflight.append(self._submit_chunk(batch))

    def results(self) -> Iterator[Any]:
        """What the caller iterates: the values of each chunk in turn."""
        return _Results(self, self._chunks())

    def _chunks(self) -> Iterator[list]:
        """Each chunk's values in order, refilling the window as chunks are
        taken; withdraws what is left when closed, interrupted or collected."""
        try:
            while self.inflight:
                values, self.error = self._chunk_outcome(self._take())
                self._fill()
                # Handed out by popping, so the iterator keeps no value it
                # has yielded, inside a chunk too (at C speed).
                values.reverse()
                yield itertools.starmap(values.pop, itertools.repeat((), len(values)))
                if self.error is not None:
                    raise self._pop_error()  # no local may hold it: its traceback has this frame
        finally:
            self.close()

    def _pop_error(self) -> BaseException:
        err, self.error = self.error, None
        return err  # type: ignore[return-value]

    def _take(self) -> Future:
        remaining = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        if self.ordered:
            future = self.inflight[0]
            try:
                future.exception(remaining)  # collects results in this thread while it waits
            except TimeoutError:
                raise TimeoutError("map() results not ready within the timeout") from None
            except CancelledError:
                pass
            self.inflight.popleft()
            return future
        done, _ = _wait(self.inflight, remaining, return_when=FIRST_COMPLETED)
        if not done:
            raise TimeoutError("map() results not ready within the timeout")
        future = next(iter(done))
        self.inflight.remove(future)
        return future

    def _chunk_outcome(self, future: Future) -> tuple[list, BaseException | None]:
        """The values a chunk produced and the error at its end, if any."""
        try:
            values, failure = future.result()
            return values, None if failure is None else unpack_exception(failure)
        except (WorkerCrashed, TaskTimeout):
            batch = future._batch  # type: ignore[attr-defined]
            if len(batch) == 1:
                raise
        # A chunk whose worker died: run its items one by one so that only the
        # item that kills a worker fails. Items before it may run twice.
        values = []
        for item in future._rerun:  # type: ignore[attr-defined]
            try:
                vals, failure = self._submit_chunk([item]).result()
            except (WorkerCrashed, TaskTimeout) as exc:
                return values, exc
            values.extend(vals)
            if failure is not None:
                return values, unpack_exception(failure)
        return values, None

    def close(self) -> None:
        """Withdraws chunks not yet started."""
        for f in self.inflight:
            f.cancel()
        self.inflight.clear()
        self.exhausted = True
        unhold_all(self.held)
        function, self.function = self.function, None
        if function is not None:
            function.release()


