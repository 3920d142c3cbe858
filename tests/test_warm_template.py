"""The warm template: workers start with the caller's packages imported.

Each test runs a fresh caller in a subprocess (what the caller imported is
what the template is asked to import). Modules that misbehave are real
packages written to ``tmp_path``; each misbehaves only where ``ironpool``
is already imported (the template and its probe), since the caller must
import it cleanly first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

PYTHON = sys.executable

pytest.importorskip("pandas")


def run_caller(script: str, *args: str, timeout: float = 120) -> dict:
    """Runs ``script`` as a fresh ``__main__``; returns the JSON it prints last."""
    proc = subprocess.run([PYTHON, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "stderr": proc.stderr}


def test_a_recycled_worker_has_pandas_before_its_task_imports_it():
    out = run_caller("""
        import json, logging, sys
        logging.basicConfig(level=logging.DEBUG, format="%(name)s %(message)s")
        import pandas
        import ironpool

        def task():
            # Looks before anything of this task could import pandas.
            import os, sys
            return os.getpid(), "pandas" in sys.modules

        with ironpool.Pool(1, max_tasks_per_worker=1) as pool:
            info = pool.template_info(timeout=100)
            # The worker forked before the warm-up ended is replaced after
            # each task: the second task runs on a worker forked since.
            runs = [pool.submit(task).result() for _ in range(2)]
        print(json.dumps({"warm": info.warm, "pending": info.pending, "skipped": info.skipped, "runs": runs}))
    """)
    assert "pandas" in out["warm"] and "numpy" in out["warm"], out
    assert out["pending"] == [] and "pandas" not in out["skipped"], out
    (pid1, _), (pid2, has_pandas) = out["runs"]
    assert pid1 != pid2 and has_pandas
    # Visible in the log, too.
    imported = [ln for ln in out["stderr"].splitlines() if ln.startswith("ironpool ") and "imported" in ln]
    assert imported and "pandas" in imported[0], out["stderr"]


def test_the_warm_up_survives_workers_that_exit_while_it_runs():
    # Each worker exit makes the template sweep its children for workers'
    # orphans; the warm-up's probe is a child too, and must be spared.
    out = run_caller("""
        import json
        import pandas
        import ironpool

        def task():
            return 1

        with ironpool.Pool(1, max_tasks_per_worker=1) as pool:
            exits = 0
            while pool.template_info(timeout=0).pending and exits < 2000:
                pool.submit(task).result()
                exits += 1
            info = pool.template_info(timeout=100)
        print(json.dumps({"warm": info.warm, "pending": info.pending, "skipped": info.skipped, "exits": exits}))
    """)
    assert "pandas" in out["warm"] and out["pending"] == [], out
    assert 0 < out["exits"] < 2000, out  # the warm-up ended while workers were recycled


def test_the_warm_up_waits_while_every_cpu_computes_and_ends_once_one_is_free(tmp_path):
    # The imports would only slow a pool whose workers take every CPU, and
    # no worker is forked meanwhile that they could serve.
    stop, started = tmp_path / "stop", tmp_path / "started"
    os.mkfifo(started)
    write_packages(tmp_path, {"ip_light": "VALUE = 1\n"})
    out = run_caller(f"""
        import json, os, sys
        sys.path.insert(0, sys.argv[1])
        import ironpool

        def spin():
            with open({str(started)!r}, "w") as f:
                f.write("x")
            while not os.path.exists({str(stop)!r}):
                pass
            return os.getpid()

        n = len(os.sched_getaffinity(0))
        with ironpool.Pool(n) as busy_pool:
            spinning = [busy_pool.submit(spin) for _ in range(n)]
            fifo, got = os.open({str(started)!r}, os.O_RDWR), b""  # O_RDWR: no EOF between writers
            while len(got) < n:  # every worker spins
                got += os.read(fifo, n)
            import ip_light  # new: the next pool asks the template for it
            with ironpool.Pool(1) as pool:
                busy = pool.template_info(timeout=2)
                open({str(stop)!r}, "w").close()
                pids = {{f.result() for f in spinning}}
                idle = pool.template_info(timeout=100)
        print(json.dumps({{"busy": [busy.warm, busy.pending], "idle": [idle.warm, idle.pending],
                          "workers": len(pids), "n": n}}))
    """, str(tmp_path))
    assert out["workers"] == out["n"], out
    assert "ip_light" in out["busy"][1] and "ip_light" not in out["busy"][0], out
    assert "ip_light" in out["idle"][0] and out["idle"][1] == [], out


BAD_PACKAGES = {
    # Each misbehaves only where ironpool is already imported (template, probe).
    "ip_raises": "import sys\nif 'ironpool' in sys.modules:\n    raise ImportError('no backend for this here')\n",
    "ip_exits": "import os, sys\nif 'ironpool' in sys.modules:\n    os._exit(3)\n",
    "ip_hangs": "import sys, time\nif 'ironpool' in sys.modules:\n    time.sleep(3600)\n",
    "ip_thread": "import threading\nthreading.Thread(target=threading.Event().wait, daemon=True).start()\n",
    "ip_prints": "print('hello from ip_prints')\n",
    "ip_fine": "VALUE = 42\n",
}


def write_packages(root, packages: dict[str, str]) -> None:
    for name, code in packages.items():
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(code)


def test_misbehaving_modules_are_skipped_and_the_pool_works(tmp_path):
    write_packages(tmp_path, BAD_PACKAGES)
    out = run_caller("""
        import json, sys
        sys.path.insert(0, sys.argv[1])
        import ip_raises, ip_exits, ip_hangs, ip_thread, ip_prints, ip_fine
        import ironpool, ironpool._zygote
        ironpool._zygote.WARM_MODULE_SECONDS = 1.0  # ip_hangs is killed after this

        def task():
            import os, sys
            held = sorted(m for m in sys.modules if m.startswith("ip_"))
            return os.getpid(), held, len(os.listdir("/proc/self/task"))

        with ironpool.Pool(1, max_tasks_per_worker=1) as pool:
            info = pool.template_info(timeout=100)
            runs = [pool.submit(task).result() for _ in range(3)]
        print(json.dumps({"warm": info.warm, "skipped": info.skipped, "pending": info.pending, "runs": runs}))
    """, str(tmp_path))
    skipped = out["skipped"]
    assert "raised ImportError: no backend for this here" in skipped["ip_raises"], skipped
    assert "ended the process (exit status 3)" in skipped["ip_exits"], skipped
    assert "did not finish within 1 s" in skipped["ip_hangs"], skipped
    assert "started 1 thread" in skipped["ip_thread"], skipped
    assert "printed" in skipped["ip_prints"], skipped
    # The warm-up went on after each failure.
    assert "ip_fine" in out["warm"] and out["pending"] == [], out
    for name in BAD_PACKAGES.keys() - {"ip_fine"}:
        assert name not in out["warm"], out
    # Workers forked since hold ip_fine only, and have one thread.
    _, modules, threads = out["runs"][-1]
    assert modules == ["ip_fine"] and threads == 1, out
    assert "hello from ip_prints" not in out["stderr"]


def test_a_template_left_with_threads_restarts_cold_and_refuses_the_module(tmp_path):
    # Clean in the probe (which leaves a mark), starts a thread in the
    # template itself: the template must not fork again.
    marker = tmp_path / "probed"
    write_packages(tmp_path, {"ip_late_thread": textwrap.dedent(f"""
        import os, sys, threading
        if 'ironpool' in sys.modules:
            if os.path.exists({str(marker)!r}):
                threading.Thread(target=threading.Event().wait, daemon=True).start()
            else:
                open({str(marker)!r}, "w").close()
    """)})
    out = run_caller("""
        import json, sys
        sys.path.insert(0, sys.argv[1])
        import ip_late_thread
        import ironpool, ironpool._zygote as z

        def task():
            import os, sys
            return "ip_late_thread" in sys.modules, len(os.listdir("/proc/self/task"))

        with ironpool.Pool(1) as pool:
            first = pool.template_info(timeout=100)
            after = pool.submit(task).result()  # on a worker of the restarted template
        with ironpool.Pool(1, max_tasks_per_worker=1) as pool:
            again = pool.template_info(timeout=100)
            fresh = [pool.submit(task).result() for _ in range(2)]
        print(json.dumps({"first": first.skipped, "after": after, "again": [again.warm, again.pending],
                          "fresh": fresh, "refused": z._refused}))
    """, str(tmp_path))
    assert "started a thread in the template" in out["first"]["ip_late_thread"], out
    assert out["after"] == [False, 1], out
    # The restarted template is asked for the rest, never for it again.
    assert "ip_late_thread" in out["refused"] and "ip_late_thread" not in out["again"][0], out
    assert out["fresh"][-1] == [False, 1], out


def test_a_task_running_when_the_template_retires_runs_again_instead_of_failing(tmp_path):
    # A pool's worker is mid-task when another pool's warm-up leaves the
    # shared template with threads: the template kills its workers, but
    # that task did nothing wrong and must run again, not fail as crashed.
    marker, started, go, runs = (tmp_path / n for n in ("probed", "started", "go", "runs"))
    runs.mkdir()
    write_packages(tmp_path, {"ip_thread_later": textwrap.dedent(f"""
        import os, threading
        if os.environ.get("IP_CALLER") != str(os.getpid()):  # the template or its probe
            if os.path.exists({str(marker)!r}):
                threading.Thread(target=threading.Event().wait, daemon=True).start()
            else:
                open({str(marker)!r}, "w").close()
    """)})
    os.mkfifo(started)
    os.mkfifo(go)
    out = run_caller(f"""
        import json, os, sys
        sys.path.insert(0, sys.argv[1])
        import ironpool

        def task():
            open(os.path.join({str(runs)!r}, str(os.getpid())), "w").close()
            if len(os.listdir({str(runs)!r})) == 1:  # the first attempt waits
                with open({str(started)!r}, "w") as f:
                    f.write("x")
                open({str(go)!r}).read()
            return os.getpid()

        with ironpool.Pool(1) as busy:
            fut = busy.submit(task)
            with open({str(started)!r}) as f:
                f.read()
            os.environ["IP_CALLER"] = str(os.getpid())
            import ip_thread_later
            with ironpool.Pool(1) as other:
                skipped = other.template_info(timeout=100).skipped
            pid = fut.result(timeout=60)
            state = busy.stats()
        print(json.dumps({{"skipped": skipped, "pid": pid, "runs": sorted(os.listdir({str(runs)!r})),
                          "failed": state.failed}}))
    """, str(tmp_path))
    assert "started a thread in the template" in out["skipped"]["ip_thread_later"], out
    # Two attempts on two workers; the second one's answer is the result.
    assert len(out["runs"]) == 2 and str(out["pid"]) in out["runs"] and out["failed"] == 0, out


def test_warm_false_gives_a_template_without_the_callers_modules():
    out = run_caller("""
        import json
        import pandas
        import ironpool

        def task():
            import sys
            return "pandas" in sys.modules

        with ironpool.Pool(1, warm=False, max_tasks_per_worker=1) as cold:
            info = cold.template_info(timeout=5)
            runs = [cold.submit(task).result() for _ in range(2)]
            with ironpool.Pool(1) as warm:
                other = warm.template_info(timeout=100)
        print(json.dumps({"info": [info.pid, info.warm, info.pending], "runs": runs,
                          "warm_pid": other.pid, "warm": other.warm}))
    """)
    pid, warm, pending = out["info"]
    assert warm == [] and pending == [] and out["runs"] == [False, False], out
    assert out["warm_pid"] != pid and "pandas" in out["warm"], out


def test_bad_arguments_name_what_was_wrong():
    import ironpool

    with pytest.raises(TypeError, match="warm must be True or False"):
        ironpool.Pool(1, warm="yes")  # type: ignore[arg-type]
    with ironpool.Pool(1) as pool:
        with pytest.raises(ValueError, match="timeout must be a non-negative number"):
            pool.template_info(timeout=-1)


def test_caller_modules_are_third_party_top_level_packages():
    from ironpool import _zygote

    names = _zygote.caller_modules()
    assert "pytest" not in names and "ironpool" not in names  # tooling, ourselves
    assert not [n for n in names if "." in n or n.startswith("_") or n in sys.stdlib_module_names], names


@pytest.mark.parametrize("recycling", [False, True])
def test_what_the_tasks_imported_is_warmed_for_later_workers(tmp_path, recycling):
    """A caller that never imports ``ip_task_only``, whose tasks do: the
    worker reports it, and the template imports it, at once for a pool that
    recycles its workers, else once the pool is shut down (never taking a
    CPU from its tasks); a worker forked after that holds it before any of
    its tasks runs (imported in the template, not in the worker)."""
    installed = tmp_path / "site-packages"  # installed packages only: not the user's own code
    installed.mkdir()
    write_packages(installed, {"ip_task_only": "import os\nIMPORTED_IN = os.getpid()\n"})
    out = run_caller("""
        import json, os, sys
        sys.path.insert(0, sys.argv[1])
        import ironpool

        def uses_it():
            import ip_task_only
            return os.getpid(), ip_task_only.IMPORTED_IN

        def looks():
            module = sys.modules.get("ip_task_only")
            return os.getpid(), getattr(module, "IMPORTED_IN", None)

        recycling = sys.argv[2] == "True"
        with ironpool.Pool(1, max_tasks_per_worker=1 if recycling else None) as first:
            ran = first.submit(uses_it).result()
            during = first.template_info(timeout=100 if recycling else 2)
            if recycling:  # the worker after the next forks from the warm template
                seen = [first.submit(looks).result() for _ in range(2)][-1]
        if not recycling:
            with ironpool.Pool(1, max_tasks_per_worker=1) as later:
                later.template_info(timeout=100)
                seen = [later.submit(looks).result() for _ in range(2)][-1]
        print(json.dumps({"during": [during.warm, during.pending], "template": during.pid, "ran": ran,
                          "seen": seen, "caller_has_it": "ip_task_only" in sys.modules}))
    """, str(installed), str(recycling))
    assert not out["caller_has_it"], out
    (pid, imported_in) = out["ran"]
    assert pid == imported_in, out  # the first worker imported it itself
    warm, pending = out["during"]
    if recycling:
        assert "ip_task_only" in warm and pending == [], out
    else:
        assert "ip_task_only" not in warm and "ip_task_only" not in pending, out
    later_pid, later_imported_in = out["seen"]
    assert later_imported_in == out["template"] != later_pid, out


def test_warm_false_does_not_warm_what_the_tasks_imported(tmp_path):
    """A warm template for the same settings is open in the same caller: a
    report of a ``warm=False`` pool's tasks must not reach it."""
    installed = tmp_path / "site-packages"
    installed.mkdir()
    write_packages(installed, {"ip_task_cold": "VALUE = 1\n"})
    out = run_caller("""
        import json, sys
        sys.path.insert(0, sys.argv[1])
        import ironpool

        def uses_it():
            import ip_task_cold
            return ip_task_cold.VALUE

        with ironpool.Pool(1) as warm_pool:
            warm_pool.template_info(timeout=100)
            with ironpool.Pool(1, warm=False, max_tasks_per_worker=1) as cold:
                runs = [cold.submit(uses_it).result() for _ in range(2)]
                cold_info = cold.template_info(timeout=2)
            info = warm_pool.template_info(timeout=100)
        print(json.dumps({"runs": runs, "warm": info.warm, "pending": info.pending, "cold": cold_info.warm}))
    """, str(installed))
    assert out["runs"] == [1, 1] and out["cold"] == [], out
    assert "ip_task_cold" not in out["warm"] and "ip_task_cold" not in out["pending"], out


