"""Pitfalls P3, P4, P8 and P13 of shared/pitfalls.md, reproduced against ironpool."""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import functools
import json
import os
import pickle
import signal
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from html.parser import HTMLParser

import ironpool
import pytest
from conftest import Beacon, run_python, running, wait_until

# --- tasks -------------------------------------------------------------------


def raise_value_error(x):
    raise ValueError(f"bad value {x}")


class QuotaError(Exception):
    def __init__(self, user, used):
        super().__init__(user, used)
        self.user = user
        self.used = used

    def __str__(self):
        return f"{self.user} used {self.used}"


def raise_custom(user):
    raise QuotaError(user, 42)


class LockedError(Exception):
    """Cannot be pickled: it carries a lock."""

    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


def raise_unpicklable():
    raise LockedError("the lock is inside")


class TwoArgError(Exception):
    """Pickles, but cannot be rebuilt (``args`` has one item, ``__init__`` wants two)."""

    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


def raise_two_arg():
    raise TwoArgError("x", "y")


def raise_base(kind):
    if kind == "exit":
        raise SystemExit(3)
    raise KeyboardInterrupt


def identity(x):
    return x


def make_lock():
    return threading.Lock()


def getpid(*_):
    return os.getpid()


def crash(kind, tag="crash-marker"):
    print(f"{tag}: about to {kind}", file=sys.stderr, flush=True)
    if kind == "exit":
        os._exit(3)
    if kind == "segv":
        ctypes.string_at(0)
    if kind == "abort":
        os.abort()
    raise AssertionError(kind)


def segv_at(i, bad):
    if i == bad:
        ctypes.string_at(0)
    return i


def blocking(beacon: Beacon, value):
    beacon.notify(os.getpid())
    beacon.wait()
    return value


def chatty(i):
    print(f"stdout line {i}", flush=True)
    print(f"stderr line {i}", file=sys.stderr, flush=True)
    sys.stdout.write(f"partial {i}")  # completed by the next write
    sys.stdout.write(" done\n")
    return i


class TagCounter(HTMLParser):
    """A stateful, non-thread-safe parser: each worker must have its own."""

    def __init__(self):
        super().__init__()
        self.tags = 0

    def handle_starttag(self, tag, attrs):
        self.tags += 1


_parser: TagCounter | None = None


def init_parser():
    global _parser
    _parser = TagCounter()


def count_tags(doc):
    before = _parser.tags
    _parser.feed(doc)
    return os.getpid(), id(_parser), _parser.tags - before


# --- P13: errors -------------------------------------------------------------


def test_task_exception_keeps_type_message_and_remote_traceback(pool):
    fut = pool.submit(raise_value_error, 7)
    with pytest.raises(ValueError, match=r"^bad value 7$") as info:
        fut.result(timeout=30)
    cause = info.value.__cause__
    assert isinstance(cause, _RemoteTraceback)
    raise_line = raise_value_error.__code__.co_firstlineno + 1
    assert "raise_value_error" in cause.tb
    assert f"line {raise_line}" in cause.tb, cause.tb
    assert "ValueError: bad value 7" in cause.tb
    # Same through map.
    with pytest.raises(ValueError, match="bad value 3") as info:
        list(pool.map(raise_value_error, [3]))
    assert "raise_value_error" in info.value.__cause__.tb


def test_custom_exception_type_and_attributes_survive(pool):
    with pytest.raises(QuotaError) as info:
        pool.submit(raise_custom, "ann").result(timeout=30)
    assert str(info.value) == "ann used 42"
    assert info.value.user == "ann" and info.value.used == 42
    assert isinstance(info.value.__cause__, _RemoteTraceback)


@pytest.mark.parametrize("kind,exc_type", [("exit", SystemExit), ("interrupt", KeyboardInterrupt)])
def test_system_exit_and_keyboard_interrupt_end_only_the_task(kind, exc_type):
    with ironpool.Pool(1) as pool:
        pid = pool.submit(getpid).result(timeout=30)
        fut = pool.submit(raise_base, kind)
        err = fut.exception(timeout=30)
        assert isinstance(err, exc_type), repr(err)
        if kind == "exit":
            assert err.code == 3
        assert pool.submit(getpid).result(timeout=30) == pid, "the worker died of the task's exception"
        assert [w.restarts for w in pool.stats()] == [0]


