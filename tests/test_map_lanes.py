"""Map lanes (``crates/ironpool-py/src/lanes.rs``): a ``map``'s or an
``imap_unordered``'s small chunks of plain items go to the engine in one
call per window and come back without a ticket or a future each. These tests reach what is
the lane's own: the pickle it writes for a chunk, its fallback to tickets,
its place in the window among tickets, and how its chunks end when the
pool is stopped under it. Errors, crashes and time limits inside a lane
are the same tests as for any map (``test_executor``, ``test_faults``),
which run through lanes wherever their chunks are small and plain."""

from __future__ import annotations

import enum
import functools
import math
import os
import pickle
import signal
import threading
import time
from collections import OrderedDict, defaultdict
from concurrent.futures import CancelledError
from decimal import Decimal

import ironpool
import pytest
from conftest import Beacon, wait_until
from ironpool import _core
from ironpool.errors import PoolClosed


def identity(x):
    return x


def count_visits(d: dict) -> int:
    d.setdefault("visits", []).append(1)
    return len(d["visits"])


LAST_SEEN: list = [None]


def is_previous(x: object) -> bool:
    """Whether this item is the very object the worker's previous item was."""
    same, LAST_SEEN[0] = x is LAST_SEEN[0], x
    return same


def pack(*args):
    return args


def segv_at(x, bad):
    if x == bad:
        import ctypes

        ctypes.string_at(0)
    return x


def block_from(beacon: Beacon, first: int, x: int) -> int:
    """Returns at once below ``first``; from it, blocks until released."""
    if x >= first:
        beacon.notify(x)
        beacon.wait()
    return x


def hold_first(beacon: Beacon, first: object, x: object) -> object:
    """Blocks on ``first`` until released; every other item returns at once."""
    if x == first:
        beacon.notify(x)
        beacon.wait()
    return x


def crash_at_13_and_hold_12_when_rerun(beacon: Beacon, flag: str, x: int) -> int:
    """13 kills its worker; 12 returns at once the first time and, run
    again alone after that crash, waits for the beacon."""
    if x == 13:
        os._exit(3)
    if x == 12:
        if os.path.exists(flag):
            beacon.notify(x)
            beacon.wait()
        else:
            open(flag, "w").close()
    return x


def text_id(text: str, i: int) -> int:
    return id(text)


UNPICKLED = [0]


def _rebuilt_marker() -> Marker:
    UNPICKLED[0] += 1
    return Marker()


class Marker:
    """Counts, in the caller, how often a result holding one is unpickled."""

    def __reduce__(self):
        return (_rebuilt_marker, ())


def marker_or_raise(x: int) -> Marker:
    if x == 2:
        raise ValueError("item 2")
    return Marker()


def _rebuild_in(pid: int) -> int:
    if os.getpid() != pid:
        raise ValueError("this result rebuilds only in its worker")
    return pid


class Unreadable:
    """Pickles in a worker, fails to unpickle in the caller."""

    def __reduce__(self):
        return (_rebuild_in, (os.getpid(),))


def unreadable_at_5(x: int) -> object:
    return Unreadable() if x == 5 else x


class Colour(enum.IntEnum):
    RED = 1


EDGES = [
    0, 1, 255, 256, 65535, 65536, -1, -256, 2**31 - 1, -(2**31), 2**31, -(2**31) - 1, 2**40, 2**63 - 1, -(2**63),
    0.0, -0.0, 1.5, -2.25e-300, math.inf, -math.inf,
    "", "a", "é€😀", "x" * 255, "y" * 256, "z" * 70_000,
    None, True, False,
]
TUPLES = [(), (1,), (1, "a"), (1, 2.0, None), (1, 2, 3, 4), (b"",), (b"ab", 1), (b"q" * 300, "s", True, None, 7)]
CONTAINERS = [
    [], {}, [1, "a", None], {"id": 7, "name": "x" * 40, "tags": ["a", "b"], "score": 0.5},
    {1: (2, [3, {"k": None}]), (1, "t"): b"v", 2.5: [], False: {}}, (1, (2, (3, ((),)))), b"bare bytes",
    [[[[[[[[[[[[[[[1]]]]]]]]]]]]]]],  # 15 deep: within the limit
]


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def same(a: list, b: list) -> bool:
    """Equal, of the same types, and with the same sign of zero."""
    return a == b and [type(x) for x in a] == [type(x) for x in b] and all(
        math.copysign(1, x) == math.copysign(1, y) for x, y in zip(a, b, strict=True) if type(x) is float
    )


