"""What only the threads backend does: nothing is pickled, tracebacks are
the task's own, a timed-out task's thread is abandoned (a thread cannot be
killed) and replaced, and options a thread cannot honour are refused. The
API every backend shares is in test_api_suite.py."""

from __future__ import annotations

import gc
import pickle
import textwrap
import threading
import traceback
import weakref

import ironpool
import pytest
from conftest import run_python


def wait_for(started: threading.Event, release: threading.Event, done: threading.Event, value):
    started.set()
    release.wait()
    done.set()
    return value


def wait_for_item(item):
    return wait_for(*item)


class TaskError(Exception):
    pass


def raise_here(seen: list):
    seen.append(TaskError("from the task"))  # no local holds it: its traceback holds this frame
    raise seen[-1]


def hang_once(runs: list, release: threading.Event):
    """Blocks on its first run only, so a retry finishes."""
    runs.append(threading.get_native_id())
    if len(runs) == 1:
        release.wait()
    return len(runs)


@pytest.fixture
def release():
    """Set at the end of the test, so that no abandoned thread outlives it."""
    event = threading.Event()
    yield event
    event.set()


def test_nothing_is_pickled():
    lock = threading.Lock()
    with ironpool.Pool(2, backend="threads") as pool:
        made = pool.submit(lambda held: (held, lambda: 42), lock).result(timeout=30)
        assert made[0] is lock and made[1]() == 42
        generators = list(pool.map(lambda n: (i for i in range(n)), [2, 3]))
        assert [list(g) for g in generators] == [[0, 1], [0, 1, 2]]


def test_an_exception_is_the_task_own_with_its_traceback():
    seen: list = []
    with ironpool.Pool(1, backend="threads") as pool:
        future = pool.submit(raise_here, seen)
        err = future.exception(timeout=30)
        assert err is seen[0], "the exception object itself, not a rebuilt copy"
        frames = [f.name for f in traceback.extract_tb(err.__traceback__)]
        assert frames == ["raise_here"], frames
        with pytest.raises(TaskError) as raised:
            future.result()
        assert "raise_here" in [f.name for f in traceback.extract_tb(raised.value.__traceback__)]


def test_a_settled_exception_holds_no_cycle_through_its_future():
    # Pitfall P4: an exception's traceback must not hold the future that
    # holds it (nor the task), or a pool outlives its last reference.
    seen: list = []
    pool = ironpool.Pool(1, backend="threads")
    gc.disable()
    try:
        future = pool.submit(raise_here, seen)
        try:
            future.result(timeout=30)
        except TaskError:
            pass
        gone = weakref.ref(seen.pop())
        assert pool.submit(int, 1).result(timeout=30) == 1  # the thread has moved on to another task
        del future
        assert gone() is None, "the exception is kept alive by a reference cycle"
    finally:
        gc.enable()
        pool.shutdown()


def test_a_shared_object_is_handed_over_itself_and_its_handle_never_pickles():
    table = {"rows": [1, 2, 3]}
    with ironpool.Pool(2, backend="threads") as pool, ironpool.Pool(1) as processes:
        handle = pool.share(table)
        assert pool.submit(lambda t: t, handle).result(timeout=30) is table
        with pytest.raises(ironpool.SerializationError, match="cannot be pickled"):
            pickle.dumps(handle)
        err = processes.submit(len, handle).exception(timeout=30)
        assert isinstance(err, ironpool.SerializationError)
        err = pool.submit(len, processes.share([1])).exception(timeout=30)
        assert isinstance(err, ironpool.SerializationError) and "processes pool" in str(err)


@pytest.mark.parametrize(
    ("option", "named"),
    [
        ({"max_memory_per_worker": "1GB"}, "max_memory_per_worker"),
        ({"preload": ("json",)}, "preload"),
        ({"thread_limit": 4}, "thread_limit=4"),
        ({"forward_output": False}, "forward_output=False"),
    ],
)
def test_options_a_thread_cannot_honour_are_refused(option, named):
    with pytest.raises(ValueError, match=f"backend='threads' cannot honour {named}"):
        ironpool.Pool(1, backend="threads", **option)


