"""Process trees: nothing a task starts outlives its worker, and the template's
death is survivable.

Real processes and signals. Each task starts grandchildren (a plain
``Popen``, one in a new session, and a stdlib ``multiprocessing`` fork pool),
tells the test their pids, and the test checks that they are gone (pid no
longer exists, or a zombie about to be reaped by init) within a deadline once
the worker is gone by each path: timeout, recycling, outside kill, segfault,
pool shutdown, caller SIGKILL.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
from concurrent.futures import CancelledError

import ironpool
import psutil
import pytest
from conftest import PYTHON, running, wait_until
from ironpool import _zygote

GONE_WITHIN = 5.0

# Keeps a task's multiprocessing pool referenced after the task returns, so
# that its finaliser does not stop the pool (we want it left running).
_KEEP: list = []


def spawn_tree(with_mp: bool = True) -> dict:
    """Starts grandchildren of the calling worker; returns their pids."""
    plain = subprocess.Popen(["sleep", "300"])
    session = subprocess.Popen(["sleep", "300"], start_new_session=True)
    pids = {"worker": os.getpid(), "plain": [plain.pid], "session": [session.pid], "mp": []}
    if with_mp:
        import multiprocessing

        mp_pool = multiprocessing.get_context("fork").Pool(2)
        mp_pool.apply(os.getpid)  # its workers are up
        _KEEP.append(mp_pool)
        pids["mp"] = [p.pid for p in mp_pool._pool]
    _KEEP.extend([plain, session])
    return pids


def tree_and_wait(beacon, with_mp: bool = True) -> None:
    beacon.notify(json.dumps(spawn_tree(with_mp)))
    beacon.wait()


def tree_and_return(with_mp: bool = True) -> dict:
    return spawn_tree(with_mp)


def tree_and_crash(beacon) -> None:
    beacon.notify(json.dumps(spawn_tree(True)))
    os.kill(os.getpid(), signal.SIGSEGV)


def grandchildren(info: dict) -> list[int]:
    return info["plain"] + info["session"] + info["mp"]


def gone(pid: int) -> bool:
    """No such process: it was killed *and* reaped (zombies do not count as
    gone here, because the template, as subreaper, must reap them)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE and psutil.Process(pid).ppid() == 1
    except psutil.NoSuchProcess:
        return True


def assert_all_gone(pids: list[int]) -> None:
    assert pids
    ok = wait_until(lambda: all(gone(p) for p in pids), GONE_WITHIN)
    left = []
    for p in pids:
        try:
            proc = psutil.Process(p)
            left.append((p, proc.status(), proc.ppid(), proc.cmdline()[:3]))
        except psutil.NoSuchProcess:
            pass
    assert ok, f"still there: {left}"


def started_tree(beacon) -> dict:
    info = json.loads(beacon.started(1)[0])
    assert all(running(p) for p in grandchildren(info)), info
    return info


# --- (a)-(d): the worker goes, its tree goes ----------------------------------


def test_timeout_kills_the_tasks_tree(beacon):
    with ironpool.Pool(1, task_timeout=3) as pool:
        fut = pool.submit(tree_and_wait, beacon)
        info = started_tree(beacon)
        with pytest.raises(ironpool.TaskTimeout):
            fut.result(30)
        assert_all_gone(grandchildren(info))
        # The pool goes on.
        assert pool.submit(os.getpid).result(30) != info["worker"]


def test_recycled_worker_takes_its_tree_with_it():
    with ironpool.Pool(1, max_tasks_per_worker=1) as pool:
        info = pool.submit(tree_and_return).result(30)
        assert_all_gone(grandchildren(info))
        assert pool.submit(os.getpid).result(30) != info["worker"]


@pytest.mark.parametrize("how", ["sigkill", "segfault"])
def test_killed_worker_takes_its_tree_with_it(beacon, how):
    with ironpool.Pool(1) as pool:
        if how == "sigkill":
            fut = pool.submit(tree_and_wait, beacon)
            info = started_tree(beacon)
            os.kill(info["worker"], signal.SIGKILL)
        else:
            fut = pool.submit(tree_and_crash, beacon)
            info = json.loads(beacon.started(1)[0])
        with pytest.raises(ironpool.WorkerCrashed):
            fut.result(30)
        assert_all_gone(grandchildren(info))
        assert pool.submit(os.getpid).result(30) != info["worker"]


