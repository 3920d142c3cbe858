"""Pitfalls P2 (CPU quotas), P9 (start-up), P11 (chunk size), P12 (oversubscription)
reproduced against ironpool. Behaviour only: timings belong in benches/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import ironpool
import psutil
import pytest
from ironpool import _core, _zygote


def _env_of_worker(names: tuple[str, ...]) -> dict:
    return {n: os.environ.get(n) for n in names}


def _parent_pid() -> int:
    return os.getppid()


def test_p2_default_workers_honours_cpu_affinity():
    """`taskset -c 0` leaves one CPU: the default pool has one worker, not nproc."""
    if shutil.which("taskset") is None:
        pytest.skip("taskset not installed")
    code = "import ironpool; p = ironpool.Pool(); print(p.workers); p.shutdown()"
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "1"


def test_p2_default_workers_never_exceed_the_usable_cpus():
    # The cgroup quota parser is unit-tested in Rust (platform::parse_cpu_max).
    assert 1 <= _core.default_workers() <= len(os.sched_getaffinity(0))


def test_p9_workers_are_forks_of_one_template_reused_by_later_pools():
    with ironpool.Pool(2) as first:
        parents_first = {first.submit(_parent_pid).result() for _ in range(4)}
    with ironpool.Pool(2) as second:
        parents_second = {second.submit(_parent_pid).result() for _ in range(4)}
    # Every worker of both pools is a child of the same template process,
    # which is not us: no pool paid for a fresh interpreter per worker.
    assert len(parents_first) == 1
    assert parents_first == parents_second
    template = psutil.Process(parents_first.pop())
    assert template.pid != os.getpid()
    assert template.ppid() == os.getpid()
    assert any(z.pid == template.pid for z in _zygote._zygotes.values())


def test_p11_tiny_tasks_are_batched_without_a_chunksize():
    n = 50_000
    with ironpool.Pool(2) as pool:
        assert list(pool.map(abs, range(-n, 0))) == list(range(n, 0, -1))
        messages = sum(w.tasks_done for w in pool.stats())
    # One message per item would be n; measured task times grow the chunks.
    assert messages < n / 20


def test_p11_slow_tasks_keep_chunks_small_for_balance():
    import time as _t

    with ironpool.Pool(2) as pool:
        out = list(pool.map(_t.sleep, [0.02] * 20))
        messages = sum(w.tasks_done for w in pool.stats())
    assert out == [None] * 20
    assert messages >= 10  # ~20 ms items stay (nearly) one per chunk


def test_p12_blas_threads_limited_in_workers_by_default_and_overridable():
    names = _zygote.THREAD_LIMIT_VARS
    with ironpool.Pool(1) as pool:
        env = pool.submit(_env_of_worker, names).result()
    assert all(v == "1" for v in env.values()), env
    with ironpool.Pool(1, thread_limit=3) as pool:
        env = pool.submit(_env_of_worker, names).result()
    assert all(v == "3" for v in env.values()), env


def test_p12_per_worker_utilisation_is_reported():
    import time as _t

    with ironpool.Pool(2) as pool:
        list(pool.map(_t.sleep, [0.05] * 8))
        stats = pool.stats()
    assert len(stats) == 2
    assert sum(w.tasks_done for w in stats) >= 4
    assert sum(w.busy_seconds for w in stats) >= 0.35
    assert all(w.pid > 0 and w.rss > 0 for w in stats)


def _run_script(tmp_path, source: str) -> str:
    """Runs ``source`` as a script (its own ``__main__``); its stdout."""
    script = tmp_path / "job.py"
    script.write_text(source)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_p9_main_functions_lambdas_and_closures_run_on_fresh_workers_without_cloudpickle(tmp_path):
    """A script's own functions travel by value. Recycling makes every call
    run on a freshly forked worker, of a cold template: each rebuilds the
    function (with its closure, defaults, a lambda it calls, the modules it
    reads) without importing cloudpickle, which would cost every template
    start ~25 ms. A ``__main__`` class still arrives (cloudpickle, imported
    on that first need)."""
    out = _run_script(
        tmp_path,
        "import sys, math, ironpool\n"
        "SCALE = 10\n"
        "square = lambda x: x * x\n"
        "def make(offset):\n"
        "    def shifted(x, *, k=2):\n"
        "        return math.floor(square(x) * SCALE + offset + k)\n"
        "    return shifted\n"
        "def has_cloudpickle(_):\n"
        "    return 'cloudpickle' in sys.modules\n"
        "class Point:\n"
        "    def __init__(self, x):\n"
        "        self.x = x\n"
        "def through(p):\n"
        "    return ('cloudpickle' in sys.modules, p.x)\n"
        "if __name__ == '__main__':\n"
        "    with ironpool.Pool(1, max_tasks_per_worker=1, warm=False) as pool:\n"
        "        print(list(pool.map(make(5), [1, 2, 3])))\n"
        "        print(list(pool.map(has_cloudpickle, range(3))))\n"
        "        print(pool.submit(through, Point(7)).result(timeout=60))\n",
    )
    assert out.split("\n")[:3] == ["[17, 47, 97]", "[False, False, False]", "(True, 7)"]


def test_p9_the_warm_up_brings_cloudpickle_before_the_caller_uses_it(tmp_path):
    """A template warms cloudpickle first, even when the caller has not
    imported it yet, so recycled workers rebuild ``__main__`` classes
    without importing it. The probe is a builtin: running it imports nothing;
    the second runs on a worker forked after the warm-up."""
    out = _run_script(
        tmp_path,
        "import sys, ironpool\n"
        "if __name__ == '__main__':\n"
        "    with ironpool.Pool(1, max_tasks_per_worker=1) as pool:\n"
        "        before = 'cloudpickle' in sys.modules\n"
        "        info = pool.template_info(timeout=60)\n"
        "        probe = \"'cloudpickle' in __import__('sys').modules\"\n"
        "        pool.submit(eval, probe).result(timeout=60)  # the worker forked before the warm-up\n"
        "        print(before, 'cloudpickle' in info.warm, pool.submit(eval, probe).result(timeout=60))\n",
    )
    assert out.strip() == "False True True"


def _sleeps_of(thread) -> int:
    """How many times a Python thread of this process has gone to sleep."""
    return _sleeps_of_tid(str(thread.native_id))


def _sleeps_of_tid(tid: str) -> int:
    """How many times a thread of this process has gone to sleep (/proc)."""
    with open(f"/proc/self/task/{tid}/status") as f:
        return int(f.read().split("voluntary_ctxt_switches:")[1].split()[0])


def _thread_name(tid: str) -> str:
    """A thread's OS name (at most 15 characters)."""
    with open(f"/proc/self/task/{tid}/comm") as f:
        return f.read().strip()


