"""Pickling code by value: cloudpickle, with two changes.

- **One ``__main__`` per worker.** Functions (and class methods) from the
  caller's ``__main__`` -- a script, a notebook, or ``__mp_main__`` in a
  stdlib spawn child -- are rebuilt over the receiving worker's own
  ``__main__`` namespace, as a real module's functions share one module.
  What an ``initializer`` assigns to a global is then what tasks read, and
  a stdlib pool started inside a task can pickle them by reference. Of the
  globals a function brings along, functions and classes replace what the
  namespace holds (the caller's latest definition wins), while other values
  are set only where the name is missing: state that a worker or its
  initializer set is the worker's, like a module imported once.
- **Code keeps its file name**, so a remote traceback shows the user's file,
  line and source (cloudpickle blanks it to ``<dynamic-code>``).

Only the unpickling side of this module runs in workers; it is imported
there the first time a payload needs it.
"""

from __future__ import annotations

import builtins
import copyreg
import sys
import types
from collections import ChainMap

import cloudpickle
from cloudpickle import cloudpickle as _cp

from . import _serialize

#: Module names that hold the caller's top-level code.
MAIN_MODULES = ("__main__", "__mp_main__")


def main_namespace() -> dict:
    """The namespace ``__main__`` functions are rebuilt over: this worker's
    ``__main__``; outside a worker (a result sent back to the caller), a fresh
    one per pickle, so the caller's own ``__main__`` is never written to."""
    worker_main = _serialize.WORKER_MAIN
    if worker_main is not None:
        return worker_main
    return {"__name__": "__main__", "__builtins__": builtins}


class _MainGlobals:
    """Stands in a pickle for the receiver's ``__main__`` namespace."""

    __slots__ = ()

    def __reduce__(self) -> tuple:
        return (main_namespace, ())


_MAIN_GLOBALS = _MainGlobals()


def _install_globals(fn: types.FunctionType, state: tuple) -> None:
    """State setter of a ``__main__`` function: puts the globals it reads into
    the namespace (code replaces, data only fills gaps; see the module doc)."""
    _attrs, slots = state
    ns = fn.__globals__
    slots["__globals__"] = {
        name: value
        for name, value in slots["__globals__"].items()
        if name not in ns or isinstance(value, (types.FunctionType, type))
    }
    # The function itself is not put in by its name: it may be the
    # undecorated original inside a decorator's closure.
    _cp._function_setstate(fn, state)


def _code_at(ctor: type, args: tuple, filename: str) -> types.CodeType:
    return ctor(*args).replace(co_filename=filename)


def _code_reduce(code: types.CodeType) -> tuple:
    ctor, args = _cp._code_reduce(code)
    return (_code_at, (ctor, args, code.co_filename))


class Pickler(cloudpickle.Pickler):
    """cloudpickle's pickler with ``__main__`` code bound to one namespace per
    worker and file names kept (see the module doc)."""

    def __init__(self, file, protocol: int, buffer_callback=None, dispatch: dict | None = None) -> None:
        # Before the C pickler's __init__, which reads it (cloudpickle's class
        # attribute of the same name hides the C slot from later assignment).
        self.dispatch_table = ChainMap(
            {types.CodeType: _code_reduce}, cloudpickle.Pickler._dispatch_table, dispatch or copyreg.dispatch_table
        )
        super().__init__(file, protocol=protocol, buffer_callback=buffer_callback)

    def _function_getnewargs(self, func: types.FunctionType) -> tuple:
        code, base_globals, name, argdefs, closure = super()._function_getnewargs(func)
        if func.__globals__.get("__name__") in MAIN_MODULES:
            base_globals = _MAIN_GLOBALS
        return code, base_globals, name, argdefs, closure

    def _dynamic_function_reduce(self, func: types.FunctionType) -> tuple:
        newargs = self._function_getnewargs(func)
        setter = _install_globals if newargs[1] is _MAIN_GLOBALS else _cp._function_setstate
        return (_cp._make_function, newargs, _cp._function_getstate(func), None, None, setter)


def dumps(obj: object, buffer_callback, dispatch: dict | None) -> bytes:
    """Pickles ``obj`` by value where needed, protocol 5."""
    mp_main = sys.modules.get("__mp_main__")
    if mp_main is not None and mp_main.__name__ == "__mp_main__":
        # A stdlib spawn child: its script's code lives in `__mp_main__`,
        # which workers cannot import, so it goes by value like `__main__`.
        cloudpickle.register_pickle_by_value(mp_main)
    import io

    out = io.BytesIO()
    Pickler(out, 5, buffer_callback, dispatch).dump(obj)
    return out.getvalue()
