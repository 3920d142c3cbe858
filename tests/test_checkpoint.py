"""``map(..., checkpoint=path)``: killed half-way with SIGKILL and run again,
it recomputes nothing it recorded and loses nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import ironpool
import numpy as np
import pandas as pd
import pytest

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    import ironpool

    log_path, ckpt, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def work(i):
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{i}\\n".encode())
        os.close(fd)
        return np.arange(i, i + 50_000, dtype=np.int64)  # 400 KB: travels out of band

    with ironpool.Pool(2) as pool:
        for n, out in enumerate(pool.map(work, range(200), chunksize=4, checkpoint=ckpt)):
            assert out[0] == n and len(out) == 50_000
            if n + 1 == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    print("all", n + 1)
    """
)


def computed(log_path) -> list[int]:
    with open(log_path) as f:
        return [int(line) for line in f]


def test_a_map_killed_half_way_resumes_without_recomputing(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    ckpt = tmp_path / "job.ckpt"
    log1, log2 = tmp_path / "run1.log", tmp_path / "run2.log"

    first = subprocess.run([sys.executable, str(script), str(log1), str(ckpt), "80"], capture_output=True, timeout=120)
    assert first.returncode == -signal.SIGKILL, first.stderr.decode()
    second = subprocess.run([sys.executable, str(script), str(log2), str(ckpt), "0"], capture_output=True, timeout=120)
    assert second.returncode == 0, second.stderr.decode()
    assert second.stdout.decode().split() == ["all", "200"]  # every result, in order, checked by the script

    handed_out = set(range(80))  # what the first run had recorded when it was killed
    again = set(computed(log2))
    assert not again & handed_out, sorted(again & handed_out)
    assert again | set(computed(log1)) >= set(range(200))
    assert set(range(80, 200)) <= again | set(computed(log1))


def double(x):
    return x * 2


def triple(x):
    return x * 3


def test_results_come_back_intact_with_their_types(tmp_path):
    ckpt = tmp_path / "frames.ckpt"
    frames = [pd.DataFrame({"a": np.arange(i, i + 20_000), "b": ["x"] * 20_000}) for i in range(6)]
    with ironpool.Pool(2) as pool:
        first = list(pool.map(double, frames, checkpoint=ckpt))
        again = list(pool.map(double, frames, checkpoint=ckpt))
        assert pool.stats().items_done == 6  # the second map ran nothing
    for a, b, f in zip(first, again, frames, strict=True):
        pd.testing.assert_frame_equal(a, b)
        pd.testing.assert_frame_equal(b, f * 2)
    b0 = again[0]
    b0.loc[0, "a"] = -1  # a restored frame is an ordinary writable one


def test_a_changed_function_or_input_is_refused(tmp_path):
    ckpt = tmp_path / "x.ckpt"
    with ironpool.Pool(2) as pool:
        assert list(pool.map(double, range(10), checkpoint=ckpt)) == [x * 2 for x in range(10)]
        with pytest.raises(ironpool.CheckpointMismatch, match="another function, or a changed triple"):
            list(pool.map(triple, range(10), checkpoint=ckpt))
        with pytest.raises(ironpool.CheckpointMismatch, match="written for 10 items, this map has 11"):
            list(pool.map(double, range(11), checkpoint=ckpt))
        changed = [0, 1, 2, 99, 4, 5, 6, 7, 8, 9]
        with pytest.raises(ironpool.CheckpointMismatch, match="item 3 is not the item recorded"):
            list(pool.map(double, changed, checkpoint=ckpt))
        with pytest.raises(ironpool.CheckpointMismatch, match="input ended after 5 items"):
            list(pool.map(double, (x for x in range(5)), checkpoint=ckpt))
        with pytest.raises(ironpool.CheckpointMismatch, match="another kind"):
            list(pool.starmap(double, [(x,) for x in range(10)], checkpoint=ckpt))
    (tmp_path / "junk").write_bytes(b"not a checkpoint")
    with ironpool.Pool(1) as pool, pytest.raises(ironpool.CheckpointMismatch, match="not an ironpool checkpoint"):
        list(pool.map(double, range(3), checkpoint=tmp_path / "junk"))


def test_a_torn_last_record_is_cut_off_and_recomputed(tmp_path):
    ckpt = tmp_path / "t.ckpt"
    with ironpool.Pool(2) as pool:
        list(pool.map(double, range(20), checkpoint=ckpt))
        size = os.path.getsize(ckpt)
        with open(ckpt, "r+b") as f:
            f.truncate(size - 3)  # the process died writing the last record
        before = pool.stats().items_done
        assert list(pool.map(double, range(20), checkpoint=ckpt)) == [x * 2 for x in range(20)]
        assert pool.stats().items_done - before == 1
        assert list(pool.map(double, range(20), checkpoint=ckpt)) == [x * 2 for x in range(20)]
        assert pool.stats().items_done - before == 1


def fails_on_odd(x):
    if x % 2:
        raise ValueError(x)
    return x


def test_failed_items_are_not_recorded_so_a_rerun_retries_them(tmp_path):
    ckpt = tmp_path / "f.ckpt"
    with ironpool.Pool(2) as pool:
        got = list(pool.map(fails_on_odd, range(6), checkpoint=ckpt, return_exceptions=True))
        assert [type(g).__name__ for g in got] == ["int", "ValueError"] * 3
        before = pool.stats().items_done
        list(pool.map(fails_on_odd, range(6), checkpoint=ckpt, return_exceptions=True))
        assert pool.stats().items_done - before == 3
