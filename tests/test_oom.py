"""A worker killed by the kernel's out-of-memory killer is reported as such.

The end-to-end test puts a fresh interpreter into a memory cgroup of its
own with a small limit (v2 ``memory.max`` or v1
``memory.limit_in_bytes``, under this process's cgroup), so the kernel's
OOM killer really fires on a worker that allocates without end. Where
this machine does not allow making such a cgroup, it is skipped, saying
why; the parsing of the kernel's counters is tested in Rust
(``platform/linux/oom.rs``) against the real files either way.
"""

from __future__ import annotations

import contextlib
import json
import os
import textwrap
from pathlib import Path

import pytest
from conftest import run_python, wait_until


def _mount_of(fstype: str, option: str | None) -> tuple[str, str] | None:
    """(root, mount point) of a cgroup hierarchy, from /proc/self/mountinfo."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, after = left.split(), right.split()
        if after and after[0] == fstype and (option is None or option in after[2].split(",")):
            return fields[3], fields[4]
    return None


def _own_memory_cgroup() -> tuple[Path, str] | None:
    """This process's memory cgroup directory and the name of its limit file."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            mount, limit = _mount_of("cgroup2", None), "memory.max"
        elif "memory" in controllers.split(","):
            mount, limit = _mount_of("cgroup", "memory"), "memory.limit_in_bytes"
        else:
            continue
        if mount is None:
            continue
        root, point = mount
        rel = path[len(root):] if root != "/" and path.startswith(root) else path
        directory = Path(point) / rel.lstrip("/")
        if (directory / limit).exists() or (limit == "memory.max" and (directory / "memory.events").exists()):
            return directory, limit
    return None


@contextlib.contextmanager
def memory_limited_cgroup(limit: int):
    """A new child memory cgroup with ``limit`` bytes, removed afterwards;
    skips the test if this machine does not let us make one."""
    own = _own_memory_cgroup()
    if own is None:
        pytest.skip("no memory cgroup (v1 memory controller or v2 memory.events) for this process")
    parent, limit_file = own
    child = parent / f"ironpool-oom-test-{os.getpid()}"
    try:
        child.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a child memory cgroup under {parent}: {exc}")
    try:
        try:
            (child / limit_file).write_text(str(limit))
            swap = child / "memory.memsw.limit_in_bytes"  # v1 with swap accounting
            if swap.exists():
                swap.write_text(str(limit))
            swap_v2 = child / "memory.swap.max"
            if swap_v2.exists():
                swap_v2.write_text("0")
        except OSError as exc:
            pytest.skip(f"cannot set a memory limit in {child}: {exc}")
        yield child
    finally:
        wait_until(lambda: _removed(child), timeout=20)


def _removed(cgroup: Path) -> bool:
    try:
        cgroup.rmdir()
    except FileNotFoundError:
        return True
    except OSError:  # its processes are still exiting
        return False
    return True


_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import ironpool

    with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))  # the template and workers are started after: they are in it too

    def hog():
        chunks = []
        while True:
            chunks.append(bytearray(b"x") * (16 << 20))  # written, so really resident

    def killed_from_outside():
        os.kill(os.getpid(), signal.SIGKILL)

    out = {}
    with ironpool.Pool(1) as pool:
        for name, fn in [("hog", hog), ("kill", killed_from_outside), ("hog2", hog)]:
            try:
                pool.submit(fn).result()
            except ironpool.WorkerCrashed as err:
                out[name] = {"signal": err.signal, "oom_killed": err.oom_killed, "message": str(err)}
        out["after"] = pool.submit(sum, [1, 2]).result()
    print(json.dumps(out))
""")


def test_a_worker_killed_by_the_oom_killer_says_so(tmp_path):
    script = tmp_path / "oom.py"
    script.write_text(_SCRIPT)
    with memory_limited_cgroup(300 * 2**20) as cgroup:
        out = run_python(str(script), str(cgroup), timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for hog in ("hog", "hog2"):  # the second: one counted kill per death, not the first one again
        assert got[hog]["signal"] == 9 and got[hog]["oom_killed"] is True, got
        assert "from the kernel's out-of-memory killer" in got[hog]["message"]
    assert got["kill"]["signal"] == 9 and got["kill"]["oom_killed"] is False, got
    assert "not the out-of-memory killer" in got["kill"]["message"]
    assert got["after"] == 3