def test_unpicklable_argument_fails_only_its_future(pool):
    fut = pool.submit(identity, threading.Lock())  # does not raise here
    err = fut.exception(timeout=30)
    assert isinstance(err, ironpool.SerializationError), repr(err)
    assert isinstance(err, pickle.PicklingError)
    assert "identity" in str(err) and "lock" in str(err).lower(), str(err)
    assert pool.submit(identity, 5).result(timeout=30) == 5


def test_unpicklable_argument_in_map(pool):
    results = pool.map(identity, [1, 2, threading.Lock(), 4], chunksize=1)
    assert [next(results), next(results)] == [1, 2]
    with pytest.raises(ironpool.SerializationError, match=r"(?i)lock"):
        next(results)


def test_unpicklable_function_fails_its_future(pool):
    lock = threading.Lock()
    fut = pool.submit(lambda: lock)
    err = fut.exception(timeout=30)
    assert isinstance(err, ironpool.SerializationError), repr(err)
    assert "lambda" in str(err) and "lock" in str(err).lower(), str(err)
    assert pool.submit(identity, 1).result(timeout=30) == 1


def test_function_a_worker_cannot_import_fails_its_tasks_clearly(pool):
    """A function pickled by reference to a module the workers cannot import
    (made at run time here, as a notebook extension or a plugin might)."""
    import types

    mod = types.ModuleType("made_only_in_the_caller")
    exec("def double(x):\n    return 2 * x\n", mod.__dict__)
    sys.modules[mod.__name__] = mod
    try:
        for _ in range(2):  # every task, not just the first
            err = pool.submit(mod.double, 1).exception(timeout=30)
            assert isinstance(err, ironpool.SerializationError), repr(err)
            assert "could not be unpickled in the worker" in str(err), str(err)
            assert "made_only_in_the_caller" in str(err), str(err)
    finally:
        del sys.modules[mod.__name__]
    assert pool.submit(identity, 3).result(timeout=30) == 3


def test_unpicklable_result_names_task_and_type(pool):
    err = pool.submit(make_lock).exception(timeout=30)
    assert isinstance(err, ironpool.SerializationError), repr(err)
    assert isinstance(err, pickle.PicklingError)
    assert "make_lock" in str(err) and "lock" in str(err).lower(), str(err)
    assert pool.submit(identity, 2).result(timeout=30) == 2


@pytest.mark.parametrize("fn,type_name,text", [(raise_unpicklable, "LockedError", "the lock is inside"),
                                                (raise_two_arg, "TwoArgError", "x/y")])
def test_exception_that_cannot_travel_is_still_reported(pool, fn, type_name, text):
    err = pool.submit(fn).exception(timeout=30)
    assert err is not None
    assert type_name in f"{type(err).__name__}: {err}", repr(err)
    assert text in str(err)
    assert isinstance(err.__cause__, _RemoteTraceback)
    assert fn.__name__ in err.__cause__.tb
    assert pool.submit(identity, 3).result(timeout=30) == 3


# --- P3: native crashes fail one task, the pool goes on ----------------------


@pytest.mark.parametrize(
    "kind,exitcode,sig",
    [("exit", 3, None), ("segv", None, signal.SIGSEGV), ("abort", None, signal.SIGABRT)],
)
def test_worker_crash_fails_only_that_task(pool, kind, exitcode, sig):
    before = pool.submit(getpid).result(timeout=30)
    fut = pool.submit(crash, kind, tag="crash-tail-42")
    err = fut.exception(timeout=30)
    assert isinstance(err, ironpool.WorkerCrashed), repr(err)
    assert isinstance(err, BrokenProcessPool)
    assert err.exitcode == exitcode and err.signal == sig, (err.exitcode, err.signal)
    assert "crash" in str(err) and repr(kind) in str(err), str(err)  # names the task and its argument
    assert isinstance(err.stderr_tail, str) and "crash-tail-42: about to " + kind in err.stderr_tail
    if kind == "segv":
        assert "Segmentation fault" in err.stderr_tail  # faulthandler is on in workers
        assert err.python_stack and "crash" in err.python_stack
    with pytest.raises(ironpool.WorkerCrashed):
        fut.result()
    # The pool keeps going with both workers.
    pids = {pool.submit(getpid, i).result(timeout=30) for i in range(6)}
    assert err.pid not in pids and not running(err.pid)
    assert sum(pool.map(identity, range(10))) == 45
    assert before == err.pid or before in pids  # the other worker was not touched


