"""Lifecycle (P14): no worker, zombie or descriptor outlives a pool, whatever ends it."""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import subprocess
import sys
import time
import weakref

import ironpool
import psutil
import pytest
from conftest import PYTHON, Beacon, descendants, running, stray_workers, wait_until, worker_pids, zygote_pids


def square(x):
    return x * x


def getpid(*_):
    return os.getpid()


def blocking(beacon: Beacon, value):
    beacon.notify(os.getpid())
    beacon.wait()
    return value


def raise_value_error(x):
    raise ValueError(x)


def _use(pool: ironpool.Pool) -> set[int]:
    assert sum(pool.map(square, range(20))) == sum(i * i for i in range(20))
    assert pool.submit(square, 3).result(timeout=30) == 9
    pids = {pool.submit(getpid, i).result(timeout=30) for i in range(4)}
    return pids | worker_pids(pool)


def _gone(pids) -> bool:
    return not any(running(p) for p in pids)


def _assert_no_strays(before: set[int], pids: set[int]) -> None:
    assert wait_until(lambda: _gone(pids) and not stray_workers(before), 3), (
        f"left behind: {stray_workers(before)}; pool pids still running: {[p for p in pids if running(p)]}"
    )


@pytest.fixture
def before():
    """Descendants that existed before the test (other tests' templates)."""
    return set(descendants())


# --- the ways a pool ends ------------------------------------------------------


def test_with_exit_leaves_no_workers(before):
    with ironpool.Pool(2) as pool:
        pids = _use(pool)
    assert pids and zygote_pids().isdisjoint(pids)
    _assert_no_strays(before, pids)


def test_shutdown_leaves_no_workers(before):
    pool = ironpool.Pool(2)
    pids = _use(pool)
    pool.shutdown()
    _assert_no_strays(before, pids)
    pool.shutdown()  # idempotent


def test_shutdown_after_errors_and_crashes_leaves_no_workers(before):
    pool = ironpool.Pool(2)
    pids = _use(pool)
    assert isinstance(pool.submit(raise_value_error, 1).exception(timeout=30), ValueError)
    assert isinstance(pool.submit(os._exit, 1).exception(timeout=30), ironpool.WorkerCrashed)
    pids |= _use(pool)
    pool.shutdown()
    _assert_no_strays(before, pids)


def test_garbage_collected_pool_stops_its_workers(before):
    pool = ironpool.Pool(2)
    pids = _use(pool)
    ref = weakref.ref(pool)
    del pool
    gc.collect()
    assert ref() is None, "an unreferenced pool is kept alive"
    _assert_no_strays(before, pids)


def test_garbage_collected_pool_after_a_raised_result(before):
    # P4: the exception from result() (with its traceback) must not keep the pool alive.
    def run():
        pool = ironpool.Pool(1)
        fut = pool.submit(raise_value_error, 1)
        try:
            fut.result(timeout=30)
        except ValueError:
            pass
        return weakref.ref(pool), _use(pool)

    ref, pids = run()
    gc.collect()
    assert ref() is None
    _assert_no_strays(before, pids)


def test_terminate_kills_running_work(before, beacon):
    pool = ironpool.Pool(2)
    fut = pool.submit(blocking, beacon, 1)
    pid = int(beacon.started(1)[0])
    start = time.monotonic()
    pool.terminate()
    assert time.monotonic() - start < 5
    assert fut.cancelled() or isinstance(fut.exception(timeout=5), Exception)
    _assert_no_strays(before, {pid})


def _open_fds() -> dict[int, str]:
    gc.collect()
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own descriptor
            pass
    return out


def test_descriptors_do_not_leak_across_pools():
    with ironpool.Pool(2) as warm:  # first pool: template, threads, caches
        _use(warm)
    del warm
    before = _open_fds()
    for i in range(20):
        with ironpool.Pool(2) as pool:
            assert pool.submit(square, i).result(timeout=30) == i * i
            if i % 5 == 0:
                assert isinstance(pool.submit(raise_value_error, i).exception(timeout=30), ValueError)
                assert list(pool.map(square, range(50))) == [x * x for x in range(50)]
    del pool

    def new_fds():
        # Compared by number and target (sockets and pipes carry their inode),
        # so that descriptors freed meanwhile by earlier tests cannot hide a leak.
        now = _open_fds()
        return {fd: target for fd, target in now.items() if before.get(fd) != target}

    assert wait_until(lambda: not new_fds(), 3), f"descriptors left by 20 pools: {new_fds()}"
    assert len(_open_fds()) <= len(before)


# --- interpreter exit and parent death ------------------------------------------

EXIT_SCRIPT = """\
import json, os, sys
import ironpool
from ironpool import _zygote

def touch(path):
    import time
    time.sleep(0.05)
    with open(path, "a") as f:
        f.write("x\\n")
    return os.getpid()

pool = ironpool.Pool(2)
pids = sorted({pool.submit(touch, sys.argv[1]).result() for _ in range(4)})
futs = [pool.submit(touch, sys.argv[1]) for _ in range(6)]   # still queued at exit
zyg = [z.pid for z in _zygote._zygotes.values()]
print(json.dumps(sorted(set(pids) | {w.pid for w in pool.stats() if w.pid}) + zyg), flush=True)
# no shutdown(), no result(): the interpreter just ends
"""


