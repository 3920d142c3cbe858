"""The joblib backend ``"ironpool"`` (``ironpool.joblib``), driven by real
joblib calls, real worker processes and signals, and a real scikit-learn
grid search."""

from __future__ import annotations

import ctypes
import glob
import os
import signal
import tempfile
import textwrap

import ironpool
import ironpool.joblib
import joblib
import numpy as np
import pytest
from conftest import run_python, running, wait_until
from joblib import Parallel, delayed, parallel_config

# --- tasks (module level: workers import this module) --------------------------


def square(x):
    return x * x


def pid_of(_=None):
    return os.getpid()


def rendezvous(beacon):
    """Holds its worker until the test releases it: N of these at once are on N workers."""
    beacon.notify(os.getpid())
    beacon.wait()
    return os.getpid()


def hang(beacon):
    beacon.notify(os.getpid())
    beacon.wait()  # released only when the test ends


def segfault_when_released(beacon):
    beacon.notify(os.getpid())
    beacon.wait()
    ctypes.string_at(0)


class QuotaExceeded(Exception):
    def __init__(self, user, used):
        super().__init__(user, used)
        self.user = user
        self.used = used


def over_quota(user):
    raise QuotaExceeded(user, 42)


def nested_pids(n_jobs, backend=None):
    """A Parallel call inside a task: where do its tasks run?"""
    inner = Parallel(n_jobs=n_jobs, backend=backend)(delayed(pid_of)(i) for i in range(4))
    return os.getpid(), inner, type(joblib.parallel.get_active_backend()[0]).__name__


def inspect_array(arr, temp_folder):
    """What a worker sees of a big array argument."""
    root = arr
    while getattr(root, "base", None) is not None:
        root = root.base
    if isinstance(root, memoryview):
        root = root.obj
    return {
        "memmap": isinstance(arr, np.memmap),
        "writeable": arr.flags.writeable,
        "buffer": type(root).__name__,
        "sum": float(arr.sum()),
        "shape": arr.shape,
        "temp_files": os.listdir(temp_folder),
    }


# --- helpers --------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fresh_pools():
    """Each test starts with no pool kept by the backend and leaves none."""
    ironpool.joblib.shutdown()
    yield
    ironpool.joblib.shutdown()


def worker_pids(beacon, n_jobs=2):
    """The pids of the backend's current workers (one rendezvous per worker)."""
    gen = Parallel(n_jobs=n_jobs, backend="ironpool", return_as="generator", batch_size=1)(
        delayed(rendezvous)(beacon) for _ in range(n_jobs)
    )
    pids = {int(p) for p in beacon.started(n_jobs)}
    beacon.release(n_jobs)
    assert set(gen) == pids
    return pids


# --- registration and packaging -------------------------------------------------


