"""Worker-side functions for test_faults.py and test_chaos.py, plus a few
parent-side probes (worker processes, fds, memfds).

Everything here runs for real inside ironpool workers: it sleeps, spins in C
with the GIL held, leaks memory, segfaults and exits. Tasks report what they
did by appending a line to a log file (O_APPEND writes of one short line are
atomic), so a test can tell a task that ran twice from one that ran once.
"""

from __future__ import annotations

import ctypes
import os
import re
import time

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 2**20


class ChaosError(Exception):
    """The exception a chaos task raises on purpose."""


# ---- bookkeeping --------------------------------------------------------------


def log(path: str | None, line: str) -> None:
    """Appends one line to ``path`` atomically (one write on an O_APPEND fd)."""
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def read_log(path) -> list[str]:
    try:
        with open(path) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


def private_rss() -> int:
    """Resident memory as ironpool's supervisor reads it: (resident - shared) pages of statm."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * PAGE


def bump(path: str) -> int:
    """Counts one attempt in ``path``; returns the attempt number (1-based)."""
    log(path, "x")
    return len(read_log(path))


# ---- plain tasks ----------------------------------------------------------------


def whoami(i: int = 0, log_path: str | None = None) -> tuple[int, int]:
    log(log_path, f"{i}:{os.getpid()}")
    return os.getpid(), i


def logged_or_exit(i: int, payload: bytes, exit_at: int, log_path: str | None = None) -> int:
    """Logs that item ``i`` ran, then returns it; item ``exit_at`` ends the
    worker instead (``payload`` only makes the task's frame bigger)."""
    log(log_path, str(i))
    if i == exit_at:
        os._exit(7)
    return i


def sleep_for(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def crash(code: int = 3) -> None:
    os._exit(code)


def wait_on(beacon) -> int:
    """Says "started" (with the pid) through the conftest Beacon, then blocks until released."""
    beacon.notify(os.getpid())
    beacon.wait()
    return os.getpid()


# ---- time limits --------------------------------------------------------------------


def regex_backtrack() -> object:
    """Catastrophic backtracking: one C call, GIL held, effectively forever."""
    return re.match(r"(a+)+$", "a" * 40 + "b")


def c_sum() -> int:
    """A C loop that never checks for signals or releases the GIL (minutes of work)."""
    return sum(range(10**11))


# ---- memory ---------------------------------------------------------------------------

_LEAK: list[bytes] = []


def leak(mb: int = 20) -> tuple[int, int, int]:
    """Keeps ``mb`` more MiB (touched, so resident) in a module-level list, like a
    cache that is never cleared. Returns (pid, RSS before, RSS after)."""
    before = private_rss()
    _LEAK.append(b"\x01" * (mb * MB))
    return os.getpid(), before, private_rss()


def hog(step_mb: int = 8, cap_mb: int = 4096, pause: float = 0.001) -> str:
    """Grows memory until the pool stops it. Gives up (and says so) at ``cap_mb``
    so a broken limit fails the test instead of exhausting the machine."""
    keep = []
    while len(keep) * step_mb < cap_mb:
        keep.append(b"\x01" * (step_mb * MB))
        if pause:
            time.sleep(pause)
    return f"hog was never stopped, reached {cap_mb} MiB"


# ---- retries --------------------------------------------------------------------------


def crash_first_time(counter: str) -> int:
    """Kills its worker on the first attempt only (the counter file survives)."""
    n = bump(counter)
    if n == 1:
        os._exit(9)
    return n


def always_crash(counter: str) -> None:
    bump(counter)
    os._exit(11)


def value_error_first_time(counter: str) -> int:
    n = bump(counter)
    if n == 1:
        raise ValueError(f"attempt {n} fails")
    return n


def hang_first_time(counter: str) -> int:
    n = bump(counter)
    if n == 1:
        time.sleep(3600)
    return n


def scripted(counter: str, plan: tuple[str, ...]) -> int:
    """Attempt k does ``plan[k-1]`` (the last step repeats): crash, value, hang or ok."""
    n = bump(counter)
    step = plan[min(n, len(plan)) - 1]
    if step == "crash":
        os._exit(13)
    if step == "value":
        raise ValueError(f"attempt {n}")
    if step == "hang":
        time.sleep(3600)
    return n


# ---- worker start ------------------------------------------------------------------


def failing_initializer(counter: str) -> None:
    log(counter, str(os.getpid()))
    raise RuntimeError("initializer refuses to start")


# ---- chaos ------------------------------------------------------------------------------

#: kind -> weight in the chaos mix.
CHAOS_MIX = {
    "ok": 48,
    "raise": 15,
    "segv": 8,
    "exit": 8,
    "hang": 3,
    "hog": 3,
    "big": 15,
}


def chaos_task(i: int, kind: str, arg: int, log_path: str) -> object:
    """Logs its start, then does what ``kind`` says."""
    log(log_path, str(i))
    if kind == "ok":
        return i, i * arg
    if kind == "raise":
        raise ChaosError(i)
    if kind == "segv":
        ctypes.string_at(0)  # a real SIGSEGV in native code
        return "survived a segfault"
    if kind == "exit":
        os._exit(arg)
    if kind == "hang":
        time.sleep(3600)
        return "woke up"
    if kind == "hog":
        return hog(step_mb=16, pause=0)
    if kind == "big":
        import numpy as np

        return np.full(arg, i, dtype=np.int64)
    raise AssertionError(f"unknown kind {kind}")


# ---- parent-side probes -----------------------------------------------------------------


def fd_table() -> dict[int, str]:
    """This process's open fds and what they point to."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the fd listdir itself used
            continue
    return out


def ironpool_memfds() -> list[str]:
    """memfds named by ironpool still open or mapped in this process."""
    found = [t for t in fd_table().values() if t.startswith("/memfd:ironpool")]
    with open("/proc/self/maps") as f:
        found += [line.split(None, 5)[-1].strip() for line in f if "/memfd:ironpool" in line]
    return found
