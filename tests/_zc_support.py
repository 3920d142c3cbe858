"""Helpers for the zero-copy data-plane tests (test_zero_copy*.py).

Everything here reads the real kernel state of real processes: which memfd
segments a process maps or holds open, how much memory a process tree uses.
Task functions live here too, so workers import them by reference.
"""

from __future__ import annotations

import gc
import os
import threading
import time

import numpy as np

MIB = 1 << 20
THRESHOLD = 64 * 1024  # ironpool.Pool's default buffer_threshold
MEMFD_TAG = "/memfd:ironpool"


# --- task functions (run in workers) ------------------------------------------


def ident(x):
    return x


def array_sum(a):
    return float(np.asarray(a).sum())


def mutate_then_sum(a):
    """Writes into its argument, which must not leak to anyone else."""
    before = float(a.sum())
    a[...] = -1
    return before


def make_array(nbytes: int, seed: int) -> np.ndarray:
    a = np.arange(nbytes // 8, dtype=np.float64)
    a += seed
    return a


def make_frame(rows: int, cols: int, seed: int):
    import pandas as pd

    base = np.arange(rows, dtype=np.float64)
    return pd.DataFrame({f"c{j}": base + (seed * cols + j) for j in range(cols)})


def build_result(kind: str):
    """Run in a worker: a large result made there (no argument segment involved)."""
    if kind == "numpy":
        return make_array(8 * MIB, 1)
    if kind == "frame":
        return make_frame(100_000, 4, 2)
    if kind == "arrow":
        import pyarrow as pa

        return pa.table({"x": np.arange(1_000_000), "s": pa.array([f"s{i}" for i in range(100_000)] * 10)})
    if kind == "bytes":
        return os.urandom(8 * MIB)
    raise ValueError(kind)


def expected_frame_sum(rows: int, cols: int, seed: int) -> float:
    base = rows * (rows - 1) / 2
    return sum(base + rows * (seed * cols + j) for j in range(cols))


def my_memfd_inodes(_=None) -> list[int]:
    """Run in a worker: the ironpool segments it maps or holds right now."""
    return sorted(memfd_inodes(os.getpid()))


def hold_and_report(a, fifo: str, stash: list = []):  # noqa: B006 - the stash outlives the call on purpose
    """Run in a worker: keeps `a` (a mapped segment) alive, reports this
    worker's pid and segment inodes through `fifo`, then blocks forever."""
    stash.append(a)
    inodes = ",".join(str(i) for i in sorted(memfd_inodes(os.getpid())))
    with open(fifo, "w") as f:
        f.write(f"{os.getpid()} {inodes}\n")
    while True:
        time.sleep(3600)


def segment_report(obj) -> tuple[int, int]:
    """Run in a worker: (bytes of `obj`'s large buffers inside segments, bytes of its large buffers)."""
    large = sum(n for _, n in buffer_spans(obj) if n >= THRESHOLD)
    return bytes_in_segments(obj, THRESHOLD), large


def raise_after_touching(a):
    float(a.sum())
    raise ValueError("task failed after reading its argument")


def segment_inode(obj) -> int | None:
    """Run in a worker: the inode of the segment holding `obj`'s first large
    buffer (which segment it was sent in), or None if it is not in one."""
    spans = [addr for addr, n in buffer_spans(obj) if n >= THRESHOLD]
    if not spans:
        return None
    return next((ino for lo, hi, ino in segment_ranges() if lo <= spans[0] < hi), None)


def inode_and_writable(a) -> tuple[int | None, bool]:
    """Run in a worker: the segment `a` arrived in, and whether it is writable."""
    return segment_inode(a), bool(a.flags.writeable)


def frame_sum_then_scribble(df) -> float:
    """The sum `df` arrived with; then overwrites a column in place and adds one."""
    total = float(df.to_numpy().sum())
    df.iloc[:, 0] = -1.0
    df["added_by_a_task"] = 1.0
    return total


class ReleasesWhilePickled:
    """Releases `handle` when pickled: stands for another thread calling
    release() while the call holding the handle is being pickled."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def __reduce__(self):
        self.handle.release()
        return (int, (0,))


def first_sum(a, _other=None) -> float:
    return float(a.sum())


class Flaky(Exception):
    """A transient failure, for retry_on."""


def fail_once_then_read(a, marker: str, beacon, how: str = "raise") -> float:
    """First call (no `marker` yet): says so, waits for the test's go, then
    raises Flaky or kills its worker. Later calls: a[0]."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        beacon.notify(os.getpid())
        beacon.wait()
        if how == "raise":
            raise Flaky("transient")
        os._exit(3)
    return float(a[0])


def sum_after_wait(a, beacon) -> float:
    """Says it started, waits for the test's go (conftest.Beacon), then sums."""
    beacon.notify(os.getpid())
    beacon.wait()
    return float(a.sum())


def value_at(a, k: int) -> float:
    return float(a[k])


_STASH: dict = {}


def stash(a, slot: str) -> float:
    """Keeps its argument alive in this worker after the task."""
    _STASH[slot] = a
    return float(a.sum())


def write_one_read_other(_a, write: str, read: str) -> float:
    """Writes into one stashed argument, sums another."""
    _STASH[write][...] = -1.0
    return float(_STASH[read].sum())


def keys_then_add_one(d: dict) -> list:
    """The keys `d` arrived with; then adds one (should a later task see it?)."""
    keys = sorted(d)
    d["added_by_a_task"] = True
    return keys


def columns_then_add_one(df) -> list:
    """The columns `df` arrived with; then adds one."""
    cols = list(df.columns)
    df["added_by_a_task"] = 1.0
    return cols


def _refuse_outside(pid: int):
    if os.getpid() != pid:
        raise ImportError(f"this object cannot be rebuilt outside process {pid}")
    return LoadsOnlyHere()


class LoadsOnlyHere:
    """Pickles anywhere, unpickles only in the process that pickled it: an
    object a worker cannot rebuild (a missing module, a broken __setstate__)."""

    def __reduce__(self):
        return (_refuse_outside, (os.getpid(),))


# --- where buffers live -------------------------------------------------------


def segment_ranges(pid: int | str = "self") -> list[tuple[int, int, int]]:
    """(start, end, inode) of every ironpool segment mapped by `pid`."""
    out = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                if MEMFD_TAG in line:
                    fields = line.split()
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    out.append((lo, hi, int(fields[4])))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def buffer_spans(obj) -> list[tuple[int, int]]:
    """(address, nbytes) of the data buffers behind numpy, pandas and Arrow objects."""
    import pandas as pd
    import pyarrow as pa

    spans: list[tuple[int, int]] = []
    if isinstance(obj, np.ndarray):
        if obj.nbytes and not obj.dtype.hasobject:  # object arrays hold pointers, never shareable
            spans.append((obj.__array_interface__["data"][0], obj.nbytes))
    elif isinstance(obj, pd.DataFrame):
        for i in range(obj.shape[1]):
            spans += buffer_spans(obj.iloc[:, i])
    elif isinstance(obj, (pd.Series, pd.Index)):
        arr = obj.array
        if hasattr(arr, "_mask") and hasattr(arr, "_data"):  # nullable Int64, Float64, boolean
            return spans + buffer_spans(arr._data) + buffer_spans(arr._mask)
        for attr in ("_ndarray", "_pa_array", "codes", "_data"):
            inner = getattr(arr, attr, None)
            if inner is not None:
                spans += buffer_spans(inner)
                break
    elif isinstance(obj, (pa.Table, pa.RecordBatch)):
        for col in obj.columns:
            spans += buffer_spans(col)
    elif isinstance(obj, pa.ChunkedArray):
        for chunk in obj.chunks:
            spans += buffer_spans(chunk)
    elif isinstance(obj, pa.Array):
        for b in obj.buffers():
            if b is not None and b.size:
                spans.append((b.address, b.size))
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            spans += buffer_spans(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            spans += buffer_spans(x)
    return spans


def bytes_in_segments(obj, min_size: int = 0) -> int:
    """How many bytes of `obj`'s data buffers (of `min_size` bytes or more)
    lie inside ironpool segment mappings of this process, that is, were not
    copied out on receipt."""
    ranges = segment_ranges()
    total = 0
    for addr, n in buffer_spans(obj):
        if n >= min_size and any(lo <= addr and addr + n <= hi for lo, hi, _ in ranges):
            total += n
    return total


def has_shared_base(arr) -> bool:
    """True when the base chain of `arr` ends in an ironpool SegmentView."""
    from ironpool import _core

    seen = 0
    x = arr
    while x is not None and seen < 64:
        if isinstance(x, _core.SegmentView):
            return True
        x = x.obj if isinstance(x, memoryview) else getattr(x, "base", None)
        seen += 1
    return False


def settle() -> None:
    gc.collect()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Polls `predicate` (a kernel state with no event to wait on) until true."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


# --- kernel views of memfds ---------------------------------------------------


def memfd_inodes(pid: int | str, tag: str = MEMFD_TAG) -> set[int]:
    """Inodes of ironpool memfds `pid` holds as descriptors or mappings."""
    found = {inode for _, _, inode in segment_ranges(pid)}
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return found
    for name in names:
        try:
            if os.readlink(f"{fd_dir}/{name}").startswith(tag):
                found.add(os.stat(f"{fd_dir}/{name}").st_ino)
        except OSError:
            pass
    return found


def holders_of(inodes: set[int]) -> dict[int, set[int]]:
    """System-wide: pid -> which of `inodes` (ironpool memfds) it still holds."""
    out: dict[int, set[int]] = {}
    if not inodes:
        return out
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            held = memfd_inodes(entry) & inodes
            if held:
                out[int(entry)] = held
    return out


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def tree_pids(root: int) -> list[int]:
    """`root` and all its live descendants (reads /proc/<pid>/task/*/children)."""
    if not os.path.exists(f"/proc/{root}"):
        return []
    seen = [root]
    i = 0
    while i < len(seen):
        seen += [c for c in _children(seen[i]) if c not in seen]
        i += 1
    return seen


# --- memory footprint ---------------------------------------------------------


def _rollup(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _shmem_objects(pid: int, sizes: dict[tuple[int, int], int]) -> None:
    """Adds every memfd and /dev/shm object `pid` maps or holds (allocated
    bytes, keyed by device and inode so a segment counts once)."""
    for kind in ("map_files", "fd"):
        d = f"/proc/{pid}/{kind}"
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for name in names:
            path = f"{d}/{name}"
            try:
                target = os.readlink(path)
                if not (target.startswith("/memfd:") or target.startswith("/dev/shm/")):
                    continue
                st = os.stat(path)
            except OSError:
                continue
            sizes[(st.st_dev, st.st_ino)] = st.st_blocks * 512


def footprint(pids: list[int]) -> int:
    """Memory a process tree costs the machine, in bytes.

    Proportional set size of anonymous and file pages (shared pages split
    between sharers, so a page mapped by parent and workers counts once), plus
    every shared-memory object the tree maps or holds open, counted once at
    its allocated size whether or not anyone has touched it (PSS alone would
    miss a segment that is queued but not mapped yet, or mapped but unread).
    """
    total = 0
    shm: dict[tuple[int, int], int] = {}
    for pid in pids:
        r = _rollup(pid)
        total += r.get("Pss_Anon", 0) + r.get("Pss_File", 0)
        _shmem_objects(pid, shm)
    return total + sum(shm.values())


def pool_pids(pool) -> list[int]:
    """This process and the current workers of `pool` (not other pools' exiting workers)."""
    return [os.getpid()] + [w.pid for w in pool.stats() if w.pid > 0]


class PeakSampler:
    """Samples footprint(pids()) in a thread and keeps the peak."""

    def __init__(self, pids, interval: float = 0.005) -> None:
        self.pids = pids
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-sampler", daemon=True)

    def sample(self) -> int:
        value = footprint(self.pids())
        self.peak = max(self.peak, value)
        self.samples += 1
        return value

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# --- equality -------------------------------------------------------------------


def assert_same(got, want, path: str = "obj") -> None:
    """Deep equality for numpy, pandas, Arrow, bytes-likes and containers."""
    import pandas as pd
    import pyarrow as pa

    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), f"{path}: {type(got)}"
        assert type(got) is type(want), f"{path}: {type(got)} != {type(want)}"
        assert got.dtype == want.dtype, f"{path}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{path}: shape {got.shape} != {want.shape}"
        if want.dtype.hasobject:
            assert got.tolist() == want.tolist(), path
        elif isinstance(want, np.ma.MaskedArray):
            np.testing.assert_array_equal(np.ma.getmaskarray(got), np.ma.getmaskarray(want))
            np.testing.assert_array_equal(got.filled(), want.filled())
        else:
            # Bytes, not values: NaN payloads, -0.0 and NaT must survive too.
            assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes(), path
    elif isinstance(want, pd.DataFrame):
        pd.testing.assert_frame_equal(got, want, check_exact=True)
    elif isinstance(want, pd.Series):
        pd.testing.assert_series_equal(got, want, check_exact=True)
    elif isinstance(want, pd.Index):
        pd.testing.assert_index_equal(got, want, exact=True)
    elif isinstance(want, (pa.Array, pa.ChunkedArray, pa.Table, pa.RecordBatch)):
        assert type(got) is type(want), f"{path}: {type(got)} != {type(want)}"
        if hasattr(want, "schema"):
            assert got.schema.equals(want.schema, check_metadata=True), path
        else:
            assert got.type == want.type, path
        assert got.equals(want), path
    elif isinstance(want, memoryview):
        assert bytes(memoryview(got).cast("B")) == bytes(want.cast("B")), path
    elif isinstance(want, (bytes, bytearray)):
        assert type(got) is type(want), f"{path}: {type(got)} != {type(want)}"
        assert got == want, path
    elif isinstance(want, dict):
        assert type(got) is type(want) and got.keys() == want.keys(), path
        for k in want:
            assert_same(got[k], want[k], f"{path}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{path}[{i}]")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def dev_shm_files_open() -> list[str]:
    """Files under /dev/shm that this process tree holds open or maps (but the
    caller's own POSIX semaphores, ``sem.*``: tqdm, imported by other tests of
    this process, makes one for its lock; they hold no data)."""
    out = []
    for pid in tree_pids(os.getpid()):
        for d in ("fd", "map_files"):
            try:
                names = os.listdir(f"/proc/{pid}/{d}")
            except OSError:
                continue
            for n in names:
                try:
                    t = os.readlink(f"/proc/{pid}/{d}/{n}")
                except OSError:
                    continue
                if t.startswith("/dev/shm") and not t.startswith("/dev/shm/sem."):
                    out.append(t)
    return out