def test_import_ironpool_does_not_import_joblib():
    code = "import sys, ironpool; ironpool.Pool; print('joblib' in sys.modules, 'sklearn' in sys.modules)"
    out = run_python("-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_importing_the_module_registers_the_backend():
    assert joblib.parallel.BACKENDS["ironpool"] is ironpool.joblib.IronpoolBackend
    with parallel_config(backend="ironpool", n_jobs=2):
        pids = set(Parallel()(delayed(pid_of)(i) for i in range(20)))
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_unknown_option_is_an_error_naming_it():
    with pytest.raises(TypeError, match="'task_timout'"):
        with parallel_config(backend="ironpool", task_timout=3):
            pass


def test_pool_options_reach_the_pool():
    # max_tasks_per_worker=1: every batch gets a fresh worker.
    with parallel_config(backend="ironpool", max_tasks_per_worker=1):
        pids = Parallel(n_jobs=2, batch_size=1)(delayed(pid_of)(i) for i in range(4))
    assert len(set(pids)) == 4


# --- n_jobs -------------------------------------------------------------------------


@pytest.mark.parametrize("n_jobs", [1, 2, 3, -1, -2, -100])
def test_n_jobs_means_what_it_means_for_loky(n_jobs):
    ours = ironpool.joblib.IronpoolBackend(nesting_level=0).effective_n_jobs(n_jobs)
    lokys = joblib.parallel.BACKENDS["loky"](nesting_level=0).effective_n_jobs(n_jobs)
    assert ours == lokys


def test_n_jobs_zero_is_refused():
    with pytest.raises(ValueError, match="n_jobs == 0"):
        Parallel(n_jobs=0, backend="ironpool")(delayed(square)(1) for _ in range(2))


def test_n_jobs_one_runs_in_the_caller():
    assert Parallel(n_jobs=1, backend="ironpool")(delayed(pid_of)(i) for i in range(3)) == [os.getpid()] * 3


def test_n_jobs_minus_one_uses_every_cpu(beacon):
    assert len(worker_pids(beacon, n_jobs=joblib.cpu_count())) == joblib.cpu_count()
    with parallel_config(backend="ironpool", n_jobs=-1):
        assert Parallel()(delayed(square)(i) for i in range(10)) == [i * i for i in range(10)]


# --- results, batching, dispatch -----------------------------------------------------


def test_auto_batching_grows_batches_of_tiny_tasks(capsys):
    out = Parallel(n_jobs=2, backend="ironpool", verbose=10)(delayed(square)(i) for i in range(5000))
    assert out == [i * i for i in range(5000)]
    err = capsys.readouterr().err
    assert "Using backend IronpoolBackend with 2 concurrent workers." in err
    assert "Batch computation too fast" in err and "Setting batch_size=" in err
    assert "Done 5000 out of 5000" in err


def test_fixed_batch_size_and_the_pool_start_line(capsys):
    out = Parallel(n_jobs=2, backend="ironpool", batch_size=7, verbose=10)(delayed(square)(i) for i in range(50))
    assert out == [i * i for i in range(50)]
    err = capsys.readouterr().err
    assert "ironpool: started a pool of 2 workers" in err
    assert "Batch computation" not in err


def test_return_as_generator_yields_before_the_call_ends(beacon):
    gen = Parallel(n_jobs=2, backend="ironpool", return_as="generator", batch_size=1)(
        [delayed(square)(3), delayed(rendezvous)(beacon)]
    )
    assert next(gen) == 9  # while the second task still holds its worker
    pid = int(beacon.started(1)[0])
    beacon.release()
    assert list(gen) == [pid]


def test_return_as_generator_unordered_yields_in_completion_order(beacon):
    gen = Parallel(n_jobs=2, backend="ironpool", return_as="generator_unordered", batch_size=1)(
        [delayed(rendezvous)(beacon), delayed(square)(4)]
    )
    assert next(gen) == 16  # the first task has not finished
    pid = int(beacon.started(1)[0])
    beacon.release()
    assert list(gen) == [pid]


@pytest.mark.parametrize("pre_dispatch,pulled", [(2, 2), ("all", 6)])
def test_pre_dispatch_bounds_how_much_input_is_taken(beacon, pre_dispatch, pulled):
    taken = []

    def tasks():
        for i in range(6):
            taken.append(i)
            yield delayed(rendezvous)(beacon)

    gen = Parallel(n_jobs=2, backend="ironpool", return_as="generator", batch_size=1, pre_dispatch=pre_dispatch)(
        tasks()
    )
    beacon.started(2)  # both workers hold a task
    assert taken == list(range(pulled))  # pre_dispatch=2: none pulled ahead of the two dispatched
    beacon.release(6)
    assert len(list(gen)) == 6 and len(taken) == 6


# --- errors, crashes, timeouts ----------------------------------------------------------


def test_a_task_error_is_raised_as_its_own_type():
    with pytest.raises(QuotaExceeded) as info:
        Parallel(n_jobs=2, backend="ironpool")(delayed(over_quota)(f"user{i}") for i in range(4))
    assert info.value.used == 42 and info.value.user.startswith("user")
    assert "over_quota" in str(info.value.__cause__)  # the worker's traceback
    assert Parallel(n_jobs=2, backend="ironpool")(delayed(square)(i) for i in range(3)) == [0, 1, 4]


def test_a_segfault_fails_only_its_task_and_the_pool_goes_on(beacon):
    before = worker_pids(beacon)
    gen = Parallel(n_jobs=2, backend="ironpool", return_as="generator", batch_size=1)(
        [delayed(square)(i) for i in range(6)] + [delayed(segfault_when_released)(beacon)]
    )
    assert [next(gen) for _ in range(6)] == [i * i for i in range(6)]  # the others' results arrive
    crashed = int(beacon.started(1)[0])
    beacon.release()
    with pytest.raises(ironpool.WorkerCrashed) as info:
        next(gen)
    err = info.value
    assert err.signal == signal.SIGSEGV and err.pid == crashed
    assert "segfault_when_released" in str(err), str(err)  # names the task
    assert wait_until(lambda: not running(crashed))
    # The same pool serves the next call; the other worker was not touched.
    after = worker_pids(beacon)
    assert crashed in before and crashed not in after
    assert before - {crashed} <= after


def test_timeout_kills_the_hung_worker_only(beacon):
    before = worker_pids(beacon)
    with pytest.raises(ironpool.TaskTimeout) as info:
        Parallel(n_jobs=2, backend="ironpool", timeout=0.5)([delayed(hang)(beacon)])
    hung = int(beacon.started(1)[0])
    assert isinstance(info.value, TimeoutError)  # what code written for loky catches
    assert info.value.pid == hung and "hang" in str(info.value)
    assert wait_until(lambda: not running(hung))  # really gone, not abandoned
    after = worker_pids(beacon)
    assert hung not in after and before - {hung} <= after


def test_the_parallel_object_keeps_its_timeout():
    par = Parallel(n_jobs=2, backend="ironpool", timeout=30)
    assert par(delayed(square)(i) for i in range(4)) == [0, 1, 4, 9]
    assert par.timeout == 30


@pytest.mark.parametrize("retries", [0, 1])  # with retries the killed task must not run again
def test_an_error_kills_the_calls_other_running_tasks(beacon, retries):
    with parallel_config(backend="ironpool", retries=retries):
        gen = Parallel(n_jobs=2, return_as="generator_unordered", batch_size=1)(
            [delayed(hang)(beacon), delayed(over_quota)("late")]
        )
        busy = int(beacon.started(1)[0])
        with pytest.raises(QuotaExceeded):
            list(gen)
    # Its result would be dropped: like loky, the backend does not let it run on.
    assert wait_until(lambda: not running(busy))
    with pytest.raises(TimeoutError):
        beacon.started(1, timeout=0.5)  # and it did not start again
    assert Parallel(n_jobs=2, backend="ironpool")(delayed(square)(i) for i in range(3)) == [0, 1, 4]


# --- nesting and reuse -----------------------------------------------------------------------


@pytest.mark.parametrize("inner_backend", [None, "ironpool"])
def test_nested_calls_run_sequentially_in_their_worker(inner_backend):
    out = Parallel(n_jobs=2, backend="ironpool")(delayed(nested_pids)(2, inner_backend) for _ in range(4))
    for worker, inner, active in out:
        assert worker != os.getpid()
        assert inner == [worker] * 4  # no pool inside the worker, no task sent back to the pool
        assert active == "SequentialBackend"


def test_calls_with_the_same_n_jobs_reuse_one_pool(beacon):
    first = worker_pids(beacon)
    assert worker_pids(beacon) == first
    three = worker_pids(beacon, n_jobs=3)  # other settings: the idle pool is shut down
    assert not three & first
    assert all(wait_until(lambda p=p: not running(p)) for p in first)
    ironpool.joblib.shutdown()
    assert all(wait_until(lambda p=p: not running(p)) for p in three)


# --- big arrays -------------------------------------------------------------------------------


@pytest.mark.parametrize("max_nbytes,writeable", [("1K", False), (None, True)])
def test_big_arrays_travel_in_shared_memory_not_memmap_files(tmp_path, max_nbytes, writeable):
    arr = np.random.default_rng(0).random(1_000_000)  # 8 MB
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "joblib_memmapping_folder_*")))
    out = Parallel(n_jobs=2, backend="ironpool", max_nbytes=max_nbytes, temp_folder=str(tmp_path))(
        delayed(inspect_array)(arr, str(tmp_path)) for _ in range(4)
    )
    for seen in out:
        assert seen["sum"] == float(arr.sum()) and seen["shape"] == arr.shape
        assert not seen["memmap"] and seen["temp_files"] == []
        assert seen["buffer"] == "SegmentView"  # a view of ironpool's shared memory
        # Over max_nbytes: sent once per call, read-only like loky's mmap_mode="r";
        # max_nbytes=None: an ordinary argument, a private writable copy.
        assert seen["writeable"] is writeable
    assert os.listdir(tmp_path) == []
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "joblib_memmapping_folder_*"))) == before
    assert arr.flags.writeable  # the caller's array is left as it was


