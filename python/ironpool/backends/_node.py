"""The cluster side of the Dask and Ray backends: what runs inside a cluster
worker process.

Neither engine can kill a hung task or survive a segfault in one, so a
cluster worker does not run the task itself: it hands the call to an
ironpool process pool of its own (``node_pool``), made on first use with the
caller's pool options and kept for the life of the worker process, and
returns the outcome as data (:func:`run`). The caller
(``_cluster.ClusterBackend``) turns it back into the value or the exception,
of the same types as the local pool gives.

Objects the caller put in the engine's store (``client.scatter``,
``ray.put``) arrive as arguments of :func:`run` and are registered with the
node pool once per key (``_stored``), so it sends them to each of its
workers once; ``pool.share()`` handles become the node pool's own
``share()`` handles, with the same semantics as on one machine.
"""

from __future__ import annotations

import io
import pickle
import threading
from collections import OrderedDict
from dataclasses import asdict
from typing import Any

from .._remote_exception import pack_exception, repack_exception
from .._send_once import Shared, call_started, dumps_shared
from .._serialize import PRIVATE
from ..errors import SerializationError
from . import Call

#: Outcome kinds :func:`run` returns, with their data.
OK, RAISED, ERROR = 0, 1, 2
#: How a stored object is passed to a task (the persistent ids of the call).
AUTO, FRESH_SHARE, REUSE_SHARE = 0, 1, 2

#: Node pools kept per cluster worker process (distinct option sets), and
#: handles of stored objects registered with them.
_POOLS = 4
_OBJECTS = 16

_lock = threading.Lock()
_pools: OrderedDict[bytes, Any] = OrderedDict()
_handles: OrderedDict[tuple, Shared] = OrderedDict()


class Packed:
    """A task's exception as plain data (``pack_exception``), so that it
    arrives with its type and its worker's traceback through any engine."""

    __slots__ = ("data",)

    def __init__(self, data: tuple) -> None:
        self.data = data

    def __reduce__(self):
        return (Packed, (self.data,))


def travel(value: Any) -> Any:
    """An exception as it crosses the engine (others as they are)."""
    if not isinstance(value, BaseException):
        return value
    packed = repack_exception(value)
    return value if packed is None else Packed(packed)


def node_pool(key: bytes, options: bytes, slots: int) -> Any:
    """This worker process's pool for the options pickled in ``options``
    (``key`` is their digest), started on first use with ``slots`` workers."""
    with _lock:
        pool = _pools.get(key)
        if pool is not None:
            _pools.move_to_end(key)
            return pool
        from ..pool import Pool

        pool = Pool(slots, **pickle.loads(options))
        _pools[key] = pool
        while len(_pools) > _POOLS:
            # The least recently used option set: its running tasks finish.
            _pools.popitem(last=False)[1].shutdown(wait=False)
        return pool


def _stored(pool: Any, key: str, value: Any, how: int, mode: int | None) -> Any:
    """What a task gets for a stored argument: a handle registered once with
    this worker's node pool, so its workers receive it once and no task
    re-checks its content (a stored object never changes: a changed one is
    stored anew under another key). An argument stored automatically keeps
    the mode an ordinary argument of its kind has (a writable array arrives
    writable and private: ``mode`` is the one the caller saw); a ``share()`` object is the node pool's own
    ``share()``, read-only."""
    slot = (pool, key, how)
    with _lock:
        handle = _handles.get(slot)
        if handle is not None:
            _handles.move_to_end(slot)
            return handle
    backend = pool._running()
    if how == AUTO:
        if mode == PRIVATE and getattr(getattr(value, "flags", None), "writeable", True) is False:
            # Ray hands out its store's numpy arrays read-only: one copy per
            # worker process keeps them writable for the tasks, as they were.
            value = value.copy()
        handle = backend._register_digested(dumps_shared(value, backend.threshold), mode)[0]
    else:
        handle = backend.share(value, how == REUSE_SHARE)
    with _lock:
        _handles[slot] = handle
        while len(_handles) > _OBJECTS:
            _handles.popitem(last=False)[1].release()
    return handle


class _CallUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, pool: Any, keys: list[str], values: tuple) -> None:
        super().__init__(io.BytesIO(data))
        self.pool = pool
        self.keys = keys
        self.values = values

    def persistent_load(self, pid: Any) -> Any:
        index, how, mode = pid
        return _stored(self.pool, self.keys[index], self.values[index], how, mode)


def run(slots: int, key: bytes, options: bytes, spec: bytes, keys: list[str], *values: Any) -> tuple:
    """Runs one call (``spec``, pickled by ``_cluster``) in this worker's node
    pool; returns ``(OK, value)``, ``(RAISED, packed exception)`` or
    ``(ERROR, ironpool error)``. A map chunk's value is ``(values, error)``
    with exceptions made to travel (``travel``)."""
    try:
        pool = node_pool(key, options, slots)
        fn, args, kwargs, chunk, timeout, retries = _CallUnpickler(spec, pool, keys, values).load()
    except BaseException as exc:
        err = SerializationError(f"a call could not be unpickled on this cluster worker: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return (ERROR, err)
    call = Call(fn, args, kwargs, chunk=chunk, timeout=timeout, retries=retries, since=call_started())
    try:
        value = pool._running().submit(call).result()
    except BaseException as exc:
        packed = repack_exception(exc)
        if packed is not None:
            return (RAISED, packed)
        try:
            pickle.dumps(exc)
        except Exception:
            return (RAISED, pack_exception(exc))
        return (ERROR, exc)
    if chunk:
        values_done, error = value
        return (OK, ([travel(v) for v in values_done], travel(error)))
    return (OK, value)


def stats(key: bytes) -> list[dict]:
    """The figures of this worker process's node pool for options ``key``."""
    with _lock:
        pool = _pools.get(key)
    return [] if pool is None else [asdict(info) for info in pool.stats()]