@pytest.mark.parametrize("how", ["shutdown", "with", "terminate"])
def test_pool_shutdown_takes_every_tree_with_it(beacon, how):
    pool = ironpool.Pool(2)
    try:
        infos = [pool.submit(tree_and_return, i == 0).result(30) for i in range(2)]
        if how == "terminate":
            fut = pool.submit(tree_and_wait, beacon, False)
            infos.append(started_tree(beacon))
        pids = [p for info in infos for p in grandchildren(info)]
        assert all(running(p) for p in pids)
        if how == "shutdown":
            pool.shutdown()
        elif how == "with":
            with pool:
                pass
        else:
            pool.terminate()
            with pytest.raises((ironpool.PoolClosed, CancelledError)):
                fut.result(30)
        assert_all_gone(pids)
    finally:
        pool.terminate()


# --- (e): the caller is SIGKILLed ---------------------------------------------

CALLER_SCRIPT = """\
import json, os, sys
sys.path.insert(0, sys.argv[1])
import ironpool
from test_process_tree import tree_and_return, tree_and_wait, spawn_tree

class Fifo:
    def __init__(self, path):
        self.path = path
    def notify(self, token):
        with open(self.path, "w") as f:
            f.write(token + "\\n")
    def wait(self):
        import time
        time.sleep(300)

pool = ironpool.Pool(2)
first = pool.submit(tree_and_return).result()
fifo = sys.argv[2]
os.mkfifo(fifo)
pool.submit(tree_and_wait, Fifo(fifo), False)
with open(fifo) as f:          # returns once the second task's tree is up
    second = json.loads(f.readline())
print(json.dumps([first, second]), flush=True)
sys.stdin.read()
"""


def test_sigkill_of_the_caller_takes_every_tree_with_it(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen(
        [PYTHON, "-c", CALLER_SCRIPT, here, str(tmp_path / "fifo")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, proc.stderr.read() if proc.poll() is not None else "no output in time"
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        infos = json.loads(line)
        pids = [p for info in infos for p in grandchildren(info)]
        pids += [info["worker"] for info in infos]
        assert all(running(p) for p in pids)
        proc.kill()
        proc.wait(10)
        # Killed, then reaped by the template or (if they outlived it) init.
        assert wait_until(lambda: not any(running(p) for p in pids), GONE_WITHIN), [
            (p, psutil.Process(p).status()) for p in pids if running(p)
        ]
    finally:
        proc.kill()
        proc.wait()


# --- item 13: the template's death is survivable ------------------------------


def template_of(pool: ironpool.Pool) -> int:
    """The pid of the template process the pool's workers are forked from."""
    worker = pool.submit(os.getpid).result(30)
    return psutil.Process(worker).ppid()


def notify_and_wait(beacon) -> None:
    beacon.notify(os.getpid())
    beacon.wait()


def test_existing_pool_survives_the_templates_sigkill(beacon):
    with ironpool.Pool(2) as pool:
        old = template_of(pool)
        assert old in {z.pid for z in _zygote._zygotes.values()}
        # Both workers busy, so that the next tasks stay queued.
        busy = [pool.submit(notify_and_wait, beacon) for _ in range(2)]
        beacon.started(2)
        queued = [pool.submit(pow, 2, i) for i in range(20)]
        os.kill(old, signal.SIGKILL)
        later = [pool.submit(pow, 3, i) for i in range(20)]
        # Only the tasks that were running may fail, and only as crashes.
        for f in busy:
            with pytest.raises(ironpool.WorkerCrashed):
                f.result(30)
        assert [f.result(30) for f in queued] == [2**i for i in range(20)]
        assert [f.result(30) for f in later] == [3**i for i in range(20)]
        new = template_of(pool)
        assert new != old and running(new)
        assert not running(old)
        # A pool started now shares the new template.
        with ironpool.Pool(1) as other:
            assert template_of(other) == new


def test_new_pool_right_after_the_templates_sigkill_works():
    with ironpool.Pool(1) as pool:
        old = template_of(pool)
    os.kill(old, signal.SIGKILL)
    with ironpool.Pool(2) as pool:
        assert sorted(pool.map(abs, range(-5, 0))) == [1, 2, 3, 4, 5]
        assert template_of(pool) != old
    zygote = next(z for z in _zygote._zygotes.values() if z.pid != old)
    assert zygote.alive()
    pid = zygote.pid
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not running(pid), GONE_WITHIN)
    assert not zygote.alive(), "alive() must see the death at once"
    with ironpool.Pool(1) as pool:
        assert pool.submit(sum, [1, 2]).result(30) == 3
