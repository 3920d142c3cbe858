"""``map``'s per-item errors (``return_exceptions``) and progress
(``progress``), with real raises, segfaults and kill timeouts mixed in."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import ironpool
import pytest
from maplib import Box, big_text, blocked, mixed, result_unpicklable_at, stop_at_3, tiny_then_mixed, unbox
from tqdm import tqdm


@pytest.fixture(scope="module")
def pool():
    with ironpool.Pool(2, task_timeout=2.0) as p:
        yield p


def check_mixed(results: list, items: range) -> None:
    for x, got in zip(items, results, strict=True):
        if x == 13:
            assert isinstance(got, ironpool.WorkerCrashed) and got.signal == signal.SIGSEGV, got
        elif x == 17:
            assert isinstance(got, ironpool.TaskTimeout), got
        elif x % 7 == 0 and x:
            assert isinstance(got, ValueError) and str(got) == f"bad {x}", got
        else:
            assert got == x * 10


@pytest.mark.parametrize("chunksize", [None, 1, 4])
def test_return_exceptions_keeps_every_other_result(pool, chunksize):
    items = range(30)
    results = list(pool.map(mixed, items, return_exceptions=True, chunksize=chunksize))
    check_mixed(results, items)


def test_items_queued_deep_behind_each_other_keep_their_own_outcomes(pool):
    # Once its items are known to take µs, the engine queues dozens of them
    # per worker and sends them in batch frames: a segfault, a hang past the
    # time limit and raises among them still fail only their own items.
    results = list(pool.map(tiny_then_mixed, range(1030), chunksize=1, return_exceptions=True))
    assert results[:1000] == [x * 10 for x in range(1000)]
    check_mixed([r - 10_000 if isinstance(r, int) else r for r in results[1000:]], range(30))


def test_return_exceptions_starmap_and_unordered(pool):
    items = range(20)
    check_mixed(list(pool.starmap(mixed, [(x,) for x in items], return_exceptions=True)), items)
    got = list(pool.imap_unordered(mixed, items, return_exceptions=True, chunksize=3))
    assert len(got) == 20
    assert sorted(v for v in got if isinstance(v, int)) == [x * 10 for x in items if x not in (7, 13, 14, 17)]
    kinds = sorted(type(v).__name__ for v in got if not isinstance(v, int))
    assert kinds == ["TaskTimeout", "ValueError", "ValueError", "WorkerCrashed"]


def test_return_exceptions_isolates_a_result_that_cannot_be_pickled(pool):
    got = list(pool.map(result_unpicklable_at, range(8), chunksize=8, return_exceptions=True))
    assert got[:4] == [0, 1, 2, 3] and got[5:] == [5, 6, 7]
    assert isinstance(got[4], ironpool.SerializationError)
    assert "Unpicklable" in str(got[4])


def test_without_return_exceptions_the_first_error_ends_the_map(pool):
    it = pool.map(mixed, range(10), chunksize=2)
    assert [next(it) for _ in range(7)] == [x * 10 for x in range(7)]
    with pytest.raises(ValueError, match="bad 7"):
        next(it)


@pytest.mark.parametrize("chunksize", [None, 1, 7])
def test_lists_and_ranges_are_cut_by_slicing_without_losing_an_item(pool, chunksize):
    """A list or range input is cut into chunks by slicing (a range's chunk
    travels as a range): every item comes back once, in order, whatever the
    step, sign or length."""
    inputs = [range(0), range(1), range(5, 500, 3), range(400, -400, -7), [], list(range(-50, 333)),
              [("a", 1), None, 2.5] * 40]
    for items in inputs:
        assert list(pool.map(repr, items, chunksize=chunksize)) == [repr(x) for x in items]
    assert sorted(pool.imap_unordered(abs, range(-300, 300, 2), chunksize=chunksize)) == sorted(
        abs(x) for x in range(-300, 300, 2)
    )


@pytest.mark.parametrize("chunksize", [1, 5])
def test_an_item_raising_stopiteration_is_an_error_not_the_end_of_its_chunk(pool, chunksize):
    it = pool.map(stop_at_3, range(10), chunksize=chunksize)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError) as info:  # a generator's StopIteration, as ProcessPoolExecutor.map gives
        next(it)
    assert isinstance(info.value.__cause__, StopIteration)
    out = list(pool.map(stop_at_3, range(10), chunksize=chunksize, return_exceptions=True))
    assert out[:3] == [0, 1, 2] and out[4:] == list(range(4, 10))
    assert isinstance(out[3], StopIteration)


def test_a_long_string_handed_out_is_not_kept_by_the_iterator(pool):
    """Values are let go of as they are handed out, inside a chunk too;
    only lists of small atoms go out through a plain iterator."""
    it = iter(pool.map(big_text, range(4), chunksize=4))
    value = next(it)
    assert len(value) == 1_000_000
    assert sys.getrefcount(value) == 2  # this name and the call's argument: the chunk no longer holds it


def test_a_list_input_is_let_go_of_once_it_is_cut(pool):
    import gc
    import weakref

    boxes = [Box(i) for i in range(50)]
    refs = [weakref.ref(b) for b in boxes]
    it = pool.map(unbox, boxes, chunksize=7)
    del boxes
    assert list(it) == list(range(50))
    gc.collect()
    assert sum(r() is not None for r in refs) == 0  # `it` is alive; the items are not


def test_results_that_arrive_together_come_out_in_order_and_before_the_error(pool):
    """Chunks already returned behind the one taken are handed out with it;
    values up to a failing item still come first, then its error, and a
    worker crash further on is met when the map gets there."""
    for _ in range(3):
        it = pool.map(mixed, range(12), chunksize=1)
        assert [next(it) for _ in range(7)] == [x * 10 for x in range(7)]
        with pytest.raises(ValueError, match="bad 7"):
            next(it)
    # 200 tiny chunks, then a crash (13) in the last one.
    items = [1] * 200 + [13]
    it = pool.map(mixed, items, chunksize=1, return_exceptions=True)
    out = list(it)
    assert out[:200] == [10] * 200
    assert isinstance(out[200], ironpool.WorkerCrashed)


def test_an_item_exception_keeps_its_remote_traceback(pool):
    (err,) = [v for v in pool.map(mixed, [7], return_exceptions=True)]
    assert isinstance(err, ValueError)
    assert 'in mixed\n    raise ValueError(f"bad {x}")' in str(err.__cause__)


def progress_bar(total=None) -> tuple[tqdm, io.StringIO]:
    stream = io.StringIO()
    return tqdm(total=total, file=stream, mininterval=0), stream


@pytest.mark.parametrize("chunksize", [None, 1, 7])
def test_progress_counts_every_item_of_a_sized_input(pool, chunksize):
    bar, stream = progress_bar()
    assert sum(pool.map(abs, range(1000), chunksize=chunksize, progress=bar)) == sum(range(1000))
    assert bar.n == 1000 and bar.total == 1000
    assert "1000/1000" in stream.getvalue()


def test_progress_counts_a_generator_without_a_length(pool):
    bar, stream = progress_bar()
    assert len(list(pool.imap_unordered(abs, (x for x in range(500)), progress=bar))) == 500
    assert bar.n == 500 and bar.total is None
    assert "500it" in stream.getvalue().replace(" ", "")


def test_progress_callback_sees_done_and_total(pool):
    calls: list[tuple[int, int | None]] = []
    lock = threading.Lock()

    def seen(done, total):
        with lock:
            calls.append((done, total))

    list(pool.starmap(pow, [(x, 2) for x in range(300)], chunksize=10, progress=seen))
    assert calls[-1] == (300, 300)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert len(calls) <= 30  # once per chunk, not per item


def test_progress_counts_failed_items_with_return_exceptions(pool):
    bar, _ = progress_bar()
    got = list(pool.map(mixed, range(20), return_exceptions=True, progress=bar))
    check_mixed(got, range(20))
    assert bar.n == 20


def test_progress_true_draws_a_bar_on_stderr(pool, capsys):
    assert list(pool.map(abs, range(50), progress=True)) == list(range(50))
    err = capsys.readouterr().err
    assert "50/50" in err and "map" in err


def test_progress_rejects_what_it_cannot_use(pool):
    with pytest.raises(TypeError, match="progress must be"):
        pool.map(abs, range(3), progress="yes")


def test_progress_bar_is_closed_when_the_map_is_abandoned(pool):
    bar, _ = progress_bar(total=None)
    it = pool.map(abs, range(100_000), chunksize=10, progress=bar)
    next(it)
    it.close()  # the caller's own bar stays open, and no later chunk is counted
    n = bar.n
    assert 1 <= n < 100_000
    assert not bar.disable


def test_tqdm_is_not_imported_unless_progress_is_asked_for():
    code = (
        "import sys, ironpool\n"
        "def f(x): return x\n"
        "with ironpool.Pool(1) as p: assert list(p.map(f, range(5), return_exceptions=True)) == list(range(5))\n"
        "assert 'tqdm' not in sys.modules, 'tqdm imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_stats_counts_the_pool_s_tasks(pool):
    before = pool.stats()
    list(pool.map(mixed, range(14), chunksize=1, return_exceptions=True))  # 7 raises, 13 segfaults
    after = pool.stats()
    assert after.submitted - before.submitted >= 14
    assert after.done - before.done == after.submitted - before.submitted
    assert after.failed - before.failed == 1  # the crash (a raise inside a chunk still returns its chunk)
    assert after.items_done - before.items_done == 14
    assert after.queued == 0 and after.running == 0
    assert len(after) == 2 and {w.slot for w in after} == {0, 1}  # still the per-worker list
    assert after.throughput > 0 and 0 <= after.utilisation <= 1 and after.mean_task_seconds > 0
    assert "PoolStats(workers=2" in repr(after)


def test_stats_shows_queued_and_running_tasks(tmp_path):
    fifos = [tmp_path / f"go{i}" for i in range(3)]
    for fifo in fifos:
        os.mkfifo(fifo)
    with ironpool.Pool(1) as p:
        futures = [p.submit(blocked, str(fifo)) for fifo in fifos]
        with open(fifos[0], "w") as gate:  # opens once the first task is reading
            s = p.stats()
            assert (s.submitted, s.running + s.queued, s.done) == (3, 3, 0)
            assert s.running >= 1
            gate.write("x")
        for fifo in fifos[1:]:
            with open(fifo, "w") as gate:
                gate.write("x")
        assert [f.result(timeout=30) for f in futures] == [1, 1, 1]
        s = p.stats()
        assert (s.done, s.failed, s.running, s.queued) == (3, 0, 0, 0)


def test_hint_when_chunks_are_far_shorter_than_dispatch(pool, monkeypatch):
    from ironpool import _insight

    monkeypatch.setattr(_insight, "_given", set())
    # Long enough to be judged (MIN_WALL_SECONDS, lowered here) up to ~500k items/s.
    monkeypatch.setattr(_insight, "MIN_WALL_SECONDS", 0.12)
    with pytest.warns(ironpool.PerformanceHint, match="chunks of 1 item"):
        for _ in pool.map(abs, range(60_000), chunksize=1):
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        list(pool.map(abs, range(20000), chunksize=1))


def test_hint_when_the_caller_s_loop_is_the_bottleneck(pool, monkeypatch):
    from ironpool import _insight

    monkeypatch.setattr(_insight, "_given", set())
    with pytest.warns(ironpool.PerformanceHint, match="that loop is the bottleneck"):
        for _ in pool.map(abs, range(8), chunksize=1):
            time.sleep(0.06)  # the caller's own work on each result


def test_no_hint_for_a_well_sized_map(pool, monkeypatch):
    from ironpool import _insight

    monkeypatch.setattr(_insight, "_given", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error", ironpool.PerformanceHint)
        assert len(list(pool.map(abs, range(200_000)))) == 200_000
        list(pool.map(time.sleep, [0.1] * 8))