def test_sigkill_of_a_worker_mid_task(pool, beacon):
    fut = pool.submit(blocking, beacon, "never")
    pid = int(beacon.started(1)[0])
    other = pool.submit(identity, "other")
    assert other.result(timeout=30) == "other"
    os.kill(pid, signal.SIGKILL)
    err = fut.exception(timeout=30)
    assert isinstance(err, ironpool.WorkerCrashed), repr(err)
    assert err.signal == signal.SIGKILL and err.exitcode is None
    assert err.pid == pid
    assert "out-of-memory" in str(err) and "blocking" in str(err), str(err)
    assert err.oom_killed is not True  # None only where the kernel keeps no OOM count
    assert [pool.submit(identity, i).result(timeout=30) for i in range(4)] == [0, 1, 2, 3]


def test_one_segfault_among_a_hundred_tasks(pool):
    futs = [pool.submit(segv_at, i, 50) for i in range(100)]
    results, crashed = {}, []
    for i, f in enumerate(futs):
        err = f.exception(timeout=60)
        if err is None:
            results[i] = f.result()
        else:
            crashed.append((i, err))
    assert len(crashed) == 1, crashed
    i, err = crashed[0]
    assert i == 50 and isinstance(err, ironpool.WorkerCrashed) and err.signal == signal.SIGSEGV
    assert results == {i: i for i in range(100) if i != 50}


def test_one_segfault_in_map_fails_at_its_item(pool):
    results = pool.map(segv_at, range(100), [50] * 100)
    assert [next(results) for _ in range(50)] == list(range(50))
    with pytest.raises(ironpool.WorkerCrashed) as info:
        next(results)
    assert info.value.signal == signal.SIGSEGV
    assert "50" in str(info.value)
    assert list(pool.map(identity, range(20))) == list(range(20))


def test_crash_is_caught_by_broken_process_pool_handlers(pool):
    try:
        pool.submit(crash, "exit").result(timeout=30)
    except BrokenProcessPool as exc:  # code written for ProcessPoolExecutor
        caught = exc
    assert isinstance(caught, ironpool.WorkerCrashed)


def test_per_worker_parser_from_initializer():
    # P3: the flex-scanner case. Each worker owns its parser; no sharing.
    docs = ["<a><b></b><c/></a>" * (i % 4 + 1) for i in range(40)]
    with ironpool.Pool(2, initializer=init_parser) as pool:
        out = list(pool.map(count_tags, docs, chunksize=1))
    assert [n for _, _, n in out] == [3 * (i % 4 + 1) for i in range(40)]
    owners = {}
    for pid, parser_id, _ in out:
        owners.setdefault(pid, set()).add(parser_id)
    assert all(len(v) == 1 for v in owners.values()), owners


def test_worker_output_reaches_the_parent(capfd):
    with ironpool.Pool(2) as pool:
        assert list(pool.map(chatty, range(4), chunksize=1)) == [0, 1, 2, 3]
    out, err = capfd.readouterr()
    for i in range(4):
        assert f"stdout line {i}\n" in out, out
        assert f"partial {i} done\n" in out, out
        assert f"stderr line {i}\n" in err, err


def test_crashing_worker_output_is_forwarded_too(capfd):
    with ironpool.Pool(1) as pool:
        err = pool.submit(crash, "exit", tag="last words").exception(timeout=30)
    assert "last words: about to exit" in err.stderr_tail
    assert "last words: about to exit" in capfd.readouterr().err


# --- P8: __main__ code, lambdas and closures -----------------------------------


def test_lambdas_closures_and_partials(pool):
    base = 100

    def closure(x):
        return x + base

    def make_adder(n):
        return lambda x: x + n

    assert pool.submit(lambda x: x * 2, 21).result(timeout=30) == 42
    assert pool.submit(closure, 1).result(timeout=30) == 101
    assert list(pool.map(make_adder(5), range(3))) == [5, 6, 7]
    assert pool.submit(functools.partial(pow, 2), 8).result(timeout=30) == 256
    assert pool.submit(identity, lambda: 7).result(timeout=30)() == 7  # a lambda as an argument


NO_GUARD_SCRIPT = """\
import os
import ironpool
print("module body ran", os.getpid(), flush=True)

def square(x):
    return x * x

SCALE = 3
with ironpool.Pool(2) as pool:
    print("sum", sum(pool.map(square, range(10))), flush=True)
    print("lambda", pool.submit(lambda x: x * SCALE, 14).result(), flush=True)
    print("pids", sorted({w.pid for w in pool.stats()}), flush=True)
"""