def test_mmap_modes_that_write_back_are_refused():
    arr = np.zeros(1_000_000)
    with pytest.raises(ValueError, match="mmap_mode='r\\+'"):
        Parallel(n_jobs=2, backend="ironpool", mmap_mode="r+")(delayed(np.sum)(arr) for _ in range(2))


def test_loky_would_have_memmapped_the_same_call(tmp_path):
    # The check above can fail: under loky the same call gets a memmap backed by a
    # file in temp_folder. (In a child: loky's executor keeps semaphores in /dev/shm,
    # which other tests check this process does not hold.)
    code = textwrap.dedent(f"""
        import numpy as np
        from joblib import Parallel, delayed
        from test_joblib_backend import inspect_array
        arr = np.random.default_rng(0).random(1_000_000)
        seen = Parallel(n_jobs=2, backend="loky", max_nbytes="1K", temp_folder={str(tmp_path)!r})(
            delayed(inspect_array)(arr, {str(tmp_path)!r}) for _ in range(2))[0]
        print(seen["memmap"], bool(seen["temp_files"]))
    """)
    out = run_python("-c", code, cwd=os.path.dirname(__file__))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


def array_total(a):
    return float(a.sum())


def test_a_kept_open_parallel_sends_an_array_changed_between_calls():
    arr = np.ones(1_000_000)  # over max_nbytes: sent once per burst, checked on every re-send
    with Parallel(n_jobs=2, backend="ironpool") as par:
        assert par(delayed(array_total)(arr) for _ in range(2)) == [1e6, 1e6]
        arr[:] = 2.0
        assert par(delayed(array_total)(arr) for _ in range(2)) == [2e6, 2e6]


