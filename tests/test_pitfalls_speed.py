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


_HAS_CLOUDPICKLE = "'cloudpickle' in __import__('sys').modules"


@pytest.mark.parametrize("defines_functions", [True, False])
def test_p9_fresh_workers_have_cloudpickle_when_main_defines_functions(tmp_path, defines_functions):
    """A script (or notebook) whose ``__main__`` defines functions sends them
    by value: each new, replaced or recycled worker must not import
    cloudpickle again. The probe itself is a builtin, so running it imports
    nothing; recycling makes every probe run on a freshly forked worker."""
    script = tmp_path / "job.py"
    script.write_text(
        "import ironpool\n"
        + ("def work(x):\n    return x\n" if defines_functions else "")
        + "if __name__ == '__main__':\n"
        "    with ironpool.Pool(1, max_tasks_per_worker=1) as pool:\n"
        f"        print([pool.submit(eval, {_HAS_CLOUDPICKLE!r}).result(timeout=60) for _ in range(3)])\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str([defines_functions] * 3)
