"""The README's example runs as written."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_example_runs_as_written(tmp_path):
    text = README.read_text()
    example = text[text.index("## Example") :]
    code = re.search(r"```python\n(.*?)```", example, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].endswith("ValueError('unlucky')") and float(lines[0].split()[0]) > 0
    assert lines[1] == "42"
    assert re.fullmatch(r"21 items done in \d+ tasks, workers \d+% busy", lines[2]), lines[2]