def test_p11_a_caller_waiting_on_each_result_does_not_wake_the_results_thread_per_task():
    """While a caller waits in ``result()`` it takes its completions itself;
    waking the pool's results thread for each (to find nothing to do) cost a
    context switch per task, on a core the worker needs. Each task sleeps a
    millisecond, so its caller is surely waiting when it ends."""
    import threading
    import time as _t

    n = 200
    with ironpool.Pool(1) as pool:
        pool.submit(abs, -1).result()
        (results,) = [t for t in threading.enumerate() if t.name == "ironpool-results"]
        before = _sleeps_of(results)
        assert [pool.submit(_t.sleep, 0.001).result() for _ in range(n)] == [None] * n
        woken = _sleeps_of(results) - before
    assert woken < n // 4, woken


def test_p11_a_caller_waiting_on_each_result_does_not_wake_the_supervisor_thread_per_task():
    """A caller spinning in ``result()`` reads the workers' answers itself;
    the engine's supervisor thread, which sleeps on the same sockets, was
    woken by each of them too (and then contended for the engine's lock).

    Counted over round trips whose answer came while the caller still spun
    (within 150 µs of the 200 µs it spins): a slower one (a busy machine)
    ends the spin first and rightly leaves the answer to the supervisor.
    Each task computes for some 20 µs, so that its caller has begun
    spinning when the answer comes: an answer that beats the caller to
    ``result()`` wakes the supervisor too, and is not what this counts."""
    import time as _t

    earlier = set(os.listdir("/proc/self/task"))
    with ironpool.Pool(1) as pool:
        pool.submit(abs, -1).result()
        new = set(os.listdir("/proc/self/task")) - earlier
        (supervisor,) = [tid for tid in new if _thread_name(tid) == "ironpool-superv"]
        fast = woken = 0
        give_up = _t.monotonic() + 20
        while fast < 300 and _t.monotonic() < give_up:
            before = _sleeps_of_tid(supervisor)
            start = _t.perf_counter()
            assert pool.submit(sum, range(2000)).result() == 1999000
            if _t.perf_counter() - start < 150e-6:
                fast += 1
                woken += _sleeps_of_tid(supervisor) - before
    assert fast >= 100, f"only {fast} round trips took under 150 µs"
    assert woken < fast // 4, (woken, fast)


