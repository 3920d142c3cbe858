"""numpy arrays born in shared memory, so they travel without a copy.

While ironpool's allocator is installed (``with ironpool.shared_memory():``),
every numpy array of 1 MiB or more gets its own memfd. Sending such
an array passes the memfd's descriptor, and the receiver maps the same pages:
no copy at either end.

Sending freezes what was sent: the memfd is sealed and the sender's pages
become copy-on-write, so later writes by the sender stay private and the
receiver always sees the array as it was when it was sent. An array written
after it was sent is copied on its next send, like any other. A ``fork()`` of the caller seals every block in the
same way, so that parent and child never share writes; ironpool's own
process starts do not.

Buffers received from another process (results, arguments in a worker) are
sealed memfds already: sending one on unchanged costs no copy either.

Inside a task, the same block makes a large result travel to the caller
with no copy at all. It is not the default in workers: memfd memory has
4 KiB pages where numpy's own large arrays get huge pages, so first touch
is slower, and for results built from temporaries that costs more than the
one copy it saves (measured in ``docs/decisions.md``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from . import _core


def install() -> object | None:
    """Makes ironpool's allocator numpy's, in the current context (thread).
    Returns the handler it replaced, or None if numpy is not loaded."""
    if "numpy" not in sys.modules:
        return None
    return _core.set_numpy_handler(_core.shared_memory_handler())


def restore(previous: object) -> None:
    """Puts back the handler :func:`install` replaced."""
    if "numpy" in sys.modules:
        _core.set_numpy_handler(previous)


@contextlib.contextmanager
def shared_memory() -> Iterator[None]:
    """numpy arrays made inside this block live in shared memory, so passing
    them to tasks costs no copy, however often they are sent::

        import numpy as np
        import ironpool

        with ironpool.shared_memory():
            big = np.random.default_rng(0).random(32_000_000)   # 256 MB
        with ironpool.Pool() as pool:
            sums = list(pool.map(np.sum, [big] * 8))             # nothing copied

    Arrays keep their memory after the block ends; only new allocations go
    back to numpy's allocator. Each task sees the array as it was when the
    task was submitted; if you change it afterwards, the next task that gets
    it gets a fresh copy.

    Limits: only arrays of 1 MiB or more are placed in shared memory (smaller
    ones are cheap to copy and would waste a descriptor each), and at most
    128 such arrays are alive at once (fewer when the descriptor limit is
    under 1024: an eighth of it); beyond that numpy's usual allocator is
    used, silently and correctly. The allocator is numpy's per-context
    handler: it applies to the current thread and to asyncio tasks created
    inside the block (they copy the context), not to other threads. numpy is
    imported if it was not.
    """
    if "numpy" not in sys.modules:
        import numpy  # noqa: F401
    previous = install()
    try:
        yield
    finally:
        restore(previous)


def stats() -> tuple[int, int]:
    """(arrays alive in shared memory, buffers sent without a copy) in this process."""
    return _core.shared_memory_stats()
