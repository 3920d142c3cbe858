"""The functions a process pool has registered with its engine (each sent to
a worker once), held weakly and forgotten in workers once collected."""

from __future__ import annotations

import functools
import os
import threading
import types
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from .._serialize import describe_call, dumps_function
from ..errors import SerializationError


class Function:
    """A function registered with a pool (sent to each worker once). The pool
    holds it weakly -- a bound method by its object and function -- so it keeps
    nothing of the caller's alive; once it dies, workers forget it. A callable
    that cannot be weakly referenced is held while calls use it, then
    forgotten."""

    __slots__ = ("__weakref__", "forgotten", "holds", "id", "key", "owner", "refs", "strong")

    def __init__(self, owner: Functions, key: Any, fid: int, parts: tuple) -> None:
        self.owner = owner
        self.key = key
        self.id = fid
        self.holds = 0
        self.forgotten = False
        self.strong: tuple | None = None
        died = functools.partial(_died, weakref.ref(owner.dead), weakref.ref(self))
        try:
            self.refs: tuple | None = tuple(weakref.ref(p, died) for p in parts)
        except TypeError:
            self.refs = None
            self.strong = parts

    @property
    def counted(self) -> bool:
        """Whether calls hold it (a strongly held callable, forgotten once
        no call uses it) and so must ``release`` it; a weakly held one goes
        when its callable does."""
        return self.refs is None

    def is_for(self, parts: tuple) -> bool:
        refs = self.refs
        if refs is not None and len(refs) == 1:  # a plain function: no tuple built per call
            return len(parts) == 1 and refs[0]() is parts[0]
        held = self.strong if refs is None else tuple(r() for r in refs)
        return held is not None and len(held) == len(parts) and all(a is b for a, b in zip(held, parts, strict=True))

    def release(self, _future: Any = None) -> None:
        """One call is done with it."""
        if self.counted:
            self.owner.release(self)


def _died(dead_ref: Callable, function_ref: Callable, _ref: Any) -> None:
    # A weakref callback: runs in whichever thread dropped the last reference,
    # maybe inside the pool's own locks, so it only leaves a note.
    dead, function = dead_ref(), function_ref()
    if dead is not None and function is not None:
        dead.append(function)


def _identity(fn: Any) -> tuple:
    """What identifies a callable: a bound method by its object and function
    (a fresh method object is made at each attribute access)."""
    if isinstance(fn, types.MethodType):
        return (fn.__self__, fn.__func__)
    return (fn,)


class Functions:
    """The functions a pool has registered, by identity: submitting the same
    function again is a cache hit while it lives."""

    def __init__(self, core: Any, ids: Iterator[int]) -> None:
        self.core = core
        self.ids = ids
        self.pid = os.getpid()
        # Reentrant: a garbage collection while a function is pickled may
        # close an abandoned map, which releases its function.
        self.lock = threading.RLock()
        self.by_key: dict[tuple, Function] = {}
        self.dead: deque[Function] = deque()
        #: The last plain function acquired (its weak reference, and it).
        self.last: tuple[weakref.ref, Function] | None = None

    def acquire(self, fn: Any) -> Function:
        """The registration of ``fn``, held for one call (``release`` it)."""
        last = self.last
        if last is not None and last[0]() is fn and not last[1].forgotten and not self.dead:
            return last[1]  # the same plain function as the last call: no lock, no lookup
        self.forget_dead()
        parts = _identity(fn)
        key = tuple(map(id, parts))
        with self.lock:
            function = self.by_key.get(key)
            if function is None or not function.is_for(parts):
                try:
                    payload = dumps_function(fn)
                except Exception as exc:
                    raise SerializationError(
                        f"function {describe_call(fn)} could not be pickled: {type(exc).__name__}: {exc}"
                    ) from exc
                function = Function(self, key, next(self.ids), parts)
                self.core.register_object(function.id, payload)
                self.by_key[key] = function
            if function.counted:
                function.holds += 1
            elif len(parts) == 1:  # held weakly, so remembering it costs nothing
                self.last = (function.refs[0], function)  # type: ignore[index]
            return function

    def release(self, function: Function) -> None:
        with self.lock:
            function.holds -= 1
            if function.holds:  # (only a counted function is released)
                return
        self._forget(function)

    def forget_dead(self) -> None:
        """Forgets the functions whose callables were collected."""
        while self.dead:  # (checked first: raising IndexError per call costs)
            try:
                function = self.dead.popleft()
            except IndexError:  # empty, or another thread took the last
                return
            self._forget(function)

    def _forget(self, function: Function) -> None:
        with self.lock:
            if function.forgotten or (function.holds and function.refs is None):
                return
            function.forgotten = True
            if self.by_key.get(function.key) is function:
                del self.by_key[function.key]
        if os.getpid() == self.pid:  # a forked child's copy has no engine
            self.core.unregister(function.id)