def test_interpreter_exit_stops_workers_after_queued_work(tmp_path):
    marks = tmp_path / "marks"
    start = time.monotonic()
    proc = subprocess.run([PYTHON, "-c", EXIT_SCRIPT, str(marks)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 20
    pids = json.loads(proc.stdout)
    # Like ProcessPoolExecutor, work submitted before exit is completed.
    assert marks.read_text().count("x") == 10
    assert wait_until(lambda: _gone(pids), 3), [p for p in pids if running(p)]


PARENT_SCRIPT = """\
import json, os, sys, time
import ironpool
from ironpool import _zygote

def long_task(fifo):
    with open(fifo, "w") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(120)

pool = ironpool.Pool(2)
fifo = sys.argv[1]
os.mkfifo(fifo)
fut = pool.submit(long_task, fifo)
with open(fifo) as f:           # returns once the task is running
    running = int(f.readline())
other = pool.submit(os.getpid).result()
pids = sorted({w.pid for w in pool.stats() if w.pid} | {running, other})
print(json.dumps({"workers": pids, "zygotes": [z.pid for z in _zygote._zygotes.values()]}), flush=True)
fut.result()
"""


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the subprocess printed nothing in time"
    return proc.stdout.readline()


def test_sigkill_of_the_parent_leaves_no_worker_and_no_template(tmp_path):
    proc = subprocess.Popen([PYTHON, "-c", PARENT_SCRIPT, str(tmp_path / "fifo")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(_read_line(proc, 30))
        pids = info["workers"] + info["zygotes"]
        assert len(info["workers"]) >= 2 and len(info["zygotes"]) == 1
        assert all(running(p) for p in pids)
        proc.kill()
        proc.wait(10)
        # Orphans are reparented to init, which reaps them: zombies count as gone.
        assert wait_until(lambda: _gone(pids), 3), [
            (p, psutil.Process(p).status()) for p in pids if running(p)
        ]
    finally:
        proc.kill()
        proc.wait()


CTRL_C_SCRIPT = """\
import json, os, sys, time
import ironpool
from ironpool import _zygote

def slow(x):
    print(f"started {x}", flush=True)
    time.sleep(60)
    return x

with ironpool.Pool(2) as pool:
    pool.submit(os.getpid).result()
    for r in pool.map(slow, range(100), chunksize=1):
        print("result", r, flush=True)
"""


def test_ctrl_c_during_map_returns_promptly(tmp_path):
    proc = subprocess.Popen([PYTHON, "-c", CTRL_C_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert _read_line(proc, 30).startswith("started")
        kids = set(descendants(proc.pid))
        assert kids
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pytest.fail("the program did not return within 5 s of Ctrl-C")
        elapsed = time.monotonic() - start
        err = proc.stderr.read()
        assert "KeyboardInterrupt" in err, err
        assert proc.returncode in (1, -signal.SIGINT), (proc.returncode, err)
        assert elapsed < 2.5, f"Ctrl-C took {elapsed:.2f} s"
        assert wait_until(lambda: _gone(kids), 3), [p for p in kids if running(p)]
    finally:
        proc.kill()
        proc.wait()


# --- fork --------------------------------------------------------------------


def _in_child(conn_fd: int, pool: ironpool.Pool) -> None:
    report = {}
    try:
        try:
            pool.submit(square, 2)
            report["inherited"] = "accepted work"
        except ironpool.PoolClosed as exc:
            report["inherited"] = "PoolClosed"
            report["message"] = str(exc)
        try:
            list(pool.map(square, [1]))
            report["inherited_map"] = "accepted work"
        except ironpool.PoolClosed:
            report["inherited_map"] = "PoolClosed"
        with ironpool.Pool(1) as own:
            report["own"] = own.submit(square, 7).result(timeout=20)
            report["own_pids"] = sorted(worker_pids(own) | zygote_pids())
    except BaseException as exc:  # reported to the parent
        report["error"] = repr(exc)
    finally:
        os.write(conn_fd, json.dumps(report).encode())
        os._exit(0)


def test_fork_with_a_live_pool():
    pool = ironpool.Pool(2)
    try:
        assert pool.submit(square, 3).result(timeout=30) == 9
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _in_child(w, pool)
        os.close(w)
        try:
            assert pool.submit(square, 4).result(timeout=30) == 16  # while the child lives
            ready, _, _ = select.select([r], [], [], 30)
            assert ready, "the forked child did not report"
            data = b""
            while chunk := os.read(r, 65536):
                data += chunk
        finally:
            os.close(r)
            _, status = os.waitpid(pid, 0)
        report = json.loads(data)
        assert os.waitstatus_to_exitcode(status) == 0
        assert "error" not in report, report
        assert report["inherited"] == "PoolClosed" and report["inherited_map"] == "PoolClosed"
        assert "fork" in report["message"]
        assert report["own"] == 49
        assert wait_until(lambda: _gone(report["own_pids"]), 3)  # the child's pool and template are gone
        assert list(pool.map(square, range(10))) == [x * x for x in range(10)]
    finally:
        pool.shutdown()


def _use_inherited(q, pool):
    try:
        pool.submit(square, 1)
        q.put("accepted")
    except ironpool.PoolClosed:
        q.put("PoolClosed")


def test_fork_based_multiprocessing_child_refuses_the_inherited_pool():
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with ironpool.Pool(1) as pool:
        assert pool.submit(square, 5).result(timeout=30) == 25
        q = ctx.Queue()
        p = ctx.Process(target=_use_inherited, args=(q, pool))
        p.start()
        try:
            assert q.get(timeout=30) == "PoolClosed"
        finally:
            p.join(10)
        assert p.exitcode == 0
        assert pool.submit(square, 6).result(timeout=30) == 36


def test_python_exits_promptly_with_a_pool_left_open():
    code = "import ironpool\np = ironpool.Pool(2)\nprint(p.submit(abs, -3).result())\n"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "3", proc.stderr
    assert time.monotonic() - start < 10
