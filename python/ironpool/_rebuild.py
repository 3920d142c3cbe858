"""The receiving side of code pickled by value (``_by_value``), without cloudpickle.

A function from the caller's ``__main__``, a lambda or a closure arrives as
calls to the functions below, so a worker rebuilds it with what the template
already holds (``types``, ``sys``): importing cloudpickle would cost every
template ~25 ms at start, on the first pool's critical path. What only
cloudpickle knows how to rebuild (classes, enums, type variables, types
that only ``types`` names) still names cloudpickle in the stream; the worker
imports it on first need.
"""

from __future__ import annotations

import builtins
import sys
import types

from . import _serialize

TYPE_CHECKING = False  # workers never import typing (see _worker)
if TYPE_CHECKING:
    from typing import Any


def main_namespace() -> dict:
    """The namespace ``__main__`` functions are rebuilt over: this worker's
    ``__main__``; outside a worker (a result sent back to the caller), a fresh
    one per pickle, so the caller's own ``__main__`` is never written to."""
    worker_main = _serialize.WORKER_MAIN
    if worker_main is not None:
        return worker_main
    return {"__name__": "__main__", "__builtins__": builtins}


def function(code: types.CodeType, namespace: dict, closure: tuple | None) -> types.FunctionType:
    """A function shell; its state (defaults, globals, cell values) follows."""
    namespace.setdefault("__builtins__", builtins.__dict__)
    return types.FunctionType(code, namespace, None, None, closure)


def set_function_state(fn: types.FunctionType, state: tuple[dict, dict]) -> None:
    """State setter of a function: ``__globals__`` and ``__closure__`` are
    read-only attributes, so their contents are filled in place."""
    attrs, slots = state
    fn.__dict__.update(attrs)
    fn.__globals__.update(slots.pop("__globals__"))
    cells = slots.pop("__closure__")
    # Held only so that the submodules the code reads were imported above.
    slots.pop("_cloudpickle_submodules", None)
    if cells is not None and fn.__closure__ is not None:
        for target, source in zip(fn.__closure__, cells, strict=True):
            try:
                target.cell_contents = source.cell_contents
            except ValueError:  # an empty cell stays empty
                pass
    for name, value in slots.items():
        setattr(fn, name, value)


def set_main_function_state(fn: types.FunctionType, state: tuple[dict, dict]) -> None:
    """State setter of a ``__main__`` function: of the globals it reads,
    code replaces what the namespace holds and data only fills gaps (see
    ``_by_value``). The function itself is not put in by its name: it may be
    the undecorated original inside a decorator's closure."""
    slots = state[1]
    ns = fn.__globals__
    slots["__globals__"] = {
        name: value
        for name, value in slots["__globals__"].items()
        if name not in ns or isinstance(value, (types.FunctionType, type))
    }
    set_function_state(fn, state)


def code(args: tuple, filename: str) -> types.CodeType:
    """A code object, under the file name it was compiled from (so a remote
    traceback shows the user's file and line)."""
    return types.CodeType(*args).replace(co_filename=filename)


def cell(*value: Any) -> types.CellType:
    """A closure cell holding ``value``, or an empty one."""
    return types.CellType(*value)


def module(name: str) -> types.ModuleType:
    """An importable module, by name (``__import__`` returns the top package)."""
    __import__(name)
    return sys.modules[name]
