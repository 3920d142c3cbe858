"""Code written for ``ProcessPoolExecutor``/``multiprocessing`` behaves the
same on ironpool: stdlib semantics, ``__main__`` code, ``multiprocessing``
interop, Ctrl-C. Scripts run as real ``__main__`` programs in a fresh
interpreter, as users run them."""

from __future__ import annotations

import gc
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import weakref

import ironpool
import pytest
from conftest import PYTHON
from ironpool.errors import PoolClosed


def run_script(tmp_path, body: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Runs ``body`` as the ``__main__`` script ``job.py``; fails on a non-zero exit."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(body))
    proc = subprocess.run(
        [PYTHON, str(script), *args], capture_output=True, text=True, timeout=timeout, cwd=tmp_path
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


# Stdlib semantics -----------------------------------------------------------


def test_map_timeout_counts_from_the_call(pool):
    pool.submit(abs, 1).result()  # workers up: the limit is not spent starting them
    started = time.monotonic()
    results = pool.map(time.sleep, [0, 0, 6], timeout=1.5)
    with pytest.raises(TimeoutError):
        list(results)
    waited = time.monotonic() - started
    assert 1.5 <= waited < 2.5, f"map(timeout=1.5) raised after {waited:.2f} s"


def test_result_timeout_is_not_waited_twice(pool):
    future = pool.submit(time.sleep, 5)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        future.result(timeout=1.0)
    assert time.monotonic() - started < 1.6
    with pytest.raises(TimeoutError):
        future.exception(timeout=1.0)
    assert time.monotonic() - started < 3.2


class Model:
    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def predict(self, x):
        return x + len(self.payload)


class Big:
    """An argument or result the test can watch being collected."""

    def __init__(self, n: int) -> None:
        self.data = bytes(n)


def make_big(n):
    return Big(n)


def test_bound_method_does_not_keep_its_object_alive(pool):
    model = Model(b"x" * 1000)
    watch = weakref.ref(model)
    future = pool.submit(model.predict, 1)
    assert future.result() == 1001
    assert list(pool.map(model.predict, range(3))) == [1000, 1001, 1002]
    del model, future
    gc.collect()
    assert watch() is None, "the pool keeps a submitted bound method's object alive"


def test_arguments_and_results_are_not_kept(pool):
    arg = Big(10)
    watch_arg = weakref.ref(arg)
    future = pool.submit(len, [arg.data])
    assert future.result() == 1
    result_future = pool.submit(make_big, 100)
    watch_result = weakref.ref(result_future.result())
    cancelled_arg = Big(10)
    watch_cancelled = weakref.ref(cancelled_arg)
    blockers = [pool.submit(time.sleep, 0.3) for _ in range(2)]
    queued = pool.submit(id, cancelled_arg)
    assert queued.cancel()
    del arg, future, result_future, cancelled_arg, queued
    for b in blockers:
        b.result()
    gc.collect()
    assert watch_arg() is None, "an argument outlived its done future"
    assert watch_result() is None, "a result outlived its done future"
    assert watch_cancelled() is None, "a cancelled task's argument outlived it"


def registry_size(_=None):
    from ironpool import _serialize

    return len(_serialize.REGISTRY)


def test_fresh_lambdas_do_not_grow_the_pool_or_its_workers():
    with ironpool.Pool(1) as pool:
        for i in range(300):
            assert pool.submit(lambda x, i=i: x + i, 1).result() == i + 1
        in_caller = len(pool._backend.functions.by_key)
        in_worker = pool.submit(registry_size).result()
    assert in_caller < 10, f"the pool holds {in_caller} functions after 300 dead lambdas"
    assert in_worker < 10, f"the worker holds {in_worker} payloads after 300 dead lambdas"


def test_resubmitting_a_live_function_is_a_cache_hit(pool):
    pool.submit(registry_size).result()
    ids = {pool._backend.functions.acquire(registry_size).id for _ in range(3)}
    assert len(ids) == 1


def test_map_iterator_frees_what_it_yielded(pool):
    results = pool.map(make_big, [1000] * 6, chunksize=3)  # two chunks of three
    first = next(results)
    watch = weakref.ref(first)
    del first
    gc.collect()
    assert watch() is None, "map's iterator keeps a value it has yielded (same chunk)"
    rest = list(results)
    assert len(rest) == 5


def test_submit_during_interpreter_shutdown(tmp_path):
    proc = run_script(
        tmp_path,
        """
        import atexit
        import ironpool

        pool = ironpool.Pool(1)
        pool.submit(abs, 1).result()

        @atexit.register
        def late():
            try:
                pool.submit(abs, 2)
            except RuntimeError as exc:
                print(type(exc).__name__, exc)
        """,
    )
    assert "PoolClosed cannot schedule new futures after interpreter shutdown" in proc.stdout


def test_future_in_flight_fails_at_once_in_a_forked_child(pool):
    pool.submit(abs, 1).result()
    future = pool.submit(time.sleep, 5)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what result() did, then leave at once
        try:
            os.close(read)
            try:
                future.result()
                msg = "returned"
            except PoolClosed as exc:
                msg = f"PoolClosed: {exc}"
            except BaseException as exc:
                msg = f"{type(exc).__name__}: {exc}"
            os.write(write, msg.encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], 3.0)
        assert ready, "result() in the forked child hung"
        msg = os.read(read, 4096).decode()
    finally:
        os.close(read)
        os.kill(pid, signal.SIGKILL)  # gone already when it reported
        os.waitpid(pid, 0)
    assert msg.startswith("PoolClosed"), msg
    future.cancel()


# __main__ code and multiprocessing interop ----------------------------------


def test_initializer_globals_are_what_main_tasks_read(tmp_path):
    proc = run_script(
        tmp_path,
        """
        import ironpool

        LEVEL = "INFO"
        SEEN = []

        def setup(level):
            global LEVEL
            LEVEL = level

        def level(_):
            return LEVEL

        def remember(x):
            SEEN.append(x)  # module state lives in the worker, as with a real module
            return len(SEEN)

        if __name__ == "__main__":
            with ironpool.Pool(1, initializer=setup, initargs=("DEBUG",)) as pool:
                print("submit", pool.submit(level, 0).result())
                print("map", list(pool.map(level, range(2))))
                print("lambda", pool.submit(lambda: LEVEL).result())
                print("state", [pool.submit(remember, i).result() for i in range(3)])
        """,
    )
    assert "submit DEBUG" in proc.stdout
    assert "map ['DEBUG', 'DEBUG']" in proc.stdout
    assert "lambda DEBUG" in proc.stdout
    assert "state [1, 2, 3]" in proc.stdout


def test_caller_changes_after_first_use(tmp_path):
    """Data globals are the worker's once it has them; code follows the caller
    (docs/decisions.md, "Functions and globals from __main__")."""
    proc = run_script(
        tmp_path,
        """
        import ironpool

        LIMIT = 1

        def helper():
            return "old helper"

        def read_limit():
            return LIMIT

        def read_limit_again():
            return LIMIT

        def use_helper():
            return helper()

        if __name__ == "__main__":
            with ironpool.Pool(1) as pool:
                print("first", pool.submit(read_limit).result(), pool.submit(use_helper).result())
                LIMIT = 2

                def helper():
                    return "new helper"

                def use_helper_again():
                    return helper()

                # A function already sent is not sent again: it keeps the helper it had.
                print("later", pool.submit(read_limit_again).result(), pool.submit(use_helper_again).result(),
                      pool.submit(use_helper).result())
            with ironpool.Pool(1) as pool:
                print("new pool", pool.submit(read_limit).result())
        """,
    )
    assert "first 1 old helper" in proc.stdout
    assert "later 1 new helper new helper" in proc.stdout
    assert "new pool 2" in proc.stdout


def put_in(proxies, i):
    d, q, lock, event = proxies
    with lock:
        d[i] = i * i
    q.put(i)
    if i == 3:
        event.set()
    return os.getpid()


def test_manager_proxies_work_across_respawns():
    with multiprocessing.Manager() as manager:
        proxies = (manager.dict(), manager.Queue(), manager.Lock(), manager.Event())
        with ironpool.Pool(2, max_tasks_per_worker=1) as pool:
            pids = list(pool.map(put_in, [proxies] * 4, range(4)))
        d, q, _, event = proxies
        assert dict(d) == {0: 0, 1: 1, 2: 4, 3: 9}
        assert sorted(q.get(timeout=5) for _ in range(4)) == [0, 1, 2, 3]
        assert event.is_set()
        assert len(set(pids)) == 4, "each task ran in a fresh worker"


def test_unshareable_multiprocessing_objects_say_how_to_share(tmp_path):
    # In a script of its own: mp.Value maps a /dev/shm arena into its process for good.
    proc = run_script(
        tmp_path,
        """
        import multiprocessing
        import ironpool

        if __name__ == "__main__":
            with ironpool.Pool(1) as pool:
                for obj in (multiprocessing.Lock(), multiprocessing.Value("i", 0), multiprocessing.Queue()):
                    try:
                        pool.submit(id, obj).result()
                        print("sent", type(obj).__name__)
                    except ironpool.SerializationError as exc:
                        print("refused", "Manager()" in str(exc))
                print("still usable", pool.submit(abs, -1).result())
            try:  # the stdlib's recipe for a lock every worker holds: initargs
                ironpool.Pool(1, initializer=print, initargs=(multiprocessing.Queue(),))
            except ironpool.SerializationError as exc:
                print("initargs refused", "initargs" in str(exc) and "Manager()" in str(exc))
        """,
    )
    lines = proc.stdout.split("\n")
    assert lines[:5] == ["refused True"] * 3 + ["still usable 1", "initargs refused True"], proc.stdout


def test_stdlib_spawn_pool_inside_a_task(tmp_path):
    proc = run_script(
        tmp_path,
        """
        import multiprocessing
        import ironpool

        def sq(x):
            return x * x

        def nested(n):
            with multiprocessing.get_context("spawn").Pool(2) as inner:
                return inner.map(sq, range(n))

        if __name__ == "__main__":
            with ironpool.Pool(1) as pool:
                print("nested", pool.submit(nested, 4).result())
        """,
    )
    assert "nested [0, 1, 4, 9]" in proc.stdout


def test_ironpool_inside_a_stdlib_spawn_worker(tmp_path):
    proc = run_script(
        tmp_path,
        """
        import multiprocessing
        import ironpool

        def cube(x):
            return x ** 3

        def outer(n):
            with ironpool.Pool(1) as pool:
                return list(pool.map(cube, range(n))) + [pool.submit(lambda: "lambda ok").result()]

        if __name__ == "__main__":
            with multiprocessing.get_context("spawn").Pool(1) as stdlib_pool:
                print("outer", stdlib_pool.apply(outer, (3,)))
        """,
    )
    assert "outer [0, 1, 8, 'lambda ok']" in proc.stdout


def test_traceback_shows_the_users_file_and_line(tmp_path):
    proc = run_script(
        tmp_path,
        """
        import traceback
        import ironpool

        def parse(text):
            value = int(text)  # the line the traceback must show
            return value

        if __name__ == "__main__":
            with ironpool.Pool(1) as pool:
                try:
                    pool.submit(parse, "x").result()
                except ValueError as exc:
                    print("".join(traceback.format_exception(exc)))
        """,
    )
    script = str(tmp_path / "job.py")
    assert f'File "{script}", line 6, in parse' in proc.stdout
    assert "value = int(text)  # the line the traceback must show" in proc.stdout
    assert "<dynamic-code>" not in proc.stdout


# Ctrl-C during shutdown -----------------------------------------------------

SHUTDOWN_SCRIPT = """
import sys, time
import ironpool

def nap(seconds):
    time.sleep(seconds)

if __name__ == "__main__":
    seconds, count = float(sys.argv[1]), int(sys.argv[2])
    with ironpool.Pool(2) as pool:
        futures = [pool.submit(nap, seconds) for _ in range(count)]
        while not all(f.running() for f in futures[:2]):
            time.sleep(0.01)
        print("draining", flush=True)
    print("returned", sum(f.cancelled() for f in futures), flush=True)
"""


def start_shutdown_script(tmp_path, seconds: float, count: int) -> subprocess.Popen:
    script = tmp_path / "drain.py"
    script.write_text(SHUTDOWN_SCRIPT)
    proc = subprocess.Popen(
        [PYTHON, str(script), str(seconds), str(count)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "draining"
    return proc


def interrupt(proc: subprocess.Popen, presses: int) -> tuple[str, float]:
    """Presses Ctrl-C ``presses`` times; returns stderr and the seconds from the
    last press to the exit."""
    for press in range(presses):
        if press:
            time.sleep(0.3)  # separate key presses, not one; nothing to wait on
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    return err, time.monotonic() - sent


def test_first_ctrl_c_in_shutdown_cancels_queued_work(tmp_path):
    proc = start_shutdown_script(tmp_path, 1.0, 20)  # 10 s of queued work
    err, took = interrupt(proc, 1)
    assert "KeyboardInterrupt" in err, err
    assert took < 4.0, f"Ctrl-C during shutdown took {took:.1f} s to return"


def test_second_ctrl_c_in_shutdown_kills_the_workers(tmp_path):
    proc = start_shutdown_script(tmp_path, 60.0, 4)
    err, took = interrupt(proc, 2)
    assert "KeyboardInterrupt" in err, err
    assert took < 3.0, f"a second Ctrl-C took {took:.1f} s to return"


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("Linux only")


def _pid(_):
    return os.getpid()


def test_process_pool_executor_keywords():
    """``ProcessPoolExecutor(max_workers=..., max_tasks_per_child=..., mp_context=...)`` runs as is."""
    with ironpool.Pool(max_workers=2, max_tasks_per_child=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pids = list(pool.map(_pid, range(4)))
        assert pool.workers == 2
    assert len(set(pids)) == 4, "max_tasks_per_child=1 gives each task a fresh worker"
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        ironpool.Pool(max_workers=0)
    with pytest.raises(TypeError, match="not both"):
        ironpool.Pool(2, max_workers=2)


def test_decorated_main_function_stays_decorated(tmp_path):
    proc = run_script(
        tmp_path,
        """
        import ironpool

        def shout(fn):
            def wrapper(*args):
                return fn(*args).upper()
            return wrapper

        @shout
        def greet(name):
            return "hi " + name

        def calls_greet(name):
            return greet(name)

        if __name__ == "__main__":
            with ironpool.Pool(1) as pool:
                print(pool.submit(greet, "a").result(), pool.submit(calls_greet, "b").result())
        """,
    )
    assert "HI A HI B" in proc.stdout, proc.stdout
