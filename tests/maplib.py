"""Tasks for tests/test_map_features.py, in a module that imports almost
nothing: a replacement worker imports a task's module on its first task, and
that import counts against the task's time limit (pytest would cost ~0.3 s
of CPU, more than a limit allows on a loaded machine)."""

from __future__ import annotations

import os
import signal
import time


def mixed(x: int) -> int:
    """Fails on some items: raises on multiples of 7, segfaults on 13, hangs on 17."""
    if x == 13:
        os.kill(os.getpid(), signal.SIGSEGV)
    if x == 17:
        time.sleep(60)
    if x % 7 == 0 and x:
        raise ValueError(f"bad {x}")
    return x * 10


class Unpicklable:
    def __reduce__(self):
        raise TypeError("no pickling for you")


def result_unpicklable_at(x: int) -> object:
    return Unpicklable() if x == 4 else x


def blocked(path: str) -> int:
    with open(path) as f:  # a FIFO: returns once the test writes to it
        return len(f.read())


def tiny_then_mixed(x: int) -> int:
    """Quick for the first 1000 items, then like ``mixed`` of ``x - 1000``."""
    return x * 10 if x < 1000 else mixed(x - 1000) + 10_000


def stop_at_3(x: int) -> int:
    """Raises ``StopIteration`` on 3, which ``map`` (the builtin) would take for the end."""
    if x == 3:
        raise StopIteration("three")
    return x


def big_text(x: int) -> str:
    return str(x) * 1_000_000


class Box:
    """An item the pool can pickle by reference and a test can hold weakly."""

    def __init__(self, n: int) -> None:
        self.n = n


def unbox(b: Box) -> int:
    return b.n
