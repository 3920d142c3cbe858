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

What a worker runs to rebuild the code is in ``_rebuild``, which needs no
cloudpickle; a worker imports this module only to send code back by value.
"""

from __future__ import annotations

import copyreg
import sys
import types
from collections import ChainMap

import cloudpickle
from cloudpickle import cloudpickle as _cp

from . import _rebuild

#: Module names that hold the caller's top-level code.
MAIN_MODULES = ("__main__", "__mp_main__")


class _MainGlobals:
    """Stands in a pickle for the receiver's ``__main__`` namespace."""

    __slots__ = ()

    def __reduce__(self) -> tuple:
        return (_rebuild.main_namespace, ())


_MAIN_GLOBALS = _MainGlobals()


def _code_reduce(code: types.CodeType) -> tuple:
    _ctor, args = _cp._code_reduce(code)
    return (_rebuild.code, (args, code.co_filename))


def _cell_reduce(cell: types.CellType) -> tuple:
    try:
        return (_rebuild.cell, (cell.cell_contents,))
    except ValueError:  # empty
        return (_rebuild.cell, ())


def _module_reduce(module: types.ModuleType) -> tuple:
    if _cp._should_pickle_by_reference(module):
        return (_rebuild.module, (module.__name__,))
    return _cp._module_reduce(module)


class Pickler(cloudpickle.Pickler):
    """cloudpickle's pickler with ``__main__`` code bound to one namespace per
    worker, file names kept, and functions rebuilt by ``_rebuild`` (see the
    module doc)."""

    def __init__(self, file, protocol: int, buffer_callback=None, dispatch: dict | None = None) -> None:
        # Before the C pickler's __init__, which reads it (cloudpickle's class
        # attribute of the same name hides the C slot from later assignment).
        ours = {types.CodeType: _code_reduce, types.CellType: _cell_reduce, types.ModuleType: _module_reduce}
        self.dispatch_table = ChainMap(ours, cloudpickle.Pickler._dispatch_table, dispatch or copyreg.dispatch_table)
        super().__init__(file, protocol=protocol, buffer_callback=buffer_callback)

    def _dynamic_function_reduce(self, func: types.FunctionType) -> tuple:
        code, base_globals, _name, _argdefs, closure = self._function_getnewargs(func)
        setter = _rebuild.set_function_state
        if func.__globals__.get("__name__") in MAIN_MODULES:
            base_globals, setter = _MAIN_GLOBALS, _rebuild.set_main_function_state
        return (_rebuild.function, (code, base_globals, closure), _cp._function_getstate(func), None, None, setter)


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
