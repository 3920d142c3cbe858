"""The caller's side of templates: starting one (one per distinct
``preload`` set, thread limit and ``warm`` choice, kept in a per-process
registry), asking it to warm up, and reading what it holds.

The template is a fresh interpreter that imported ironpool and the preload
modules and has no threads (what runs in it is ``_template``). Workers are
forked from it, so they never re-execute the caller's ``__main__`` and a
new worker costs a fork.

Warm-up: after a pool has asked for its first workers, the caller asks the
template (``Zygote.warm``) to import cloudpickle and the packages the caller
has imported (:func:`caller_modules`). The template does it between forks,
when no fork request waits: first in a throwaway forked probe, which finds
the modules that raise, end the process, hang, start threads or print, then
for real with the rest. A report comes back, read by a thread of the caller
(:func:`warm`); :func:`info` tells what a template holds and skipped.
"""

from __future__ import annotations

import _thread
import os
import sys
import threading
import time
from dataclasses import dataclass, field

from . import _core
from ._imported import third_party_modules as caller_modules  # what the caller imported
from ._template import WARM_MODULE_SECONDS, WARM_TOTAL_SECONDS, fields

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
    "from ironpool._template import main; main()"
)

#: At most this many modules are imported automatically into one template.
WARM_MAX_MODULES = 48

_lock = _thread.allocate_lock()
_zygotes: dict[tuple, _core.Zygote] = {}
_owner = os.getpid()


@dataclass(frozen=True)
class TemplateInfo:
    """What the template a pool's workers are forked from holds, from
    :meth:`ironpool.Pool.template_info`::

        info = pool.template_info(timeout=30)   # wait for the warm-up
        assert "pandas" in info.warm
        print(info.skipped)   # {"noisy": "its import printed to stdout or stderr"}

    ``pid`` is the template's process; ``preload`` the modules named by
    ``preload=``; ``warm`` those it imported automatically (the caller had
    them); ``skipped`` maps each module it did not import to why;
    ``pending`` lists those still being imported.
    """

    pid: int
    preload: tuple[str, ...]
    warm: tuple[str, ...]
    skipped: dict[str, str]
    pending: tuple[str, ...]


@dataclass
class _Warmth:
    """What one template process was asked to import and what it said."""

    pid: int
    asked: set[str] = field(default_factory=set)
    held: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)


#: Per template key: its warm-up (for the current template process).
_warmth: dict[tuple, _Warmth] = {}
#: Modules a template of this process skipped: never asked for again.
_refused: dict[str, str] = {}


def get(preload: tuple[str, ...], thread_limit: int | None, warm: bool = True) -> _core.Zygote:
    """The running template for these settings, started on first use."""
    global _owner
    key = (preload, thread_limit, warm)
    with _lock:
        if _owner != os.getpid():  # a forked copy of this process: not ours
            _zygotes.clear()
            _warmth.clear()
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
        }
        if thread_limit is not None:
            for var in THREAD_LIMIT_VARS:
                env[var] = str(thread_limit)
        # pyarrow's bundled jemalloc starts a purging thread when it loads;
        # a template must have no threads to fork safely (pyarrow's default
        # allocator is mimalloc, so little is lost). A caller's own setting wins.
        if "JE_ARROW_MALLOC_CONF" not in os.environ:
            env["JE_ARROW_MALLOC_CONF"] = "background_thread:false"
        # -S: the parent's sys.path (site-packages included) is handed over
        # explicitly, so the template can skip `site` and start faster.
        z = _core.Zygote.spawn([sys.executable, "-S", "-c", _BOOT], list(env.items()))
        _zygotes[key] = z
        return z