@pytest.mark.parametrize("items", [EDGES, TUPLES, CONTAINERS, [-0.0]], ids=["atoms", "tuples", "containers", "one"])
def test_the_lane_pickle_unpickles_to_the_items_exactly(items):
    data = _core.lane_pickle(items, 1 << 16)
    assert data is not None
    assert same(pickle.loads(data), items)


@pytest.mark.parametrize(
    "items",
    [[2**63], [-(2**63) - 1], ["\ud800"], [(b"x" * 16,)], [Colour.RED], [1.5, {"k": [b"x" * 16]}],
     [{1: Colour.RED}], [{Colour.RED: 1}], [[2**70]], [OrderedDict(a=1)], [defaultdict(list)], [{1}], [nested(17)]],
    ids=["int-above-64-bits", "int-below-64-bits", "lone-surrogate", "bytes-at-threshold", "int-subclass",
         "bytes-at-threshold-in-a-dict", "subclass-value", "subclass-key", "big-int-in-a-list", "ordered-dict",
         "defaultdict", "set", "nested-beyond-the-limit"],
)
def test_the_lane_pickle_leaves_to_pickle_what_only_it_writes(items):
    assert _core.lane_pickle(items, 16) is None


def test_the_lane_pickle_keeps_lists_and_dicts_that_appear_twice_or_in_themselves_one_object():
    shared, loop, dloop = {"a": 1}, [1], {"k": 0}
    loop.append(loop)
    dloop["self"] = dloop
    data = _core.lane_pickle([(shared, shared), shared, loop, dloop], 1 << 16)
    assert data is not None
    (a, b), c, back_loop, back_dloop = pickle.loads(data)
    assert a is b is c and a == shared
    assert back_loop[1] is back_loop and back_dloop["self"] is back_dloop
    # A tuple inside itself (through a list): only pickle keeps it one object.
    inner: list = []
    cycle = (inner,)
    inner.append(cycle)
    assert _core.lane_pickle([cycle], 1 << 16) is None
    back_inner = pickle.loads(_core.lane_pickle([inner], 1 << 16))[0]  # entered at the list: the memo closes it
    assert back_inner[0][0] is back_inner
    # A list that holds one list many times, many levels down, is walked once per object.
    wide: list = [1]
    for _ in range(12):
        wide = [wide] * 8
    assert _core.lane_pickle([wide], 1 << 16) is not None
    assert not _core.plain_items([wide], 1 << 16)  # the check gives up, and the encoder sends it


def test_the_lane_pickle_writes_a_tuple_held_many_times_once():
    # Ten levels of a tuple holding one tuple four times: 4**10 paths, 11 objects.
    dag: tuple = (1,)
    for _ in range(10):
        dag = (dag, dag, dag, dag)
    data = _core.lane_pickle([dag, dag], 1 << 16)
    assert data is not None and len(data) <= len(pickle.dumps([dag, dag], protocol=5))
    first, second = pickle.loads(data)
    assert first == dag and first is second and first[0] is first[3]


@pytest.mark.parametrize("chunksize", [1, 4])
def test_a_tuple_twice_in_a_chunk_is_one_object_in_the_worker_as_with_pickle(pool, chunksize):
    row = ([0], "row")
    expected = [False] * 4 if chunksize == 1 else [False, True, True, True]
    assert list(pool.map(is_previous, [row] * 4, chunksize=chunksize)) == expected


@pytest.mark.parametrize("chunksize", [1, 3])
def test_plain_items_of_every_kind_come_back_as_sent(pool, chunksize):
    assert same(list(pool.map(identity, EDGES, chunksize=chunksize)), EDGES)
    assert list(pool.starmap(pack, TUPLES, chunksize=chunksize)) == TUPLES
    assert list(pool.map(identity, CONTAINERS, chunksize=chunksize)) == CONTAINERS
    # Refused by the lane writer: the same map sends them as tickets.
    odd = [2**70, "\ud800", [Colour.RED], Colour.RED, -(2**80), OrderedDict(a=1), nested(20)]
    assert same(list(pool.map(identity, odd, chunksize=chunksize)), odd)


