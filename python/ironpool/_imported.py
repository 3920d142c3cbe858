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

_INSTALLED = f"{os.sep}site-packages{os.sep}"
_INSTALLED_DEB = f"{os.sep}dist-packages{os.sep}"

#: Tooling of the caller rather than of its tasks (test runners, shells,
#: debuggers, coverage, packaging): never imported automatically.
NOT_WARMED = frozenset({
    "pytest", "py", "pluggy", "iniconfig", "xdist", "hypothesis", "IPython", "ipykernel", "jupyter_client",
    "jupyter_core", "traitlets", "zmq", "tornado", "debugpy", "pydevd", "coverage", "pip", "setuptools",
    "pkg_resources", "wheel", "mypy", "ruff", "maturin", "ironpool",
})


def _roots() -> tuple[str, ...]:
    roots = []
    for entry in sys.path:
        if isinstance(entry, str):
            try:  # '' and relative entries need the working directory, which may be gone
                roots.append(os.path.join(os.path.abspath(entry or os.curdir), ""))
            except OSError:
                pass
    return tuple(roots)


def third_party_modules(since: int = 0, installed_only: bool = False) -> list[str]:
    """The top-level packages this process imported that a task may need:
    from site-packages or another ``sys.path`` entry, not the standard
    library, not private (``_name``), not tooling (``NOT_WARMED``), in the
    order they were imported; ``since``: only those imported after the
    first ``since`` entries of ``sys.modules`` (which keeps import order);
    ``installed_only``: only installed packages (under a ``site-packages``
    or ``dist-packages`` directory), not the user's own code, which may be
    edited between two pools or differ between two same-named files."""
    roots = _roots()
    stdlib = sys.stdlib_module_names
    found = []
    for name, module in list(sys.modules.items())[since:]:
        if "." in name or name.startswith("_") or name in stdlib or name in NOT_WARMED:
            continue
        spec = getattr(module, "__spec__", None)
        origin = getattr(spec, "origin", None)
        if getattr(spec, "name", None) != name or not isinstance(origin, str) or not origin.startswith(roots):
            continue
        if installed_only and _INSTALLED not in origin and _INSTALLED_DEB not in origin:
            continue
        found.append(name)
    return found
