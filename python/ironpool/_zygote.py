"""The template process: how it starts, and the per-process registry of
running templates (one per distinct ``preload`` set and thread limit).

The template is a fresh interpreter that imported ironpool and the preload
modules and has no threads. Workers are forked from it, so they never
re-execute the caller's ``__main__`` and a new worker costs a fork.
"""

from __future__ import annotations

import _thread
import os
import sys
from typing import Any

from . import _core

#: Thread-pool sizes of native libraries, set before anything is imported.
THREAD_LIMIT_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "BLIS_NUM_THREADS",
)

_BOOT = (
    "import os, sys; "
    "sys.path[:0] = [p for p in os.environ.pop('IRONPOOL_SYS_PATH').split(os.pathsep) if p]; "
    "from ironpool._zygote import main; main()"
)

_lock = _thread.allocate_lock()
_zygotes: dict[tuple, _core.Zygote] = {}
_owner = os.getpid()


def get(preload: tuple[str, ...], thread_limit: int | None) -> _core.Zygote:
    """The running template for these settings, started on first use."""
    global _owner
    key = (preload, thread_limit)
    with _lock:
        if _owner != os.getpid():  # a forked copy of this process: not ours
            _zygotes.clear()
            _owner = os.getpid()
        z = _zygotes.get(key)
        if z is not None:
            # A template that died (OOM killer, kill -9) is started again
            # in place, from the same command: pools using it carry on too.
            z.ensure_running()
            return z
        env = {
            "IRONPOOL_SYS_PATH": os.pathsep.join(p for p in sys.path if p),
            "IRONPOOL_PRELOAD": ",".join(preload),
            "IRONPOOL_BY_VALUE": "1" if _main_defines_functions() else "",
        }
        if thread_limit is not None:
            for var in THREAD_LIMIT_VARS:
                env[var] = str(thread_limit)
        # -S: the parent's sys.path (site-packages included) is handed over
        # explicitly, so the template can skip `site` and start faster.
        z = _core.Zygote.spawn([sys.executable, "-S", "-c", _BOOT], list(env.items()))
        _zygotes[key] = z
        return z


def _main_defines_functions() -> bool:
    """Whether the caller's ``__main__`` (a script, a notebook) defines
    functions: those go to workers by value, through cloudpickle."""
    main = sys.modules.get("__main__")
    names = getattr(main, "__dict__", {})
    return any(getattr(v, "__module__", None) == "__main__" and callable(v) for v in list(names.values()))


def main() -> None:
    """Entry point of the template process."""
    import _signal  # type: ignore[import-not-found]  # `signal` would import enum: start-up time

    fd = int(os.environ.pop("IRONPOOL_ZYGOTE_FD"))
    # Ctrl-C is the caller's to handle; workers must not die of it.
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    preload = [m for m in os.environ.pop("IRONPOOL_PRELOAD", "").split(",") if m]
    try:
        for name in preload:
            __import__(name)
        from . import _worker  # noqa: F401 - imported once here, not per worker
        if os.environ.pop("IRONPOOL_BY_VALUE", ""):
            # The caller's `__main__` defines functions, which travel by
            # value and need cloudpickle to unpickle: imported once here, or
            # every new, replaced or recycled worker imports it again.
            from . import _by_value  # noqa: F401
    except BaseException:
        import traceback

        _core.zygote_fail(fd, traceback.format_exc())
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    # Set up once what every worker needs, so a fork inherits it: the
    # faulthandler (its dumps go to fd 2, which each worker points at its
    # pipe) and line-buffered output.
    import faulthandler
    import gc

    faulthandler.enable()
    # Workers' own `__main__`: empty, where the caller's `__main__` code
    # lands (see `_by_value`), not this boot script's namespace.
    from . import _serialize

    main_module: Any = type(sys)("__main__")
    main_module.__builtins__ = __builtins__
    sys.modules["__main__"] = main_module
    _serialize.WORKER_MAIN = main_module.__dict__
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            pass
    # Move the template's objects out of the collector's reach: a worker's
    # collections then do not write to (and copy) the pages it shares with us.
    gc.freeze()
    channel = _core.zygote_serve(fd)
    if channel is None:
        os._exit(0)
    from ._worker import run

    run(channel)