@pytest.mark.parametrize("chunksize", [1, 2])
def test_a_dict_twice_in_a_chunk_is_one_object_in_the_worker_as_with_pickle(pool, chunksize):
    # The stdlib pickles a chunk as one list: the worker sees one dict.
    d: dict = {"id": 1}
    expected = [1, 1, 1, 1] if chunksize == 1 else [1, 2, 1, 2]
    assert list(pool.map(count_visits, [d, d, d, d], chunksize=chunksize)) == expected
    assert d == {"id": 1}, "the caller's dict changed"


@pytest.mark.parametrize("chunksize", [1, 2])
def test_a_window_of_other_items_between_lanes_keeps_its_place(pool, chunksize):
    """Windows before and after the one with a Decimal go as lanes, that
    one as tickets; the map hands everything out in input order."""
    items: list = list(range(2000))
    items[700] = Decimal(700)
    assert list(pool.map(identity, items, chunksize=chunksize)) == items
    assert list(pool.map(identity, iter(items), chunksize=chunksize)) == items


def test_a_crash_in_a_lane_chunk_fails_only_its_item(pool):
    """A chunk of 4 whose worker died is run again an item at a time: the
    items before the culprit are values, the culprit is WorkerCrashed."""
    results = pool.map(segv_at, range(40), [13] * 40, chunksize=4)
    assert [next(results) for _ in range(13)] == list(range(13))
    with pytest.raises(ironpool.WorkerCrashed) as info:
        next(results)
    assert info.value.signal == signal.SIGSEGV
    assert list(pool.map(identity, range(100), chunksize=1)) == list(range(100))


@pytest.mark.parametrize("path", ["lanes", "tickets", "unordered", "progress"])
def test_terminating_the_pool_ends_a_map_with_poolclosed_on_either_path(beacon, path):
    """The same error whether the map's chunks went as lanes or as tickets
    (Decimal items, which a lane does not carry), in order or not, counted
    or not."""
    options = {"progress": lambda done, total: None} if path == "progress" else {}
    items = [Decimal(i) for i in range(100)] if path == "tickets" else range(100)
    pool = ironpool.Pool(2)
    run = pool.imap_unordered if path == "unordered" else pool.map
    try:
        results = run(functools.partial(block_from, beacon, 1), items, chunksize=1, **options)
        assert next(results) == 0
        beacon.started(2)  # items 1 and 2 are running
        pool.terminate()
        with pytest.raises(PoolClosed, match="terminated"):
            next(results)
    finally:
        pool.terminate()


def test_cancelling_futures_at_shutdown_withdraws_a_lane_s_queued_chunks(beacon):
    """What no worker took is withdrawn: the map hands out what ran, in
    order, then raises CancelledError."""
    pool = ironpool.Pool(1)
    try:
        results = pool.map(functools.partial(block_from, beacon, 1), range(50), chunksize=1)
        assert next(results) == 0
        beacon.started(1)
        pool.shutdown(wait=False, cancel_futures=True)
        beacon.release(50)
        values = [0]
        with pytest.raises(CancelledError):
            for v in results:
                values.append(v)
        assert values == list(range(len(values))) and len(values) < 50
        pool.shutdown(wait=True)
    finally:
        pool.terminate()


@pytest.mark.parametrize("ordered", [True, False], ids=["map", "imap_unordered"])
def test_closing_a_map_withdraws_the_lane_chunks_not_started(beacon, ordered):
    with ironpool.Pool(1) as pool:
        run = pool.map if ordered else pool.imap_unordered
        results = run(functools.partial(block_from, beacon, 0), range(200), chunksize=1)
        beacon.started(1)
        results.close()
        beacon.release(200)
        with pytest.raises(StopIteration):
            next(results)
        pool.shutdown(wait=True)
        assert sum(w.tasks_done for w in pool.stats()) <= 2


