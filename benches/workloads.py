"""Functions the benchmarks send to workers. They live in an importable module
so that every library pickles them by reference."""

from __future__ import annotations

import os
import time

_LEAKED: list = []


def identity(x):
    return x


def square(x):
    return x * x


def array_sum(arr) -> float:
    return float(arr.sum())


def array_sum_shared(shared, _i) -> float:
    """mpire with ``shared_objects``: the array comes first."""
    return float(shared.sum())


def make_frame(i: int, rows: int, strings: bool = False):
    """A rows x 8 float64 DataFrame (plus two string columns when ``strings``)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(i)
    data = rng.random((rows, 8))
    df = pd.DataFrame(data, columns=[f"c{j}" for j in range(8)])
    if strings:
        words = np.array([f"item-{k:04d}" for k in range(1000)], dtype=object)
        df["s0"] = pd.array(words[rng.integers(0, 1000, rows)], dtype="str")
        df["s1"] = pd.array(words[rng.integers(0, 1000, rows)], dtype="str")
    return df


def frame_pid(i: int) -> int:
    """A small pandas task: builds and sums a 100-row frame; returns the pid."""
    float(make_frame(i, 100).sum().sum())
    return os.getpid()


def crash_at(i: int, bad: int, pause: float = 0.005) -> int:
    """Returns ``i`` after a short pause; task ``bad`` segfaults."""
    if i == bad:
        import ctypes

        ctypes.string_at(0)
    time.sleep(pause)
    return i


def hang_at(i: int, bad: int, pause: float = 0.05, long: float = 3600.0) -> int:
    time.sleep(long if i == bad else pause)
    return i


def leak(nbytes: int) -> tuple[int, int]:
    """Keeps ``nbytes`` of touched memory forever; returns (pid, rss after)."""
    _LEAKED.append(b"\x01" * nbytes)
    with open("/proc/self/statm", "rb") as f:
        rss_pages = int(f.read().split()[1])
    return os.getpid(), rss_pages * os.sysconf("SC_PAGE_SIZE")


def getpid(_x=None) -> int:
    return os.getpid()


def pid_time(_x=None) -> tuple[int, float]:
    return os.getpid(), time.time()


def block(seconds: float, marker: str) -> int:
    """Occupies a worker: writes ``marker`` when it starts, then sleeps."""
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def crash_stamp(path: str) -> None:
    """Writes the wall-clock time to ``path``, then segfaults."""
    import ctypes

    with open(path, "w") as f:
        f.write(repr(time.time()))
    ctypes.string_at(0)


def sleep_marker(seconds: float, directory: str, i: int) -> int:
    with open(os.path.join(directory, f"started-{i}-{os.getpid()}"), "w"):
        pass
    time.sleep(seconds)
    return i


def warm(seconds: float = 0.2, modules: tuple = ()) -> int:
    """Makes a worker exist (and import ``modules``) before the timed part."""
    import importlib

    for m in modules:
        importlib.import_module(m)
    time.sleep(seconds)
    return os.getpid()
