"""Send once (pitfall P10): an object passed to many tasks crosses to each
worker once, automatically or through ``pool.share()``, and never hands a task
stale, foreign or half-built data."""

from __future__ import annotations

import functools
import pickle
import threading

import ironpool
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from _zc_support import (
    MIB,
    Flaky,
    LoadsOnlyHere,
    ReleasesWhilePickled,
    array_sum,
    columns_then_add_one,
    fail_once_then_read,
    first_sum,
    frame_sum_then_scribble,
    ident,
    inode_and_writable,
    keys_then_add_one,
    memfd_inodes,
    mutate_then_sum,
    segment_inode,
    stash,
    sum_after_wait,
    value_at,
    wait_for,
    write_one_read_other,
)


def _inodes_and_sums(pool, arg, n=4):
    futs = [(pool.submit(segment_inode, arg), pool.submit(array_sum, arg)) for _ in range(n)]
    return {f.result(timeout=60) for f, _ in futs}, {g.result(timeout=60) for _, g in futs}


@pytest.fixture(scope="module")
def pool():
    with ironpool.Pool(2) as p:
        yield p


# --- automatic send-once is exact -------------------------------------------------


def test_unchanged_read_only_array_travels_once(pool):
    a = np.arange(4 * MIB // 8, dtype="f8")
    a.flags.writeable = False
    inodes, sums = _inodes_and_sums(pool, a)
    assert sums == {float(a.sum())}
    assert len(inodes) == 1 and None not in inodes, f"sent more than once: segments {inodes}"


def test_read_only_array_written_through_an_older_view_is_sent_anew(pool):
    a = np.zeros(4 * MIB // 8)
    alias = a[:]  # writable, made before a was frozen
    a.flags.writeable = False
    first, _ = _inodes_and_sums(pool, a, 2)
    alias[:] = 2.0
    second, sums = _inodes_and_sums(pool, a, 2)
    assert sums == {2.0 * a.size}, "a task saw the array as it was before the write"
    assert first.isdisjoint(second)


def test_array_made_writable_changed_and_frozen_again_is_sent_anew(pool):
    a = np.ones(4 * MIB // 8)
    a.flags.writeable = False
    assert pool.submit(array_sum, a).result(timeout=60) == a.size
    a.flags.writeable = True
    a[123] = 1000.0
    a.flags.writeable = False
    assert pool.submit(array_sum, a).result(timeout=60) == a.size + 999.0


def test_arrow_array_over_numpy_memory_changed_underneath_is_sent_anew(pool):
    backing = np.arange(4 * MIB // 8, dtype="i8")
    arr = pa.array(backing)
    assert arr.buffers()[1].address == backing.ctypes.data, "pyarrow copied: the test needs a zero-copy array"
    assert pool.submit(array_sum, arr).result(timeout=60) == float(backing.sum())
    backing[:] = 1
    assert pool.submit(array_sum, arr).result(timeout=60) == float(backing.size)


def test_writable_array_passed_to_many_tasks_travels_once_and_arrives_writable(pool):
    a = np.arange(4 * MIB // 8, dtype="f8")
    got = [f.result(timeout=60) for f in [pool.submit(inode_and_writable, a) for _ in range(6)]]
    inodes = [inode for inode, _ in got]
    assert None not in inodes
    # One copy, mapped by every task.
    assert len(set(inodes)) == 1, inodes
    assert all(writable for _, writable in got), "a writable argument must arrive writable"
    sums = [f.result(timeout=60) for f in [pool.submit(mutate_then_sum, a) for _ in range(6)]]
    assert sums == [float(a.sum())] * 6, "a task's writes reached another task"
    assert a[0] == 0.0


def test_an_argument_a_task_kept_is_never_handed_to_the_next_task():
    """Workers reuse a writable argument's mappings for the next task only
    when nothing refers to them any more: a task that keeps its argument and
    writes into it later must not change what another task got."""
    a = np.ones(4 * MIB // 8)
    with ironpool.Pool(1) as p:
        futs = [
            p.submit(stash, a, "first"),
            p.submit(stash, a, "second"),
            p.submit(write_one_read_other, a, "first", "second"),
        ]
        assert [f.result(timeout=60) for f in futs] == [a.size] * 3


def test_writable_array_changed_between_submits_is_sent_anew(pool):
    a = np.ones(4 * MIB // 8)
    futs = [pool.submit(array_sum, a) for _ in range(3)]
    a[:] = 3.0
    futs += [pool.submit(array_sum, a) for _ in range(3)]
    assert [f.result(timeout=60) for f in futs] == [a.size] * 3 + [3.0 * a.size] * 3


def test_dataframe_passed_to_many_tasks_travels_once_and_each_task_gets_its_own(pool):
    df = pd.DataFrame({"a": np.arange(200_000.0), "b": np.ones(200_000), "s": ["x"] * 200_000})
    df = df[["a", "b"]]
    inodes = [f.result(timeout=60) for f in [pool.submit(segment_inode, df) for _ in range(5)]]
    assert None not in inodes and len(set(inodes)) == 1, inodes
    want = float(df.to_numpy().sum())
    futs = [pool.submit(frame_sum_then_scribble, df) for _ in range(8)]
    assert [f.result(timeout=60) for f in futs] == [want] * 8
    assert list(df.columns) == ["a", "b"] and float(df.to_numpy().sum()) == want


def test_an_array_written_by_another_thread_while_it_is_first_sent_is_never_reused_stale(pool):
    """The copy and the digest of a first send must describe the same bytes
    even while another thread writes into the array; else a later, quiet
    re-send whose bytes match the digest would get the torn copy."""
    k = 3_000_000
    stale = []
    for _ in range(15):
        a = np.zeros(4_000_000)
        stop = threading.Event()

        def toggle(a=a, stop=stop):
            while not stop.is_set():
                for _ in range(1000):
                    a[k] = 1.0
                    a[k] = 0.0

        writer = threading.Thread(target=toggle)
        writer.start()
        first = pool.submit(value_at, a, k)  # races the writer
        stop.set()
        writer.join()
        a[k] = 0.0
        got = pool.submit(value_at, a, k).result(timeout=60)
        first.result(timeout=60)
        if got != 0.0:
            stale.append(got)
    assert not stale, f"a quiet re-send reused a torn first copy {len(stale)} times in 15"


def test_large_bytes_passed_to_many_tasks_travel_once(pool):
    blob = bytes(range(256)) * (16 * 1024)  # 4 MiB, pickled in-band
    auto = pool._backend.auto_share
    futs = [pool.submit(len, blob) for _ in range(6)]
    assert [f.result(timeout=60) for f in futs] == [len(blob)] * 6
    assert [e.value is blob for e in auto._entries.values()].count(True) == 1, "bytes were not sent once"


@pytest.mark.parametrize("how", ["raise", "crash"])
def test_a_retry_sees_the_arguments_as_first_submitted(tmp_path, beacon, how):
    a = np.zeros(MIB // 8)
    with ironpool.Pool(1, retries=1, retry_on=(Flaky,)) as p:
        fut = p.submit(fail_once_then_read, a, str(tmp_path / "m"), beacon, how)
        beacon.started(1)
        a[0] = 99.0  # after the submit, before the retry
        beacon.release()
        assert fut.result(timeout=60) == 0.0


def test_map_items_rerun_after_a_crash_see_what_their_chunk_got(tmp_path, beacon):
    a = np.zeros(MIB // 8)
    fn = functools.partial(fail_once_then_read, marker=str(tmp_path / "m"), beacon=beacon, how="crash")
    with ironpool.Pool(1) as p:
        results = p.map(fn, [a] * 4, chunksize=4)
        beacon.started(1)
        a[0] = 42.0  # while the chunk runs; its worker then dies
        beacon.release()
        assert list(results) == [0.0] * 4


# --- handles belong to one pool and live until released ---------------------------


def test_handle_of_another_pool_is_refused_with_a_clear_error(pool):
    with ironpool.Pool(1) as other:
        theirs = other.share(np.full(MIB // 8, 7.0))
        # Ids are counted per pool: this pool has an object under the same id.
        fut = pool.submit(array_sum, theirs)
        with pytest.raises(ironpool.SerializationError, match="another pool"):
            fut.result(timeout=60)
        assert other.submit(array_sum, theirs).result(timeout=60) == 7.0 * (MIB // 8)


def test_release_waits_for_the_tasks_already_submitted(pool, beacon):
    handle = pool.share(np.ones(MIB // 8))
    futs = [pool.submit(sum_after_wait, handle, beacon) for _ in range(6)]
    beacon.started(2)  # two running, four queued
    handle.release()
    beacon.release(6)
    assert [f.result(timeout=60) for f in futs] == [MIB // 8] * 6
    with pytest.raises(ironpool.SerializationError, match="was released"):
        pool.submit(array_sum, handle).result(timeout=60)


def test_unpicklable_frame_is_reported_as_the_tasks_argument(pool):
    df = pd.DataFrame({"x": np.zeros(100_000), "o": [threading.Lock()] + [None] * 99_999})
    err = pool.submit(len, df).exception(timeout=60)
    assert isinstance(err, ironpool.SerializationError), repr(err)
    assert "the arguments of len(" in str(err) and "lock" in str(err).lower(), str(err)


def test_release_waits_for_a_retry_of_a_call_submitted_before_it(tmp_path, beacon):
    with ironpool.Pool(1, retries=1, retry_on=(Flaky,)) as p:
        handle = p.share(np.full(MIB // 8, 5.0))
        fut = p.submit(fail_once_then_read, handle, str(tmp_path / "m"), beacon, "raise")
        beacon.started(1)
        handle.release()  # the first attempt is running; its retry is still to come
        beacon.release()
        assert fut.result(timeout=60) == 5.0


def test_release_waits_for_the_rest_of_a_map_started_before_it(tmp_path, beacon):
    fn = functools.partial(fail_once_then_read, marker=str(tmp_path / "m"), beacon=beacon, how="crash")
    with ironpool.Pool(1) as p:
        handle = p.share(np.full(MIB // 8, 7.0))
        results = p.map(fn, [handle] * 3, chunksize=3)
        beacon.started(1)
        handle.release()  # the chunk's worker dies next: its items are re-run one by one
        beacon.release()
        assert list(results) == [7.0] * 3
        with pytest.raises(ironpool.SerializationError, match="was released"):
            list(p.map(array_sum, [handle]))


def _workers_hold_no_segment(pool) -> bool:
    return wait_for(lambda: not any(memfd_inodes(w.pid) for w in pool.stats()))


def test_a_map_closed_before_it_started_lets_go_of_its_handles():
    with ironpool.Pool(1) as p:
        handle = p.share(np.ones(MIB // 8))
        results = p.map(array_sum, [handle] * 4, chunksize=2)
        results.close()
        del results
        handle.release()
        assert _workers_hold_no_segment(p), "a released handle is still held by a closed map"


def test_a_map_iterated_by_a_for_loop_runs_to_the_end_then_lets_go():
    """A for loop keeps only the iterator of map's result: the result object
    itself is dropped at once, which must not end the map."""
    with ironpool.Pool(1) as p:
        handle = p.share(np.ones(MIB // 8))
        got = []
        for r in p.map(array_sum, [handle] * 5, chunksize=1):
            got.append(r)
        assert got == [MIB // 8] * 5
        handle.release()
        assert _workers_hold_no_segment(p)


def test_a_map_whose_input_fails_lets_go_of_its_handles():
    with ironpool.Pool(1) as p:
        handle = p.share(np.ones(MIB // 8))

        def items():
            yield handle
            yield handle
            raise ValueError("input broke")

        with pytest.raises(ValueError, match="input broke"):
            p.map(array_sum, items(), chunksize=1)
        handle.release()
        assert _workers_hold_no_segment(p), "a released handle is still held by a failed map"


def test_release_during_the_pickling_of_a_call_that_holds_the_handle(pool):
    handle = pool.share(np.full(MIB // 8, 2.0))
    fut = pool.submit(first_sum, handle, ReleasesWhilePickled(handle))
    assert fut.result(timeout=60) == 2.0 * (MIB // 8)
    with pytest.raises(ironpool.SerializationError, match="was released"):
        pool.submit(first_sum, handle).result(timeout=60)


def test_handle_pickled_outside_a_task_is_refused(pool):
    handle = pool.share(b"x" * MIB)
    with pytest.raises(ironpool.SerializationError, match="only be pickled as a task argument"):
        pickle.dumps(handle)


def test_released_handle_says_so(pool):
    handle = pool.share(np.ones(MIB // 8))
    assert pool.submit(array_sum, handle).result(timeout=60) == MIB // 8
    handle.release()
    with pytest.raises(ironpool.SerializationError, match="was released"):
        pool.submit(array_sum, handle).result(timeout=60)
    with pytest.raises(ironpool.SerializationError, match="was released"):
        list(pool.map(array_sum, [handle]))


def test_shared_object_a_worker_cannot_unpickle_fails_its_tasks():
    with ironpool.Pool(1) as p:
        handle = p.share({"data": np.ones(MIB // 8), "broken": LoadsOnlyHere()})
        for _ in range(2):  # and every later task too, not just the first
            with pytest.raises(ironpool.SerializationError, match="could not be unpickled in the worker") as info:
                p.submit(ident, handle).result(timeout=60)
            assert "cannot be rebuilt outside process" in str(info.value)
        assert p.submit(ident, 5).result(timeout=60) == 5


# --- each task gets its own shared object ----------------------------------------


def test_a_task_adding_a_key_to_a_shared_dict_changes_nothing_for_the_next():
    with ironpool.Pool(1) as p:
        handle = p.share({"x": np.ones(MIB // 8)})
        keys = [p.submit(keys_then_add_one, handle).result(timeout=60) for _ in range(3)]
    assert keys == [["x"]] * 3


def test_a_task_adding_a_column_to_a_shared_frame_changes_nothing_for_the_next():
    df = pd.DataFrame({"a": np.arange(200_000.0), "b": np.ones(200_000)})
    with ironpool.Pool(1) as p:
        handle = p.share(df)
        cols = [p.submit(columns_then_add_one, handle).result(timeout=60) for _ in range(3)]
        # One item per chunk: within a chunk, items given the same handle
        # share one object, as pickle's memo has it (docs/decisions.md).
        cols += list(p.map(columns_then_add_one, [handle] * 3, chunksize=1))
    assert cols == [["a", "b"]] * 6
    assert list(df.columns) == ["a", "b"]


def test_reuse_hands_each_task_on_a_worker_the_same_object():
    with ironpool.Pool(1) as p:
        handle = p.share({"x": np.ones(MIB // 8)}, reuse=True)
        first = p.submit(keys_then_add_one, handle).result(timeout=60)
        second = p.submit(keys_then_add_one, handle).result(timeout=60)
    assert first == ["x"]
    assert second == ["added_by_a_task", "x"], "reuse=True documents that changes persist on the worker"