READABLE = [
    ([4], None), ([1, "a", "a", 2.5, None, True, (1, "x")], None), [2**40, -5, 2**63 - 1, -(2**63), 65536, -1],
    "é€😀", ("s",) * 5, (), [], [[1], [2]], "y" * 70_000, -0.0, [str(i) for i in range(300)] * 2,
    {}, {"a": 1}, {"id": 3, "ok": True, "rows": [1, 2], "meta": {"k": None}}, [{"i": i} for i in range(1500)],
]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_the_lane_reader_reads_what_pickle_writes_for_plain_values(protocol):
    """A chunk's result of atoms is read in the binding, not by pickle:
    it must read every protocol's opcodes for them, memo included."""
    for value in READABLE:
        back = _core.lane_unpickle(pickle.dumps(value, protocol=protocol))
        assert back is not None and same([back[0]], [value]), value
    for value in [b"q" * 300, (b"",)] if protocol > 2 else []:  # protocol 2 writes bytes by reduce
        assert _core.lane_unpickle(pickle.dumps(value, protocol=protocol)) == [value]
    s = "shared"
    first, second = _core.lane_unpickle(pickle.dumps([s, s], protocol=protocol))[0]
    assert first is second  # the memo is honoured, as pickle would


@pytest.mark.parametrize(
    "data",
    [pickle.dumps(v, protocol=5) for v in (2**64, "\ud800", {1}, 1 + 2j, [2**70], Colour.RED, OrderedDict(a=1))]
    + [b"", b"\x80\x05", b"\x80\x05K", b"\x80\x05]K\x01", b"\x80\x05(K\x01e.", b"\x80\x05h\x05.",
       b"\x80\x05N\x86.", b"\x80\x05NN.", b"\x80\x05Nr\xff\xff\xff\x7f.",
       b"\x80\x05}(K\x01u.", b"\x80\x05](K\x01K\x02u.", b"\x80\x05}(]]u.", b"\x80\x05K\x01K\x02s."],
)
def test_the_lane_reader_leaves_anything_else_to_pickle(data):
    """Other values, and malformed or hostile pickles (a memo index far
    out of range), are left to ``pickle.loads``, which says what is wrong."""
    assert _core.lane_unpickle(data) is None


def test_values_ready_before_a_crashed_chunk_do_not_wait_for_its_reruns(pool, beacon, tmp_path):
    """Chunks 0-11 have returned and the chunk of 12-15 has crashed before
    the map is read: 0-11 are handed out at once, as with tickets, and
    only then do 12-15 run again one at a time (12's rerun waits)."""
    fn = functools.partial(crash_at_13_and_hold_12_when_rerun, beacon, str(tmp_path / "ran-12"))
    results = pool.map(fn, range(16), chunksize=4)
    assert wait_until(lambda: pool.stats().done >= 4, timeout=20)
    got: list = []
    taker = threading.Thread(target=lambda: got.extend(next(results) for _ in range(12)))
    taker.start()
    taker.join(30)  # a failure detector: the rerun is released below either way
    handed_out_first = not taker.is_alive()
    beacon.release(1)
    taker.join()
    assert handed_out_first, "the values before the crashed chunk waited for its reruns"
    assert got == list(range(12))
    assert next(results) == 12
    with pytest.raises(ironpool.WorkerCrashed):
        next(results)


def test_a_string_repeated_in_a_chunk_is_sent_once():
    text = "x" * 100_000
    items = [(text, i) for i in range(50)]
    data = _core.lane_pickle(items, 1 << 16)
    assert data is not None and len(data) < 2 * len(text)
    back = pickle.loads(data)
    assert back == items and all(t is back[0][0] for t, _ in back)


def test_a_worker_gets_one_object_for_a_string_repeated_in_its_chunk(pool):
    text = "y" * 1000
    ids = list(pool.starmap(text_id, [(text, i) for i in range(20)], chunksize=20))
    assert len(set(ids)) == 1


def test_a_failed_chunk_s_values_are_unpickled_once(pool):
    UNPICKLED[0] = 0
    results = pool.map(marker_or_raise, range(3), chunksize=3)
    assert [type(next(results)) for _ in range(2)] == [Marker, Marker]
    with pytest.raises(ValueError, match="item 2"):
        next(results)
    assert UNPICKLED[0] == 2



