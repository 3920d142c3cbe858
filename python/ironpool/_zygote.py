"""The template process: how it starts, the per-process registry of
running templates (one per distinct ``preload`` set, thread limit and
``warm`` choice), and its warm-up.

The template is a fresh interpreter that imported ironpool and the preload
modules and has no threads. Workers are forked from it, so they never
re-execute the caller's ``__main__`` and a new worker costs a fork.

Warm-up: after a pool has asked for its first workers, the caller asks the
template (``Zygote.warm``) to import the packages the caller has imported
(:func:`caller_modules`). The template does it between forks, when no fork
request waits: first in a throwaway forked probe, which finds the modules
that raise, end the process, hang, start threads or print, then for real
with the rest. A report comes back, read by a thread of the caller
(:func:`warm`); :func:`info` tells what a template holds and skipped.
"""

from __future__ import annotations

import _thread
import os
import sys
import threading
import time
from dataclasses import dataclass, field
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

#: At most this many modules are imported automatically into one template.
WARM_MAX_MODULES = 48
#: Longest one module's import may take in the warm-up probe (it is then
#: killed and the module skipped).
WARM_MODULE_SECONDS = 10.0
#: The probe's niceness: about a quarter of the CPU share of a busy worker.
PROBE_NICENESS = 5
#: Longest one warm request may take; modules not tried by then are skipped.
WARM_TOTAL_SECONDS = 60.0

#: Tooling of the caller rather than of its tasks (test runners, shells,
#: debuggers, coverage, packaging): never imported automatically.
NOT_WARMED = frozenset({
    "pytest", "py", "pluggy", "iniconfig", "xdist", "hypothesis", "IPython", "ipykernel", "jupyter_client",
    "jupyter_core", "traitlets", "zmq", "tornado", "debugpy", "pydevd", "coverage", "pip", "setuptools",
    "pkg_resources", "wheel", "mypy", "ruff", "maturin", "ironpool",
})

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
            "IRONPOOL_BY_VALUE": "1" if _main_defines_functions() else "",
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


def warm(preload: tuple[str, ...], thread_limit: int | None) -> None:
    """Asks the (warm) template for these settings to import, in the
    background, the caller's modules it was not asked for yet. Call it once
    the pool has asked for its first workers: the template serves those
    fork requests first. A thread of this process waits for the report."""
    key = (preload, thread_limit, True)
    with _lock:
        z = _zygotes.get(key)
        if z is None:
            return
        w = _warmth.get(key)
        if w is None or w.pid != z.pid:  # first request, or a restarted template
            w = _warmth[key] = _Warmth(z.pid, asked=set(preload))
        room = WARM_MAX_MODULES - len(w.held) - len(w.pending)
        names = [n for n in caller_modules() if n not in w.asked and n not in _refused][: max(room, 0)]
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


def caller_modules() -> list[str]:
    """The top-level packages this process imported that a task may need:
    from site-packages or another ``sys.path`` entry, not the standard
    library, not private (``_name``), not tooling (``NOT_WARMED``), in the
    order they were imported."""
    roots = tuple(os.path.join(os.path.abspath(p or os.curdir), "") for p in sys.path if isinstance(p, str))
    stdlib = sys.stdlib_module_names
    found = []
    for name, module in list(sys.modules.items()):
        if "." in name or name.startswith("_") or name in stdlib or name in NOT_WARMED:
            continue
        spec = getattr(module, "__spec__", None)
        origin = getattr(spec, "origin", None)
        if getattr(spec, "name", None) == name and isinstance(origin, str) and origin.startswith(roots):
            found.append(name)
    return found


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
            what, name, why = _fields(line)
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


# The template's side of the warm-up -----------------------------------------------


def warm_up(request: bytes, first: bool) -> tuple[bytes, bool] | None:
    """Runs in the template, called by ``zygote_serve`` between forks: one
    short step of a warm request (never more than one module's import).
    None while there is more to do; then the report, and whether the
    template now has threads (it then exits: forking a process with
    threads is unsafe)."""
    global _under_way
    if first or _under_way is None:
        _under_way = _WarmUp(request)
    done = _under_way.step()
    if done is not None:
        _under_way = None
    return done


def probe_pid() -> int | None:
    """The warm-up probe's pid while one runs: the template's sweeps for
    workers' orphans spare it (called by ``zygote_serve`` before each)."""
    probe = _under_way.probe if _under_way is not None else None
    return probe.pid if probe is not None else None


