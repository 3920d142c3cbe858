"""The worker side: what runs in a process forked from the template.

The loop itself is in Rust (``_core.worker_main``); this handler only turns
payloads into calls and results back into payloads.
"""

from __future__ import annotations

import os
import sys

from . import _core, _imported, _state
from ._remote_exception import pack_exception
from ._serialize import REGISTRY, Registered, describe_call, dumps, dumps_chunk, loads, serialization_error

# Not `typing.TYPE_CHECKING`: importing typing costs a template ~9 ms at start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

#: Task flag: the payload is a list of argument tuples (a ``map`` chunk).
CHUNK = 1
#: With CHUNK: the list holds single arguments, not tuples (``map`` over one
#: iterable), which pickles several times faster.
SINGLE = 2
#: With CHUNK: an item that raises does not stop the chunk; its exception is
#: reported in its place (``map(..., return_exceptions=True)``).
KEEP_GOING = 4

#: What ``Handler.run`` reports: the function returned, raised, or raised an
#: exception of the pool's ``retry_on`` types (the engine decides whether
#: its retry budget allows another run).
RETURNED, RAISED, RETRYABLE = 0, 1, 2


class Handler:
    """Called by the Rust loop for each message."""

    threshold = 64 * 1024
    retry_on: tuple = ()

    def __init__(self, log_sender: Any = None) -> None:
        self.objects = REGISTRY
        self.log_sender = log_sender
        #: ``sys.modules`` entries the pool knows of: what the template
        #: held at the fork, then what this worker reported.
        self.modules_seen = len(sys.modules)
        #: What runs now, for logging records: ``(fn, args, kwargs)``, or a
        #: map chunk's ``(fn, items, single, results)``; None between tasks.
        self.running: tuple | None = None
        #: ``(running, item, text)``: the last answer of ``current_task``.
        self.described: tuple | None = None

    def current_task(self) -> str | None:
        """The call this worker runs now, as error messages name it (in a
        map chunk, the item it is at); worked out once per task or item, so
        a task that logs often does not repr its arguments each time."""
        running = self.running
        if running is None:
            return None
        at = len(running[3]) if len(running) == 4 else 0
        described = self.described
        if described is not None and described[0] is running and described[1] == at:
            return described[2]
        if len(running) == 3:
            text = describe_call(*running)
        elif at < len(running[1]):
            fn, items, single, _ = running
            text = describe_call(fn, (items[at],) if single else tuple(items[at]))
        else:
            text = describe_call(running[0])
        self.described = (running, at, text)
        return text

    def init(self, parts: list) -> list | None:
        try:
            cfg = loads(parts)
            sys.path[:] = cfg["sys_path"]
            try:
                os.chdir(cfg["cwd"])
            except OSError:
                pass
            self.threshold = cfg["threshold"]
            self.retry_on = tuple(cfg.get("retry_on", ()))
            _adopt_caller(cfg)
            self._route_logging(cfg)
            initializer = cfg["initializer"]
            # What it returns is this worker's state (ironpool.worker_state()).
            state = _state.NO_INITIALIZER
            if initializer is not None:
                self.running = (initializer, cfg["initargs"], None)
                state = initializer(*cfg["initargs"])
            _state.set_process_state(state)
            return None
        except BaseException as exc:  # reported to the pool
            return dumps(pack_exception(exc), 1 << 62)
        finally:
            self.running = self.described = None

    def _route_logging(self, cfg: dict) -> None:
        """Sends this worker's ``logging`` records to the pool, from the
        moment something imports ``logging`` (a worker that never logs
        never imports it)."""
        sender, caller_levels = self.log_sender, cfg.get("logging")
        if sender is None or caller_levels is None:
            return

        def install(_module: Any) -> None:
            from . import _logging

            _logging.install(sender, self.threshold, caller_levels, self.current_task)

        after_import("logging", install)

    def register(self, function_id: int, payload: object) -> None:
        self.objects[function_id] = Registered(payload)  # unpickled when a task needs it

    def forget(self, ref_id: int) -> None:
        self.objects.pop(ref_id, None)

    def run(self, task_id: int, function_id: int, flags: int, parts: list) -> tuple[int, list]:
        """``(status, parts)``: RETURNED with the pickled value, else RAISED
        or RETRYABLE with the pickled exception. A map chunk's exceptions
        travel inside its value, so a chunk is never RETRYABLE."""
        outcome = self._run(task_id, function_id, flags, parts)
        if len(sys.modules) != self.modules_seen:
            self._report_imports()
        return outcome

    def _report_imports(self) -> None:
        """Tells the pool, before this task's result, which packages the
        tasks imported since the fork (or the last report), so that its
        template imports them too and later workers start with them."""
        seen, self.modules_seen = self.modules_seen, len(sys.modules)
        if self.log_sender is None:
            return
        try:  # a hint, never a reason to lose the task's result
            names = _imported.third_party_modules(seen, installed_only=True)
            if names:
                import pickle

                self.log_sender.send([pickle.dumps((_imported.IMPORTED, names), 5)], self.threshold)
        except Exception:
            pass

    def _run(self, task_id: int, function_id: int, flags: int, parts: list) -> tuple[int, list]:
        retry_on = () if flags & CHUNK else self.retry_on
        entry = self.objects.get(function_id)
        if entry is None:
            return self._raised(RuntimeError(f"function {function_id} was never registered"), retry_on)
        try:
            fn: Any = entry.get("the function")  # unpickled at first use, then kept
        except BaseException as exc:
            return self._raised(exc, retry_on)
        try:
            call = loads(parts)
        except BaseException as exc:
            err = serialization_error(
                f"the arguments of task {task_id} for {describe_call(fn)} could not be unpickled "
                f"in the worker: {type(exc).__name__}: {exc}"
            )
            return self._raised(err, retry_on)
        if flags & CHUNK:
            results: list = []
            self.running = (fn, call, bool(flags & SINGLE), results)  # the item run is results' length
            try:
                outcome = run_chunk(fn, call, flags, pack_exception, results)
            finally:
                self.running = self.described = None
            try:
                return RETURNED, dumps_chunk(outcome, self.threshold)
            except BaseException as exc:
                return self._raised(_chunk_result_error(fn, call, flags, outcome[0], exc), ())
        args, kwargs = call
        self.running = (fn, args, kwargs)
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:  # SystemExit too: it ends the task, not the worker
            return self._raised(exc, retry_on)
        finally:
            self.running = self.described = None
            del call
        return self._result(value, fn, args, retry_on)

    def _result(self, value: object, fn: Any, args: tuple, retry_on: tuple) -> tuple[int, list]:
        try:
            return RETURNED, dumps(value, self.threshold)
        except BaseException as exc:
            err = serialization_error(
                f"the result of {describe_call(fn, args)} could not be pickled: "
                f"{type(value).__module__}.{type(value).__qualname__} object: {type(exc).__name__}: {exc}"
            )
            return self._raised(err, retry_on)

    def _raised(self, exc: BaseException, retry_on: tuple) -> tuple[int, list]:
        # Every exception the caller would see counts, as when the caller
        # matched the rebuilt exception (a SerializationError too).
        status = RETRYABLE if retry_on and isinstance(exc, retry_on) else RAISED
        return status, dumps(pack_exception(exc), self.threshold)