@pytest.mark.parametrize("chunksize", [1, 3])
def test_imap_unordered_hands_out_every_value_once(pool, chunksize):
    got = list(pool.imap_unordered(identity, range(5000), chunksize=chunksize))
    assert sorted(got) == list(range(5000))
    edges = list(pool.imap_unordered(identity, EDGES, chunksize=chunksize))
    assert sorted(map(repr, edges)) == sorted(map(repr, EDGES))
    odd = [Decimal(i) for i in range(300)]  # no lane: tickets, waited for together
    assert sorted(pool.imap_unordered(identity, odd, chunksize=chunksize)) == odd


@pytest.mark.parametrize("kind", ["lanes", "tickets"])
def test_imap_unordered_hands_out_what_finished_while_an_earlier_chunk_runs(pool, beacon, kind):
    """Item 2 blocks on one worker; results of the other worker, of the
    same lane as item 2 (the map's second: the first holds a chunk per
    worker) and of later ones (or tickets, for Decimals), are handed out
    before it. (Some items may wait behind item 2 in its worker's queue,
    sent there before it turned out long.)"""
    items = list(range(200)) if kind == "lanes" else [Decimal(i) for i in range(200)]
    results = pool.imap_unordered(functools.partial(hold_first, beacon, items[2]), items, chunksize=1)
    # Of the window's 128 items, up to 32 (DEEP_QUEUE) may wait behind item 2.
    assert wait_until(lambda: pool.stats().done >= 60, timeout=20)
    got: list = []
    taker = threading.Thread(target=lambda: got.extend(next(results) for _ in range(60)))
    taker.start()
    taker.join(30)  # a failure detector: item 0 is released below either way
    handed_out_first = not taker.is_alive()
    beacon.release(1)
    taker.join()
    assert handed_out_first, "finished results waited for an earlier chunk"
    assert items[2] not in got
    assert sorted(got + list(results)) == items


def test_imap_unordered_times_out_while_every_chunk_runs(pool, beacon):
    results = pool.imap_unordered(functools.partial(block_from, beacon, 0), range(10), chunksize=1, timeout=0.3)
    with pytest.raises(TimeoutError):
        next(results)
    beacon.release(10)


def test_a_crash_in_an_unordered_lane_chunk_fails_only_its_item(pool):
    results = list(pool.imap_unordered(functools.partial(segv_at, bad=13), range(40), chunksize=4,
                                       return_exceptions=True))
    crashed = [r for r in results if isinstance(r, ironpool.WorkerCrashed)]
    assert len(crashed) == 1 and crashed[0].signal == signal.SIGSEGV
    assert sorted(r for r in results if not isinstance(r, Exception)) == [x for x in range(40) if x != 13]
    with pytest.raises(ironpool.WorkerCrashed):
        list(pool.imap_unordered(functools.partial(segv_at, bad=13), range(40), chunksize=4))


