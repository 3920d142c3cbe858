"""From what the engine reports to what the caller sees: the one place that
turns a task's outcome (``_core.Returned``, ``Raised``, ``Crashed``,
``TimedOut``, ``StartFailed``) and its earlier attempts into a value or an
ironpool exception, and names the likely cause of a crash."""

from __future__ import annotations

import signal as _signal
from collections.abc import Callable
from typing import Any

from . import _core
from ._remote_exception import unpack_exception
from ._serialize import loads
from .errors import Attempt, MemoryLimitExceeded, SerializationError, TaskTimeout, WorkerCrashed, WorkerStartError


def resolve(outcome: Any, attempts: list, describe: Callable[[], str]) -> tuple[Any, BaseException | None]:
    """``(value, None)`` or ``(None, error)`` for a finished task; ``describe``
    names the task for messages (called only when one is needed)."""
    if isinstance(outcome, _core.Returned):
        try:
            return loads(outcome.parts), None
        except BaseException as exc:
            return None, unpickling_error(exc, describe)
    if isinstance(outcome, _core.Raised):
        raised = unpack_exception(loads(outcome.parts))
        if attempts:
            raised.add_note(attempts_text([attempt_record(a) for a in attempts]))
        return None, raised
    if isinstance(outcome, _core.TimedOut):
        task = describe()
        timeout = TaskTimeout(
            f"{task} ran longer than its {outcome.limit:g} s limit; worker pid {outcome.crash.pid} "
            "was killed and replaced",
            task=task,
            limit=outcome.limit,
            pid=outcome.crash.pid,
        )
        return None, _with_attempts(timeout, attempts)
    if isinstance(outcome, _core.Crashed):
        return None, _with_attempts(crash_error(outcome.crash, describe()), attempts)
    if isinstance(outcome, _core.StartFailed):
        return None, start_error(outcome.parts, outcome.crash)
    return None, RuntimeError(f"ironpool: unknown task outcome {outcome!r}")


def unpickling_error(exc: BaseException, describe: Callable[[], str]) -> SerializationError:
    """The error of a task whose result ``exc`` stopped from being unpickled."""
    err = SerializationError(f"the result of {describe()} could not be unpickled: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def attempt_record(attempt: Any) -> Attempt:
    """The caller's record of an earlier run (a ``_core`` Crashed, TimedOut
    or Raised): plain data that pickles with the error it belongs to."""
    if isinstance(attempt, _core.Raised):
        try:
            exc = unpack_exception(loads(attempt.parts))
        except BaseException as err:  # describing must not lose the outcome
            text = f"raised an exception that could not be read back ({type(err).__name__}: {err})"
            return Attempt("raised", description=text)
        return Attempt("raised", error=exc, description=f"raised {_safe_str(exc)}")
    crash = attempt.crash
    what = "timeout" if isinstance(attempt, _core.TimedOut) else crash.killed_by or "crashed"
    return Attempt(
        what, crash.pid, crash.exitcode, crash.signal,
        description=f"{what} (pid {crash.pid}, exitcode {crash.exitcode}, signal {crash.signal})",
    )


def attempts_text(records: list[Attempt]) -> str:
    return "earlier attempts:\n" + "\n".join(f"attempt {i}: {a.description}" for i, a in enumerate(records, 1))


def _with_attempts(err: BaseException, attempts: list) -> BaseException:
    return with_attempt_records(err, [attempt_record(a) for a in attempts])


def with_attempt_records(err: BaseException, records: list[Attempt]) -> BaseException:
    """Adds the earlier attempts to an ironpool error's message; they stay
    available as ``err.attempts``."""
    if records:
        err.args = (f"{err.args[0]}\n{attempts_text(records)}",)
        err.attempts = records  # type: ignore[attr-defined]
    return err


def _safe_str(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:
        return f"{type(exc).__name__} (its str() failed)"


def _signal_name(sig: int) -> str:
    try:
        return _signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def crash_error(crash: Any, task: str) -> WorkerCrashed:
    """The error for a task whose worker died (a ``_core.CrashReport``),
    naming the likely cause."""
    sig, code, pid = crash.signal, crash.exitcode, crash.pid
    tail = crash.stderr_tail or ""
    advice = ""
    if crash.killed_by == "memory":
        rss, limit = crash.rss or 0, crash.memory_limit or 0
        msg = (
            f"worker pid {pid} was killed running {task}: its memory reached "
            f"{rss / 2**20:.0f} MiB, over the hard limit of {limit / 2**20:.0f} MiB"
        )
        err = MemoryLimitExceeded(
            msg, exitcode=code, signal=sig, pid=pid, stderr_tail=tail, task=task, oom_killed=crash.oom_killed
        )
        err.rss = rss
        err.limit = limit
        return err
    if crash.protocol_error:
        cause = f"broke the pool protocol ({crash.protocol_error})"
    elif sig is not None:
        cause = f"was killed by {_signal_name(sig)}"
        if sig == _signal.SIGKILL and crash.killed_by is None:
            if crash.oom_killed:
                cause += " from the kernel's out-of-memory killer (its memory cgroup counted the kill)"
                advice = (
                    ": it, or the workers together, needed more memory than the machine or container "
                    "allows; use fewer workers or smaller pieces of work"
                )
            elif crash.oom_killed is None:
                cause += " that ironpool did not send: probably the out-of-memory killer"
            else:
                cause += (
                    " that ironpool did not send, and not the out-of-memory killer "
                    "(the kernel counted no OOM kill): another process killed it"
                )
        elif sig == _signal.SIGSEGV:
            cause += " (a segmentation fault in native code)"
        elif sig == _signal.SIGABRT:
            cause += " (abort(): a failed assertion or fatal error in native code)"
    elif code is not None:
        cause = f"exited with code {code} (os._exit or exit() from native code)"
    else:
        cause = "was lost (the template process died)"
    msg = f"worker pid {pid} {cause} while running {task}{advice}"
    if tail:
        msg += "\n--- last lines of the worker's stderr ---\n" + tail
    return WorkerCrashed(
        msg, exitcode=code, signal=sig, pid=pid, stderr_tail=tail, task=task, oom_killed=crash.oom_killed
    )


def start_error(parts: list | None, crash: Any) -> WorkerStartError:
    """Workers could not start: the initializer raised (``parts``), or they died."""
    if parts is not None:
        exc = unpack_exception(loads(parts))
        err = WorkerStartError(f"workers could not start: the initializer raised {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return err
    why = crash.protocol_error or crash_error(crash, "its set-up").args[0]
    return WorkerStartError(f"workers could not start: {why}")


def argument_error(exc: Exception, where: str) -> SerializationError:
    """The error for arguments that could not be pickled."""
    if isinstance(exc, SerializationError):
        return exc
    err = SerializationError(
        f"the arguments of {where} could not be pickled: {type(exc).__name__}: {exc}{sharing_hint(exc)}"
    )
    err.__cause__ = exc
    return err


def sharing_hint(exc: Exception) -> str:
    """How to share what ``multiprocessing`` lets only children inherit."""
    if not (isinstance(exc, RuntimeError) and "through inheritance" in str(exc)):
        return ""
    return (
        "; ironpool's workers are not children of this process, so multiprocessing locks, values, "
        "queues and pipes cannot reach them (in initargs either): use a multiprocessing.Manager() "
        "proxy instead (manager.Lock(), manager.Value(), manager.Queue(), manager.dict()), or "
        "pool.share() for read-only data"
    )
