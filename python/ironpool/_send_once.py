"""What a call sends, decided in one pickling pass: each object goes with
the call, or once to each worker (pitfall P10).

``encode`` pickles a call (or a ``map`` chunk) once. While it does, the
reducers in ``_serialize`` ask the call's :class:`Encoding` about each large
numpy, pandas or Arrow object they meet, anywhere in the arguments: it
answers with a handle from :class:`AutoShare` or lets the object travel with
the call. ``pool.share(obj)`` makes such a handle explicitly
(:class:`Shared`). Either way the object is pickled once into a registered
payload that the engine sends each worker once (``Register``); the worker
builds the object for each task from it (``_serialize.Registered``).

Automatic reuse is exact, never a guess: the cache is keyed by identity, and
an entry is used again only while a 128-bit digest of the object's pickled
bytes (``_core.digest``, at memory speed) is the one taken when it was
shared. An object passed writable reaches tasks writable, over private
copy-on-write mappings, just as an ordinary argument would.
"""

from __future__ import annotations

import _thread
import itertools
import os
import pickle
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _core, _serialize
from ._serialize import FRESH, PRIVATE, REUSE, dumps, serialization_error
from .errors import SerializationError

#: Objects remembered by the automatic cache: this many...
_ENTRIES = 16
#: ...holding at most this much in registered payloads (an object larger
#: than this is never shared automatically)...
_MAX_BYTES = 2 * 2**30
#: ...of which at most this much in bytes objects, which cannot be weakly
#: referenced and so are kept alive by the cache.
_HELD_BYTES = 256 * 2**20


#: Orders calls and releases: a call may send a handle released after it
#: began (a rerun, the rest of a map), never one released before.
_sequence = itertools.count(1)


def call_started() -> int:
    """A mark for a call beginning, for ``encode(..., since=)``."""
    return next(_sequence)


class SharedRef:
    """Pickles as a reference to an object the pool registered once; the
    worker receives the object itself. Only the pool that registered it can
    send it. Each encoding holds it for the call being built (the caller
    lets go once the call is done); once released and held by no call, the
    pool forgets it (``unregister``)."""

    __slots__ = ("gone", "holds", "id", "lock", "mode", "pid", "pool", "released", "unregister")

    def __init__(self, ref_id: int, pool: int, mode: int, unregister: Callable[[int], None]) -> None:
        self.id = ref_id
        self.pool = pool
        self.mode = mode
        self.unregister = unregister
        self.pid = os.getpid()
        self.lock = _thread.allocate_lock()
        self.holds = 0  # calls that may still send it
        self.released = 0  # the call_started() mark when it was released; 0: not
        self.gone = False  # forgotten by the pool

    def hold(self, since: int) -> None:
        """Holds it for a call that began at ``since``, if it may send it."""
        with self.lock:
            if self.gone or (self.released and self.released < since):
                raise serialization_error(
                    f"ironpool.Shared handle {self.id} was released: workers no longer hold its object"
                )
            self.holds += 1

    def unhold(self) -> None:
        with self.lock:
            self.holds -= 1
            last = self.holds == 0 and self.released and not self.gone
            if last:
                self.gone = True
        if last:
            self._forget()

    def release(self) -> None:
        """Refuses new calls; forgets it once no call holds it."""
        with self.lock:
            if not self.released:
                self.released = next(_sequence)
            last = self.holds == 0 and not self.gone
            if last:
                self.gone = True
        if last:
            self._forget()

    def _forget(self) -> None:
        if os.getpid() == self.pid:  # not in a forked child
            self.unregister(self.id)

    def __reduce__(self):
        encoding = _serialize.current_encoding()
        if not isinstance(encoding, Encoding):
            raise serialization_error(
                f"ironpool.Shared handle {self.id} can only be pickled as a task argument of the pool "
                "that made it (not by pickle, copy or another pool's initargs)"
            )
        if encoding.pool != self.pool:
            raise serialization_error(
                f"ironpool.Shared handle {self.id} belongs to another pool: pass it only in the "
                "arguments of tasks of the pool whose share() made it"
            )
        return encoding.refer(self)


def unhold_all(held: list) -> None:
    """Lets go of the handles a call held (see ``encode``)."""
    for ref in held:
        ref.unhold()
    held.clear()


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

    def __init__(self, ref: SharedRef, value: Any) -> None:
        self.value = value
        self._ref = ref
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


def _pandas_nbytes(v: Any) -> int:
    """A pandas object's column bytes, without pickling it (object columns
    count their pointers: a long one is worth sending once too)."""
    if hasattr(v, "nbytes"):  # Series
        return int(v.nbytes)
    try:
        return sum(int(a.nbytes) for a in v._mgr.arrays)
    except AttributeError:  # a pandas without the block manager's arrays
        return int(v.memory_usage(index=False, deep=False).sum())


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
        return PRIVATE if _pandas_nbytes(v) >= threshold else None
    if module.startswith("pyarrow"):
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

    def handle(self, value: Any, threshold: int, mode: int) -> Shared | None:
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


