"""The demo ships in the package: ``python -m ironpool demo --small`` runs the
four ways on real files and checks the results against the loop's."""

from __future__ import annotations

import subprocess
import sys


def test_demo_small_runs_and_every_result_matches_the_loop():
    done = subprocess.run(
        [sys.executable, "-m", "ironpool", "demo", "--small"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = [line for line in done.stdout.splitlines() if "identical" in line or "values" in line]
    for way in ("plain loop", "ProcessPoolExecutor, DataFrames", "to_dict", "ironpool.Pool"):
        (row,) = [line for line in table if way in line]
        assert "identical to the loop's" in row or "same values" in row, row
    assert "6/6" in done.stderr  # ironpool's run drew its progress bar


def test_unknown_command_says_how_to_run_the_demo():
    done = subprocess.run([sys.executable, "-m", "ironpool"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "python -m ironpool demo" in done.stderr
