"""The zero-copy data plane (issue 3; pitfalls P1, P2, P7, P10).

Round trips of numpy, pandas, Arrow and bytes-like data through real workers,
checked for equality and for actually travelling through shared memory; the
results behaving as ordinary objects; P1 (many concurrent 64 MB DataFrame
results, BufferError under every view pattern); P2 (a 64 MB /dev/shm does not
matter). Memory and leak tests are in test_zero_copy_leaks.py.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import threading
from concurrent.futures import as_completed, wait

import ironpool
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from _zc_support import (
    MIB,
    THRESHOLD,
    array_sum,
    assert_same,
    buffer_spans,
    build_result,
    bytes_in_segments,
    dev_shm_files_open,
    expected_frame_sum,
    has_shared_base,
    ident,
    make_array,
    make_frame,
    memfd_inodes,
    mutate_then_sum,
    segment_report,
    settle,
)
from ironpool import _testing

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def pool():
    with ironpool.Pool(2) as p:
        yield p


# --- the cases ------------------------------------------------------------------
# Each case: id -> (factory, zero_copy). zero_copy means every data buffer of at
# least THRESHOLD bytes must stay inside a shared segment, in the worker (the
# argument) and in the parent (the result), with no copy on receipt.

N = 100_000  # rows: numeric columns of 8-byte values are 800 KB, well above the threshold


def _rng():
    return np.random.default_rng(12345)


def _with_specials(a: np.ndarray) -> np.ndarray:
    if len(a) < 5:
        return a
    if a.dtype.kind in "fc":
        a[:5] = [np.nan, np.inf, -np.inf, -0.0, np.finfo(a.real.dtype).tiny]
    elif a.dtype.kind in "mM":
        a[:2] = np.array(["NaT", "NaT"], dtype=a.dtype)
    return a


NUMPY_DTYPES = [
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64", "longdouble", "complex64", "complex128", "clongdouble",
    ">i4", ">f8", "datetime64[ns]", "datetime64[D]", "datetime64[s]", "timedelta64[ms]", "timedelta64[ns]",
    "S8", "U5", "V16",
]  # fmt: skip


def _numpy_of(dtype: str, n: int) -> np.ndarray:
    rng = _rng()
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.integers(0, 2, n).astype(bool)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, n, dtype=dt.newbyteorder("=")).astype(dt)
    if dt.kind == "f":
        return _with_specials((rng.standard_normal(n) * 1e3).astype(dt))
    if dt.kind == "c":
        return _with_specials((rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(dt))
    if dt.kind in "mM":
        return _with_specials(rng.integers(-(10**9), 10**9, n).astype(dt))
    if dt.kind == "S":
        return np.array([f"b{i % 9973}".encode() for i in range(n)], dtype=dt)
    if dt.kind == "U":
        return np.array([f"ü{i % 997}" for i in range(n)], dtype=dt)
    if dt.kind == "V":
        return rng.integers(0, 256, (n, dt.itemsize), dtype=np.uint8).view(dt).reshape(n)
    raise AssertionError(dtype)


def _structured(n: int, with_datetime: bool = False) -> np.ndarray:
    fields = [("id", "<i4"), ("x", "<f8"), ("tag", "S3"), ("xy", "<f4", (2,))]
    a = np.zeros(n, dtype=[*fields, ("when", "M8[s]")] if with_datetime else fields)
    a["id"] = np.arange(n)
    a["x"] = np.linspace(0, 1, n)
    a["tag"] = b"abc"
    a["xy"] = np.arange(2 * n, dtype="f4").reshape(n, 2)
    if with_datetime:
        a["when"] = np.arange(n).astype("M8[s]")
    return a


def _nested_structured(n: int) -> np.ndarray:
    inner = np.dtype([("a", "u1"), ("b", ">i2")])
    dt = np.dtype({"names": ["p", "q"], "formats": [inner, "<c8"], "offsets": [0, 8], "itemsize": 24})  # padded
    a = np.zeros(n, dtype=dt)
    a["p"]["a"] = np.arange(n) % 256
    a["p"]["b"] = np.arange(n) % 30000
    a["q"] = np.arange(n) * (1 + 1j)
    return a


def _objects(n: int) -> np.ndarray:
    pool = [1, "two", None, 3.5, (4, "five"), {"six": [6]}, b"seven", np.float32(8), 2**80]
    a = np.empty(n, dtype=object)
    for i in range(n):
        a[i] = pool[i % len(pool)]
    return a


def _frame_numeric(n: int = N) -> pd.DataFrame:
    rng = _rng()
    return pd.DataFrame(
        {
            "i64": rng.integers(-(10**12), 10**12, n),
            "f64": _with_specials(rng.standard_normal(n)),
            "f32": rng.standard_normal(n).astype("f4"),
            "u8": rng.integers(0, 255, n).astype("u1"),
            "b": rng.integers(0, 2, n).astype(bool),
            "Int64": pd.array(np.where(np.arange(n) % 7 == 0, None, np.arange(n)), dtype="Int64"),
            "Float64": pd.array(np.where(np.arange(n) % 5 == 0, None, np.arange(n) / 3), dtype="Float64"),
        },
        index=pd.RangeIndex(10, 10 + n),
    )


def _frame_datetime(n: int = N) -> pd.DataFrame:
    ts = pd.date_range("2021-03-28 00:00", periods=n, freq="37s")  # crosses a DST change in Paris
    df = pd.DataFrame(
        {
            "naive_ns": ts,
            "naive_s": ts.as_unit("s"),
            "paris": ts.tz_localize("Europe/Paris", ambiguous="NaT", nonexistent="NaT"),
            "utc_us": ts.tz_localize("UTC").as_unit("us"),
            "delta": ts - pd.Timestamp("2021-03-28"),
        }
    )
    if n > 4:
        df.loc[3, "naive_ns"] = pd.NaT
        df.loc[4, "utc_us"] = pd.NaT
    return df.set_index(pd.DatetimeIndex(ts.tz_localize("Asia/Tokyo"), name="when"))


def _frame_categorical(n: int = N) -> pd.DataFrame:
    labels = np.array(["apple", "banana", "cherry", "date"])
    idx = np.arange(n) % 4
    return pd.DataFrame(
        {
            "cat": pd.Categorical(labels[idx]),
            "ordered": pd.Categorical(labels[::-1][idx], categories=labels[::-1], ordered=True),
            "many": pd.Categorical([f"k{i % 1000}" for i in range(n)]),  # int16 codes
            "with_nan": pd.Categorical(np.where(idx == 0, None, labels[idx])),
        }
    )


def _frame_strings(n: int = N) -> pd.DataFrame:
    words = [f"wörd-{i % 5000}" * (1 + i % 3) for i in range(n)]
    obj = pd.Series(words, dtype=object)
    obj[::11] = None
    return pd.DataFrame(
        {
            "default_str": pd.Series(words),  # pandas' default string dtype
            "python_str": pd.Series(words, dtype=pd.StringDtype("python")),
            "pyarrow_str": pd.Series(words, dtype=pd.StringDtype("pyarrow")),
            "object": obj,
            "mixed_object": pd.Series([w if i % 2 else i for i, w in enumerate(words)], dtype=object),
        }
    )


def _frame_arrow(n: int = N) -> pd.DataFrame:
    rng = _rng()
    ints = pa.array(rng.integers(0, 10**9, n), mask=np.arange(n) % 9 == 0)
    return pd.DataFrame(
        {
            "int64": pd.array(ints, dtype=pd.ArrowDtype(pa.int64())),
            "float": pd.array(pa.array(rng.standard_normal(n)), dtype=pd.ArrowDtype(pa.float64())),
            "string": pd.array(pa.array([f"s{i}" for i in range(n)]), dtype=pd.ArrowDtype(pa.string())),
            "large_string": pd.array(
                pa.array([f"t{i % 77}" for i in range(n)], pa.large_string()), dtype=pd.ArrowDtype(pa.large_string())
            ),
            "ts_tz": pd.array(
                pa.array(np.arange(n) * 10**6, pa.timestamp("us", tz="America/New_York")),
                dtype=pd.ArrowDtype(pa.timestamp("us", tz="America/New_York")),
            ),
            "list": pd.array(
                pa.array([[i, i + 1] if i % 4 else None for i in range(n)], pa.list_(pa.int32())),
                dtype=pd.ArrowDtype(pa.list_(pa.int32())),
            ),
            "bool": pd.array(pa.array(np.arange(n) % 3 == 0), dtype=pd.ArrowDtype(pa.bool_())),
            "decimal": pd.array(
                pa.array([i * 3 for i in range(n)], pa.int64()).cast(pa.decimal128(24, 2)),
                dtype=pd.ArrowDtype(pa.decimal128(24, 2)),
            ),
        }
    )


def _frame_mixed(n: int = N // 4) -> pd.DataFrame:  # still above the threshold; equality checks are slow
    parts = [_frame_numeric(n).reset_index(drop=True), _frame_datetime(n).reset_index(drop=True),
             _frame_categorical(n), _frame_strings(n), _frame_arrow(n)]  # fmt: skip
    df = pd.concat(parts, axis=1)
    df["period"] = pd.period_range("2000-01", periods=n, freq="M")
    df["interval"] = pd.IntervalIndex.from_breaks(np.arange(n + 1))
    df["sparse"] = pd.arrays.SparseArray(np.where(np.arange(n) % 100 == 0, 1.0, 0.0))
    df.columns = [f"{i}_{c}" for i, c in enumerate(df.columns)]
    return df


def _multiindex_frame(n: int = N) -> pd.DataFrame:
    idx = pd.MultiIndex.from_arrays([np.arange(n) % 10, np.arange(n)], names=["g", "i"])
    cols = pd.MultiIndex.from_tuples([("a", "x"), ("a", "y"), ("b", "x")])
    return pd.DataFrame(np.arange(3 * n, dtype="f8").reshape(n, 3), index=idx, columns=cols)


def _arrow_table(n: int = N) -> pa.Table:
    rng = _rng()
    return pa.table(
        {
            "i": pa.array(rng.integers(0, 10**6, n), mask=np.arange(n) % 13 == 0),
            "f": pa.array(rng.standard_normal(n).astype("f4")),
            "s": pa.array([f"v{i}" for i in range(n)]),
            "d": pa.array([f"k{i % 20}" for i in range(n)]).dictionary_encode(),
            "st": pa.StructArray.from_arrays(
                [pa.array(np.arange(n)), pa.array(np.arange(n) % 2 == 0)], names=["n", "even"]
            ),
            "ts": pa.array(np.arange(n, dtype="i8"), pa.timestamp("ns", tz="UTC")),
            "bin": pa.array([bytes([i % 256]) * 8 for i in range(n)], pa.binary(8)),
        },
        metadata={"origin": "ironpool-test"},
    )


def _chunked_table(n: int = N) -> pa.Table:
    t = _arrow_table(n)
    return pa.concat_tables([t.slice(0, n // 3), t.slice(n // 3)])


CASES: dict[str, tuple] = {}
for _dt in NUMPY_DTYPES:
    CASES[f"np-{_dt}-large"] = (lambda dt=_dt: _numpy_of(dt, N), True)
    CASES[f"np-{_dt}-small"] = (lambda dt=_dt: _numpy_of(dt, 7), False)
CASES.update(
    {
        "np-structured": (lambda: _structured(N), True),
        "np-structured-with-datetime": (lambda: _structured(N, with_datetime=True), True),
        "np-structured-nested-padded": (lambda: _nested_structured(N), True),
        "np-structured-with-object": (
            lambda: np.array([(i, f"o{i}") for i in range(N)], dtype=[("i", "i8"), ("o", "O")]), False),
        "np-0d": (lambda: np.array(3.25), False),
        "np-0d-structured": (lambda: _structured(1)[0:1].reshape(()), False),
        "np-zero-length": (lambda: np.empty(0, dtype="f8"), False),
        "np-zero-length-2d": (lambda: np.empty((0, 5), dtype="i4"), False),
        "np-zero-length-inner": (lambda: np.empty((7, 0), dtype="c16"), False),
        "np-large-3d": (lambda: np.arange(64 * 64 * 64, dtype="f8").reshape(64, 64, 64), True),
        "np-large-4d-int16": (
            lambda: (np.arange(2 * 3 * 256 * 256) % 30000).astype("i2").reshape(2, 3, 256, 256), True),
        "np-fortran-2d": (lambda: np.asfortranarray(np.arange(600 * 500, dtype="f8").reshape(600, 500)), True),
        "np-fortran-3d": (lambda: np.asfortranarray(np.arange(40 * 50 * 60, dtype="i4").reshape(40, 50, 60)), True),
        "np-transposed": (lambda: np.arange(300 * 400, dtype="f4").reshape(300, 400).T, True),
        "np-strided": (lambda: np.arange(4 * N, dtype="f8")[::4], False),
        "np-reversed": (lambda: np.arange(N, dtype="i8")[::-1], False),
        "np-column-slice": (lambda: np.arange(500 * 400, dtype="f8").reshape(500, 400)[:, 10:300:3], False),
        "np-structured-field": (lambda: _structured(N)["x"], False),
        "np-broadcast": (lambda: np.broadcast_to(np.arange(1000.0), (200, 1000)), False),
        "np-object": (lambda: _objects(N), False),
        "np-object-2d": (lambda: _objects(600).reshape(20, 30), False),
        "np-masked": (lambda: np.ma.masked_array(np.arange(N, dtype="f8"), mask=np.arange(N) % 3 == 0), False),
        "np-matrix-like-view-of-big": (lambda: np.arange(10 * N, dtype="f8").reshape(10, N)[3], True),
        "pd-numeric": (_frame_numeric, True),
        "pd-datetime": (_frame_datetime, True),
        "pd-categorical": (_frame_categorical, True),
        "pd-strings": (_frame_strings, False),
        "pd-arrow": (_frame_arrow, True),
        "pd-mixed": (_frame_mixed, False),
        "pd-multiindex": (_multiindex_frame, True),
        "pd-series-f8": (lambda: pd.Series(np.arange(N, dtype="f8"), name="x"), True),
        "pd-series-tz": (lambda: pd.Series(pd.date_range("2020", periods=N, freq="min", tz="Europe/Paris")), True),
        "pd-series-cat": (lambda: _frame_categorical()["ordered"], True),
        "pd-series-arrow-str": (lambda: _frame_arrow()["string"], True),
        "pd-series-object": (lambda: _frame_strings()["object"], False),
        "pd-index-datetime": (lambda: pd.date_range("2020", periods=N, freq="s", tz="UTC"), True),
        "pd-empty-frame": (lambda: _frame_mixed(0), False),
        "pa-int-nulls": (lambda: pa.array(np.arange(N), mask=np.arange(N) % 3 == 0), True),
        "pa-string": (lambda: pa.array([f"str{i}" for i in range(N)]), True),
        "pa-list": (lambda: pa.array([list(range(i % 5)) for i in range(N)], pa.list_(pa.int64())), True),
        "pa-sliced": (lambda: pa.array(np.arange(4 * N)).slice(N, 2 * N), True),
        "pa-dictionary": (lambda: pa.array([f"k{i % 10}" for i in range(N)]).dictionary_encode(), False),
        "pa-chunked": (lambda: pa.chunked_array([np.arange(N), np.arange(N, 2 * N)]), True),
        "pa-table": (_arrow_table, True),
        "pa-table-chunked": (_chunked_table, True),
        "pa-record-batch": (lambda: _arrow_table().to_batches()[0], True),
        "pa-empty-table": (lambda: _arrow_table(0), False),
        "bytes-small": (lambda: b"\x00abc" * 10, False),
        "bytes-large": (lambda: bytes(range(256)) * (8 * 1024), False),
        "bytes-20mb": (lambda: os.urandom(20 * MIB), False),
        "bytearray-large": (lambda: bytearray(os.urandom(3 * MIB)), False),
        "memoryview-bytes": (lambda: memoryview(os.urandom(2 * MIB)), False),
        "memoryview-2d-array": (lambda: memoryview(np.arange(N, dtype="f8").reshape(100, -1)), False),
        "nested": (
            lambda: {
                "a": np.arange(N, dtype="f8"),
                "b": [np.ones((300, 300)), (np.arange(N, dtype="i4"), _frame_numeric(1000))],
                "c": {"deep": {"table": _arrow_table(5000), "tiny": np.arange(3)}},
                "n": None,
                "s": "text",
            },
            True,
        ),
        "list-of-many-arrays": (lambda: [np.full(20_000, i, dtype="f8") for i in range(60)], True),
        "tuple-of-frames": (lambda: tuple(_frame_numeric(20_000) for _ in range(3)), True),
    }
)  # fmt: skip


def _large_bytes(obj) -> int:
    return sum(n for _, n in buffer_spans(obj) if n >= THRESHOLD)


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(pool, case):
    factory, zero_copy = CASES[case]
    original = factory()
    # pickle, not deepcopy: deepcopy drops the padding bytes of structured dtypes
    keep = bytes(original) if isinstance(original, memoryview) else pickle.loads(pickle.dumps(original, protocol=5))
    result = pool.submit(ident, original).result(timeout=60)
    assert_same(result, original)
    if isinstance(original, memoryview):
        assert bytes(original) == keep
    else:
        assert_same(original, keep)  # sending did not touch the caller's object
    if zero_copy:
        large = _large_bytes(result)
        assert large > 0, "case is meant to be large"
        in_parent = bytes_in_segments(result, THRESHOLD)
        assert in_parent == large, f"result: {in_parent} of {large} large bytes are in shared segments"
        in_worker, large_in_worker = pool.submit(segment_report, original).result(timeout=60)
        assert large_in_worker == large
        assert in_worker == large, f"argument: {in_worker} of {large} large bytes are in shared segments"


def test_shared_identity_is_preserved(pool):
    a = np.arange(N, dtype="f8")
    got = pool.submit(ident, [a, a, {"again": a}]).result(timeout=60)
    assert got[0] is got[1] is got[2]["again"]
    assert_same(got[0], a)


def test_non_contiguous_and_fortran_arrive_with_their_layout(pool):
    f = np.asfortranarray(np.arange(600 * 500, dtype="f8").reshape(600, 500))
    r = pool.submit(ident, f).result(timeout=60)
    assert r.flags.f_contiguous and not r.flags.c_contiguous
    assert has_shared_base(r)
    s = np.arange(4 * N, dtype="f8").reshape(N, 4)[:, 1]
    r = pool.submit(ident, s).result(timeout=60)
    assert_same(r, s)
    assert r.flags.writeable


def test_large_numpy_result_is_a_view_of_a_shared_buffer(pool):
    r = pool.submit(make_array, 8 * MIB, 3).result(timeout=60)
    assert has_shared_base(r), "the result was copied out of the segment"
    assert bytes_in_segments(r) == r.nbytes
    assert _testing.live_mappings() >= 1


# --- results are ordinary objects -------------------------------------------------


def test_result_is_writable_and_private(pool):
    a = np.arange(4 * MIB // 8, dtype="f8")
    r1 = pool.submit(ident, a).result(timeout=60)
    r2 = pool.submit(ident, a).result(timeout=60)
    assert r1.flags.writeable and r2.flags.writeable
    assert has_shared_base(r1)
    r1[:] = -7.0
    assert (r1 == -7.0).all()
    assert_same(r2, a)
    assert a[1] == 1.0 and a[-1] == a.size - 1
    # in place operators, views of the result, np functions writing into it
    v = r2[::2]
    v *= 3
    np.add(r2, 1, out=r2)
    assert r2[2] == 2 * 3 + 1 and r2[1] == 2


def test_tasks_writing_into_their_argument_affect_no_one_else(pool):
    a = np.arange(2 * MIB // 8, dtype="f8")
    want = float(a.sum())
    sums = [f.result(timeout=60) for f in [pool.submit(mutate_then_sum, a) for _ in range(6)]]
    assert sums == [want] * 6
    assert float(a.sum()) == want


def test_frame_result_mutates_like_a_local_frame(pool):
    df = _frame_numeric()
    r = pool.submit(ident, df).result(timeout=60)
    other = pool.submit(ident, df).result(timeout=60)
    r.iloc[0, 0] = -5
    r["f64"] *= 2
    r.loc[r.index[1], "Int64"] = pd.NA
    r["new"] = r["i64"] + 1
    arr = r["f32"].to_numpy(copy=False)
    r.loc[:, "f32"] = 1.5
    assert r.iloc[0, 0] == -5 and (r["f32"] == 1.5).all()
    del arr
    assert_same(other, df)
    pd.testing.assert_frame_equal(other, _frame_numeric(), check_exact=True)
    tbl = pool.submit(ident, _arrow_table()).result(timeout=60)
    assert tbl.column("i").null_count > 0 and tbl.equals(_arrow_table())


def test_result_pickles_again_and_can_be_sent_back(pool):
    df = _frame_mixed(5_000)
    big = np.arange(N, dtype="f8")
    r_df, r_big, r_tbl = pool.submit(ident, (df, big, _arrow_table())).result(timeout=60)
    assert has_shared_base(r_big)
    for proto in range(2, pickle.HIGHEST_PROTOCOL + 1):
        assert_same(pickle.loads(pickle.dumps(r_big, protocol=proto)), big)
        assert_same(pickle.loads(pickle.dumps(r_df, protocol=proto)), df)
    bufs: list = []
    data = pickle.dumps((r_big, r_tbl), protocol=5, buffer_callback=bufs.append)
    assert bufs, "protocol 5 should take the result's buffers out of band"
    got = pickle.loads(data, buffers=bufs)
    assert_same(got[0], big)
    assert_same(got[1], _arrow_table())
    assert_same(copy.deepcopy(r_df), df)
    assert pool.submit(array_sum, r_big).result(timeout=60) == float(big.sum())
    assert_same(pool.submit(ident, r_df).result(timeout=60), df)


@pytest.mark.parametrize("how", ["shutdown", "terminate", "recycled-workers"])
def test_result_outlives_the_pool(how):
    settle()
    base_maps, base_fds = _testing.live_mappings(), _testing.open_segments()
    p = ironpool.Pool(2, max_tasks_per_worker=1 if how == "recycled-workers" else None)
    futs = [p.submit(make_frame, 20_000, 8, i) for i in range(4)]
    futs.append(p.submit(make_array, 4 * MIB, 9))
    results = [f.result(timeout=60) for f in futs]
    workers = [w.pid for w in p.stats()]
    if how == "terminate":
        p.terminate()
    else:
        p.shutdown(wait=True)
    del p
    settle()
    for i, df in enumerate(results[:4]):
        assert float(df.to_numpy().sum()) == expected_frame_sum(20_000, 8, i)
        df.iloc[:, 0] = 0.0
        assert df.iloc[:, 0].sum() == 0.0
    arr = results[4]
    assert has_shared_base(arr)
    np.testing.assert_array_equal(arr, make_array(4 * MIB, 9))
    arr += 1
    assert pickle.loads(pickle.dumps(arr))[0] == 10.0
    assert _testing.live_mappings() > base_maps
    del results, arr, df, futs
    settle()
    assert _testing.live_mappings() == base_maps
    assert _testing.open_segments() == base_fds
    assert not any(memfd_inodes(pid) for pid in workers), "the pool's workers outlived it with segments"


@pytest.mark.parametrize("kind", ["numpy", "frame", "arrow", "bytes"])
def test_segment_is_unmapped_when_the_result_is_dropped(kind):
    """While the pool keeps running: dropping the only reference to a result
    must unmap its segment right away (not at the next result, not at
    shutdown). The future is awaited with wait(), as as_completed() users do,
    so ironpool's own results thread delivers it."""
    settle()
    base_maps, base_fds = _testing.live_mappings(), _testing.open_segments()
    with ironpool.Pool(2) as p:
        fut = p.submit(build_result, kind)
        wait([fut], timeout=60)
        r = fut.result()
        del fut
        if kind != "bytes":
            assert _testing.live_mappings() > base_maps, "a large result should be held in a mapped segment"
        # One descriptor per mapped segment, kept so that the result can be
        # sent on without a copy (see docs/decisions.md).
        assert _testing.open_segments() - base_fds <= _testing.live_mappings() - base_maps
        del r
        settle()
        assert _testing.live_mappings() == base_maps, "the segment outlived the result"
        assert _testing.open_segments() == base_fds
        assert p.submit(ident, 5).result(timeout=60) == 5