def _first_item_calls(x: int, address: str) -> int:
    if x == 0:  # a connection waits in the listener's backlog: no rendezvous, no hang
        import socket

        with socket.socket(socket.AF_UNIX) as s:
            s.connect(address)
    return x


def test_p11_a_map_s_first_chunk_runs_while_the_rest_of_its_input_is_read(tmp_path):
    """A slow input (a generator reading a source) and workers overlap: the
    first chunk is sent as soon as it is cut, not once the whole window is.
    The generator yields its third item only once the first item has run."""
    import functools
    import select
    import socket

    address = str(tmp_path / "first-ran")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(address)
    listener.listen(4)

    def items():
        yield 0
        yield 1
        readable, _, _ = select.select([listener], [], [], 30)
        assert readable, "no item ran before the map had read all of its input"
        yield from range(2, 40)

    try:
        with ironpool.Pool(2) as pool:
            fn = functools.partial(_first_item_calls, address=address)
            assert list(pool.map(fn, items(), chunksize=1)) == list(range(40))
    finally:
        listener.close()


def test_p11_only_exact_atoms_and_containers_of_them_skip_the_encoder():
    """The per-item check of a chunk (in Rust, at memory speed) passes
    exact atoms, small bytes and exact tuples, lists and dicts of them,
    nothing else: a subclass pickles its own way, and a large ``bytes`` is
    sent once."""
    import enum

    class Colour(enum.IntEnum):
        RED = 1

    assert _core.plain_items([1, 2.5, "s", None, True, (1, b"ab", None)], 16)
    assert not _core.plain_items([1, Colour.RED], 16)
    assert not _core.plain_items([(1, b"x" * 16)], 16)
    assert _core.plain_items([[1], ((1,),), {"k": [1, (b"ab", None)]}, b"small"], 16)
    assert not _core.plain_items([{"k": [b"x" * 16]}], 16)
    assert not _core.plain_items([{Colour.RED: 1}], 16)
    assert not _core.plain_items([[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]], 16)  # beyond the depth limit
    assert _core.atoms_only([1, "a", None, 0.5, False])
    assert not _core.atoms_only([1, (1,)])
    assert not _core.atoms_only([Colour.RED])
    assert not _core.atoms_only(["x" * 16], 16)  # a long str is not small
    # A submit's (args, kwargs), by the same rule.
    assert _core.plain_call((1, "a", b"ab"), {"k": None}, 16)
    assert _core.plain_call((), None, 16)
    assert not _core.plain_call((1,), {"k": b"x" * 16}, 16)
    assert _core.plain_call(({"rows": [1, 2]},), {"k": [None]}, 16)
    assert not _core.plain_call(([Colour.RED],), None, 16)
    assert not _core.plain_call((Colour.RED,), None, 16)
    assert not _core.plain_call([1], None, 16)  # not a tuple: the full encoder decides
