"""Advice a ``map`` gives once it ends (pitfall P12): when most of its time
went to dispatching chunks far shorter than a round trip, or when the
workers sat idle while the caller's own loop over the results was the
bottleneck. Each kind of advice is given once per process, through
``warnings`` (``warnings.simplefilter("ignore", ironpool.PerformanceHint)``
silences it)."""

from __future__ import annotations

import time
import warnings
from typing import Any

#: What sending a chunk to a worker and its result back costs, roughly (the
#: round trip measured in benches/): a chunk much shorter is mostly overhead.
DISPATCH_SECONDS = 50e-6
#: Maps shorter than this are not judged.
MIN_WALL_SECONDS = 0.3

_given: set[str] = set()


class PerformanceHint(UserWarning):
    """Advice on how a ``map`` could run faster, given once per process::

        import warnings
        warnings.simplefilter("ignore", ironpool.PerformanceHint)  # silence it
        warnings.simplefilter("error", ironpool.PerformanceHint)   # or fail a test on it
    """


class MapClock:
    """Times one ``map``: its wall time, the caller's own time between
    results (while the map's generator is suspended), and (from the
    backend's counts) the workers' time running it."""

    __slots__ = ("backend", "caller_seconds", "counts", "started")

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.counts = backend.counts()
        self.started = time.monotonic()
        self.caller_seconds = 0.0

    def advise(self, what: str, chunksize: int | None, workers: int) -> None:
        """Warns once per kind when the map's figures call for it."""
        wall = time.monotonic() - self.started
        if wall < MIN_WALL_SECONDS:
            return
        now = self.backend.counts()
        tasks = now["returned"] + now["failed"] - self.counts["returned"] - self.counts["failed"]
        busy = now["task_seconds"] - self.counts["task_seconds"]
        if tasks <= 0:
            return
        per_chunk = busy / tasks
        if chunksize is not None and per_chunk < DISPATCH_SECONDS:
            _warn_once(
                "short-chunks",
                f"{what}: its chunks of {chunksize} item(s) each ran for {per_chunk * 1e6:.0f} µs on average, "
                f"less than the ~{DISPATCH_SECONDS * 1e6:.0f} µs a chunk costs to send to a worker and back, "
                "so most of the time went to dispatch: leave chunksize=None (ironpool sizes chunks from "
                "measured task times) or pass a larger one",
            )
        utilisation = busy / (wall * workers)
        caller_busy = self.caller_seconds / wall
        if utilisation < 0.25 and caller_busy > 0.75:
            _warn_once(
                "caller-bound",
                f"{what}: the workers were busy {utilisation:.0%} of its {wall:.1f} s while this thread spent "
                f"{caller_busy:.0%} of them in its own loop between results: that loop is the bottleneck; "
                "move its work into the function the pool runs, or run it on fewer workers",
            )


def _warn_once(kind: str, message: str) -> None:
    if kind in _given:
        return
    _given.add(kind)
    warnings.warn(message, PerformanceHint, stacklevel=5)  # the frame iterating the map