# --- send once -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["share", "read-only"])
def test_object_sent_once_cannot_carry_writes_between_tasks(pool, how):
    """A shared object is mapped once per worker and reused by its tasks. A
    task writing into it must either be refused (read-only) or write a private
    copy: never change what a later task sees."""
    a = np.arange(2 * MIB // 8, dtype="f8")
    want = float(a.sum())
    if how == "share":
        arg = pool.share(a)
    else:
        arg = a.copy()
        arg.flags.writeable = False
    outcomes = []
    for f in [pool.submit(mutate_then_sum, arg) for _ in range(8)]:
        try:
            outcomes.append(f.result(timeout=60))
        except ValueError as exc:
            assert "read-only" in str(exc)
            outcomes.append("read-only")
    assert all(o in (want, "read-only") for o in outcomes), f"tasks saw earlier tasks' writes: {outcomes}"
    assert float(a.sum()) == want
    assert pool.submit(array_sum, arg).result(timeout=60) == want


def test_share_handle_round_trips_big_data(pool):
    df = _frame_numeric()
    tbl = _arrow_table()
    h_df, h_tbl = pool.share(df), pool.share(tbl)
    got = [f.result(timeout=60) for f in [pool.submit(ident, (h_df, h_tbl)) for _ in range(3)]]
    for g_df, g_tbl in got:
        assert_same(g_df, df)
        assert_same(g_tbl, tbl)
    in_seg, large = pool.submit(segment_report, h_df).result(timeout=60)
    assert in_seg == large > 0
    h_df.release()
    h_tbl.release()


# --- P1: many concurrent 64 MB DataFrame results, no BufferError ------------------


def test_p1_concurrent_64mb_frames_never_raise_buffererror():
    rows, cols, n_tasks = 1_000_000, 8, 12  # each result: 8 float64 columns x 1e6 rows = 64 MB
    settle()
    base_maps = _testing.live_mappings()
    errors: list[BaseException] = []
    kept: list = []
    lock = threading.Lock()
    callback_views: list[memoryview] = []

    def on_done(fut):  # runs on ironpool's result thread, as in the seed's callback design
        try:
            df = fut.result()
            mv = memoryview(df["c0"].to_numpy(copy=False))
            with lock:
                callback_views.append(mv)
        except BaseException as exc:
            errors.append(exc)

    def consume(futs, order: int) -> None:
        rnd = random.Random(order)
        try:
            for fut in futs:
                seed = fut.seed
                df = fut.result(timeout=90)
                assert df.shape == (rows, cols)
                assert float(df.to_numpy().sum()) == expected_frame_sum(rows, cols, seed)
                # hold views of the result, export them further, pickle while views are held
                views = [memoryview(df[c].to_numpy(copy=False)) for c in df.columns]
                wrapped = [np.frombuffer(v, dtype="f8") for v in views[:3]]
                raw = pickle.dumps(df.iloc[:1000], protocol=4)
                bufs: list = []
                p5 = pickle.dumps(df, protocol=5, buffer_callback=bufs.append)
                again = pickle.loads(p5, buffers=bufs)
                assert again.shape == df.shape and again.iloc[-1, -1] == df.iloc[-1, -1]
                del again, bufs, p5
                assert pickle.loads(raw).shape == (1000, cols)
                assert wrapped[0][-1] == rows - 1 + seed * cols
                if order % 3 == 0:  # release views first, then drop the frame
                    del wrapped
                    rnd.shuffle(views)
                    for v in views:
                        v.release()
                    del df
                elif order % 3 == 1:  # drop the frame first, views still valid afterwards
                    del df
                    settle()
                    assert views[0][rows - 1] == rows - 1 + seed * cols
                    del wrapped
                    for v in reversed(views):
                        v.release()
                else:  # keep the frame and one view for the final concat
                    with lock:
                        kept.append((seed, df, views[1]))
                    del wrapped
                    for v in views[2:]:
                        v.release()
        except BaseException as exc:
            errors.append(exc)

    with ironpool.Pool(2) as p:
        futs = []
        for i in range(n_tasks):
            f = p.submit(make_frame, rows, cols, i)
            f.seed = i
            f.add_done_callback(on_done)
            futs.append(f)
        ordered = list(as_completed(futs[:4])) + futs[4:]  # some consumed in completion order
        threads = [threading.Thread(target=consume, args=(ordered[k::4], k)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors
        kept.sort(key=lambda x: x[0])
        total = pd.concat([k[1] for k in kept], ignore_index=True)
        assert len(total) == rows * len(kept)
        assert float(total.to_numpy().sum()) == sum(expected_frame_sum(rows, cols, k[0]) for k in kept)
        del total
        random.Random(7).shuffle(kept)
        while kept:
            seed, df, view = kept.pop()
            del df
            assert np.frombuffer(view, dtype="f8")[5] == 5 + seed * cols + 1
            view.release()
        assert len(callback_views) == n_tasks
        for v in callback_views[::2]:
            v.release()
        callback_views.clear()
        del futs, ordered, f
    settle()
    assert not errors, errors
    assert _testing.live_mappings() == base_maps


# --- P2: shared memory does not depend on the size of /dev/shm --------------------

P2_SCRIPT = r"""
import json, os, sys, threading
import numpy as np
import ironpool

sys.path.insert(0, TESTS_DIR)
from _zc_support import dev_shm_files_open

MIB = 1 << 20


def shm_used():
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def shm_size():
    st = os.statvfs("/dev/shm")
    return st.f_blocks * st.f_frsize


def scale(a, k):
    return a * k


peak = [0]
stop = threading.Event()


def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], shm_used())
        stop.wait(0.005)


used0 = shm_used()
t = threading.Thread(target=sample)
t.start()
a = np.arange(ELEMS, dtype=np.float64)
with ironpool.Pool(2) as pool:
    futs = [pool.submit(scale, a, k) for k in (2, 3)]
    results = [f.result(timeout=120) for f in futs]
    ok = all(np.array_equal(r, a * k) for r, k in zip(results, (2, 3)))
    shm_files = dev_shm_files_open()
    from ironpool import _testing
    maps = _testing.live_mappings()
stop.set()
t.join()
print(json.dumps({"ok": ok, "size": shm_size(), "used0": used0, "peak": peak[0], "files": shm_files,
                  "maps": maps, "nbytes": a.nbytes}))
"""


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        r = subprocess.run(
            ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
            capture_output=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def test_p2_pool_in_container_with_64mb_dev_shm(tmp_path):
    if not _unshare_works():
        pytest.skip("unshare -m with a tmpfs mount is not available here")
    script = tmp_path / "p2.py"
    elems = 128 * MIB // 8  # 128 MiB array: twice the whole /dev/shm, arguments and results alike
    script.write_text(P2_SCRIPT.replace("TESTS_DIR", repr(TESTS_DIR)).replace("ELEMS", str(elems)))
    cmd = f"mount -t tmpfs -o size=64m tmpfs /dev/shm && exec {sys.executable} {script}"
    r = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["size"] == 64 * MIB
    assert out["ok"], "results differ"
    assert out["maps"] >= 2, "the results should be views of shared segments"
    assert out["files"] == []
    assert out["peak"] == out["used0"] == 0, f"/dev/shm use rose to {out['peak']} bytes"


def test_p2_no_dev_shm_file_is_used_while_big_data_is_in_flight(pool):
    """Without a namespace: no process of the pool maps or holds anything from
    /dev/shm while big arguments and results are alive; segments are memfds."""
    a = np.arange(16 * MIB // 8, dtype="f8")
    futs = [pool.submit(ident, a) for _ in range(3)]
    results = [f.result(timeout=60) for f in futs]
    assert dev_shm_files_open() == []
    assert all(has_shared_base(r) for r in results)
    assert memfd_inodes(os.getpid()), "results should map ironpool memfds"
