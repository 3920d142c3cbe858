"""Workers' ``logging`` records reach the caller's handlers, and their print
output reaches the caller's stdout and stderr in whole lines.

Everything is real: records are made in worker processes, travel over the
pool's channel and are handled by handlers attached here.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import sys
import textwrap
import threading
import time

import ironpool
import pytest
from conftest import run_python


class Collect(logging.Handler):
    """Keeps every record it handles."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def collect():
    """A handler on logger ``iptest`` (level DEBUG), removed afterwards."""
    logger = logging.getLogger("iptest")
    handler = Collect()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
    logging.getLogger("iptest.quiet").setLevel(logging.NOTSET)


# ---- tasks (they run in workers) ------------------------------------------------


def log_levels(x: int) -> int:
    logging.getLogger("iptest.a").debug("debug %d", x)
    logging.getLogger("iptest.a").info("info %s %s", x, "two")
    logging.getLogger("iptest.b").warning("warning %r", {"x": x})
    logging.getLogger("iptest.quiet").info("below its level")
    logging.getLogger("elsewhere").warning("no handler of ours")
    logging.getLogger("iptest.b").error("error", extra={"custom": [x], "unpicklable": threading.Lock()})
    return os.getpid()


def worker_levels() -> tuple[int, int, int]:
    return (
        logging.getLogger().level,
        logging.getLogger("iptest").level,
        logging.getLogger("iptest.quiet").getEffectiveLevel(),
    )


def log_exception() -> None:
    try:
        {}["missing"]
    except KeyError:
        logging.getLogger("iptest.exc").exception("lookup failed for %s", "missing")


def log_then_segfault() -> None:
    logging.getLogger("iptest.crash").critical("last words of %d", os.getpid())
    ctypes.string_at(0)  # SIGSEGV right after logging returned


def init_logging(tag: str) -> None:
    logging.getLogger("iptest.init").info("initializer %s in %d", tag, os.getpid())


def from_threads(threads: int, each: int) -> int:
    def run(t: int) -> None:
        log = logging.getLogger(f"iptest.thread{t}")
        for i in range(each):
            log.info("thread %d record %d %s", t, i, "x" * (i % 50))

    started = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for t in started:
        t.start()
    for t in started:
        t.join()
    return threads * each


def big_message(size: int) -> int:
    logging.getLogger("iptest.big").warning("%s", "y" * size)
    return size


def many_records(n: int, logger: str) -> float:
    log = logging.getLogger(logger)
    start = time.perf_counter()
    for i in range(n):
        log.info("record %d", i)
    return time.perf_counter() - start


def imports_logging() -> bool:
    return "logging" in sys.modules


# ---- records -------------------------------------------------------------------


def test_levels_loggers_messages_and_attributes(collect):
    logging.getLogger("iptest.quiet").setLevel(logging.WARNING)
    with ironpool.Pool(1) as pool:
        pid = pool.submit(log_levels, 7).result()
    got = [(r.levelno, r.name, r.getMessage()) for r in collect.records]
    assert got == [
        (logging.DEBUG, "iptest.a", "debug 7"),
        (logging.INFO, "iptest.a", "info 7 two"),
        (logging.WARNING, "iptest.b", "warning {'x': 7}"),
        (logging.ERROR, "iptest.b", "error"),
    ]
    for r in collect.records:
        assert r.worker_pid == pid and r.process == pid
        assert r.task == "test_logging.log_levels(7)"
        assert r.funcName == "log_levels" and r.filename == "test_logging.py"
        assert r.processName == "ironpool-worker"
    error = collect.records[-1]
    assert error.custom == [7]  # extra= attributes travel
    assert error.unpicklable.startswith("<unlocked _thread.lock")  # as their repr when they do not pickle


def test_caplog_sees_worker_records(caplog):
    caplog.set_level(logging.INFO, logger="iptest")
    with ironpool.Pool(1) as pool:
        pool.submit(log_levels, 1).result()
    assert ("iptest.b", logging.WARNING, "warning {'x': 1}") in caplog.record_tuples


def test_workers_start_with_the_callers_levels(collect):
    logging.getLogger("iptest.quiet").setLevel(logging.ERROR)
    with ironpool.Pool(1) as pool:
        assert pool.submit(worker_levels).result() == (logging.root.level, logging.DEBUG, logging.ERROR)


def test_the_callers_levels_decide_when_records_arrive(collect):
    logging.getLogger("iptest.quiet").setLevel(logging.WARNING)
    with ironpool.Pool(1) as pool:
        pool.submit(log_levels, 1).result()
        assert len(collect.records) == 4
        logging.getLogger("iptest").setLevel(logging.ERROR)  # after the workers started
        pool.submit(log_levels, 2).result()
    assert [r.getMessage() for r in collect.records[4:]] == ["error"]


def test_map_records_name_the_item(collect):
    with ironpool.Pool(2) as pool:
        pids = list(pool.map(log_levels, range(6), chunksize=3))
    tasks = {r.task for r in collect.records}
    assert tasks == {f"test_logging.log_levels({i})" for i in range(6)}
    assert {r.worker_pid for r in collect.records} == set(pids)