class Encoding:
    """One call being pickled: the handles it refers to (held for the call)
    and the objects it sent as handles. Consulted by ``_serialize``'s
    reducers and by ``SharedRef.__reduce__`` while ``encode`` runs."""

    __slots__ = ("auto", "held", "ids", "pinned", "pool", "since", "threshold")

    def __init__(self, pool: int, threshold: int, since: int, auto: AutoShare | None, pinned: dict) -> None:
        self.pool = pool
        self.threshold = threshold
        self.since = since
        self.auto = auto
        self.pinned = pinned  # id(object) -> its Shared handle, for this call
        self.ids: list[int] = []  # registered objects the payload refers to
        self.held: list[SharedRef] = []

    def refer(self, ref: SharedRef) -> tuple:
        """The reduce value of a reference to ``ref``, held for this call."""
        ref.hold(self.since)
        self.held.append(ref)
        self.ids.append(ref.id)
        return (_serialize._shared_lookup, (ref.id, ref.mode))

    def send_once(self, obj: Any) -> tuple | None:
        """A reference to ``obj`` sent once, or None: it goes with the call."""
        handle = self.pinned.get(id(obj))
        if handle is None:
            if self.auto is None:
                return None
            mode = _policy(obj, self.threshold)
            if mode is None:
                return None
            # Its own pickling (to register it) must not send it once again.
            previous = _serialize.set_encoding(None)
            try:
                handle = self.auto.handle(obj, self.threshold, mode)
            finally:
                _serialize.set_encoding(previous)
            if handle is None:
                return None
            self.pinned[id(obj)] = handle
        return self.refer(handle._ref)

    def restart(self) -> None:
        """The call is pickled again from the start (by value)."""
        unhold_all(self.held)
        self.ids.clear()


@dataclass(slots=True)
class Encoded:
    """A call as the engine takes it."""

    parts: list  # the pickle stream and its out-of-band buffers
    needs: list[int]  # registered objects it refers to
    held: list[SharedRef]  # handles held for the call: ``unhold_all`` when it is done
    pinned: dict  # objects sent as handles (see ``encode``)


def encode(
    call: Any,
    *,
    pool: int,
    threshold: int,
    since: int,
    auto: AutoShare | None,
    pinned: dict | None = None,
) -> Encoded:
    """Pickles the arguments of a call of pool ``pool`` that began at
    ``since`` (``call_started()``; the rest of a map passes its call's mark,
    so it may still send handles released after that), in one pass: large
    numpy, pandas and Arrow objects anywhere in it are sent once through
    ``auto``. ``pinned`` (the ``Encoded.pinned`` of an earlier encoding)
    makes the objects it lists go as the same handles, so that a rerun reads
    what the first run read. The caller must ``unhold_all(encoded.held)``
    once the call is done, or at once if it is never submitted."""
    encoding = Encoding(pool, threshold, since, auto, {} if pinned is None else pinned)
    previous = _serialize.set_encoding(encoding)
    try:
        parts = dumps(call, threshold)
    except BaseException:
        unhold_all(encoding.held)
        raise
    finally:
        _serialize.set_encoding(previous)
    return Encoded(parts, encoding.ids, encoding.held, encoding.pinned)


def encode_plain(call: Any, threshold: int) -> bytes | None:
    """The payload of a call's ``(args, kwargs)`` or of a chunk's list of
    items when nothing in it can be sent once or needs the reducers (atoms
    and small ``bytes``, see ``_plain``); None otherwise, for ``encode``.
    The common small task skips the encoding machinery (a few µs each)."""
    return pickle.dumps(call, protocol=5) if _plain(call, threshold) else None


def _plain(call: Any, threshold: int) -> bool:
    """Whether ``call`` is a call's ``(args, kwargs)`` of atoms and small
    ``bytes``, a chunk's list of atoms or of such argument tuples, or a
    chunk of a range (``_core.plain_call``, ``_core.plain_items``)."""
    if type(call) is tuple:  # (args, kwargs)
        args, kwargs = call
        return _core.plain_call(args, kwargs or None, threshold)
    if type(call) is range:  # a map chunk of a range input: its items are made in the worker
        return True
    return type(call) is list and _core.plain_items(call, threshold)


def share_large_bytes(values: tuple, auto: AutoShare, threshold: int) -> tuple:
    """``values`` with large ``bytes`` replaced by handles: the pickler never
    shows ``bytes`` to a reducer, so a call's own arguments are checked here."""
    if not any(type(v) is bytes and len(v) >= threshold for v in values):
        return values
    out = []
    for v in values:
        handle = auto.handle(v, threshold, REUSE) if type(v) is bytes and len(v) >= threshold else None
        out.append(v if handle is None else handle)
    return tuple(out)