def warm(preload: tuple[str, ...], thread_limit: int | None, also: tuple[str, ...] = ()) -> None:
    """Asks the (warm) template for these settings to import, in the
    background, the caller's modules it was not asked for yet, and ``also``
    (what a worker's tasks imported, ``_worker.Handler``). Call it once the
    pool has asked for its first workers: the template serves those fork
    requests first. A thread of this process waits for the report."""
    key = (preload, thread_limit, True)
    with _lock:
        z = _zygotes.get(key)
        if z is None:
            return
        w = _warmth.get(key)
        if w is None or w.pid != z.pid:  # first request, or a restarted template
            w = _warmth[key] = _Warmth(z.pid, asked=set(preload))
        room = WARM_MAX_MODULES - len(w.held) - len(w.pending)
        # cloudpickle first: what rebuilds `__main__` classes, whether or
        # not this process has pickled one yet.
        wanted = dict.fromkeys(["cloudpickle", *caller_modules(), *also])
        names = [n for n in wanted if n not in w.asked and n not in _refused][: max(room, 0)]
        if not names:
            return
        w.asked.update(names)
        w.pending += names
        try:
            request = z.warm(_warm_request(names))
        except OSError as exc:
            _settle(w, [], {n: f"not asked: the template could not be reached ({exc})" for n in names})
            return
    threading.Thread(target=_collect, args=(w, request, names), name="ironpool-warm", daemon=True).start()


def info(preload: tuple[str, ...], thread_limit: int | None, warm: bool, timeout: float = 0.0) -> TemplateInfo:
    """What the template for these settings holds; waits up to ``timeout``
    seconds for a warm-up under way to finish."""
    key = (preload, thread_limit, warm)
    with _lock:
        z = _zygotes.get(key)
        w = _warmth.get(key)
    pid = z.pid if z is not None else 0
    if w is None or w.pid != pid:
        return TemplateInfo(pid, preload, (), {}, ())
    end = time.monotonic() + timeout
    with w.changed:
        while w.pending and time.monotonic() < end:
            w.changed.wait(end - time.monotonic())
        return TemplateInfo(pid, preload, tuple(w.held), dict(w.skipped), tuple(w.pending))


def _warm_request(names: list[str]) -> bytes:
    lines = [f"limits\t{WARM_MODULE_SECONDS}\t{WARM_TOTAL_SECONDS}"]
    # Paths added since the template started (a module found there).
    lines += [f"path\t{os.path.abspath(p or os.curdir)}" for p in sys.path if isinstance(p, str)]
    lines += [f"module\t{n}" for n in names]
    return "\n".join(lines).encode()


def _collect(w: _Warmth, request: _core.WarmRequest, names: list[str]) -> None:
    """Waits for a warm request's report (the template bounds its own time)."""
    held: list[str] = []
    skipped: dict[str, str] = {}
    try:
        report = request.wait(WARM_TOTAL_SECONDS + 30)
    except OSError as exc:
        skipped = {n: f"not imported: the template ended during the warm-up ({exc})" for n in names}
    else:
        if report is None:
            skipped = {n: "not imported: the template did not answer the warm request" for n in names}
        for line in (report or b"").decode(errors="replace").splitlines():
            what, name, why = fields(line)
            if what == "imported":
                held.append(name)
            elif what == "skipped":
                skipped[name] = why
            elif what == "error":  # the warm-up itself failed: nothing more will come
                skipped.update((n, f"not imported: {why}") for n in names if n not in held)
    _settle(w, held, skipped)
    import logging

    log = logging.getLogger("ironpool")
    if held:
        log.debug("template %d imported %s", w.pid, ", ".join(held))
    for name, why in skipped.items():
        log.debug("template %d skipped %s: %s", w.pid, name, why)


def _settle(w: _Warmth, held: list[str], skipped: dict[str, str]) -> None:
    with w.changed:
        w.held += [n for n in held if n not in w.held]
        w.skipped.update(skipped)
        # What a module's own import did is remembered for this process;
        # a budget that ran out or a template that died is not the module's.
        _refused.update((n, why) for n, why in skipped.items() if why.startswith("its import"))
        done = set(held) | set(skipped)
        w.pending = [n for n in w.pending if n not in done]
        w.changed.notify_all()
