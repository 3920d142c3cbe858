"""``ironpool.shared_memory()``: numpy arrays born in a memfd travel to tasks
without any copy, and still behave like the caller's own arrays (issue 3,
"going to the physical limit").

Zero copy is shown with the kernel's view: the worker's argument lies in a
mapping of the very memfd (same inode) that holds the caller's array.
"""

from __future__ import annotations

import os
import sys
import threading

import ironpool
import numpy as np
import pytest
from _zc_support import MIB, segment_ranges
from ironpool import _testing
from ironpool._shared_memory import stats


def inode_of(a: np.ndarray, pid: int | str = "self") -> int | None:
    """Inode of the ironpool memfd mapping that holds `a`'s data in `pid`, if any."""
    addr = a.__array_interface__["data"][0]
    for lo, hi, inode in segment_ranges(pid):
        if lo <= addr < hi:
            return inode
    return None


def where_and_first(a: np.ndarray) -> tuple[int | None, float, float]:
    """Run in a worker: (inode holding `a`, a[0], sum)."""
    return inode_of(a), float(a[0]), float(a.sum())


def wait_then_read(a: np.ndarray, beacon) -> float:
    beacon.notify(os.getpid())
    beacon.wait()
    return float(a[0])


def scribble(a: np.ndarray) -> float:
    a[:] = -1.0
    return float(a.sum())


def frame_inodes(df) -> list[int | None]:
    return [inode_of(df[c].to_numpy()) for c in df.columns]


def current_handler() -> str:
    from numpy._core.multiarray import get_handler_name

    return get_handler_name()