class _WarmUp:
    """One warm request in the template: a probe (a forked child) imports
    the modules first and says which misbehave, without blocking the
    template; then the template imports the others, one per step."""

    def __init__(self, request: bytes) -> None:
        self.module_limit, total_limit = WARM_MODULE_SECONDS, WARM_TOTAL_SECONDS
        self.names: list[str] = []
        for line in request.decode(errors="replace").splitlines():
            what, _, value = line.partition("\t")
            if what == "limits":
                self.module_limit, total_limit = (float(x) for x in value.split("\t"))
            elif what == "path" and value not in sys.path:
                sys.path.append(value)
            elif what == "module":
                self.names.append(value)
        self.deadline = time.monotonic() + total_limit
        self.verdicts: dict[str, str | None] = {}  # name -> None (safe) or why not
        self.to_probe = [n for n in self.names if n not in sys.modules]
        self.probe: _Probe | None = None
        self.to_import: list[str] | None = None
        self.threaded = False

    def step(self) -> tuple[bytes, bool] | None:
        if self.to_import is None:
            if self.probe is None and self.to_probe:
                if time.monotonic() >= self.deadline:
                    for name in self.to_probe:
                        self.verdicts[name] = "not tried: the warm-up's time budget ran out"
                    self.to_probe = []
                else:
                    self.probe = _Probe(self.to_probe)
            if self.probe is not None:
                if not self.probe.poll(self.module_limit, self.deadline):
                    return None
                self.verdicts.update(self.probe.verdicts)
                left = [n for n in self.to_probe if n not in self.verdicts]
                if len(left) == len(self.to_probe):  # no progress: a probe that cannot start
                    self.verdicts.update((n, f"the warm-up probe failed ({self.probe.ended})") for n in left)
                    left = []
                self.to_probe, self.probe = left, None
                return None
            self.to_import = [n for n in self.names if self.verdicts.get(n) is None and n not in sys.modules]
        if self.to_import and not self.threaded:
            name = self.to_import.pop(0)
            try:
                __import__(name)
            except BaseException as exc:  # the probe imported it: a surprise
                self.verdicts[name] = f"its import raised {type(exc).__name__} in the template: {_one_line(exc)}"
            if _threads() > 1:
                self.verdicts[name] = "its import started a thread in the template (the template restarts cold)"
                self.threaded = True
            return None
        report = []
        for name in self.names:
            why = self.verdicts.get(name)
            if why is None and name not in sys.modules:
                why = "not tried: an earlier import started a thread in the template"
            report.append(f"skipped\t{name}\t{why}" if why else f"imported\t{name}")
        sys.stdout.flush()
        sys.stderr.flush()
        import gc

        gc.freeze()  # as at start-up: workers' collections leave these pages shared
        return "\n".join(report).encode(), self.threaded


_under_way: _WarmUp | None = None


class _Probe:
    """A forked child of the template that imports modules in order and
    writes how each went to a pipe, read here without blocking."""

    def __init__(self, names: list[str]) -> None:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _probe_child(names, write_end, os.getppid())
        os.close(write_end)
        self.pid, self.fd = pid, read_end
        self.verdicts: dict[str, str | None] = {}
        self.current: str | None = None
        self.since = time.monotonic()  # the current module's import began
        self.buffered = b""
        self.ended = ""

    def poll(self, module_limit: float, deadline: float) -> bool:
        """Reads what the probe wrote; True once it is over (finished,
        died, or killed for taking too long)."""
        import select

        while select.select([self.fd], [], [], 0)[0]:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return self._end(None)
            self.buffered += chunk
            *lines, self.buffered = self.buffered.split(b"\n")
            for line in lines:
                what, name, why = _fields(line.decode(errors="replace"))
                if what == "begin":
                    self.current, self.since = name, time.monotonic()
                else:
                    self.verdicts[name] = why or None
                    self.current = None
        now = time.monotonic()
        if now - self.since > module_limit:
            return self._end(f"its import did not finish within {module_limit:g} s")
        if now > deadline:
            return self._end("not finished when the warm-up's time budget ran out")
        return False

    def _end(self, why: str | None) -> bool:
        import signal

        os.close(self.fd)
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:  # reaped by someone else: how it ended is unknown
            self.ended = "it ended, how is not known"
            status = None
        if status is None:
            pass
        elif os.WIFSIGNALED(status):
            self.ended = f"killed by signal {os.WTERMSIG(status)}"
        else:
            self.ended = f"exit status {os.WEXITSTATUS(status)}"
        if self.current is not None:
            self.verdicts[self.current] = why or f"its import ended the process ({self.ended})"
        return True


def _probe_child(names: list[str], out: int, template: int) -> None:
    """The probe: imports each module, tells the template how it went, and
    stops after the first one that leaves threads behind."""
    try:
        _core.die_with_parent(template)
        # Trial imports are background work: they yield most of the CPUs to
        # the caller and its workers (a process may always lower its own
        # priority), but not all: at 19, two busy workers starved it for
        # tens of seconds, while every recycled worker imported the modules
        # itself (benches: recycle_pandas).
        os.nice(PROBE_NICENESS)
        # What imports print lands here, where the size shows it.
        sink = os.memfd_create("ironpool-warm-probe")
        os.dup2(sink, 1)
        os.dup2(sink, 2)
        for name in names:
            os.write(out, f"begin\t{name}\n".encode())
            why = ""
            try:
                __import__(name)
            except BaseException as exc:
                why = f"its import raised {type(exc).__name__}: {_one_line(exc)}"
            sys.stdout.flush()
            sys.stderr.flush()
            threads = _threads()
            if threads > 1:
                why = f"its import started {threads - 1} thread(s)"
            elif not why and os.fstat(sink).st_size:
                why = "its import printed to stdout or stderr"
                os.ftruncate(sink, 0)
                os.lseek(sink, 0, os.SEEK_SET)
            os.write(out, f"{'skipped' if why else 'ok'}\t{name}\t{why}\n".encode())
            if threads > 1:
                break
    finally:
        os._exit(0)


def _threads() -> int:
    """Threads of this process, the interpreter's and any other (/proc)."""
    return len(os.listdir("/proc/self/task"))


def _fields(line: str) -> tuple[str, str, str]:
    """A report line: what, module, why (tab-separated; why may be empty)."""
    what, name, why = [*line.split("\t", 2), "", ""][:3]
    return what, name, why


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]
