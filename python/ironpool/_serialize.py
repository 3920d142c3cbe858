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
import sys

from . import _core

TYPE_CHECKING = False  # workers never import typing (see _worker)
if TYPE_CHECKING:
    from typing import Any

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
        self.payload: Any = payload
        self.value: object = None
        self.error: BaseException | None = None

    def load(self, what: str, private: bool = False) -> object:
        """A new object over the shared read-only mapping, or over private ones."""
        try:
            p = self.payload
            return loads(p.private_parts() if private else p.readonly_parts())
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

#: The call being encoded in this thread (``_send_once.Encoding``), if any:
#: the reducers below ask it which objects to send once.
_local = _thread._local()


def set_encoding(encoding: object) -> object:
    """Makes ``encoding`` the one pickling consults in this thread; returns
    the previous one (restore it when done)."""
    previous = getattr(_local, "encoding", None)
    _local.encoding = encoding
    return previous


def current_encoding() -> object:
    return getattr(_local, "encoding", None)


def _shared_lookup(ref_id: int, mode: int = FRESH) -> object:
    """Unpickles a shared reference in a worker: the shared object."""
    entry = REGISTRY.get(ref_id)
    if entry is None:
        raise LookupError(f"shared object {ref_id} is not known to this worker (it was released)")
    what = f"the object shared as handle {ref_id}"
    if mode == REUSE:
        return entry.get(what)
    return entry.load(what, private=mode == PRIVATE)


def _rebuild_viewed(raw: Any, dtype: Any, shape: tuple, fortran: bool) -> Any:
    """Inverse of ``_reduce_ndarray``: the bytes viewed as the original dtype."""
    if fortran:
        return raw.view(dtype).reshape(shape[::-1]).T
    return raw.view(dtype).reshape(shape)


def _reduce_ndarray(a: Any) -> Any:
    """numpy pickles datetime64, timedelta64 and structured arrays in-band
    (their dtypes cannot be exported through the buffer protocol). Sending
    their bytes as uint8 lets them travel out of band like any other array.
    In a call being encoded, a large array may go as a handle instead."""
    encoding = getattr(_local, "encoding", None)
    if encoding is not None:
        handle = encoding.send_once(a)
        if handle is not None:
            return handle
    dt = a.dtype
    if a.size and not dt.hasobject and (dt.kind in "mM" or dt.names is not None):
        if a.flags.c_contiguous:
            return (_rebuild_viewed, (a.reshape(-1).view("u1"), dt, a.shape, False))
        if a.flags.f_contiguous:
            return (_rebuild_viewed, (a.T.reshape(-1).view("u1"), dt, a.shape, True))
    return a.__reduce_ex__(5)


def _reduce_sendable(obj: Any) -> Any:
    """pandas and Arrow objects: in a call being encoded, a large one may go
    as a handle (sent once); otherwise as it pickles itself."""
    encoding = getattr(_local, "encoding", None)
    if encoding is not None:
        handle = encoding.send_once(obj)
        if handle is not None:
            return handle
    return obj.__reduce_ex__(5)


def _arrow_types(pa: Any) -> list:
    found = [pa.Table, pa.RecordBatch, pa.ChunkedArray]
    todo = [pa.Array]
    while todo:  # the concrete array types: the table is keyed by exact type
        t = todo.pop()
        found.append(t)
        todo.extend(t.__subclasses__())
    return found


_tables: dict[tuple, dict] = {}


def _task_table() -> dict | None:
    """The pickler dispatch table with ironpool's reducers for the numpy,
    pandas and Arrow types loaded so far (None while numpy is not)."""
    np = sys.modules.get("numpy")
    if np is None:
        return None
    pd: Any = sys.modules.get("pandas")
    pa: Any = sys.modules.get("pyarrow")
    key = (pd is not None and hasattr(pd, "DataFrame"), pa is not None and hasattr(pa, "Table"))
    table = _tables.get(key)
    if table is None:
        import copyreg

        table = dict(copyreg.dispatch_table)
        table[np.ndarray] = _reduce_ndarray
        if key[0]:
            table[pd.DataFrame] = table[pd.Series] = _reduce_sendable
        if key[1]:
            for t in _arrow_types(pa):
                table[t] = _reduce_sendable
        _tables[key] = table
    return table


def _pickle_dumps(obj: object, buffer_callback) -> bytes:
    table = _task_table()
    if table is None:
        return pickle.dumps(obj, protocol=5, buffer_callback=buffer_callback)
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=5, buffer_callback=buffer_callback)
    pickler.dispatch_table = table
    pickler.dump(obj)
    return out.getvalue()


class _ByValue(Exception):
    """The stream refers to ``__main__``, which workers do not have."""


#: Types whose instances pickle the same way in any pickler and never refer
#: to another object: a value made only of these needs no encoding pass
#: and no buffer callback.
_ATOMS = frozenset({int, float, str, bool, type(None)})


def dumps(obj: object, threshold: int) -> list:
    """Pickles ``obj``; buffers of ``threshold`` bytes or more go out of band."""
    if type(obj) in _ATOMS:  # a tiny task's result: skip the buffer machinery
        return [pickle.dumps(obj, protocol=5)]
    buffers: list = []

    def keep_large(pb: Any) -> bool:
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
        encoding = getattr(_local, "encoding", None)
        if encoding is not None:
            encoding.restart()  # the second pickling refers to its handles again
        data = _by_value.dumps(obj, keep_large, _task_table())
    return [data, *buffers]


def loads(parts: list) -> Any:
    """Inverse of ``dumps``; out-of-band parts are used in place."""
    return pickle.loads(parts[0], buffers=parts[1:])


def dumps_chunk(outcome: tuple, threshold: int) -> list:
    """Pickles a map chunk's ``(values, failure)``; a chunk that returned
    only atoms (tiny tasks' usual result) skips the buffer machinery."""
    values, failure = outcome
    if failure is None and type(values) is list and _core.atoms_only(values):
        return [pickle.dumps(outcome, protocol=5)]
    return dumps(outcome, threshold)


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

    return [_by_value.dumps(fn, None, _task_table())]


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
