"""Which top-level packages a process has imported that a template could
hold for its workers: the caller's at pool creation (``_zygote.warm``), and
a worker's after its tasks imported more (``_worker.Handler``, reported
through its logging channel as ``(IMPORTED, names)``). Light on purpose:
workers import it, so it needs nothing but ``os`` and ``sys``."""

from __future__ import annotations

import os
import sys

#: The tag of a worker's report of what its tasks imported (a logging
#: record's state is a dict; a report is a tuple).
IMPORTED = "imported"

#: Tooling of the caller rather than of its tasks (test runners, shells,
#: debuggers, coverage, packaging): never imported automatically.
NOT_WARMED = frozenset({
    "pytest", "py", "pluggy", "iniconfig", "xdist", "hypothesis", "IPython", "ipykernel", "jupyter_client",
    "jupyter_core", "traitlets", "zmq", "tornado", "debugpy", "pydevd", "coverage", "pip", "setuptools",
    "pkg_resources", "wheel", "mypy", "ruff", "maturin", "ironpool",
})


def third_party_modules(since: int = 0) -> list[str]:
    """The top-level packages this process imported that a task may need:
    from site-packages or another ``sys.path`` entry, not the standard
    library, not private (``_name``), not tooling (``NOT_WARMED``), in the
    order they were imported; ``since``: only those imported after the
    first ``since`` entries of ``sys.modules`` (which keeps import order)."""
    roots = tuple(os.path.join(os.path.abspath(p or os.curdir), "") for p in sys.path if isinstance(p, str))
    stdlib = sys.stdlib_module_names
    found = []
    for name, module in list(sys.modules.items())[since:]:
        if "." in name or name.startswith("_") or name in stdlib or name in NOT_WARMED:
            continue
        spec = getattr(module, "__spec__", None)
        origin = getattr(spec, "origin", None)
        if getattr(spec, "name", None) == name and isinstance(origin, str) and origin.startswith(roots):
            found.append(name)
    return found
