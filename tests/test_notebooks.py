"""Code from a Jupyter notebook, ``python -c``, stdin and a script without a
main guard runs in ironpool workers.

The notebook runs in a real Jupyter kernel (nbclient + ipykernel), the
others in fresh interpreters. Each checks that tasks ran in other processes
and that the caller's top-level code was never executed again in a worker
(it appends a line to a file when it runs: the file must have one line).
"""

from __future__ import annotations

import json
import textwrap

import pytest
from conftest import PYTHON, run_python

# One program, run every way: top-level functions (one calling another),
# a lambda, a class, and its instances both ways.
_PROGRAM = textwrap.dedent("""
    import json, os, sys
    import ironpool

    with open(MARKS, "a") as f:
        f.write(f"ran in {os.getpid()}\\n")

    def helper(x):
        return x + 100

    def work(x):
        return helper(x) * 2

    class Point:
        def __init__(self, x):
            self.x = x

        def norm(self):
            return abs(self.x)

    with ironpool.Pool(2) as pool:
        out = {
            "map": list(pool.map(work, range(4))),
            "lambda": pool.submit(lambda y: (y * 3, os.getpid()), 5).result(),
            "class": [p.norm() for p in pool.map(Point, [-1, 2, -3])],
            "methods": list(pool.map(lambda p: p.norm(), [Point(-4), Point(5)])),
            "me": os.getpid(),
        }
    print(json.dumps(out))
""")


def _check(stdout: str, marks) -> None:
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["map"] == [200, 202, 204, 206]
    assert out["lambda"][0] == 15 and out["lambda"][1] != out["me"]  # ran in a worker
    assert out["class"] == [1, 2, 3]
    assert out["methods"] == [4, 5]
    assert marks.read_text().splitlines() == [f"ran in {out['me']}"]  # never re-executed in a worker


def _program(marks) -> str:
    return _PROGRAM.replace("MARKS", repr(str(marks)))


def test_python_c(tmp_path):
    marks = tmp_path / "marks"
    out = run_python("-c", _program(marks))
    assert out.returncode == 0, out.stderr
    _check(out.stdout, marks)


def test_stdin(tmp_path):
    import subprocess

    marks = tmp_path / "marks"
    out = subprocess.run([PYTHON, "-"], input=_program(marks), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    _check(out.stdout, marks)


def test_script_without_main_guard(tmp_path):
    marks = tmp_path / "marks"
    script = tmp_path / "no_guard.py"
    script.write_text(_program(marks))
    out = run_python(str(script), cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    _check(out.stdout, marks)


def test_ipython_script(tmp_path):
    pytest.importorskip("IPython")
    marks = tmp_path / "marks"
    script = tmp_path / "program.ipy"
    script.write_text(_program(marks))
    out = run_python("-m", "IPython", "--no-banner", "--quick", str(script), cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    _check(out.stdout, marks)


# ---- a real Jupyter kernel ------------------------------------------------------

_CELLS = [
    """
    import json, os
    import ironpool
    with open(MARKS, "a") as f:
        f.write(f"ran in {os.getpid()}\\n")
    results = {"me": os.getpid()}

    def helper(x):
        return x + 100

    def square(x):
        return helper(x) * 2

    class Point:
        def __init__(self, x):
            self.x = x

        def norm(self):
            return abs(self.x)

    pool = ironpool.Pool(2)
    results["first"] = list(pool.map(square, range(4)))
    """,
    """results["lambda"] = pool.submit(lambda y: (y * 3, os.getpid()), 5).result()""",
    """results["class"] = [p.norm() for p in pool.map(Point, [-1, 2, -3])]""",
    """results["methods"] = list(pool.map(lambda p: p.norm(), [Point(-4), Point(5)]))""",
    # The cell redefines the function between two maps of the same pool.
    """
    def square(x):
        return x * x * 1000

    results["redefined"] = list(pool.map(square, range(4)))
    """,
    """
    pool.shutdown()
    print(json.dumps(results))
    """,
]


def test_jupyter_notebook(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    marks = tmp_path / "marks"
    cells = [nbformat.v4.new_code_cell(textwrap.dedent(c).replace("MARKS", repr(str(marks)))) for c in _CELLS]
    notebook = nbformat.v4.new_notebook(cells=cells)
    client = nbclient.NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    text = "".join(o.get("text", "") for o in notebook.cells[-1].outputs if o.get("name") == "stdout")
    out = json.loads(text.strip().splitlines()[-1])
    assert out["first"] == [200, 202, 204, 206]
    assert out["lambda"][0] == 15 and out["lambda"][1] != out["me"]
    assert out["class"] == [1, 2, 3]
    assert out["methods"] == [4, 5]
    assert out["redefined"] == [0, 1000, 4000, 9000]  # the new definition, in the same pool
    assert marks.read_text().splitlines() == [f"ran in {out['me']}"]
