"""Pickling for the wire: protocol 5 with large buffers out of band, plain
pickle first and cloudpickle only where it is needed (``__main__``, lambdas,
closures, notebook code).

A payload is a list of parts: the pickle stream, then each out-of-band
buffer. The engine puts large parts in shared memory; ``loads`` rebuilds the
object over those mappings without copying.
"""

from __future__ import annotations

# The C pickler directly: importing the `pickle` module costs a template
# process ~10 ms of start-up (re, enum, functools) for nothing we use.
import _pickle as pickle
import _thread
import io
import itertools
import os
import sys

_repr = None


def _short(value: object) -> str:
    global _repr
    if _repr is None:
        import reprlib

        _repr = reprlib.Repr()
        _repr.maxstring = _repr.maxother = 40
        _repr.maxlist = _repr.maxtuple = _repr.maxdict = 4
    return _repr.repr(value)


def serialization_error(message: str) -> BaseException:
    # errors.py imports the pickle module, which a template need not load.
    from .errors import SerializationError

    return SerializationError(message)


#: How a worker hands a shared object to a task (a handle's ``mode``):
#: a fresh object over the one read-only mapping of its buffers,
FRESH = 0
#: the same object for every task on the worker,
REUSE = 1
#: or a fresh object over private copy-on-write mappings, writable like an
#: ordinary argument (objects the caller passed writable, sent once).
PRIVATE = 2


class Registered:
    """A payload the pool sent this worker once (``_core.RegisteredPayload``):
    a function, or a shared object. Functions are unpickled once; a shared
    object is unpickled as its handle's mode says. The large buffers stay in
    the segments either way: only the pickle stream is read again."""

    __slots__ = ("error", "payload", "value")

    def __init__(self, payload: object) -> None:
        self.payload: object = payload
        self.value: object = None
        self.error: BaseException | None = None

    def load(self, what: str, private: bool = False) -> object:
        """A new object over the shared read-only mapping, or over private ones."""
        try:
            p = self.payload
            return loads(p.private_parts() if private else p.shared_parts())  # type: ignore[union-attr]
        except BaseException as exc:
            raise serialization_error(
                f"{what} could not be unpickled in the worker: {type(exc).__name__}: {exc}"
            ) from exc

    def get(self, what: str) -> object:
        """The one object unpickled at first use (its error, if it failed)."""
        if self.payload is not None:
            try:
                self.value = self.load(what)
            except BaseException as exc:
                self.error = exc
            self.payload = None
        if self.error is not None:
            raise self.error
        return self.value


#: Payloads registered with the pool, in a worker: id -> Registered. Filled
#: by the worker handler.
REGISTRY: dict[int, Registered] = {}

#: In a worker: its own ``__main__`` namespace, which code from the caller's
#: ``__main__`` is rebuilt over (see ``_by_value``); None elsewhere.
WORKER_MAIN: dict | None = None

_collecting = _thread._local()


def _shared_lookup(ref_id: int, mode: int = FRESH) -> object:
    """Unpickles a shared reference in a worker: the shared object."""
    entry = REGISTRY.get(ref_id)
    if entry is None:
        raise LookupError(f"shared object {ref_id} is not known to this worker (it was released)")
    what = f"the object shared as handle {ref_id}"
    if mode == REUSE:
        return entry.get(what)
    return entry.load(what, private=mode == PRIVATE)


#: Orders calls and releases: a call may send a handle released after it
#: began (a retry, the rest of a map), never one released before.
_sequence = itertools.count(1)


def call_started() -> int:
    """A mark for a call beginning, for ``dumps_task(..., since=)``."""
    return next(_sequence)


class SharedRef:
    """Pickles as a reference to an object the pool registered once; the
    worker receives the object itself. Only the pool that registered it can
    send it. Each pickling holds it for the call being built (the caller
    lets go once the call is done); once released and held by no call, the
    pool forgets it (``core.unregister``)."""

    __slots__ = ("core", "gone", "holds", "id", "lock", "mode", "pid", "pool", "released")

    def __init__(self, ref_id: int, pool: int, mode: int, core: object) -> None:
        self.id = ref_id
        self.pool = pool
        self.mode = mode
        self.core = core
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
            self.core.unregister(self.id)  # type: ignore[attr-defined]

    def __reduce__(self):
        ids = getattr(_collecting, "ids", None)
        if ids is None:
            raise serialization_error(
                f"ironpool.Shared handle {self.id} can only be pickled as a task argument of the pool "
                "that made it (not by pickle, copy or another pool's initargs)"
            )
        if _collecting.pool != self.pool:
            raise serialization_error(
                f"ironpool.Shared handle {self.id} belongs to another pool: pass it only in the "
                "arguments of tasks of the pool whose share() made it"
            )
        self.hold(_collecting.since)
        _collecting.held.append(self)
        ids.append(self.id)
        return (_shared_lookup, (self.id, self.mode))


def unhold_all(held: list) -> None:
    """Lets go of the handles a call held (see ``dumps_task``)."""
    for ref in held:
        ref.unhold()
    held.clear()