def test_the_users_own_modules_are_not_warmed_so_an_edit_shows_in_the_next_pool(tmp_path):
    """A helper beside the script (not an installed package), edited between
    two pools: the second pool runs the edited one."""
    (tmp_path / "ip_own_helper.py").write_text("VALUE = 1\n")
    out = run_caller("""
        import json, os, sys
        sys.path.insert(0, sys.argv[1])
        import ironpool

        def uses_it():
            import ip_own_helper
            return ip_own_helper.VALUE

        with ironpool.Pool(1) as first:
            one = first.submit(uses_it).result()
        with ironpool.Pool(1) as between:  # whatever the first pool asked for is imported before the edit
            between.template_info(timeout=100)
        path = os.path.join(sys.argv[1], "ip_own_helper.py")
        with open(path, "w") as f:
            f.write("VALUE = 2\\n")
        os.utime(path, (0, 2_000_000_000))  # newer than its cached bytecode
        with ironpool.Pool(1, max_tasks_per_worker=1) as later:
            info = later.template_info(timeout=100)
            two = [later.submit(uses_it).result() for _ in range(2)]
        print(json.dumps({"values": [one, *two], "warm": info.warm}))
    """, str(tmp_path))
    assert out["values"] == [1, 2, 2] and "ip_own_helper" not in out["warm"], out


def put_the_working_directory_on_sys_path() -> None:
    if "" not in sys.path:
        sys.path.insert(0, "")


def leave_a_deleted_directory_and_import():
    import tempfile

    gone = tempfile.mkdtemp()
    os.chdir(gone)
    os.rmdir(gone)
    import colorsys  # noqa: F401 - something new in sys.modules

    return "ok"


def test_a_task_that_leaves_a_deleted_working_directory_still_returns():
    """'' on sys.path (python -c, a REPL, Jupyter) needs the working
    directory to tell what the task imported: its report is given up, not
    the task's result."""
    import ironpool

    with ironpool.Pool(1) as pool:
        pool.submit(put_the_working_directory_on_sys_path).result(timeout=60)
        assert pool.submit(leave_a_deleted_directory_and_import).result(timeout=60) == "ok"
        assert pool.submit(os.getpid).result(timeout=60) > 0
