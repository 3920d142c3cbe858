"""The API every backend must honour, run against each of them (the
``pool_backend`` fixture of conftest.py: a backend joins with one line).

Backend-specific behaviour stays in its own file: crashes and killed
timeouts in test_faults.py, abandoned threads in test_threads.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import io
import threading
import time

import ironpool
import pytest
from conftest import Beacon, two_running, wait_until, worker_key
from tqdm import tqdm

# --- tasks (module level: the processes backend sends them by reference) ----


def square(x):
    return x * x


def add(a, b=0, *, c=0):
    return a + b + c


def blocking(beacon: Beacon, value):
    beacon.notify(value)
    beacon.wait()
    return value


def fail_at(x, bad=(3,)):
    if x in bad:
        raise ValueError(f"item {x} is bad")
    return x * 10


def fails_until(path, succeed_on, error=ConnectionError):
    """Raises ``error`` until its ``succeed_on``-th run (runs counted in a file)."""
    with open(path, "a+") as f:
        f.write("x")
        f.flush()
        f.seek(0)
        run = len(f.read())
    if run < succeed_on:
        raise error(f"run {run}")
    return run


def label_worker(prefix):
    return {"prefix": prefix, "worker": worker_key()}


def state_and_worker(x):
    return ironpool.worker_state(), worker_key(), x


def state_or_error(_):
    try:
        return ironpool.worker_state()
    except ironpool.NoWorkerState as exc:
        return exc


def read_shared(direct, in_list, in_dict):
    return direct["k"], in_list[0]["k"], in_dict["x"]["k"]


# --- submit, result, exception, futures ------------------------------------------


def test_submit_result_and_exception(make_pool):
    pool = make_pool()
    assert pool.submit(add, 1, 2, c=3).result(timeout=30) == 6
    future = pool.submit(fail_at, 3)
    err = future.exception(timeout=30)
    assert type(err) is ValueError and str(err) == "item 3 is bad"
    with pytest.raises(ValueError, match="item 3 is bad"):
        future.result()
    assert pool.submit_with(add, (1,), {"b": 5}).result(timeout=30) == 6


def test_as_completed_yields_the_quick_tasks_before_a_blocked_one(make_pool, beacon):
    pool = make_pool()
    slow = pool.submit(blocking, beacon, "slow")
    beacon.started(1)
    quick = [pool.submit(square, i) for i in range(5)]
    seen = []
    for future in cf.as_completed([slow, *quick], timeout=30):
        seen.append(future)
        if len(seen) == 5:
            beacon.release()
    assert seen[-1] is slow and slow.result() == "slow"
    assert sorted(f.result() for f in seen[:5]) == [0, 1, 4, 9, 16]


def test_future_states_and_cancel(make_pool, beacon):
    pool = make_pool(1)
    running = pool.submit(blocking, beacon, "x")
    beacon.started(1)
    queued = [pool.submit(square, i) for i in range(4)]
    assert running.running() and not running.done()
    assert running.cancel() is False, "a running task cannot be cancelled (stdlib semantics)"
    assert queued[-1].cancel() is True and queued[-1].cancelled()
    with pytest.raises(cf.CancelledError):
        queued[-1].result()
    beacon.release()
    assert running.result(timeout=30) == "x"
    assert [f.result(timeout=30) for f in queued[:-1]] == [0, 1, 4]


def test_stats_has_one_entry_per_worker(make_pool):
    pool = make_pool(2)
    assert [f.result(timeout=30) for f in [pool.submit(square, i) for i in range(10)]] == [i * i for i in range(10)]
    # Ten tiny tasks can all finish before the second worker's start is reported (its pid is 0 until then).
    assert wait_until(lambda: all(w.pid > 0 for w in pool.stats()), timeout=30), pool.stats()
    stats = pool.stats()
    assert [w.slot for w in stats] == [0, 1]
    assert all(w.pid > 0 and w.rss >= 0 and w.busy_seconds >= 0 for w in stats), stats
    assert sum(w.tasks_done for w in stats) == 10, stats


def test_stats_counts_the_pool_s_tasks(make_pool):
    pool = make_pool(2)
    assert [f.result(timeout=30) for f in [pool.submit(square, i) for i in range(5)]] == [0, 1, 4, 9, 16]
    with pytest.raises(ValueError):
        pool.submit(fail_at, 3).result(timeout=30)
    got = list(pool.map(fail_at, range(10), chunksize=5, return_exceptions=True))
    assert isinstance(got[3], ValueError) and got[4] == 40
    s = pool.stats()
    assert (s.submitted, s.done, s.failed, s.queued, s.running) == (8, 8, 1, 0, 0), s
    assert s.items_done == 16 and s.retried == 0
    assert s.mean_task_seconds >= 0 and 0 <= s.utilisation <= 1 and s.throughput > 0


# --- map, starmap, imap_unordered ---------------------------------------------------


@pytest.mark.parametrize("chunksize", [None, 1, 7, 1000])
def test_map_keeps_input_order(make_pool, chunksize):
    pool = make_pool()
    assert list(pool.map(square, range(100), chunksize=chunksize)) == [i * i for i in range(100)]
    assert list(pool.map(add, range(5), range(10), chunksize=chunksize)) == [0, 2, 4, 6, 8]
    assert list(pool.starmap(add, [(1, 2), (3, 4)], chunksize=chunksize)) == [3, 7]


def test_imap_unordered_yields_in_completion_order(make_pool, beacon):
    pool = make_pool(2)

    def fn(x):
        return blocking(x, "slow") if isinstance(x, Beacon) else x

    results = pool.imap_unordered(fn, [beacon, 1, 2, 3], chunksize=1, timeout=20)
    beacon.started(1)
    assert {next(results) for _ in range(3)} == {1, 2, 3}, "the blocked item held up the others"
    beacon.release()
    assert list(results) == ["slow"]
    assert sorted(pool.imap_unordered(square, range(100))) == [i * i for i in range(100)]


def test_map_raises_at_the_failing_item(make_pool):
    pool = make_pool()
    got = []
    with pytest.raises(ValueError, match="item 3 is bad"):
        for value in pool.map(fail_at, range(10), chunksize=2):
            got.append(value)
    assert got == [0, 10, 20]


def test_map_timeout(make_pool, beacon):
    pool = make_pool(1)
    results = pool.map(blocking, [beacon], ["held"], timeout=0.2)
    beacon.started(1)
    with pytest.raises(TimeoutError, match="map"):
        list(results)
    beacon.release()


def test_return_exceptions_puts_each_error_in_its_place(make_pool):
    pool = make_pool()
    bad = (2, 5, 6)
    values = list(pool.map(fail_at, range(9), [bad] * 9, chunksize=3, return_exceptions=True))
    assert [v for i, v in enumerate(values) if i not in bad] == [i * 10 for i in range(9) if i not in bad]
    assert [str(values[i]) for i in bad] == [f"item {i} is bad" for i in bad]
    assert all(type(values[i]) is ValueError for i in bad)
    pairs = list(pool.starmap(fail_at, [(i, bad) for i in range(9)], return_exceptions=True))
    assert [type(v).__name__ for v in pairs].count("ValueError") == 3
    unordered = list(pool.imap_unordered(fail_at, range(9), return_exceptions=True))
    assert sorted(str(v) for v in unordered if isinstance(v, ValueError)) == ["item 3 is bad"]


def test_progress_counts_every_item_in_a_tqdm_bar_and_a_callback(make_pool):
    pool = make_pool()
    stream = io.StringIO()
    # tqdm's default write lock is a multiprocessing RLock, a POSIX semaphore
    # under /dev/shm for the rest of the session, which test_zero_copy's P2
    # check would take for data; a thread lock serves this process as well.
    tqdm.set_lock(threading.RLock())
    bar = tqdm(file=stream, mininterval=0, ascii=True)
    assert list(pool.map(square, range(50), chunksize=4, progress=bar)) == [i * i for i in range(50)]
    assert (bar.n, bar.total) == (50, 50)
    bar.close()
    assert "50/50" in stream.getvalue()
    calls = []
    generator = (i for i in range(30))  # no length: the total is unknown
    count = lambda done, total: calls.append((done, total))  # noqa: E731
    assert len(list(pool.imap_unordered(square, generator, progress=count))) == 30
    assert calls[-1] == (30, None)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    failing = []
    list(pool.map(fail_at, range(10), return_exceptions=True, progress=lambda d, t: failing.append((d, t))))
    assert failing[-1] == (10, 10), "an item that raised is counted too"


# --- worker set-up and state -------------------------------------------------------


def test_initializer_state_is_per_worker(make_pool):
    pool = make_pool(2, initializer=label_worker, initargs=("cfg",))
    out = list(pool.map(state_and_worker, range(40), chunksize=1))
    assert [x for _, _, x in out] == list(range(40))
    for state, worker, _ in out:
        assert state["prefix"] == "cfg"
        assert state["worker"] == worker, "a task saw another worker's state"
    assert pool.submit(state_or_error, 0).result(timeout=30)["prefix"] == "cfg"


def test_worker_state_without_an_initializer_is_a_clear_error(make_pool):
    pool = make_pool(1)
    err = pool.submit(state_or_error, 0).result(timeout=30)
    assert isinstance(err, ironpool.NoWorkerState) and isinstance(err, LookupError)
    assert "no initializer" in str(err)
    with pytest.raises(ironpool.NoWorkerState, match="only available inside a task"):
        ironpool.worker_state()


def test_initializer_that_raises_fails_every_task(make_pool):
    pool = make_pool(2, initializer=fail_at, initargs=(3,))
    for future in [pool.submit(square, i) for i in range(3)]:
        err = future.exception(timeout=30)
        assert isinstance(err, ironpool.WorkerStartError), repr(err)
        assert "item 3 is bad" in str(err)


# --- retries ----------------------------------------------------------------------


def test_retry_on_reruns_a_task_within_one_budget(make_pool, tmp_path):
    pool = make_pool(1, retries=2, retry_on=(ConnectionError,))
    assert pool.submit(fails_until, tmp_path / "a", 3).result(timeout=30) == 3
    err = pool.submit(fails_until, tmp_path / "b", 5).exception(timeout=30)
    assert type(err) is ConnectionError and str(err) == "run 3"
    assert "earlier attempts" in "\n".join(getattr(err, "__notes__", []))
    # Another type is the task's own final exception, not retried.
    err = pool.submit(fails_until, tmp_path / "c", 2, KeyError).exception(timeout=30)
    assert type(err) is KeyError and (tmp_path / "c").read_text() == "x"
    # A call's own budget.
    err = pool.submit_with(fails_until, (tmp_path / "d", 2), retries=0).exception(timeout=30)
    assert type(err) is ConnectionError and (tmp_path / "d").read_text() == "x"


def test_a_task_past_its_time_limit_fails_and_the_pool_keeps_its_size(make_pool, beacon):
    pool = make_pool(1)
    assert pool.submit(square, 6).result(timeout=30) == 36  # the worker has imported this module
    err = pool.submit_with(blocking, (beacon, "hung"), timeout=0.5).exception(timeout=30)
    assert isinstance(err, ironpool.TaskTimeout) and isinstance(err, TimeoutError)
    assert "0.5 s limit" in str(err) and "blocking" in err.task
    assert pool.submit(square, 7).result(timeout=30) == 49
    assert len(pool.stats()) == 1 and "timeout" in pool.stats()[0].last_exit


# --- sharing ------------------------------------------------------------------------


def test_a_shared_handle_reaches_tasks_as_its_object(make_pool):
    pool = make_pool()
    handle = pool.share({"k": [1, 2, 3]})
    assert isinstance(handle, ironpool.Shared)
    assert pool.submit(read_shared, handle, [handle], {"x": handle}).result(timeout=30) == ([1, 2, 3],) * 3
    assert list(pool.map(read_shared, [handle] * 3, [[handle]] * 3, [{"x": handle}] * 3)) == [([1, 2, 3],) * 3] * 3
    handle.release()
    err = pool.submit(read_shared, handle, [handle], {"x": handle}).exception(timeout=30)
    assert isinstance(err, ironpool.SerializationError) and "released" in str(err)


def test_a_handle_works_only_with_its_own_pool(make_pool):
    pool, other = make_pool(), make_pool()
    err = other.submit(read_shared, pool.share({"k": 1}), [{"k": 1}], {"x": {"k": 1}}).exception(timeout=30)
    assert isinstance(err, ironpool.SerializationError) and "another pool" in str(err)


# --- stopping ------------------------------------------------------------------------


def test_shutdown_waits_for_queued_work(make_pool):
    pool = make_pool(1)
    futures = [pool.submit(square, i) for i in range(20)]
    pool.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [i * i for i in range(20)]
    pool.shutdown()  # twice is fine
    with pytest.raises(ironpool.PoolClosed, match="after shutdown"):
        pool.submit(square, 2)
    with pytest.raises(ironpool.PoolClosed):
        list(pool.map(square, [1]))


def test_shutdown_cancel_futures_cancels_what_has_not_started(make_pool, beacon):
    pool = make_pool(2)
    running = two_running(pool, beacon)
    queued = [pool.submit(square, i) for i in range(8)]
    pool.shutdown(wait=False, cancel_futures=True)
    assert sum(f.cancelled() for f in queued) >= 7, [f.cancelled() for f in queued]
    # The stdlib's wait and as_completed count them done, with the running tasks still held.
    cancelled = [f for f in queued if f.cancelled()]
    assert not cf.wait(cancelled, timeout=10).not_done
    assert len(list(cf.as_completed(cancelled, timeout=10))) == len(cancelled)
    beacon.release(2)
    assert [f.result(timeout=30) for f in running] == [0, 1]
    for i, f in enumerate(queued):
        assert f.cancelled() or f.result(timeout=30) == i * i
    pool.shutdown(wait=True)


def test_context_manager_waits_and_closes(pool_backend):
    with ironpool.Pool(2, backend=pool_backend) as pool:
        futures = [pool.submit(square, i) for i in range(6)]
    assert [f.result(timeout=0) for f in futures] == [i * i for i in range(6)]
    with pytest.raises(ironpool.PoolClosed):
        pool.submit(square, 1)


def test_terminate_cancels_queued_and_fails_running(make_pool, beacon):
    pool = make_pool(1)
    running = pool.submit(blocking, beacon, "held")
    beacon.started(1)
    queued = pool.submit(square, 2)
    pool.terminate()
    assert queued.cancelled()
    assert not cf.wait([queued], timeout=10).not_done, "a cancelled future must count as done"
    # Unfinished either way (the processes backend cancels a future nobody marked running).
    assert running.cancelled() or isinstance(running.exception(timeout=30), ironpool.PoolClosed)


# --- bad arguments --------------------------------------------------------------------


def test_bad_arguments_are_named(make_pool, pool_backend):
    pool = make_pool(1)
    with pytest.raises(ValueError, match="chunksize"):
        pool.map(square, range(3), chunksize=0)
    with pytest.raises(TypeError, match="callable"):
        pool.submit(42)
    with pytest.raises(TypeError, match="callable"):
        pool.map("not a function", range(3))
    with pytest.raises(ValueError, match="timeout"):
        pool.map(square, range(3), timeout=-1)
    with pytest.raises(ValueError, match="timeout"):
        pool.submit_with(square, (1,), timeout=0)
    with pytest.raises(ValueError, match="retries"):
        pool.submit_with(square, (1,), retries=-1)
    with pytest.raises(TypeError, match="progress"):
        pool.map(square, range(3), progress=5)
    with pytest.raises(TypeError, match="initializer"):
        ironpool.Pool(1, initializer=5, backend=pool_backend)
    with pytest.raises(ValueError, match="workers"):
        ironpool.Pool(0, backend=pool_backend)
    assert pool.submit(square, 4).result(timeout=30) == 16, "the pool still works after refusing bad calls"


# --- asyncio ----------------------------------------------------------------------------


def test_asyncio_with_thousands_of_tasks_in_flight(make_pool, pool_backend):
    pool = make_pool(2)
    n = 5000

    async def main():
        loop = asyncio.get_running_loop()
        began = time.perf_counter()
        via_loop = await asyncio.gather(*[loop.run_in_executor(pool, square, i) for i in range(n)])
        middle = time.perf_counter()
        wrapped = await asyncio.gather(*[asyncio.wrap_future(pool.submit(square, i)) for i in range(n)])
        return via_loop, wrapped, middle - began, time.perf_counter() - middle

    via_loop, wrapped, t_loop, t_wrapped = asyncio.run(asyncio.wait_for(main(), 120))
    assert via_loop == wrapped == [i * i for i in range(n)]
    print(f"\n{pool_backend}: run_in_executor {n / t_loop:.0f} tasks/s, wrap_future {n / t_wrapped:.0f} tasks/s")
