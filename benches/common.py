"""Shared pieces of the benchmark suite: the scenario description, the child
protocol, timing helpers and the memory sampler."""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

WORKERS = 2
RESULT = "@@RESULT "
PARTIAL = "@@PARTIAL "


@dataclass
class Column:
    header: str
    key: str
    fmt: str = "{:.3f}"  # a format string, or "int" / "text"

    def render(self, value: Any) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, str) or self.fmt == "text":
            return str(value)
        if isinstance(value, bool):
            return "yes" if value else "no"
        if self.fmt == "int":
            return f"{int(value):,}"
        return self.fmt.format(value)


@dataclass
class Scenario:
    """One benchmark: ``cases(quick)`` lists the rows (library labels);
    ``run(case, ctx)`` runs in a fresh child process and returns a dict of
    metrics; ``columns`` say how to print it."""

    name: str
    title: str
    run: Callable[[str, Ctx], dict]
    cases: Callable[[bool], list[str]]
    columns: list[Column]
    ratio_key: str | None = None  # lower is better; ratio = peer / ironpool
    timeout: Callable[[bool], float] = lambda quick: 120.0
    repeats: Callable[[bool], int] = lambda quick: 1  # fresh processes per case (medians taken)
    variants: list[str] = field(default_factory=lambda: [""])
    notes: list[str] = field(default_factory=list)
    # Runs in the runner while the child lives (parent_kill): hook(proc, partials_queue) -> dict | None
    driver: Callable | None = None
    needs_files: bool = False


@dataclass
class Ctx:
    quick: bool
    variant: str = ""
    files_dir: str | None = None

    def emit(self, **partial: Any) -> None:
        """Progress the runner keeps if the child later hangs or dies."""
        print(PARTIAL + json.dumps(partial, default=str), flush=True)


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q / 100.0 * (len(xs) - 1))))
    return xs[k]


def repeat(fn: Callable[[], Any], runs: int = 3, budget: float = 30.0) -> tuple[list[float], Any]:
    """Times ``fn`` up to ``runs`` times, stopping early once ``budget`` seconds
    are spent (always at least once). Returns the times and the last value."""
    times: list[float] = []
    value = None
    start = time.perf_counter()
    for _ in range(runs):
        value = None  # drop the previous run's result before the next one
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget:
            break
    return times, value


# Memory -------------------------------------------------------------------------


def _rollup(pid: int) -> tuple[int, int, int]:
    """(Rss, Pss, Pss_Shmem) in bytes from /proc/<pid>/smaps_rollup; zeros if gone."""
    rss = pss = shm = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith(b"Pss_Shmem:"):
                    shm = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss, pss, shm


def _shm_fds(pid: int, found: dict[int, int]) -> None:
    """Adds the shared-memory objects (memfd, /dev/shm files) that ``pid``
    holds open to ``found``: inode -> allocated bytes."""
    base = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(base)
    except OSError:
        return
    for fd in fds:
        path = f"{base}/{fd}"
        try:
            if os.readlink(path).startswith(_SHM_PREFIXES):
                st = os.stat(path)
                found[st.st_ino] = st.st_blocks * 512
        except OSError:
            pass


def _shm_maps(pid: int) -> list[str]:
    """/proc/<pid>/map_files/ entries of the memfd and /dev/shm mappings of ``pid``."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            lines = [ln for ln in f if b" /memfd:" in ln or b" /dev/shm/" in ln]
    except OSError:
        return []
    return [f"/proc/{pid}/map_files/{ln.split(None, 1)[0].decode()}" for ln in lines]


_SHM_PREFIXES = ("/memfd:", "/dev/shm/")


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc/<pid>/task/<tid>/children."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
    return out


class MemWatch:
    """Samples the process tree rooted here every ``interval`` seconds.

    ``peak_pss``: the largest sum of PSS over the tree (RSS would count
    shared pages once per process). ``peak_total``: the largest sum of PSS
    without shared-memory pages, plus every shared-memory object (memfd,
    /dev/shm file) that some process of the tree holds open or mapped, once,
    at its allocated size: shared memory that is written but not (yet)
    mapped, which PSS cannot see, is counted too."""

    def __init__(self, interval: float = 0.02) -> None:
        self.root = os.getpid()
        self.interval = interval
        self.peak_pss = 0
        self.peak_total = 0
        self.peak_rss: dict[int, int] = {}
        self.samples = 0
        self.maps: dict[int, list[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memwatch", daemon=True)

    def __enter__(self) -> MemWatch:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        pids = tree_pids(self.root)
        # /proc/<pid>/maps is costly to read: refresh the list of shared
        # mappings every 5th sample, stat the known ones every time.
        if self.samples % 5 == 0:
            self.maps = {pid: _shm_maps(pid) for pid in pids}
        pss = shm = 0
        objects: dict[int, int] = {}
        for pid in pids:
            r, p, s = _rollup(pid)
            pss += p
            shm += s
            _shm_fds(pid, objects)
            for path in self.maps.get(pid, ()):
                try:
                    st = os.stat(path)
                    objects[st.st_ino] = st.st_blocks * 512
                except OSError:
                    pass
            if pid != self.root and r > self.peak_rss.get(pid, 0):
                self.peak_rss[pid] = r
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_total = max(self.peak_total, pss - shm + sum(objects.values()))
        self.samples += 1

    def figures(self) -> dict:
        return {"pss_mib": self.peak_pss / 2**20, "total_mib": self.peak_total / 2**20}


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return False
