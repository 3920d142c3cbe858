"""Shared helpers for the engine tests: real processes and signals, no mocks.

Workers are forked from a template process, not from the test process, so they
inherit nothing from it: tasks and tests talk through named pipes (`Beacon`).
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import ironpool
import psutil
import pytest
from ironpool import _zygote

PYTHON = sys.executable


def zygote_pids() -> set[int]:
    """The template processes of this interpreter (they live as long as it does)."""
    return {z.pid for z in list(_zygote._zygotes.values())}


def descendants(pid: int | None = None) -> dict[int, psutil.Process]:
    """Every process below ``pid`` (default: this one), zombies included."""
    try:
        return {p.pid: p for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return {}


def stray_workers(before: set[int] = frozenset()) -> list[str]:
    """Descendants of this process other than the templates and ``before``."""
    skip = zygote_pids() | set(before)
    out = []
    for pid, proc in descendants().items():
        if pid in skip:
            continue
        try:
            out.append(f"{pid} ({proc.status()}: {' '.join(proc.cmdline()[:3])})")
        except psutil.NoSuchProcess:
            continue
    return out


def running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Polls ``predicate`` (for facts with no event to wait on, such as a process being gone)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def worker_pids(pool: ironpool.Pool) -> set[int]:
    return {w.pid for w in pool.stats() if w.pid}


def run_python(*args: str, timeout: float = 60, cwd: str | None = None) -> subprocess.CompletedProcess:
    """Runs ``python *args`` in a fresh interpreter, capturing text output."""
    return subprocess.run(
        [PYTHON, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=dict(os.environ)
    )


class Beacon:
    """Two named pipes between the test and its tasks.

    In a task: ``beacon.notify(token)`` says "I started" (any text, e.g. the
    worker's pid) and ``beacon.wait()`` blocks until the test calls
    ``release()``. In the test: ``started(n)`` returns the first ``n`` tokens.
    Only the paths are pickled; once the test closes the beacon, ``wait()``
    returns at once, so a failed test never leaves a task blocked.
    """

    def __init__(self, directory: os.PathLike | str) -> None:
        self.up = os.path.join(directory, "beacon-up")
        self.go = os.path.join(directory, "beacon-go")
        os.mkfifo(self.up)
        os.mkfifo(self.go)
        # O_RDWR: neither end blocks on open, and tasks always find a peer.
        self._up = os.open(self.up, os.O_RDWR | os.O_NONBLOCK)
        self._go = os.open(self.go, os.O_RDWR | os.O_NONBLOCK)
        self._buf = b""

    def __getstate__(self) -> dict:
        return {"up": self.up, "go": self.go}

    # Task side ------------------------------------------------------------

    def notify(self, token: object = "") -> None:
        try:
            fd = os.open(self.up, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # the test is gone
            return
        try:
            os.write(fd, f"{token}\n".encode())
        finally:
            os.close(fd)

    def wait(self) -> None:
        fd = os.open(self.go, os.O_RDONLY | os.O_NONBLOCK)
        try:
            os.set_blocking(fd, True)
            os.read(fd, 1)  # b"" at once if the test closed its end
        finally:
            os.close(fd)

    # Test side ------------------------------------------------------------

    def started(self, n: int = 1, timeout: float = 20.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while self._buf.count(b"\n") < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._up], [], [], left)[0]:
                got = self._buf.count(b"\n")
                raise TimeoutError(f"only {got} of {n} tasks started")
            self._buf += os.read(self._up, 4096)
        lines = self._buf.split(b"\n")
        self._buf = b"\n".join(lines[n:])
        return [line.decode() for line in lines[:n]]

    def release(self, n: int = 1) -> None:
        os.write(self._go, b"x" * n)

    def close(self) -> None:
        for fd in (self._up, self._go):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def beacon(tmp_path):
    b = Beacon(tmp_path)
    yield b
    b.close()


@pytest.fixture
def pool():
    """A two-worker pool, killed at the end even if the test left work running."""
    p = ironpool.Pool(2)
    yield p
    p.terminate()


#: The backends the shared API suite (tests/test_api_suite.py) and the worker
#: state tests run against: a new backend joins them with one entry here.
BACKENDS = ["processes", "threads"]


@pytest.fixture(params=BACKENDS)
def pool_backend(request) -> str:
    """Each backend in turn, by name (``Pool(backend=pool_backend)``)."""
    return request.param


@pytest.fixture
def make_pool(pool_backend):
    """``make_pool(workers, **options)``: a pool of the backend under test,
    terminated at the end even if the test left work running."""
    pools: list[ironpool.Pool] = []

    def make(workers: int = 2, **options) -> ironpool.Pool:
        pool = ironpool.Pool(workers, backend=pool_backend, **options)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.terminate()


def worker_key() -> tuple[int, int]:
    """Which worker runs this: ``(pid, native thread id)`` (a worker process
    runs tasks on its main thread, whose id is its pid)."""
    return os.getpid(), threading.get_native_id()


def hold(beacon: Beacon, value):
    """A task that says it started (its ``value``), then waits for ``beacon.release()``."""
    beacon.notify(value)
    beacon.wait()
    return value


def two_running(pool: ironpool.Pool, beacon: Beacon) -> list:
    """Starts one ``hold`` task per worker of a two-worker pool, one at a time,
    so that each lands on its own worker whatever the scheduler does with a
    half-started pool; their futures return 0 and 1 once released."""
    running = []
    for i in range(2):
        running.append(pool.submit(hold, beacon, i))
        beacon.started(1)
    return running
