"""One API suite over the local processes backend and real Dask and Ray
clusters started here (``distributed.LocalCluster``, ``ray.init``), each
cluster worker running the calls in its own ironpool pool: a task's own
exception with its traceback, a segfault failing only its task, a hung task
killed by ``task_timeout``, retries counted with a file, big arrays and
``share()`` through the engine's store, cancel of a task not yet started."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path

import ironpool
import numpy as np
import psutil
import pytest
from conftest import wait_until

HERE = str(Path(__file__).resolve().parent)


# Tasks: this module is importable on the cluster workers (PYTHONPATH below).


def square(x):
    return x * x


def add(a, b):
    return a + b


def fail(x):
    raise KeyError(f"no item {x}")


def segfault(_x):
    ctypes.string_at(0)


def hang(pid_file):
    Path(pid_file).write_text(str(os.getpid()))
    while True:
        time.sleep(1)


def crash_counting(counter):
    with open(counter, "a") as f:
        f.write("run\n")
    os._exit(7)


def checksum(a):
    return float(a.sum()), a.shape, str(a.dtype)


def write_first(a):
    a.flat[0] = -1.0  # an ordinary argument arrives writable and private
    return float(a.flat[0])


def mixed(x):
    if x == 3:
        raise ValueError("three")
    if x == 5:
        ctypes.string_at(0)
    return x * 10


def blocked(gate, marker):
    """Runs once ``gate`` exists; leaves ``marker`` behind."""
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    Path(marker).touch()
    return marker


# Engines: started once, for this module only (other modules check that no
# process of theirs holds /dev/shm files, as Ray's object store does), and
# gone when it ends.


def _with_descendants(pids) -> list[psutil.Process]:
    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            out += [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return out


def _ray_processes() -> list[psutil.Process]:
    out = []
    for proc in psutil.Process().children(recursive=True):
        try:
            line = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "ray" in line:
            out.append(proc)
    return out


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0")
    client = distributed.Client(cluster)
    client.run(sys.path.insert, 0, HERE)
    yield client
    # The Dask workers, and the node pools' templates and workers below them.
    procs = _with_descendants(client.run(os.getpid).values())
    client.close()
    cluster.close()
    assert procs and wait_until(lambda: not _alive(procs), timeout=30), _alive(procs)


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    env = {"PYTHONPATH": os.pathsep.join([HERE, *sys.path])}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    yield ray
    procs = _ray_processes()
    ray.shutdown()
    assert procs and wait_until(lambda: not _alive(procs), timeout=30), _alive(procs)


@pytest.fixture(params=["processes", "dask", "ray"])
def make_pool(request):
    """Makes pools of the backend under test (2 slots each)."""
    if request.param == "dask":
        client = request.getfixturevalue("dask_client")
        return lambda **kw: ironpool.Pool(backend="dask", address=client, **kw)
    if request.param == "ray":
        request.getfixturevalue("ray_session")
        return lambda **kw: ironpool.Pool(backend="ray", **kw)
    return lambda **kw: ironpool.Pool(2, **kw)


def test_submit_map_starmap_imap_unordered(make_pool):
    with make_pool() as pool:
        assert pool.workers == 2
        assert pool.submit(square, 7).result() == 49
        assert pool.submit(add, 1, b=2).result() == 3
        assert list(pool.map(square, range(50))) == [x * x for x in range(50)]
        assert list(pool.map(add, range(5), range(5))) == [0, 2, 4, 6, 8]
        assert list(pool.starmap(add, [(1, 2), (3, 4)])) == [3, 7]
        assert sorted(pool.imap_unordered(square, range(20), chunksize=3)) == [x * x for x in range(20)]


def test_a_task_exception_keeps_its_type_and_remote_traceback(make_pool):
    with make_pool() as pool:
        with pytest.raises(KeyError, match="no item 3") as info:
            pool.submit(fail, 3).result()
        remote = info.value.__cause__
        assert type(remote).__name__ == "_RemoteTraceback"
        assert 'raise KeyError(f"no item {x}")' in str(remote) and "in fail" in str(remote)
        assert str(remote).count("Traceback (most recent call last)") == 1, "the worker's traceback, once"
        with pytest.raises(KeyError, match="no item 4"):
            list(pool.map(fail, [4, 5]))


def test_a_segfault_fails_only_its_task(make_pool):
    with make_pool() as pool:
        crashed = pool.submit(segfault, 0)
        after = [pool.submit(square, x) for x in range(6)]
        with pytest.raises(ironpool.WorkerCrashed, match="SIGSEGV"):
            crashed.result()
        assert [f.result() for f in after] == [x * x for x in range(6)]
        with pytest.raises(ironpool.WorkerCrashed):
            list(pool.map(segfault, [1], chunksize=1))
        assert list(pool.map(square, range(4))) == [0, 1, 4, 9]


def test_return_exceptions_progress_and_counts(make_pool):
    calls = []
    with make_pool() as pool:
        got = list(pool.map(mixed, range(8), chunksize=4, return_exceptions=True,
                            progress=lambda done, total: calls.append((done, total))))
        assert [g for i, g in enumerate(got) if i not in (3, 5)] == [x * 10 for x in range(8) if x not in (3, 5)]
        assert isinstance(got[3], ValueError) and str(got[3]) == "three"
        assert isinstance(got[5], ironpool.WorkerCrashed) and "SIGSEGV" in str(got[5])
        assert calls[-1] == (8, 8)
        s = pool.stats()
        assert s.items_done >= 8 and s.done == s.submitted and s.queued == s.running == 0, s


def test_a_hung_task_is_killed_by_task_timeout(make_pool, tmp_path):
    pid_file = tmp_path / "pid"
    with make_pool(task_timeout=3.0, retries=1) as pool:
        with pytest.raises(ironpool.TaskTimeout) as info:
            pool.submit(hang, str(pid_file)).result(timeout=60)
        assert len(info.value.attempts) == 1, "one earlier attempt: retries=1"
        pid = int(pid_file.read_text())
        assert wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"), pid
        assert pool.submit(square, 3).result() == 9


def test_retries_run_a_task_at_most_one_plus_retries_times(make_pool, tmp_path):
    counter = tmp_path / "runs"
    with make_pool(retries=2) as pool:
        with pytest.raises(ironpool.WorkerCrashed) as info:
            pool.submit(crash_counting, str(counter)).result(timeout=60)
    assert counter.read_text().count("run") == 3
    assert len(info.value.attempts) == 2


def test_big_arrays_arrive_intact(make_pool):
    a = np.random.default_rng(1).random((1000, 2500))  # 20 MB
    with make_pool() as pool:
        futures = [pool.submit(checksum, a) for _ in range(4)]
        assert all(f.result() == (float(a.sum()), a.shape, "float64") for f in futures)
        store = getattr(pool._backend, "store", None)
        if store is not None:
            assert len(store.entries) == 1, "sent to the engine's store once, not once per task"
        assert [pool.submit(write_first, a).result() for _ in range(2)] == [-1.0, -1.0]
        assert a[0, 0] != -1.0, "a task's writes stay in its own copy"
        a[0, 0] += 1.0  # changed: sent again
        assert pool.submit(checksum, a).result()[0] == float(a.sum())


def test_share_goes_once_and_refuses_after_release(make_pool):
    a = np.arange(3_000_000, dtype=np.int64)
    with make_pool() as pool:
        table = pool.share(a)
        assert list(pool.map(checksum, [table] * 6)) == [(float(a.sum()), a.shape, "int64")] * 6
        table.release()
        with pytest.raises(ironpool.SerializationError, match="released"):
            pool.submit(checksum, table).result()


def test_cancel_withdraws_a_task_not_yet_started(make_pool, tmp_path):
    gate = tmp_path / "gate"
    with make_pool() as pool:
        futures = [pool.submit(blocked, str(gate), str(tmp_path / f"ran{i}")) for i in range(20)]
        last = futures[-1]
        assert last.cancel(), "the last of 20 tasks on 2 slots has not started"
        assert last.cancelled()
        gate.touch()
        assert [f.result(timeout=60) for f in futures[:-1]] == [str(tmp_path / f"ran{i}") for i in range(19)]
    assert not (tmp_path / "ran19").exists(), "a cancelled task never runs"


def test_stats_name_the_processes_that_run_tasks(make_pool, request):
    with make_pool() as pool:
        pids = {pool.submit(os.getpid).result() for _ in range(4)}
        stats = pool.stats()
        if request.node.callspec.params["make_pool"] == "ray":
            assert stats == [], "Ray cannot reach every worker process: documented as empty"
            return
        assert pids <= {w.pid for w in stats}
        assert sum(w.tasks_done for w in stats) >= 4


def test_address_is_refused_where_it_means_nothing(dask_client):
    with pytest.raises(TypeError, match=r"address=.*backend='dask' or backend='ray'"):
        ironpool.Pool(address="tcp://127.0.0.1:1")
    with pytest.raises(TypeError, match="workers= sizes a cluster the pool starts"):
        ironpool.Pool(2, backend="dask", address=dask_client)
    with pytest.raises(TypeError, match="address must be a scheduler address"):
        ironpool.Pool(backend="dask", address=42)


def test_a_pool_started_cluster_is_gone_after_shutdown():
    pytest.importorskip("distributed")
    with ironpool.Pool(2, backend="dask") as pool:
        assert pool.workers == 2
        assert list(pool.map(square, range(5))) == [0, 1, 4, 9, 16]
        procs = _with_descendants(pool._backend.engine.client.run(os.getpid).values())
        assert len(procs) >= 4, "the pool's own Dask worker, its node pool's template and 2 workers"
    assert wait_until(lambda: not _alive(procs), timeout=30), _alive(procs)


def test_import_ironpool_imports_no_engine():
    code = "import sys, ironpool; print(sorted(m for m in ('distributed', 'dask', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
