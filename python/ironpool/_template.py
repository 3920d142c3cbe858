"""The template process itself: its start-up and its side of the warm-up.

``python -S`` runs :func:`main`; workers fork from what it imported. Kept
to what the template needs (``os``, ``sys``, ``time``, the engine), since
every import here is paid before the first pool's first fork. The caller's
side (starting templates, asking for a warm-up, reading its report) is
``_zygote``.
"""

from __future__ import annotations

import os
import sys
import time

from . import _core

TYPE_CHECKING = False  # workers never import typing (see _worker)
if TYPE_CHECKING:
    from typing import Any

#: Longest one module's import may take in the warm-up probe (it is then
#: killed and the module skipped).
WARM_MODULE_SECONDS = 10.0
#: The probe's niceness: about a quarter of the CPU share of a busy worker.
PROBE_NICENESS = 5
#: Longest one warm request may take; modules not tried by then are skipped.
WARM_TOTAL_SECONDS = 60.0


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
        # Imported once here, not per worker: the worker path, and what
        # `__main__` functions, lambdas and closures are rebuilt with
        # (cloudpickle itself comes later, with the warm-up).
        from . import _rebuild, _worker  # noqa: F401
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
                what, name, why = fields(line.decode(errors="replace"))
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


def fields(line: str) -> tuple[str, str, str]:
    """A report line: what, module, why (tab-separated; why may be empty)."""
    what, name, why = [*line.split("\t", 2), "", ""][:3]
    return what, name, why


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]