@pytest.fixture
def big():
    with ironpool.shared_memory():
        a = np.arange(4 * MIB // 8, dtype=np.float64)
    yield a


def test_an_array_made_inside_is_sent_to_every_task_without_a_copy(big):
    parent_inode = inode_of(big)
    assert parent_inode is not None, "the array should live in an ironpool memfd"
    lent_before = stats()[1]
    with ironpool.Pool(2) as pool:
        got = list(pool.map(where_and_first, [big] * 6))
    assert all(g == (parent_inode, 0.0, float(big.sum())) for g in got), got
    assert stats()[1] - lent_before == 6


def test_each_task_sees_the_array_as_it_was_when_submitted(big, beacon):
    with ironpool.Pool(1) as pool:
        before = pool.submit(wait_then_read, big, beacon)
        beacon.started(1)
        big[0] = 42.0  # after the submit, before the task reads it
        beacon.release()
        assert before.result(timeout=30) == 0.0
        lent = stats()[1]
        # Changed since it was sent: the next task gets a copy showing the change.
        inode, first, _ = pool.submit(where_and_first, big).result(timeout=30)
        assert first == 42.0
        assert inode != inode_of(big)
        assert stats()[1] == lent
    assert big[0] == 42.0


def test_a_task_writing_its_argument_changes_nothing_outside(big):
    total = float(big.sum())
    with ironpool.Pool(2) as pool:
        assert pool.submit(scribble, big).result(timeout=30) == -float(big.size)
        # The caller's array, and the next task's view of it, are untouched.
        assert float(big.sum()) == total
        assert pool.submit(where_and_first, big).result(timeout=30)[2] == total


def test_pandas_columns_made_inside_travel_without_a_copy():
    import pandas as pd

    with ironpool.shared_memory():
        df = pd.DataFrame({f"c{i}": np.arange(MIB // 2, dtype=np.float64) + i for i in range(3)})
    parent = frame_inodes(df)
    assert all(i is not None for i in parent)
    with ironpool.Pool(1) as pool:
        assert sorted(pool.submit(frame_inodes, df).result(timeout=30)) == sorted(parent)


def test_a_forked_child_and_the_caller_never_share_writes(big):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: write, report what it sees, leave
        try:
            big[:10] = 7.0
            os.write(w, f"{big[0]}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        assert f.read() == "7.0"
    os.waitpid(pid, 0)
    assert big[0] == 0.0
    big[1] = 5.0  # and the caller's writes stay its own
    assert big[1] == 5.0


def test_only_new_arrays_in_this_thread_inside_the_block_are_shared():
    outside = np.ones(2 * MIB)
    assert inode_of(outside) is None
    seen = {}

    def other_thread():
        seen["handler"] = current_handler()
        seen["inode"] = inode_of(np.ones(2 * MIB))

    with ironpool.shared_memory():
        assert current_handler() == "ironpool_shared_memory"
        small = np.ones(16)  # below 1 MiB: the ordinary allocator
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert current_handler() == "default_allocator"
    assert seen == {"handler": "default_allocator", "inode": None}
    assert inode_of(small) is None
    # Arrays made inside outlive the block, and growing one works.
    with ironpool.shared_memory():
        grown = np.ones(MIB // 8)
    grown.resize(4 * MIB // 8, refcheck=False)
    assert grown[: MIB // 8].sum() == MIB // 8 and grown[MIB // 8 :].sum() == 0


def test_freed_arrays_leave_no_memfd_behind():
    base_fds = _testing.open_segments()
    base_blocks = stats()[0]
    with ironpool.shared_memory():
        arrays = [np.full(MIB, float(i)) for i in range(20)]
    assert stats()[0] - base_blocks == 20
    with ironpool.Pool(2) as pool:
        assert list(pool.map(where_and_first, arrays))[3][1] == 3.0
    del arrays
    assert stats()[0] == base_blocks
    assert _testing.open_segments() == base_fds


def test_without_numpy_loaded_the_block_imports_it(tmp_path):
    code = (
        "import sys, ironpool\n"
        "assert 'numpy' not in sys.modules\n"
        "with ironpool.shared_memory():\n"
        "    import numpy as np\n"
        "    a = np.ones(1 << 20)\n"
        "from ironpool._shared_memory import stats\n"
        "print(stats()[0])\n"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def mapping_flags(a: np.ndarray) -> str:
    """The permission field ("rw-s", "rw-p") of the mapping holding `a`."""
    addr = a.__array_interface__["data"][0]
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= addr < hi:
                return perms
    raise LookupError("no mapping holds the array")


def test_starting_a_pool_leaves_unsent_arrays_alone(big):
    # A new preload set makes this process start a new template process (a
    # fork that only execs): that must not turn the array copy-on-write.
    assert mapping_flags(big) == "rw-s"
    with ironpool.Pool(1, preload=("colorsys",)) as pool:
        assert pool.submit(where_and_first, np.zeros(1)).result(timeout=60)[1] == 0.0
    assert mapping_flags(big) == "rw-s"


def test_an_impossible_size_fails_with_memoryerror_as_outside():
    huge = 4 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        np.empty(huge, dtype=np.uint8)
    except MemoryError:
        pass
    else:
        pytest.skip("this machine's overcommit policy lets numpy reserve 4x its memory")
    with ironpool.shared_memory(), pytest.raises(MemoryError):
        np.empty(huge, dtype=np.uint8)


def make_filled(value: float) -> np.ndarray:
    return np.full(MIB, value)


def ident(x):
    return x


def test_received_buffers_are_sent_on_without_a_copy():
    with ironpool.Pool(2) as pool:
        results = list(pool.map(make_filled, range(4)))
        inodes = [inode_of(r) for r in results]
        assert all(inodes)
        lent = stats()[1]
        # Results fed to the next map travel as the same memfds.
        got = list(pool.map(where_and_first, results))
        assert [g[0] for g in got] == inodes and [g[1] for g in got] == [0.0, 1.0, 2.0, 3.0]
        assert stats()[1] - lent == 4
        # A task that returns its argument unchanged returns the same pages.
        back = pool.submit(ident, results[2]).result(timeout=30)
        assert inode_of(back) == inodes[2] and back[5] == 2.0
        # Once the caller writes to a result, it is copied again, with the write.
        results[1][0] = 9.0
        inode, first, _ = pool.submit(where_and_first, results[1]).result(timeout=30)
        assert inode != inodes[1] and first == 9.0


@pytest.mark.parametrize("trigger", ["send", "fork"])
def test_no_write_is_lost_when_a_block_turns_copy_on_write_under_a_writer(trigger):
    """Sealing swaps the caller's mapping while other threads may be writing
    to it (numpy releases the GIL in np.add): every write must survive."""
    passes = 40
    with ironpool.Pool(1) as pool:
        for _ in range(6):
            with ironpool.shared_memory():
                a = np.zeros(4 * MIB // 8, dtype=np.int64)
            writing = threading.Event()

            def add_ones(a=a, writing=writing):
                for i in range(passes):
                    np.add(a, 1, out=a)
                    if i == 0:
                        writing.set()

            t = threading.Thread(target=add_ones)
            t.start()
            assert writing.wait(30)
            if trigger == "send":  # the first send seals the block in place
                assert pool.submit(len, a).result(timeout=30) == a.size
            else:  # so does a fork
                pid = os.fork()
                if pid == 0:
                    os._exit(0)
                os.waitpid(pid, 0)
            t.join()
            assert (a == passes).all(), f"lost writes: values {np.unique(a)[:5]}"


def build_in_shared_memory(n: int) -> tuple[np.ndarray, int | None]:
    """Run in a worker: a result made inside shared_memory(), and where it lives."""
    with ironpool.shared_memory():
        out = np.empty(n)
    out[:] = np.arange(n)
    return out, inode_of(out)


def test_a_task_can_build_its_result_in_shared_memory():
    # Opt-in inside the task: the result then reaches the caller with no copy.
    with ironpool.Pool(1) as pool:
        result, worker_inode = pool.submit(build_in_shared_memory, MIB).result(timeout=30)
    assert worker_inode is not None and inode_of(result) == worker_inode
    assert result[12345] == 12345.0
    result[0] = -1.0  # writable, and the caller's own
    assert result[0] == -1.0


def test_threads_allocating_freeing_and_sending_while_the_process_forks():
    """Stress: the registry is shared by every thread; allocations, frees,
    sends and forks must interleave without a deadlock, a lost block or a
    wrong value."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn(seed: int) -> None:
        try:
            with ironpool.shared_memory():
                while not stop.is_set():
                    a = np.full(MIB // 8 + seed, float(seed))
                    a[::4096] += 1.0
                    assert a[1] == float(seed)
                    del a
        except BaseException as exc:  # reported below
            errors.append(exc)

    base_blocks = stats()[0]
    threads = [threading.Thread(target=churn, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        with ironpool.Pool(2) as pool:
            for round_ in range(15):
                with ironpool.shared_memory():
                    arr = np.full(MIB, float(round_))
                assert pool.submit(where_and_first, arr).result(timeout=30)[1:] == (round_, round_ * MIB)
                pid = os.fork()
                if pid == 0:
                    os._exit(0 if arr[0] == round_ else 1)
                assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    del arr
    assert stats()[0] == base_blocks