def test_a_timed_out_task_fails_its_thread_is_abandoned_and_replaced(release):
    started, done = threading.Event(), threading.Event()
    pool = ironpool.Pool(1, backend="threads", task_timeout=0.3)
    try:
        hung = pool.submit(wait_for, started, release, done, "late")
        assert started.wait(30)
        err = hung.exception(timeout=30)
        assert isinstance(err, ironpool.TaskTimeout)
        assert "cannot be killed" in str(err) and "abandoned" in str(err) and err.limit == 0.3
        # The pool kept its size: another thread runs the next task, while
        # the first one is still inside its task.
        assert pool.submit(threading.get_native_id).result(timeout=30) != err.pid
        assert not done.is_set()
        info = pool.stats()
        assert len(info) == 1 and info[0].restarts == 1 and info[0].pid != err.pid
        assert info[0].last_exit.startswith(f"timeout: thread {err.pid} abandoned")
        # shutdown does not wait for the abandoned thread.
        pool.shutdown(wait=True)
        assert not done.is_set()
        # Set free, the task ends and its result is dropped.
        release.set()
        assert done.wait(30)
        assert hung.exception() is err
    finally:
        pool.terminate()


def test_a_timed_out_task_is_retried_on_the_new_thread(release):
    runs: list = []
    with ironpool.Pool(1, backend="threads", task_timeout=0.3, retries=1) as pool:
        assert pool.submit(hang_once, runs, release).result(timeout=30) == 2
        assert runs[0] != runs[1], "the retry ran on the replacement thread"
        runs.clear()
        err = pool.submit_with(hang_once, (runs, release), retries=0).exception(timeout=30)
        assert isinstance(err, ironpool.TaskTimeout)


def test_map_items_that_time_out_fail_alone(release):
    with ironpool.Pool(2, backend="threads") as pool:
        events = [threading.Event() for _ in range(3)]
        items = [(events[i], release if i == 1 else threading.Event(), threading.Event(), i) for i in range(3)]
        for i in (0, 2):
            items[i][1].set()
        out = list(pool.starmap(wait_for, items, task_timeout=0.5, chunksize=3, return_exceptions=True))
        assert out[0] == 0 and out[2] == 2
        assert isinstance(out[1], ironpool.TaskTimeout)


def test_imap_unordered_waiting_on_blocked_items_wakes_for_a_timeout_and_gives_up_at_its_own(release):
    # Every item in flight blocks, so the map waits for any of them
    # (ThreadBackend.wait_any): the watch's TaskTimeout must end that wait,
    # and the map's own timeout must end it when nothing finishes.
    with ironpool.Pool(2, backend="threads") as pool:
        started = threading.Event()
        items = [(started, release, threading.Event(), "hung")]
        results = pool.imap_unordered(wait_for_item, items, task_timeout=0.5, chunksize=1, return_exceptions=True)
        out = list(results)
        assert started.is_set() and len(out) == 1 and isinstance(out[0], ironpool.TaskTimeout), out

        blocked = threading.Event()
        stuck = pool.imap_unordered(
            wait_for_item, [(threading.Event(), blocked, threading.Event(), "never")], chunksize=1, timeout=0.3
        )
        with pytest.raises(TimeoutError):
            next(stuck)
        blocked.set()


def test_done_callbacks_run_in_the_worker_thread_with_no_hop():
    go = threading.Event()
    names: list[str] = []
    with ironpool.Pool(2, backend="threads") as pool:
        futures = [pool.submit(go.wait) for _ in range(20)]
        for future in futures:  # all pending: the tasks wait for go
            future.add_done_callback(lambda _f: names.append(threading.current_thread().name))
        go.set()
    assert len(names) == 20
    assert set(names) <= {"ironpool-thread-0", "ironpool-thread-1"}, set(names)


def test_a_script_that_forgets_shutdown_finishes_its_work_and_exits(tmp_path):
    script = textwrap.dedent(
        """
        import threading, ironpool

        def write(path, text):
            with open(path, "w") as f:
                f.write(text)

        never = threading.Event()
        pool = ironpool.Pool(2, backend="threads", task_timeout=0.5)
        hung = pool.submit(never.wait)
        print(type(hung.exception()).__name__)
        for i in range(20):
            pool.submit(write, f"DIR/{i}", str(i))
        """
    ).replace("DIR", str(tmp_path))
    proc = run_python("-c", script, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "TaskTimeout"
    assert sorted(int(p.read_text()) for p in tmp_path.iterdir()) == list(range(20))