def dumps_task(obj: object, threshold: int, pool: int, since: int) -> tuple[list, list, list]:
    """Like ``dumps`` for the arguments of a call of pool ``pool`` that began
    at ``since`` (``call_started()``; a retry or the rest of a map passes
    its call's mark, so it may still send handles released after that).
    Returns the parts, the ids of the shared objects they refer to, and the
    handles it held: the caller must ``unhold_all`` them once the call is
    done, or at once if it is never submitted."""
    _collecting.ids = ids = []
    _collecting.held = held = []
    _collecting.pool = pool
    _collecting.since = since
    try:
        return dumps(obj, threshold), ids, held
    except BaseException:
        unhold_all(held)
        raise
    finally:
        _collecting.ids = None
        _collecting.held = None


def _rebuild_viewed(raw: object, dtype: object, shape: tuple, fortran: bool) -> object:
    """Inverse of ``_reduce_ndarray``: the bytes viewed as the original dtype."""
    if fortran:
        return raw.view(dtype).reshape(shape[::-1]).T
    return raw.view(dtype).reshape(shape)


def _reduce_ndarray(a: object) -> tuple:
    """numpy pickles datetime64, timedelta64 and structured arrays in-band
    (their dtypes cannot be exported through the buffer protocol). Sending
    their bytes as uint8 lets them travel out of band like any other array."""
    dt = a.dtype
    if a.size and not dt.hasobject and (dt.kind in "mM" or dt.names is not None):
        if a.flags.c_contiguous:
            return (_rebuild_viewed, (a.reshape(-1).view("u1"), dt, a.shape, False))
        if a.flags.f_contiguous:
            return (_rebuild_viewed, (a.T.reshape(-1).view("u1"), dt, a.shape, True))
    return a.__reduce_ex__(5)


_dispatch_table: dict | None = None


def _numpy_table() -> dict | None:
    """The pickler dispatch table with the ndarray reducer, once numpy is loaded."""
    global _dispatch_table
    if _dispatch_table is None:
        np = sys.modules.get("numpy")
        if np is None:
            return None
        import copyreg

        table = dict(copyreg.dispatch_table)
        table[np.ndarray] = _reduce_ndarray
        _dispatch_table = table
    return _dispatch_table


def _pickle_dumps(obj: object, buffer_callback) -> bytes:
    table = _numpy_table()
    if table is None:
        return pickle.dumps(obj, protocol=5, buffer_callback=buffer_callback)
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=5, buffer_callback=buffer_callback)
    pickler.dispatch_table = table
    pickler.dump(obj)
    return out.getvalue()


class _ByValue(Exception):
    """The stream refers to ``__main__``, which workers do not have."""


def dumps(obj: object, threshold: int) -> list:
    """Pickles ``obj``; buffers of ``threshold`` bytes or more go out of band."""
    buffers: list = []

    def keep_large(pb: object) -> bool:
        try:
            raw = pb.raw()
        except BufferError:  # not contiguous: let pickle copy it in-band
            return True
        if raw.nbytes < threshold:
            return True
        buffers.append(raw)
        return False

    try:
        data = _pickle_dumps(obj, keep_large)
        if b"__main__" in data or b"__mp_main__" in data:
            raise _ByValue
    except (pickle.PicklingError, TypeError, AttributeError, _ByValue):
        from . import _by_value

        buffers.clear()
        if getattr(_collecting, "ids", None):
            _collecting.ids.clear()
            unhold_all(_collecting.held)  # the second pickling holds them again
        data = _by_value.dumps(obj, keep_large, _numpy_table())
    return [data, *buffers]


def loads(parts: list) -> object:
    """Inverse of ``dumps``; out-of-band parts are used in place."""
    return pickle.loads(parts[0], buffers=parts[1:])


def dumps_function(fn: object) -> list:
    """Functions in importable modules go by reference; those from
    ``__main__``, a REPL or a notebook, lambdas and closures go by value."""
    qualname = getattr(fn, "__qualname__", "")
    by_reference = (
        getattr(fn, "__module__", None) not in (None, "__main__", "__mp_main__")
        and "<locals>" not in qualname
        and "<lambda>" not in qualname
    )
    if by_reference:
        try:
            data = pickle.dumps(fn, protocol=5)
            if b"__main__" not in data and b"__mp_main__" not in data:
                return [data]
        except Exception:
            pass
    from . import _by_value

    return [_by_value.dumps(fn, None, _numpy_table())]


def describe_call(fn: object, args: tuple = (), kwargs: dict | None = None) -> str:
    """A short, safe description of a call for error messages."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or _short(fn)
    module = getattr(fn, "__module__", None)
    if module and module != "builtins":
        name = f"{module}.{name}"
    shown = [_short(a) for a in args[:4]]
    if len(args) > 4:
        shown.append("...")
    shown += [f"{k}={_short(v)}" for k, v in list((kwargs or {}).items())[:4]]
    return f"{name}({', '.join(shown)})"
