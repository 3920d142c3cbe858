"""Sending an object to each worker once (pitfall P10).

Two routes: ``pool.share(obj)`` returns a :class:`Shared` handle, and
:class:`AutoShare` swaps large arguments the pool has seen before for
handles by itself. Either way the object is pickled once into a registered
payload that the engine sends each worker once (``RegisterFn``); the worker
builds the object for each task from it (``_serialize.Registered``).

Automatic reuse is exact, never a guess: the cache is keyed by identity, and
an entry is used again only while a 128-bit digest of the object's pickled
bytes (``_core.digest``, at memory speed) is the one taken when it was
shared. An object passed writable reaches tasks writable, over private
copy-on-write mappings, just as an ordinary argument would.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from . import _core
from ._serialize import FRESH, PRIVATE, REUSE, SharedRef, dumps
from .errors import SerializationError

#: Objects remembered by the automatic cache: this many...
_ENTRIES = 16
#: ...holding at most this much in registered payloads (an object larger
#: than this is never shared automatically)...
_MAX_BYTES = 2 * 2**30
#: ...of which at most this much in bytes objects, which cannot be weakly
#: referenced and so are kept alive by the cache.
_HELD_BYTES = 256 * 2**20


class Shared:
    """An object sent to each worker once, from :meth:`Pool.share`.

    Pass the handle as a task argument (anywhere inside the arguments) and the
    task receives the object. Large buffers inside it (``buffer_threshold``
    bytes or more, 64 KiB by default) live in shared memory that every worker
    maps once: no copy per task, no copy per worker, and those buffers arrive
    **read-only** (one task must not change what the next one reads; copy an
    array to write into it). Smaller ones travel inside the pickle stream and
    arrive as private, writable copies. Each task gets its own object, so a
    task adding a column or a dict key, or writing into a small array,
    changes nothing for other tasks; ``share(obj, reuse=True)`` hands every
    task on a worker the same object instead, and then such changes persist
    on that worker (see :meth:`Pool.share`).

    The object is a snapshot taken by ``share()``; later changes to it in the
    caller are not seen by workers. ``value`` is the original object. A
    handle works only in the arguments of its own pool's tasks, and only
    until it is released: anything else is a :class:`SerializationError`.

    Example::

        table = pool.share(big_dataframe)
        totals = list(pool.map(score, [table] * 1000, range(1000)))
        table.release()   # or let the handle be garbage collected
    """

    def __init__(self, core: Any, token: int, value: Any, ref_id: int, mode: int) -> None:
        self.value = value
        self._ref = SharedRef(ref_id, token, mode, core)
        weakref.finalize(self, self._ref.release)  # collected: as if released

    def __reduce__(self):
        return self._ref.__reduce__()

    def release(self) -> None:
        """Frees the workers' copies as soon as the calls already holding it
        are done (their retries, and the chunks of a ``map`` already read,
        included); passing it to a new call after this is a
        :class:`SerializationError`. A lazy ``map`` whose input has not yet
        produced the handle when it is released gets that error too."""
        self._ref.release()

    def __repr__(self) -> str:
        return f"<ironpool.Shared id={self._ref.id} of {type(self.value).__name__}>"


def dumps_shared(value: Any, threshold: int) -> list:
    """``dumps`` for an object to share, naming it when it cannot be pickled."""
    try:
        return dumps(value, threshold)
    except Exception as exc:
        raise SerializationError(
            f"{type(value).__module__}.{type(value).__qualname__} object could not be pickled "
            f"for sharing: {type(exc).__name__}: {exc}"
        ) from exc


_KINDS = ("numpy", "pandas", "pyarrow")


def any_candidate(values: Any) -> bool:
    """Whether any of ``values`` is of a kind that may be sent once (a cheap
    test that spares small calls the full look-up)."""
    for v in values:
        t = type(v)
        if t is bytes or t.__module__.startswith(_KINDS):
            return True
    return False


def _policy(v: Any, threshold: int) -> int | None:
    """The mode in which tasks get an argument sent once automatically, or
    None if it is not a kind worth it (large bytes, numpy, pandas, Arrow)."""
    t = type(v)
    if t is bytes:
        return REUSE if len(v) >= threshold else None
    module = t.__module__
    if module == "numpy":
        if t.__name__ != "ndarray" or v.nbytes < threshold or v.dtype.hasobject:
            return None
        if _core.in_shared_memory(v):
            return None  # lent on every send, no copy: nothing to save
        return PRIVATE if v.flags.writeable else FRESH
    if module.startswith("pandas") and t.__name__ in ("DataFrame", "Series"):
        return PRIVATE  # small ones are dropped once pickled: no buffer out of band
    if module.startswith("pyarrow"):
        name = t.__name__
        if name in ("Table", "RecordBatch", "ChunkedArray") or name.endswith("Array"):
            nbytes = getattr(v, "nbytes", 0)
            if isinstance(nbytes, int) and nbytes >= threshold:
                return REUSE  # Arrow objects have no in-place changes
    return None


def _nbytes(parts: list) -> int:
    return sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in parts)


def _deref(ref: Any) -> Any:
    return ref() if isinstance(ref, weakref.ref) else ref


class _Cached:
    """One object shared automatically."""

    __slots__ = ("digest", "handle", "held", "size", "value")

    def __init__(self, value: Any, handle: Any, digest: bytes | None, size: int, held: int) -> None:
        self.value = value  # a weak reference, or the object itself (bytes)
        self.handle = handle  # the Shared handle, or a weak reference to it
        self.digest = digest
        self.size = size  # bytes of its registered payload
        self.held = held  # bytes of it the cache keeps alive


class AutoShare:
    """A pool's automatic send-once cache. ``register(parts, mode)`` makes a
    handle for a pickled object and returns it with the digest of the bytes
    it registered (taken while copying them, so sharing costs no extra
    pass), or None if they changed meanwhile (then the entry is never
    reused).

    Every candidate is shared the first time it is seen: sharing costs the
    one copy an ordinary argument costs. Objects meant not to change stay
    cached while they live (within the limits above). A writable object's
    copy lives only while tasks that use it are queued or running (they hold
    its handle, the cache holds it weakly): it is sent once per burst of
    tasks, and no copy outlives the burst."""

    def __init__(self, register: Callable[[list, int], tuple[Shared, bytes | None]]) -> None:
        self._register = register
        # Reentrant: the weak-reference callbacks take it too, and may run
        # in any thread that drops the last reference to a cached object.
        self._lock = threading.RLock()
        self._entries: OrderedDict[int, _Cached] = OrderedDict()  # by id(value)

    def swap(self, values: Any, threshold: int) -> Any | None:
        """``values`` (an argument tuple, a kwargs dict, or a list of argument
        tuples: a map chunk) with large objects replaced by handles, or None
        if nothing was replaced."""
        if isinstance(values, dict):
            swapped = self.swap(tuple(values.values()), threshold)
            return None if swapped is None else dict(zip(values, swapped, strict=True))
        rows = values if isinstance(values, list) else [values]
        handles: dict[int, Shared | None] = {}  # one look-up (and digest) per object per call
        out = []
        changed = False
        for row in rows:
            new = list(row)
            for i, v in enumerate(new):
                key = id(v)
                if key not in handles:
                    mode = _policy(v, threshold)
                    handles[key] = None if mode is None else self._handle(v, threshold, mode)
                handle = handles[key]
                if handle is not None:
                    new[i] = handle
                    changed = True
            out.append(tuple(new))
        if not changed:
            return None
        return out if isinstance(values, list) else out[0]

    def _handle(self, value: Any, threshold: int, mode: int) -> Shared | None:
        """The cached handle for ``value`` while its digest matches, else a
        new one (None if it has no large buffer to share)."""
        key = id(value)
        with self._lock:
            hit = self._entries.get(key)
            handle = _deref(hit.handle) if hit is not None and _deref(hit.value) is value else None
        if handle is not None and type(value) is bytes:
            return handle  # cannot have changed
        try:
            parts = dumps(value, threshold)  # large buffers as views: no copy
        except Exception:
            return None  # sent as an ordinary argument, whose error names the task
        size = _nbytes(parts)
        if size < threshold:
            return None  # a small pandas object: not worth a registration
        if handle is not None and hit.digest == _core.digest(parts):  # type: ignore[union-attr]
            with self._lock:
                if key in self._entries:
                    self._entries.move_to_end(key)
            return handle
        if size > _MAX_BYTES:
            return None
        # The handle must not hold the value, or the weak entry never dies.
        handle, digest = self._register(parts, mode)
        drop = lambda _r, key=key: self._prune(key)  # noqa: E731
        try:
            ref, held = weakref.ref(value, drop), 0
        except TypeError:  # bytes: no weak references
            ref, held = value, len(value)
        lasting = mode != PRIVATE
        entry = _Cached(ref, handle if lasting else weakref.ref(handle, drop), digest, size, held)
        with self._lock:
            # Evicting only drops the cache's reference: tasks still using a
            # handle hold it, and it is unregistered once they all let go.
            self._entries[key] = entry
            while len(self._entries) > 1 and (
                len(self._entries) > _ENTRIES
                or sum(e.size for e in self._entries.values()) > _MAX_BYTES
                or sum(e.held for e in self._entries.values()) > _HELD_BYTES
            ):
                self._entries.popitem(last=False)
        return handle

    def _prune(self, key: int) -> None:
        """Drops the entry at ``key`` if its object or its handle is gone (an
        older handle of the same object dying later leaves a newer one be)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and (_deref(entry.value) is None or _deref(entry.handle) is None):
                del self._entries[key]