def _chunk_result_error(fn: Any, items: list, flags: int, results: list, exc: BaseException) -> BaseException:
    """Names the item whose result could not be pickled (the first found)."""
    for i, value in enumerate(results):
        try:
            dumps(value, 1 << 62)
        except BaseException as item_exc:
            args = (items[i],) if flags & SINGLE else tuple(items[i])
            return serialization_error(
                f"the result of {describe_call(fn, args)} (item {i} of its chunk) could not be pickled: "
                f"{type(value).__module__}.{type(value).__qualname__} object: {type(item_exc).__name__}: {item_exc}"
            )
    return serialization_error(
        f"the results of a chunk of {describe_call(fn)} could not be pickled: {type(exc).__name__}: {exc}"
    )


def run_chunk(
    fn: Any, items: list, flags: int, capture: Callable[[BaseException], Any], results: list | None = None
) -> tuple[list, Any]:
    """Runs a map chunk: ``(results, None)`` when every item returned;
    ``(results so far, capture(exc))`` when an item raised; with KEEP_GOING,
    every item runs and a failing one's ``(index, capture(exc))`` is listed
    in place of the error (its result slot holds None). ``results``: the
    list to fill (its length tells which item runs)."""
    if results is None:
        results = []
    append = results.append
    if flags & KEEP_GOING:
        failed = []
        for i, item in enumerate(items):
            try:
                append(fn(item) if flags & SINGLE else fn(*item))
            except BaseException as exc:
                append(None)
                failed.append((i, capture(exc)))
        return results, failed or None
    try:
        # A loop, not list.extend(map(...)): map would take a StopIteration
        # that fn raises for the end of the items. (As fast: 488 against
        # 477 µs for 6,250 tiny calls.)
        if flags & SINGLE:
            for arg in items:
                append(fn(arg))
        else:
            for args in items:
                append(fn(*args))
    except BaseException as exc:
        return results, capture(exc)
    return results, None


def _adopt_caller(cfg: dict) -> None:
    """What code written for ``multiprocessing`` expects of a child: the
    caller's main script as ``__main__.__file__`` (a stdlib spawn pool started
    in a task re-imports it, as from the caller) and the caller's authkey
    (``multiprocessing.Manager()`` proxies authenticate with it)."""
    main = sys.modules["__main__"]
    if cfg.get("main_file"):
        main.__file__ = cfg["main_file"]
    if cfg.get("main_spec"):
        from importlib.machinery import ModuleSpec

        main.__spec__ = ModuleSpec(cfg["main_spec"], None)
    key = cfg.get("authkey")
    if key is not None:

        def adopt(module: Any) -> None:
            module.current_process().authkey = key

        # Importing multiprocessing here would cost every worker ~15 ms.
        after_import("multiprocessing.process", adopt)


def after_import(name: str, then: Callable[[Any], None]) -> None:
    """Calls ``then(module)`` once module ``name`` is imported: now if it is
    already, else the moment something imports it."""
    module = sys.modules.get(name)
    if module is not None:
        then(module)
    else:
        sys.meta_path.insert(0, _AfterImport(name, then))


class _AfterImport:
    """An import hook that runs ``then`` on module ``name`` once it has run."""

    def __init__(self, name: str, then: Callable[[Any], None]) -> None:
        self.name = name
        self.then = then

    def find_spec(self, name: str, path: Any, target: object = None) -> Any:
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        loader = getattr(spec, "loader", None)
        if loader is None:
            return spec
        run_module, then = loader.exec_module, self.then

        def exec_module(module: Any) -> None:
            run_module(module)
            then(module)

        loader.exec_module = exec_module
        return spec


def run(channel: _core.WorkerChannel) -> None:
    """Serves tasks until the pool is done, then exits the process. (The
    template already enabled faulthandler and line buffering for us.)"""
    code = 0
    try:
        _core.worker_main(channel, Handler(channel.log_sender()))
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    os._exit(code)