def test_exception_text_travels(collect):
    with ironpool.Pool(1) as pool:
        pool.submit(log_exception).result()
    (record,) = collect.records
    assert record.getMessage() == "lookup failed for missing"
    assert record.exc_info is None  # a traceback cannot cross processes; its text does
    assert record.exc_text.startswith("Traceback (most recent call last):")
    assert "KeyError: 'missing'" in record.exc_text and "in log_exception" in record.exc_text
    formatted = logging.Formatter("%(message)s").format(record)
    assert formatted.startswith("lookup failed for missing\nTraceback") and formatted.endswith("KeyError: 'missing'")


def test_record_logged_right_before_a_segfault_arrives(collect):
    with ironpool.Pool(1) as pool:
        with pytest.raises(ironpool.WorkerCrashed) as info:
            pool.submit(log_then_segfault).result()
    pid = info.value.pid
    assert [(r.getMessage(), r.worker_pid) for r in collect.records] == [(f"last words of {pid}", pid)]


def test_initializer_records_arrive(collect):
    with ironpool.Pool(2, initializer=init_logging, initargs=("A",)) as pool:
        pids = {pool.submit(os.getpid).result() for _ in range(4)}
        pool.shutdown()
    inits = [r for r in collect.records if r.name == "iptest.init"]
    assert {r.worker_pid for r in inits} >= pids
    for r in inits:
        assert r.getMessage() == f"initializer A in {r.worker_pid}"
        assert r.task == "test_logging.init_logging('A')"


def test_records_from_many_threads_arrive_whole(collect):
    with ironpool.Pool(1) as pool:
        assert pool.submit(from_threads, 4, 500).result() == 2000
    messages = [r.getMessage() for r in collect.records]
    assert len(messages) == 2000
    for t in range(4):
        mine = [m for m in messages if m.startswith(f"thread {t} ")]
        assert mine == [f"thread {t} record {i} {'x' * (i % 50)}" for i in range(500)]  # each thread's order kept


def test_big_messages_arrive_whole(collect):
    with ironpool.Pool(1) as pool:
        sizes = [100, 70_000, 4 * 2**20]  # inline, over one frame, far over the segment threshold
        assert list(pool.map(big_message, sizes)) == sizes
    assert [r.getMessage() for r in collect.records] == ["y" * s for s in sizes]


def test_ten_thousand_records(collect):
    """10k records cost tens of microseconds each, and the pool keeps its pace."""
    n = 10_000
    logging.getLogger("iptest.quiet").setLevel(logging.WARNING)
    with ironpool.Pool(1) as pool:
        pool.submit(os.getpid).result()  # started
        filtered = pool.submit(many_records, n, "iptest.quiet").result()  # dropped in the worker
        start = time.perf_counter()
        sent = pool.submit(many_records, n, "iptest.many").result()
        delivered = time.perf_counter() - start
    assert [r.getMessage() for r in collect.records] == [f"record {i}" for i in range(n)]
    print(f"10k records: {sent:.3f} s to log in the worker, {delivered:.3f} s until all handled; "
          f"filtered by level in the worker: {filtered:.4f} s")
    assert delivered < 10, "a record costs far more than a message on the pool's channel should"


def test_a_worker_that_never_logs_does_not_import_logging():
    # Spawned fresh, with a __main__ that defines no functions, so the
    # template has not imported cloudpickle (which imports logging).
    script = textwrap.dedent("""
        import ironpool, operator
        with ironpool.Pool(1) as pool:
            print(pool.submit(eval, "'logging' in __import__('sys').modules").result())
            print(pool.submit(eval, "type(__import__('logging').getLogger().handlers[0]).__name__").result())
    """)
    out = run_python("-c", script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "Forward"]  # installed the moment a task imports logging


# ---- print output -------------------------------------------------------------


_PRINTER = textwrap.dedent("""
    import os, sys
    import ironpool

    LINE = 9000  # over PIPE_BUF, so each line takes several writes to the pipe

    def chatter(args):
        who, rounds, ready = args
        open(os.path.join(ready, who), "w").close()
        while len(os.listdir(ready)) < 2:  # both workers print at once
            pass
        for i in range(rounds):
            text = f"{who} {i} " + who * (LINE + i % 100)
            print(text)
            print(text, file=sys.stderr)
        return who

    with ironpool.Pool(2) as pool:
        print("done", sorted(pool.map(chatter, [("a", ROUNDS, READY), ("b", ROUNDS, READY)], chunksize=1)))
""")


def test_print_output_of_two_workers_arrives_in_whole_lines(tmp_path):
    rounds = 400
    script = _PRINTER.replace("ROUNDS", str(rounds)).replace("READY", repr(str(tmp_path)))
    out = run_python("-c", script)
    assert out.returncode == 0, out.stderr[-2000:]
    for stream in (out.stdout, out.stderr):
        lines = stream.splitlines()
        lines = [line for line in lines if not line.startswith("done ")]
        expected = {f"{w} {i} " + w * (9000 + i % 100) for w in "ab" for i in range(rounds)}
        assert len(lines) == 2 * rounds and set(lines) == expected  # no line torn or mixed
        firsts = [line[0] for line in lines]
        switches = sum(1 for x, y in itertools.pairwise(firsts) if x != y)
        assert switches > 2, "the two workers' output did not overlap: nothing was tested"
    assert "done ['a', 'b']" in out.stdout
