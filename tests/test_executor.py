"""ironpool.Pool as a drop-in concurrent.futures.Executor (issue 2, API part)."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import os
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import ironpool
import pytest
from conftest import Beacon, two_running, wait_until

# --- tasks (module level: they go to workers by reference) -----------------


def tiny_or_wait(i, beacon=None):
    """``i`` at once; given a beacon, only once released (a task of a kind
    the engine knows as tiny that runs long)."""
    if beacon is not None:
        beacon.notify(os.getpid())
        beacon.wait()
    return i


def square(x):
    return x * x


def add(a, b=0, *, c=0):
    return a + b + c


def blocking(beacon: Beacon, value):
    beacon.notify(os.getpid())
    beacon.wait()
    return value


def sleepy_identity(x, delay):
    time.sleep(delay)  # workload: makes later items finish first
    return x


def fail_at(x, bad):
    if x == bad:
        raise ValueError(f"item {x} is bad")
    return x * 10


class Parser:
    """Stands for a non-thread-safe native parser: one per worker, never shared."""

    def __init__(self, config):
        self.config = config
        self.uses = 0

    def parse(self, text):
        self.uses += 1
        sep = self.config["sep"]
        return [int(t) for t in text.split(sep)]


_worker_parser: Parser | None = None
INIT_LOG = "IRONPOOL_TEST_INIT_LOG"


def make_parser(config, log_path):
    global _worker_parser
    _worker_parser = Parser(config)
    with open(log_path, "a") as f:
        f.write(f"{os.getpid()}\n")


def parse_in_worker(text):
    p = _worker_parser
    return os.getpid(), id(p), p.config["mode"], p.parse(text)


def failing_initializer(log_path):
    with open(log_path, "a") as f:
        f.write(f"{os.getpid()}\n")
    raise RuntimeError("cannot open the database")


# --- futures ------------------------------------------------------------------


def test_submit_returns_a_real_future(pool):
    fut = pool.submit(square, 7)
    assert isinstance(fut, cf.Future)
    assert fut.result(timeout=30) == 49
    assert fut.done() and not fut.cancelled() and fut.exception() is None
    assert pool.submit(add, 1, 2, c=3).result(timeout=30) == 6
    assert pool.submit(add, a=1, b=5).result(timeout=30) == 6
    assert pool.submit(sum, [1, 2, 3]).result(timeout=30) == 6  # a builtin


def test_done_callback_runs(pool):
    seen = []
    fut = pool.submit(square, 3)
    fut.add_done_callback(lambda f: seen.append(f.result()))
    fut.result(timeout=30)
    assert wait_until(lambda: seen == [9], 5)


def test_as_completed_yields_every_future(pool):
    futs = {pool.submit(square, i): i for i in range(20)}
    got = {futs[f]: f.result() for f in cf.as_completed(futs, timeout=30)}
    assert got == {i: i * i for i in range(20)}


def test_wait_and_as_completed_in_several_threads_over_done_pending_and_cancelled_futures(pool, beacon):
    """The stdlib locks every future it is given; a future done before any
    thread asked for its condition shares one that locks nothing (its state
    never changes again). Threads waiting on overlapping futures, done,
    pending and cancelled, all finish and see every future once."""
    done_early = [pool.submit(square, i) for i in range(50)]
    assert wait_until(lambda: all(f.done() for f in done_early), 30)  # settled, no condition asked for
    running = two_running(pool, beacon)  # both workers held: the rest waits
    queued = [pool.submit(square, i) for i in range(50, 100)]
    cancelled = queued[::10]
    assert all(f.cancel() for f in cancelled)
    futures = done_early + queued + running
    seen: list[list] = []
    lock = threading.Lock()

    def waiter(kind: str, offset: int) -> None:
        mine = futures[offset:] + futures[:offset]
        if kind == "wait":
            done, not_done = cf.wait(mine, timeout=60)
            got = list(done) + list(not_done)
        else:
            got = list(cf.as_completed(mine, timeout=60))
        with lock:
            seen.append(got)

    kinds = ["wait", "as_completed"] * 3
    threads = [threading.Thread(target=waiter, args=(kind, 7 * i)) for i, kind in enumerate(kinds)]
    for thread in threads:
        thread.start()
    beacon.release(2)
    for thread in threads:
        thread.join(90)
    assert not any(thread.is_alive() for thread in threads), "a waiting thread hung"
    assert len(seen) == 6 and all(sorted(map(id, got)) == sorted(map(id, futures)) for got in seen)
    assert [f.result() for f in done_early] == [i * i for i in range(50)]
    assert all(f.cancelled() for f in cancelled)


_runs = itertools.count()


def run_number():
    """How many tasks this worker ran before this one."""
    return next(_runs)


def test_a_burst_of_submits_runs_in_the_order_submitted():
    # A submit that finds the engine held (by the supervisor thread, handling
    # results) leaves its task in an inbox; whoever takes the engine next
    # must queue those before its own, or a later task would overtake them.
    with ironpool.Pool(1) as pool:
        core = pool._backend.core
        for _ in range(50):  # until some went through the inbox
            futures = [pool.submit(run_number) for _ in range(5000)]
            runs = [f.result(timeout=60) for f in futures]
            assert runs == list(range(runs[0], runs[0] + len(runs)))
            if core.inboxed():
                break
        assert core.inboxed(), "no submit found the engine busy"


def test_a_cancelled_future_is_done_for_the_stdlib_wait_and_as_completed(pool, beacon):
    # The stdlib's wait() counts a cancelled future as done only once it is
    # notified, which its executors do when they dequeue it; ironpool drops
    # the task at once, so it must notify then.
    running = two_running(pool, beacon)
    cancelled = pool.submit(square, 2)
    assert cancelled.cancel()
    done, not_done = cf.wait([cancelled], timeout=30)
    assert done == {cancelled} and not not_done
    assert list(cf.as_completed([cancelled], timeout=30)) == [cancelled]
    withdrawn = [pool.submit(square, i) for i in range(3)]
    pool.shutdown(wait=False, cancel_futures=True)
    done, not_done = cf.wait(withdrawn, timeout=30)
    assert done == set(withdrawn) and all(f.cancelled() for f in withdrawn)
    beacon.release(2)
    assert [f.result(timeout=60) for f in running] == [0, 1]


def test_a_fork_while_another_thread_settles_futures_does_not_hang_the_child(pool, beacon):
    # A forked child fails the futures it inherited (they will never settle
    # there). The lock that settling takes may be held by another thread of
    # the parent at the fork: the child must not wait for it forever.
    import select

    from ironpool import _futures

    running = two_running(pool, beacon)
    held, go = threading.Event(), threading.Event()

    def hold_the_lock():
        with _futures._UNCONDITIONED:
            held.set()
            go.wait()

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    assert held.wait(30)
    pid = os.fork()
    if pid == 0:  # the fork hooks have run: the inherited futures are settled
        os._exit(0 if all(f.done() for f in running) else 3)
    go.set()
    holder.join()
    exited = os.pidfd_open(pid)
    try:
        if not select.select([exited], [], [], 30)[0]:
            os.kill(pid, 9)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(exited)
    assert os.waitstatus_to_exitcode(status) == 0
    beacon.release(2)
    assert [f.result(timeout=60) for f in running] == [0, 1]




def test_a_future_without_a_condition_has_every_attribute_of_a_stdlib_one():
    # TaskFuture skips Future.__init__ (its Condition and lists are made on
    # demand): a Python that adds state to Future must not leave ours without it.
    from ironpool._futures import TaskFuture

    ours, theirs = TaskFuture(), cf.Future()
    made_on_demand = {"_condition", "_waiters", "_done_callbacks"}
    assert set(vars(theirs)) - made_on_demand <= set(vars(ours))
    assert made_on_demand <= set(vars(theirs))
    for name in made_on_demand:
        assert type(getattr(ours, name)) is type(getattr(theirs, name))


def test_a_future_without_a_condition_moves_through_its_states_as_a_stdlib_one():
    # A threads worker marks a TaskFuture running with no condition made;
    # settling it twice (terminate and the worker racing) once deadlocked:
    # the error's repr() took the lock its raiser held.
    from ironpool._futures import TaskFuture

    def lifecycle(make):
        seen = []
        f = make()
        seen.append(f.set_running_or_notify_cancel())
        seen.append(f.running())
        f.set_result(1)
        for again in (lambda: f.set_result(2), lambda: f.set_exception(ValueError()), f.set_running_or_notify_cancel):
            try:
                again()
            except (cf.InvalidStateError, RuntimeError) as exc:
                seen.append(type(exc).__name__)
        seen.append(f.result())
        h = make()  # never marked running, as the processes backend's futures
        h.set_result(1)
        try:
            h.set_result(2)
        except cf.InvalidStateError as exc:
            seen.append(type(exc).__name__)
        g = make()
        seen.append(g.cancel())
        seen.append(g.set_running_or_notify_cancel())
        seen.append(g._state)
        return seen

    out: list = []
    t = threading.Thread(target=lambda: out.append(lifecycle(TaskFuture)), daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "a TaskFuture settled twice hung"
    assert out == [lifecycle(cf.Future)]
    assert out[0][2:5] == ["InvalidStateError", "InvalidStateError", "RuntimeError"]
    assert out[0][6] == "InvalidStateError"


def test_a_task_in_flight_gives_the_collector_two_objects_to_track(pool, beacon):
    # Every container a task in flight holds is one more object each
    # collection walks, and thousands in flight set off full collections
    # over the caller's whole heap. A future holds none until something
    # waits on it or adds a callback; the task's own record is its Call.
    import gc

    running = two_running(pool, beacon)
    gc.collect()
    before = len(gc.get_objects())
    queued = [pool.submit(square, i) for i in range(1000)]
    gc.collect()
    per_task = (len(gc.get_objects()) - before - 1) / len(queued)  # - 1: the list
    assert per_task <= 2.05, f"{per_task:.2f} tracked objects per task in flight"
    beacon.release(2)
    assert [f.result(timeout=60) for f in queued] == [i * i for i in range(1000)]
    assert [f.result(timeout=60) for f in running] == [0, 1]


def test_futures_settled_by_another_thread_reach_waiters_that_came_before_and_after():
    # The settling thread races the waiters taking each future's condition.
    from ironpool._futures import TaskFuture

    for _ in range(20):
        futures = [TaskFuture() for _ in range(200)]
        called = []
        for f in futures[::2]:
            f.add_done_callback(called.append)
        go = threading.Event()

        def settle_all(futures, go):
            go.wait()
            for i, f in enumerate(futures):
                f.set_exception(ValueError(i)) if i % 7 == 0 else f.set_result(i)

        t = threading.Thread(target=settle_all, args=(futures, go))
        t.start()
        go.set()
        seen = {futures.index(f) for f in cf.as_completed(futures[:100], timeout=30)}
        done, not_done = cf.wait(futures[100:], timeout=30)
        t.join()
        assert seen == set(range(100)) and len(done) == 100 and not not_done
        assert [f.result() for f in futures if f.exception() is None] == [i for i in range(200) if i % 7]
        assert len(called) == 100 and set(called) == set(futures[::2])
        late = []
        futures[1].add_done_callback(late.append)  # after it settled: runs at once
        assert late == [futures[1]]
        with pytest.raises(cf.InvalidStateError):
            futures[3].set_result("again")


def test_wait_first_completed_returns_while_another_task_runs(pool, beacon):
    slow = pool.submit(blocking, beacon, "slow")
    beacon.started(1)
    fast = pool.submit(square, 5)
    done, not_done = cf.wait([slow, fast], timeout=30, return_when=cf.FIRST_COMPLETED)
    assert done == {fast} and not_done == {slow}
    assert slow.running()
    beacon.release()
    done, not_done = cf.wait([slow, fast], timeout=30, return_when=cf.ALL_COMPLETED)
    assert done == {slow, fast} and not not_done
    assert slow.result() == "slow"


def test_wait_first_exception(pool, beacon):
    slow = pool.submit(blocking, beacon, "slow")
    beacon.started(1)
    bad = pool.submit(fail_at, 1, 1)
    done, not_done = cf.wait([slow, bad], timeout=30, return_when=cf.FIRST_EXCEPTION)
    assert done == {bad} and not_done == {slow}
    beacon.release()
    assert slow.result(timeout=30) == "slow"


def test_future_result_timeout(pool, beacon):
    fut = pool.submit(blocking, beacon, 1)
    beacon.started(1)
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.1)
    beacon.release()
    assert fut.result(timeout=30) == 1


def test_asyncio_wrap_future(pool):
    async def main():
        loop = asyncio.get_running_loop()
        futs = [asyncio.wrap_future(pool.submit(square, i)) for i in range(5)]
        direct = await loop.run_in_executor(pool, square, 9)
        return await asyncio.gather(*futs), direct

    assert asyncio.run(asyncio.wait_for(main(), 30)) == ([0, 1, 4, 9, 16], 81)


# --- map, starmap, imap_unordered -------------------------------------------


def test_map_keeps_input_order(pool):
    # Earlier items sleep longer, so they finish last.
    delays = [0.05 * (5 - i) for i in range(6)]
    assert list(pool.map(sleepy_identity, range(6), delays, chunksize=1)) == list(range(6))


@pytest.mark.parametrize("chunksize", [None, 1, 2, 7, 50, 1000])
def test_map_chunksize_values(pool, chunksize):
    assert list(pool.map(square, range(50), chunksize=chunksize)) == [i * i for i in range(50)]


def test_map_several_iterables_stops_at_the_shortest(pool):
    assert list(pool.map(pow, range(10), [2, 2, 2])) == [0, 1, 4]
    assert list(pool.map(square, [])) == []


def test_map_is_lazy_over_a_generator(pool):
    consumed = 0

    def items():
        nonlocal consumed
        for i in range(1_000_000):
            consumed += 1
            yield i

    results = pool.map(square, items())
    assert [next(results) for _ in range(5)] == [0, 1, 4, 9, 16]
    assert consumed < 100_000, f"map consumed {consumed} inputs to produce 5 results"
    # An endless input works too: only what is asked for is taken.
    assert list(itertools.islice(pool.map(square, itertools.count()), 3)) == [0, 1, 4]


def test_map_timeout_raises_timeout_error(pool, beacon):
    results = pool.map(blocking, [beacon], [1], timeout=0.3)
    beacon.started(1)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        next(results)
    assert time.monotonic() - start < 5
    beacon.release()


@pytest.mark.parametrize("chunksize", [None, 1, 3, 100])
def test_map_raises_at_the_failing_item(pool, chunksize):
    results = pool.map(fail_at, range(10), [6] * 10, chunksize=chunksize)
    assert [next(results) for _ in range(6)] == [0, 10, 20, 30, 40, 50]
    with pytest.raises(ValueError, match="item 6 is bad"):
        next(results)


def test_map_over_one_iterable_passes_each_item_whole(pool):
    # One iterable travels as a plain list of items (no argument tuples):
    # an item that is itself a tuple must still arrive as one argument.
    items = [(1, 2), (3,), "abcd", [0] * 5, ()]
    assert list(pool.map(len, items)) == [2, 1, 4, 5, 0]
    assert sorted(pool.imap_unordered(len, items)) == [0, 1, 2, 4, 5]
    # Errors name the item as the call it is.
    import threading

    with pytest.raises(ironpool.SerializationError, match=r"of len\(<unlocked _thread\..*\) \(or a neighbour"):
        list(pool.map(len, [threading.Lock()]))


def test_closing_a_map_withdraws_what_has_not_started(beacon):
    with ironpool.Pool(1) as pool:
        results = pool.map(blocking, [beacon] * 20, range(20), chunksize=1)
        beacon.started(1)
        results.close()  # like a generator's close(): the rest is withdrawn
        beacon.release(20)
        with pytest.raises(StopIteration):
            next(results)
        pool.shutdown(wait=True)
        assert sum(w.tasks_done for w in pool.stats()) <= 2


def test_starmap(pool):
    assert list(pool.starmap(pow, [(2, 3), (3, 2), (10, 0)])) == [8, 9, 1]
    assert list(pool.starmap(add, ((i, i) for i in range(5)), chunksize=2)) == [0, 2, 4, 6, 8]


def test_imap_unordered_yields_in_completion_order(pool, beacon):
    items = [beacon, 1, 2, 3]

    def fn(x):
        return blocking(x, "slow") if isinstance(x, Beacon) else x

    results = pool.imap_unordered(fn, items, chunksize=1, timeout=20)
    beacon.started(1)
    # The blocked item must not hold up the others: the second worker is free.
    first_three = {next(results) for _ in range(3)}
    assert first_three == {1, 2, 3}
    beacon.release()
    assert next(results) == "slow"
    with pytest.raises(StopIteration):
        next(results)


def test_imap_unordered_returns_everything(pool):
    assert sorted(pool.imap_unordered(square, range(100))) == [i * i for i in range(100)]


# --- shutdown and context manager -------------------------------------------


def test_shutdown_cancel_futures_cancels_queued_and_finishes_running(beacon):
    pool = ironpool.Pool(2)
    try:
        running = two_running(pool, beacon)
        queued = [pool.submit(square, i) for i in range(8)]
        pool.shutdown(wait=False, cancel_futures=True)
        cancelled = [f for f in queued if f.cancelled()]
        # The stdlib too may already have handed one or two calls to workers.
        assert len(cancelled) >= 6, [f.cancelled() for f in queued]
        beacon.release(2)
        assert [f.result(timeout=30) for f in running] == [0, 1]
        for i, f in enumerate(queued):
            assert f.cancelled() or f.result(timeout=30) == i * i
        pool.shutdown(wait=True)
    finally:
        pool.terminate()


def test_future_states_follow_the_stdlib(pool, beacon):
    fut = pool.submit(blocking, beacon, "x")
    beacon.started(1)
    assert fut.running() and not fut.done()
    assert "running" in repr(fut)
    assert fut.cancel() is False, "a running task cannot be cancelled (stdlib semantics)"
    assert not fut.cancelled()
    beacon.release()
    assert fut.result(timeout=30) == "x"
    assert "finished" in repr(fut)


def test_cancel_queued_future(beacon):
    with ironpool.Pool(1) as pool:
        first = pool.submit(blocking, beacon, 1)
        beacon.started(1)
        queued = [pool.submit(square, i) for i in range(4)]
        assert queued[-1].cancel() is True
        assert queued[-1].cancelled()
        with pytest.raises(cf.CancelledError):
            queued[-1].result()
        beacon.release()
        assert first.result(timeout=30) == 1
        assert [f.result(timeout=30) for f in queued[:-1]] == [0, 1, 4]


def test_shutdown_cancel_futures_leaves_only_running_or_cancelled(beacon):
    # stdlib: cancel_futures cancels every future "the executor has not started
    # running"; a future not cancelled is therefore running.
    pool = ironpool.Pool(2)
    try:
        two_running(pool, beacon)
        queued = [pool.submit(square, i) for i in range(8)]
        pool.shutdown(wait=False, cancel_futures=True)
        states = [(f.cancelled(), f.running(), f.done()) for f in queued]
        assert all(c or r or d for c, r, d in states), states
        beacon.release(2)
    finally:
        beacon.release(2)
        pool.terminate()


def test_long_tasks_on_a_fresh_pool_run_in_parallel(beacon):
    # Two long tasks submitted at once to a new two-worker pool both start.
    pool = ironpool.Pool(2)
    try:
        futs = [pool.submit(blocking, beacon, i) for i in range(2)]
        pids = beacon.started(2, timeout=10)
        assert len(set(pids)) == 2
        beacon.release(2)
        assert [f.result(timeout=30) for f in futs] == [0, 1]
    finally:
        pool.terminate()


def test_queued_task_does_not_wait_behind_a_long_one_while_a_worker_is_free(pool, beacon):
    long_a, long_b = two_running(pool, beacon)
    short = [pool.submit(square, i) for i in range(4)]
    # Not synchronisation: the long tasks must be long. The engine measures
    # a task kind from its first completion, and queues work behind a running
    # task of a kind measured under 2 ms (prefetch), as designed.
    time.sleep(0.01)
    beacon.release(1)  # one of the long tasks ends; its worker is free
    done, _ = cf.wait(short, timeout=10)
    assert len(done) == 4, "short tasks stuck behind a running long task while another worker idles"
    beacon.release(1)
    assert {long_a.result(timeout=30), long_b.result(timeout=30)} == {0, 1}


def test_results_queued_before_a_long_task_arrive_while_it_runs(beacon):
    # A map's tiny chunks go to a worker dozens at a time, in one frame, after
    # which its channel is muted until it rings (after half of the frame, and
    # at its end). One that runs long must not hold back those before it.
    with ironpool.Pool(1) as pool:
        assert list(pool.starmap(tiny_or_wait, [(i, None) for i in range(300)], chunksize=1)) == list(range(300))
        # While the worker is held, the map's chunks wait in the pool; once
        # it is free, they go to it in one frame.
        held = pool.submit(blocking, beacon, "held")
        beacon.started(1)
        items = [(i, beacon if i == 12 else None) for i in range(32)]
        results = pool.starmap(tiny_or_wait, items, chunksize=1, timeout=20)
        beacon.release()
        try:
            assert held.result(timeout=10) == "held"
            beacon.started(1)
            assert [next(results) for _ in range(12)] == list(range(12))  # TimeoutError if held back
        finally:
            beacon.release()
        assert list(results) == list(range(12, 32))


def test_shutdown_without_cancel_runs_queued_work():
    pool = ironpool.Pool(1)
    futs = [pool.submit(sleepy_identity, i, 0.01) for i in range(5)]
    pool.shutdown(wait=True)
    assert all(f.done() for f in futs)
    assert [f.result() for f in futs] == list(range(5))


def test_submit_after_shutdown_raises_pool_closed():
    pool = ironpool.Pool(1)
    assert pool.submit(square, 2).result(timeout=30) == 4
    pool.shutdown()
    pool.shutdown()  # twice is fine
    with pytest.raises(ironpool.PoolClosed):
        pool.submit(square, 2)
    with pytest.raises(RuntimeError):  # PoolClosed is a RuntimeError, like the stdlib's error
        pool.submit(square, 2)
    with pytest.raises(ironpool.PoolClosed):
        list(pool.map(square, [1]))


def test_context_manager_waits_for_work_and_closes():
    with ironpool.Pool(2) as pool:
        futs = [pool.submit(sleepy_identity, i, 0.02) for i in range(6)]
    assert all(f.done() for f in futs)
    assert [f.result() for f in futs] == list(range(6))
    with pytest.raises(ironpool.PoolClosed):
        pool.submit(square, 1)


def test_is_an_executor():
    assert issubclass(ironpool.Pool, cf.Executor)


# --- initializer -------------------------------------------------------------


def test_initializer_gives_each_worker_its_own_state(tmp_path):
    # P3/P5: per-worker parser built by the initializer; configuration goes to
    # the workers through initargs (the documented way), not through globals.
    log = tmp_path / "init.log"
    config = {"mode": "strict", "sep": ";"}
    with ironpool.Pool(2, initializer=make_parser, initargs=(config, str(log))) as pool:
        out = list(pool.map(parse_in_worker, [f"{i};{i + 1}" for i in range(40)], chunksize=1))
        # A worker can have run its initializer, and no item, before the
        # template's report of its fork is read (pid 0 until then).
        assert wait_until(lambda: all(w.pid for w in pool.stats()), timeout=30), list(pool.stats())
        pids_from_stats = {w.pid for w in pool.stats()}
    assert [r[3] for r in out] == [[i, i + 1] for i in range(40)]
    assert {r[2] for r in out} == {"strict"}
    parser_of = {}
    for pid, parser_id, _, _ in out:
        parser_of.setdefault(pid, set()).add(parser_id)
    assert all(len(ids) == 1 for ids in parser_of.values()), parser_of  # one parser per worker, kept
    init_pids = [int(x) for x in log.read_text().split()]
    assert len(init_pids) == len(set(init_pids)), "the initializer ran twice in one worker"
    assert set(parser_of) <= set(init_pids)
    assert set(init_pids) <= pids_from_stats | set(parser_of)


def test_parent_global_changes_are_not_needed_with_initargs(tmp_path):
    # P5: a parent-side change to a module global after import is invisible to
    # workers (they import the module afresh); initargs carries it.
    global INIT_LOG
    old, INIT_LOG = INIT_LOG, "changed in the parent"
    try:
        initargs = ({"mode": INIT_LOG, "sep": ","}, str(tmp_path / "l"))
        with ironpool.Pool(1, initializer=make_parser, initargs=initargs) as p:
            assert p.submit(parse_in_worker, "1,2").result(timeout=30)[2:] == ("changed in the parent", [1, 2])
    finally:
        INIT_LOG = old


def test_initializer_that_raises_fails_futures_without_endless_respawn(tmp_path):
    log = tmp_path / "init.log"
    pool = ironpool.Pool(2, initializer=failing_initializer, initargs=(str(log),))
    try:
        futs = [pool.submit(square, i) for i in range(4)]
        for f in futs:
            err = f.exception(timeout=30)
            assert isinstance(err, ironpool.WorkerStartError), repr(err)
            assert isinstance(err, BrokenProcessPool)  # as the stdlib reports a failed initializer
            assert "cannot open the database" in str(err)
        with pytest.raises(ironpool.WorkerStartError):
            pool.submit(square, 1).result(timeout=30)
        # Respawning stops: the initializer is not called over and over (workers
        # forked just before the pool gave up may still report in).
        counts = [len(log.read_text().split())]
        for _ in range(4):
            time.sleep(0.4)  # observing an absence of calls: there is no event to wait for
            counts.append(len(log.read_text().split()))
        assert counts[-1] == counts[-2] == counts[-3], f"initializer still being retried: {counts}"
        assert counts[-1] <= 8, f"initializer called {counts[-1]} times for a 2-worker pool"
    finally:
        pool.shutdown(wait=True)


# --- argument validation -------------------------------------------------------


@pytest.mark.parametrize("workers", [0, -1, 1.5, "2", True])
def test_bad_worker_count_is_named(workers):
    with pytest.raises((ValueError, TypeError), match="workers"):
        ironpool.Pool(workers)


def test_bad_arguments_are_named(pool):
    with pytest.raises(ValueError, match="chunksize"):
        pool.map(square, range(3), chunksize=0)
    with pytest.raises(ValueError, match="chunksize"):
        pool.map(square, range(3), chunksize=-2)
    with pytest.raises(TypeError, match="callable"):
        pool.submit(42)
    with pytest.raises(TypeError, match="callable"):
        pool.map("not a function", range(3))
    with pytest.raises(TypeError, match="initializer"):
        ironpool.Pool(1, initializer=5)
    with pytest.raises(TypeError, match="initargs"):
        ironpool.Pool(1, initializer=square, initargs=5)
    with pytest.raises(ValueError, match="timeout"):
        pool.map(square, range(3), timeout=-1)
    # The pool is still fine after refusing bad calls.
    assert pool.submit(square, 4).result(timeout=30) == 16


# --- who delivers results: the caller that waits, or the results thread ----


def _on_done(future: cf.Future) -> threading.Event:
    got = threading.Event()
    future.add_done_callback(lambda _f: got.set())
    return got


def test_results_nobody_waits_on_settle_while_a_caller_waits_and_after_it_stops(pool, beacon):
    """While a caller waits in ``result()`` it takes every completion (the
    results thread leaves them to it); once it stops waiting, the results
    thread settles what arrives. Neither way may strand a result."""
    blocked = pool.submit(blocking, beacon, "late")
    beacon.started(1)
    with pytest.raises(cf.TimeoutError):
        blocked.result(timeout=0.05)  # waited, then stopped waiting
    after_wait = pool.submit(square, 3)
    assert _on_done(after_wait).wait(10), "a result arriving after a caller stopped waiting was not delivered"

    waiter = threading.Thread(target=blocked.result)  # waits (drives) until released
    waiter.start()
    try:
        during_wait = [pool.submit(square, i) for i in range(50)]
        for f in during_wait:
            assert _on_done(f).wait(10), "a result arriving while another caller waited was not delivered"
        assert waiter.is_alive(), "the waiting caller was meant to still be waiting"
        assert [f.result() for f in during_wait] == [i * i for i in range(50)]
    finally:
        beacon.release()
        waiter.join(10)
    assert blocked.result(timeout=10) == "late"
    assert after_wait.result() == 9
