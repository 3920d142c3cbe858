# TEMPORARY until the typed-outcome branch lands: old tuples -> contract objects.
from dataclasses import dataclass
from typing import Any

from . import _core


@dataclass
class CrashReport:
    pid: int = 0
    exitcode: Any = None
    signal: Any = None
    stderr_tail: str = ""
    protocol_error: Any = None
    killed_by: Any = None
    limit: Any = None
    rss: Any = None
    memory_limit: Any = None


@dataclass
class Returned:
    parts: Any


@dataclass
class Raised:
    parts: Any


@dataclass
class Crashed:
    crash: Any


@dataclass
class TimedOut:
    limit: float
    crash: Any


@dataclass
class StartFailed:
    parts: Any
    crash: Any


@dataclass
class Completion:
    task_id: int
    outcome: Any
    elapsed: float
    attempts: list


def _crash(info):
    keys = CrashReport.__dataclass_fields__
    return CrashReport(**{k: v for k, v in info.items() if k in keys})


def _attempt(a):
    if "raised" in a:
        return Raised(a["raised"])
    if a.get("killed_by") == "timeout":
        return TimedOut(a.get("limit", 0.0), _crash(a))
    return Crashed(_crash(a))


def convert(t):
    task_id, kind, parts, info, elapsed, attempts = t
    if kind == "ok":
        o = Returned(parts)
    elif kind == "raised":
        o = Raised(parts)
    elif kind == "timeout":
        o = TimedOut(info.get("limit", 0.0), _crash(info))
    elif kind == "crashed":
        o = Crashed(_crash(info))
    else:
        o = StartFailed(parts, _crash(info))
    return Completion(task_id, o, elapsed, [_attempt(a) for a in attempts])


if not hasattr(_core, "Returned"):
    for _c in (CrashReport, Returned, Raised, Crashed, TimedOut, StartFailed, Completion):
        setattr(_core, _c.__name__, _c)
