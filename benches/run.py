"""ironpool against its peers, side by side, in one run.

    python benches/run.py                 # everything, full size (make bench)
    python benches/run.py --quick         # smaller sizes (make bench-quick)
    python benches/run.py --only roundtrip,big_output
    python benches/run.py --list
    python benches/run.py --only startup --compare benches/last-run-seam.txt

Every measurement (one scenario, one library) runs in a fresh child process
with a time limit, so a library that hangs or crashes shows up as "timeout"
or "error" in its row and the run always ends. Every pool has 2 workers.
Tables show medians; "ratio" is peer / ironpool for the column marked with
"*" (lower is better for all of them, so > 1 means ironpool did better).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import peers  # noqa: E402
import scen_basic  # noqa: E402
import scen_cluster  # noqa: E402
import scen_data  # noqa: E402
import scen_faults  # noqa: E402
import scen_joblib  # noqa: E402
from common import PARTIAL, RESULT, WORKERS, Ctx, Scenario, median, pid_alive  # noqa: E402

SCENARIOS: list[Scenario] = (
    scen_basic.SCENARIOS + scen_data.SCENARIOS + scen_faults.SCENARIOS + scen_joblib.SCENARIOS
    + scen_cluster.SCENARIOS
)
BY_NAME = {s.name: s for s in SCENARIOS}


# Child side ---------------------------------------------------------------------


def child_main(args: argparse.Namespace) -> int:
    scenario = BY_NAME[args.child[0]]
    ctx = Ctx(quick=args.quick, variant=args.variant, files_dir=args.files_dir)
    try:
        result = scenario.run(args.child[1], ctx)
        print(RESULT + json.dumps(result, default=str), flush=True)
    finally:
        peers.finish()
    return 0


# Runner side --------------------------------------------------------------------


def _session_members(sid: int) -> list[int]:
    """Processes in session ``sid``: what a child left behind (it was started
    in a session of its own)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            pid = int(name)
            try:
                if os.getsid(pid) == sid:
                    found.append(pid)
            except OSError:
                pass
    return found


def _reap(sid: int, grace: float = 2.0) -> int:
    """SIGKILLs what is left of the child's session after ``grace`` seconds;
    returns how many were still there."""
    deadline = time.monotonic() + grace
    left = _session_members(sid)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in _session_members(sid) if pid_alive(p)]
    left = [p for p in left if pid_alive(p)]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(left)