class Counts:
    """A progress callback: every ``done`` it was called with."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, done: int, total: int | None) -> None:
        with self.lock:
            self.seen.append(done)

    def last(self) -> int:
        with self.lock:
            return self.seen[-1] if self.seen else 0


def test_progress_counts_lane_chunks_as_they_finish_not_as_they_are_taken(pool, beacon):
    """Item 2 blocks an ordered map, so nothing is taken; the count still
    moves with the chunks that finished behind it."""
    counts = Counts()
    results = pool.map(functools.partial(hold_first, beacon, 2), range(200), chunksize=1, progress=counts)
    # Of the window's 128 items, up to 32 (DEEP_QUEUE) may wait behind item 2.
    moved = wait_until(lambda: counts.last() >= 60, timeout=20)
    beacon.release(1)
    assert moved, f"the count waited for the map to be read: {counts.last()}"
    assert list(results) == list(range(200))
    assert counts.last() == 200 and counts.seen == sorted(counts.seen)


def test_progress_counts_a_lane_chunk_run_again_item_by_item_once(pool):
    """The chunk of items 4-7 returned (counted) but does not unpickle in
    the caller: it runs again an item at a time, and the count ends at 12."""
    counts = Counts()
    out = list(pool.map(unreadable_at_5, range(12), chunksize=4, return_exceptions=True, progress=counts))
    assert isinstance(out[5], ironpool.SerializationError)
    assert out[:5] + out[6:] == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert counts.last() == 12 and counts.seen == sorted(counts.seen)


def broken_bar(done: int, total: int | None) -> None:
    raise RuntimeError("the bar broke")


@pytest.mark.parametrize("kind", ["lanes", "tickets"])
def test_a_progress_callback_that_raises_ends_the_map_and_nothing_else(pool, kind):
    """Counted in the thread that delivers every result, the callback's
    error must not end that thread: the map raises it, the pool goes on."""
    items = list(range(300)) if kind == "lanes" else [Decimal(i) for i in range(300)]
    results = pool.map(identity, items, chunksize=1, progress=broken_bar)
    assert wait_until(lambda: pool.stats().done >= 100, timeout=20)  # delivered while nobody reads the map
    got: list = []
    with pytest.raises(RuntimeError, match="the bar broke"):
        got.extend(results)
    assert got == items[:len(got)]
    assert pool._backend.thread.is_alive()  # this pool's results thread
    assert list(pool.map(identity, items, chunksize=1)) == items


def interrupt_in_the_main_thread(done: int, total: int | None) -> None:
    if threading.current_thread() is threading.main_thread():
        raise KeyboardInterrupt


@pytest.mark.parametrize("kind", ["lanes", "tickets"])
def test_ctrl_c_in_a_progress_callback_reaches_the_caller(pool, kind):
    """A KeyboardInterrupt is not a failing bar: raised while the caller's
    thread counts (it collects results while it waits), it ends the map."""
    items = list(range(5000)) if kind == "lanes" else [Decimal(i) for i in range(5000)]
    with pytest.raises(KeyboardInterrupt):
        for _ in pool.map(identity, items, chunksize=1, progress=interrupt_in_the_main_thread):
            pass
    assert list(pool.map(identity, range(100), chunksize=1)) == list(range(100))


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_a_caller_waiting_on_a_submit_does_not_spin_while_a_lane_map_runs(pool):
    """Lane chunks are in flight too: with more than the workers can hold,
    a caller blocked in result() sleeps between batches instead of
    spinning after each (which took 63-70% of a CPU before)."""
    list(pool.map(identity, range(1000), chunksize=1))
    stop = threading.Event()
    running = threading.Event()

    maps = [0]

    def mapper() -> None:
        while not stop.is_set():
            running.set()
            list(pool.map(identity, range(20_000), chunksize=1))
            maps[0] += 1

    thread = threading.Thread(target=mapper)
    thread.start()
    try:
        running.wait()
        cpu, wall, before = time.thread_time(), time.monotonic(), maps[0]
        assert pool.submit(nap, 0.5).result() == 0.5
        cpu, wall, during = time.thread_time() - cpu, time.monotonic() - wall, maps[0] - before
    finally:
        stop.set()
        thread.join()
    assert during >= 1, "no lane map ran while the caller waited"
    # 10-14% measured; spinning after each batch took 63-70%.
    assert cpu < 0.4 * wall, f"the waiting caller used {cpu:.3f} s of CPU in {wall:.3f} s"


def test_a_lane_count_that_comes_after_the_map_ended_still_completes_the_count(pool, beacon, monkeypatch):
    """The thread that delivers a lane's last chunk fills its slot, wakes the
    map, then counts it. Here it is held between the two (as when it loses
    the CPU there) until the map has taken the value and ended: the map's
    end still brings the count to the total (it was 19 of 20 before)."""
    from ironpool._progress import Progress

    entered, ended = threading.Event(), threading.Event()
    original = Progress.advance

    def held(self, items):
        if threading.current_thread().name == "ironpool-results" and self.done + items >= (self.total or 0):
            entered.set()
            ended.wait(20)
        original(self, items)

    monkeypatch.setattr(Progress, "advance", held)
    counts = Counts()
    results = pool.map(functools.partial(hold_first, beacon, 19), range(20), chunksize=1, progress=counts)
    got = [next(results) for _ in range(19)]
    beacon.release(1)
    assert entered.wait(20), "the last chunk was not counted by the results thread"
    got.extend(results)
    last = counts.last()
    ended.set()
    assert got == list(range(20))
    assert last == 20, f"the count ended at {last} of 20"