def _check_no_guard_run(proc):
    assert proc.returncode == 0, proc.stderr
    assert "bootstrapping phase" not in proc.stderr
    assert proc.stdout.count("module body ran") == 1, proc.stdout
    assert "sum 285" in proc.stdout and "lambda 42" in proc.stdout, proc.stdout


def test_script_without_main_guard(tmp_path):
    script = tmp_path / "no_guard.py"
    script.write_text(NO_GUARD_SCRIPT)
    _check_no_guard_run(run_python(str(script), cwd=str(tmp_path)))


def test_python_dash_c_without_main_guard(tmp_path):
    _check_no_guard_run(run_python("-c", NO_GUARD_SCRIPT, cwd=str(tmp_path)))


def test_python_stdin_without_main_guard(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "-"], input=NO_GUARD_SCRIPT, capture_output=True, text=True,
                          timeout=60, cwd=str(tmp_path))
    _check_no_guard_run(proc)


# --- P4: nested pools (seed 002) ------------------------------------------------


SEED_002 = """\
import concurrent.futures
import json
import os
import sys

import ironpool
from ironpool import _zygote


class Foo(object):
    def __init__(self):
        self.executor = ironpool.Pool(2)

    @staticmethod
    def fun(arg):
        raise concurrent.futures.process._RemoteTraceback("error")

    def call(self, i):
        x = []
        try:
            future = self.executor.submit(self.fun, i)
            res = future.result(timeout=20)
        except Exception as e:
            print("-" * 20, type(e).__name__, flush=True)
        return x


def predict():
    f = Foo()
    for i in range(3):
        f.call(i)
    inner = sorted(w.pid for w in f.executor.stats() if w.pid)
    inner += [z.pid for z in _zygote._zygotes.values()]
    return os.getpid(), inner


if __name__ == "__main__":
    with ironpool.Pool(2) as e:
        futures = e.submit(predict)
        outer_worker, inner = futures.result()
        outer = [w.pid for w in e.stats() if w.pid]
    print("PIDS", json.dumps(outer + inner), flush=True)
"""


def test_nested_pools_with_raising_tasks_exit_promptly(tmp_path):
    script = tmp_path / "seed002.py"
    script.write_text(SEED_002)
    start = time.monotonic()
    proc = run_python(str(script), timeout=60, cwd=str(tmp_path))
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("-" * 20 + " _RemoteTraceback") == 3, proc.stdout
    assert elapsed < 15, f"took {elapsed:.1f} s to exit"
    pids = json.loads(proc.stdout.split("PIDS", 1)[1])
    assert len(pids) >= 4
    assert wait_until(lambda: not any(running(p) for p in pids), 3), [p for p in pids if running(p)]


def test_exception_from_result_does_not_keep_the_pool_alive():
    # The article's cycle: future -> exception -> traceback -> frame -> future.
    # With the gc off, the pool must still shut down once unreferenced.
    import gc
    import weakref

    class Foo:
        def __init__(self):
            self.executor = ironpool.Pool(1)

        def call(self, i):
            try:
                future = self.executor.submit(raise_value_error, i)
                future.result(timeout=30)
            except Exception:
                pass

    gc.collect()
    gc.disable()
    try:
        f = Foo()
        for i in range(3):
            f.call(i)
        pids = {w.pid for w in f.executor.stats() if w.pid}
        ref = weakref.ref(f.executor)
        del f
        alive_without_gc = ref() is not None
    finally:
        gc.enable()
    gc.collect()
    assert ref() is None
    assert wait_until(lambda: not any(running(p) for p in pids), 5)
    assert not alive_without_gc, "a reference cycle through the future's exception keeps the pool alive"


def test_stdlib_comparison_executor_api_matches():
    # What code written for ProcessPoolExecutor relies on is present.
    for name in ("submit", "map", "shutdown", "__enter__", "__exit__"):
        assert callable(getattr(ironpool.Pool, name))
    assert issubclass(ironpool.WorkerCrashed, BrokenProcessPool)
    assert issubclass(ironpool.SerializationError, pickle.PicklingError)
    assert issubclass(ironpool.PoolClosed, RuntimeError)
    assert cf.TimeoutError is TimeoutError