def run_child(scenario: Scenario, case: str, variant: str, quick: bool, files_dir: str | None,
              logdir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", scenario.name, case, "--variant", variant]
    if quick:
        cmd.append("--quick")
    if files_dir:
        cmd += ["--files-dir", files_dir]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("PYTHONWARNINGS", "ignore")
    log_path = os.path.join(logdir, f"{scenario.name}-{variant}-{case}.log".replace("/", "_").replace(" ", "_"))
    timeout = scenario.timeout(quick)
    results: list[dict] = []
    partials: queue.Queue = queue.Queue()
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, cwd=ROOT)

        def reader() -> None:
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if line.startswith(RESULT):
                    results.append(json.loads(line[len(RESULT):]))
                elif line.startswith(PARTIAL):
                    partials.put(json.loads(line[len(PARTIAL):]))

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        status = None
        if scenario.driver is not None:
            out = scenario.driver(proc, partials, timeout)
            status = out.pop("status", None)
            if not status:
                results.append(out)
        try:
            proc.wait(timeout=max(0.0, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            status = "timeout"
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
        th.join(5)
        leftover = _reap(proc.pid) if scenario.driver is None else 0
    if results:
        res = results[-1]
        if status == "timeout":
            res["exit"] = f"did not exit within {timeout:.0f} s"
        elif proc.returncode not in (0, None) and scenario.driver is None:
            res["exit"] = f"exit status {proc.returncode}"
        if leftover:
            res["exit"] = (res.get("exit", "") + f" {leftover} processes still running 2 s after exit").strip()
        return res
    last = None
    while not partials.empty():
        last = partials.get()
    if status is None:
        status = f"error (exit {proc.returncode})"
        tail = _tail(log_path)
        if tail:
            status += f": {tail}"
    res = dict(last or {})
    res["status"] = status
    return res


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1][:100] if lines else ""
    except OSError:
        return ""


def aggregate(runs: list[dict]) -> dict:
    """Medians of numeric fields over repeated fresh-process runs."""
    ok = [r for r in runs if "status" not in r]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    for key, value in ok[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = median([r.get(key) for r in ok])
    if len(ok) > 1:
        out["repeats"] = len(ok)
    return out


def print_table(scenario: Scenario, variant: str, rows: list[tuple[str, dict]]) -> None:
    headers = ["library"] + [c.header + ("*" if c.key == scenario.ratio_key else "") for c in scenario.columns]
    if scenario.ratio_key:
        headers.append("ratio")
    if any(r.get("exit") for _, r in rows):
        headers.append("after the measurement")
    ref = next((r for case, r in rows if case.startswith("ironpool")), None)
    ref_value = ref.get(scenario.ratio_key) if ref and scenario.ratio_key else None
    table = []
    for case, r in rows:
        cells = [peers.label(case)]
        if "status" in r:
            cells.append(r["status"])
            cells += [c.render(r[c.key]) if c.key in r else "" for c in scenario.columns[1:]]
        else:
            cells += [c.render(r.get(c.key)) for c in scenario.columns]
        if scenario.ratio_key:
            v = r.get(scenario.ratio_key) if "status" not in r else None
            if isinstance(v, (int, float)) and isinstance(ref_value, (int, float)) and ref_value > 0:
                cells.append(f"{v / ref_value:.2f}x")
            else:
                cells.append("")
        if any(x.get("exit") for _, x in rows):
            cells.append(r.get("exit", ""))
        table.append(cells)
    widths = [max(len(str(row[i])) for row in [headers, *table]) for i in range(len(headers))]
    for i in range(len(widths)):
        widths[i] = min(widths[i], 56)

    def fmt(row: list[str]) -> str:
        parts = []
        for i, cell in enumerate(row):
            cell = str(cell)
            if len(cell) > widths[i]:
                cell = cell[: widths[i] - 3] + "..."
            parts.append(cell.ljust(widths[i]) if i == 0 or not _numeric(cell) else cell.rjust(widths[i]))
        return "  " + "  ".join(parts).rstrip()

    title = scenario.title + (f"  [variant: {variant}]" if variant else "")
    print()
    print(title)
    print(fmt(headers))
    print("  " + "  ".join("-" * w for w in widths))
    for row in table:
        print(fmt(row))
    sys.stdout.flush()


def _numeric(cell: str) -> bool:
    c = cell.replace(",", "").replace(".", "").replace("x", "").replace("-", "")
    return c.isdigit()


def versions() -> str:
    from importlib import metadata

    out = []
    for dist in ("ironpool", "joblib", "loky", "mpire", "pebble", "ray", "numpy", "pandas"):
        try:
            out.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(f"{dist} (not installed)")
    return ", ".join(out)


def ironpool_fingerprint() -> str:
    """The git commit and the state of ironpool's sources and extension, to
    tell whether the package changed while the benchmarks ran (it is an
    editable install)."""
    import glob
    import hashlib

    h = hashlib.sha1()
    for path in sorted(glob.glob(os.path.join(ROOT, "python", "ironpool", "*"))):
        try:
            st = os.stat(path)
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            pass
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    return f"commit {commit or '?'}, sources {h.hexdigest()[:10]}"


#: A scenario this much slower than in the recorded run is flagged.
SLOWER_FLAG = 1.5


def newest_record() -> str | None:
    """The ``benches/last-run*.txt`` committed last (by commit time; files
    not committed yet count as newest, by modification time)."""
    import glob

    def when(path: str) -> float:
        try:
            out = subprocess.run(["git", "-C", ROOT, "log", "-1", "--format=%ct", "--", path],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        return float(out) if out else os.stat(path).st_mtime + 1e10

    paths = glob.glob(os.path.join(HERE, "last-run*.txt"))
    return max(paths, key=when) if paths else None


def recorded_figures(path: str) -> dict[tuple[str, str], float]:
    """ironpool's own figure (the column marked "*") per (scenario,
    variant) in a recorded run's tables. Columns are read at the places
    the dashes under the header give."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    title = re.compile(r"^(\w+): .*?(?:  \[variant: ([^\]]*)\])?$")
    found: dict[tuple[str, str], float] = {}
    for i, line in enumerate(lines[:-3]):
        m = title.match(line)
        if not m or m.group(1) not in BY_NAME or not lines[i + 2].strip().startswith("-"):
            continue
        spans = [(d.start(), d.end()) for d in re.finditer(r"-+", lines[i + 2])]
        header = [lines[i + 1][a:b].strip() for a, b in spans]
        star = next((k for k, h in enumerate(header) if h.endswith("*")), None)
        if star is None:
            continue
        for row in lines[i + 3:]:
            if not row.startswith("  ") or not row.strip():
                break
            if row[spans[0][0]:spans[0][1]].strip().startswith("ironpool"):
                a, b = spans[star]
                # Right-aligned numbers may start left of their dashes.
                cell = row[:b].rsplit("  ", 1)[-1].strip() if a < len(row) else ""
                try:
                    found[(m.group(1), m.group(2) or "")] = float(cell.replace(",", ""))
                except ValueError:
                    pass
                break
    return found


def print_comparison(path: str, now: dict[tuple[str, str], float]) -> None:
    then = recorded_figures(path)
    print(f"\ncompared with {os.path.relpath(path, ROOT)}: ironpool's own figure (the '*' column), "
          f"now / then (> 1 is slower); flagged above {SLOWER_FLAG}x")
    for key, value in now.items():
        name = key[0] + (f" [{key[1]}]" if key[1] else "")
        old = then.get(key)
        if old is None or old <= 0:
            print(f"  {name:34} {'-':>10} {value:10.4g}   not in the recorded run")
            continue
        ratio = value / old
        flag = "  SLOWER" if ratio > SLOWER_FLAG else ""
        print(f"  {name:34} {old:10.4g} {value:10.4g}   {ratio:5.2f}x{flag}")


def ironpool_figure(scenario: Scenario, rows: list[tuple[str, dict]]) -> float | None:
    """The '*' figure of the first ironpool row, as the ratio column uses it."""
    ref = next((r for case, r in rows if case.startswith("ironpool")), None)
    if ref is None or "status" in ref or not scenario.ratio_key:
        return None
    value = ref.get(scenario.ratio_key)
    return float(value) if isinstance(value, (int, float)) else None


def main() -> int:
    ap = argparse.ArgumentParser(description="ironpool benchmarks against its peers")
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--only", help="comma-separated scenario names (see --list)")
    ap.add_argument("--list", action="store_true", help="list the scenarios")
    ap.add_argument("--compare", metavar="FILE", nargs="?", const="newest",
                    help="compare ironpool's figures with a recorded run (default: the benches/last-run*.txt "
                         "committed last) and flag any scenario more than 1.5x slower")
    ap.add_argument("--keep-logs", action="store_true", help="keep each child's stderr log and say where")
    ap.add_argument("--child", nargs=2, metavar=("SCENARIO", "CASE"), help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="", help=argparse.SUPPRESS)
    ap.add_argument("--files-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args)
    if args.list:
        for s in SCENARIOS:
            print(f"{s.name:20} {s.title}")
        return 0
    chosen = SCENARIOS
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            ap.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
        chosen = [BY_NAME[n] for n in names]

    ray_missing = peers.ray_available()
    started = time.perf_counter()
    print(f"ironpool benchmarks ({'quick' if args.quick else 'full'} size), {WORKERS} workers per pool")
    print(f"machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), Linux {platform.release()}, "
          f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.2f}")
    print(f"versions: {versions()}")
    fingerprint = ironpool_fingerprint()
    print(f"ironpool: {fingerprint}")
    if ray_missing:
        print(f"ray: skipped, {ray_missing}")
    print(__doc__.strip().split("\n\n")[-1].replace("\n", " "))
    compare_with = newest_record() if args.compare == "newest" else args.compare
    if args.compare and (compare_with is None or not os.path.exists(compare_with)):
        ap.error(f"--compare: no recorded run at {compare_with or 'benches/last-run*.txt'}")
    measured: dict[tuple[str, str], float] = {}
    logdir = tempfile.mkdtemp(prefix="ironpool-bench-logs-")
    files_dir = None
    try:
        for scenario in chosen:
            if scenario.needs_files and files_dir is None:
                from ironpool.demo import job as csvjob

                files_dir = tempfile.mkdtemp(prefix="ironpool-bench-files-")
                n = 16 if args.quick else 48
                _, nbytes = csvjob.make_files(files_dir, n, 100_000)
                print(f"\n(file_job: generated {n} CSV files x 100,000 rows, {nbytes / 1e6:.0f} MB)")
            cases = [c for c in scenario.cases(args.quick) if not (ray_missing and c.split(":")[0] == "ray")]
            for variant in scenario.variants:
                rows = []
                for case in cases:
                    reps = scenario.repeats(args.quick)
                    if case == "ray":
                        reps = min(reps, 3)
                    runs = [run_child(scenario, case, variant, args.quick, files_dir, logdir) for _ in range(reps)]
                    rows.append((case, aggregate(runs)))
                print_table(scenario, variant, rows)
                figure = ironpool_figure(scenario, rows)
                if figure is not None:
                    measured[(scenario.name, variant)] = figure
                for note in scenario.notes:
                    print(f"  note: {note}")
    finally:
        if args.keep_logs:
            print(f"\nchild logs kept in {logdir}")
        else:
            shutil.rmtree(logdir, ignore_errors=True)
        if files_dir:
            shutil.rmtree(files_dir, ignore_errors=True)
    if ironpool_fingerprint() != fingerprint:
        print(f"\nWARNING: ironpool's sources changed during the run (now {ironpool_fingerprint()}); "
              "rows measured before and after the change are not comparable")
    if compare_with:
        print_comparison(compare_with, measured)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average at the end {os.getloadavg()[0]:.2f} "
          "(the machine is shared: other processes compete for its CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