def test_loky_would_have_sent_the_old_contents():
    # The check above can fail: a kept-open loky Parallel finds the array it
    # memory-mapped before by identity and sends that file again unread.
    code = textwrap.dedent("""
        import numpy as np
        from joblib import Parallel, delayed
        from test_joblib_backend import array_total
        arr = np.ones(1_000_000)
        with Parallel(n_jobs=2, backend="loky") as par:
            par(delayed(array_total)(arr) for _ in range(2))
            arr[:] = 2.0
            print(par(delayed(array_total)(arr) for _ in range(2)))
    """)
    out = run_python("-c", code, cwd=os.path.dirname(__file__))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[1000000.0, 1000000.0]"


# --- seed 001: a joblib threads backend in a non-thread-safe native library ------------------

SEED_001 = """
import os, sys, time
from joblib import Parallel, delayed
{switch}

# Stands in for the flex scanner of seed 001: one global buffer per process,
# and a call that gives up the GIL half-way through (as native code does).
_buffer = None

def scan(text):
    global _buffer
    _buffer = text
    time.sleep(0.005)
    if _buffer is not text:
        print("fatal flex scanner internal error--end of buffer missed", file=sys.stderr, flush=True)
        os._exit(2)
    return len(text.split())

if __name__ == "__main__":
    docs = [" ".join(["word"] * (i % 5 + 1)) for i in range(40)]
    counts = Parallel(n_jobs=2, {backend})(delayed(scan)(d) for d in docs)
    print(sum(counts))
"""


def test_seed_001_switches_from_threads_with_one_line(tmp_path):
    script = tmp_path / "weather.py"
    script.write_text(textwrap.dedent(SEED_001.format(switch="", backend='backend="threading"')))
    broken = run_python(str(script))
    assert broken.returncode == 2 and "fatal flex scanner internal error" in broken.stderr
    # The one line: import ironpool.joblib and say backend="ironpool".
    script.write_text(textwrap.dedent(SEED_001.format(switch="import ironpool.joblib", backend='backend="ironpool"')))
    fixed = run_python(str(script))
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.split() == [str(sum(i % 5 + 1 for i in range(40)))]


# --- scikit-learn -------------------------------------------------------------------------------


def test_grid_search_gives_the_results_of_n_jobs_1():
    from sklearn.datasets import make_classification
    from sklearn.model_selection import GridSearchCV
    from sklearn.tree import DecisionTreeClassifier

    X, y = make_classification(n_samples=300, n_features=8, random_state=0)
    grid = {"max_depth": [2, 4, None], "min_samples_leaf": [1, 5]}

    def search(n_jobs):
        gs = GridSearchCV(DecisionTreeClassifier(random_state=0), grid, cv=3, n_jobs=n_jobs)
        return gs.fit(X, y).cv_results_

    sequential = search(1)
    with parallel_config(backend="ironpool"):
        parallel = search(2)
    assert parallel["params"] == sequential["params"]
    for key in sequential:
        if "test_score" in key or key == "rank_test_score":
            np.testing.assert_array_equal(parallel[key], sequential[key], err_msg=key)


def test_an_estimator_in_a_script_runs_on_the_workers(tmp_path):
    # __main__ code as users write it: the estimator's callable comes from the script.
    script = tmp_path / "fit.py"
    script.write_text(textwrap.dedent("""
        import os
        import ironpool.joblib
        from joblib import parallel_config
        from sklearn.datasets import make_regression
        from sklearn.linear_model import Ridge
        from sklearn.model_selection import cross_val_score

        def scorer(estimator, X, y):
            return float(os.getpid() != PARENT)

        PARENT = os.getpid()
        X, y = make_regression(n_samples=60, n_features=4, random_state=0)
        with parallel_config(backend="ironpool"):
            print(cross_val_score(Ridge(), X, y, cv=4, n_jobs=2, scoring=scorer).tolist())
    """))
    out = run_python(str(script))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[1.0, 1.0, 1.0, 1.0]"

