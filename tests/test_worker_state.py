"""``ironpool.worker_state()``: what the initializer returned, one per worker,
fresh for a replaced worker (pitfalls P3 and P5; the seed-001 case: a
scanner that is not thread-safe must get one instance per worker)."""

from __future__ import annotations

import os
import threading
import uuid
from html.parser import HTMLParser

import ironpool
import pytest
from conftest import worker_key


class ItemScanner(HTMLParser):
    """A stateful scanner, like the flex scanner of seed 001: what it has
    read of the current item and its buffer span ``feed()`` calls, so two
    threads feeding one instance corrupt each other's results."""

    def __init__(self) -> None:
        super().__init__()
        self.token = uuid.uuid4().hex  # which instance this is, across processes too
        self.items: list[tuple[str, str]] = []
        self.item: str | None = None
        self.text = ""

    def handle_starttag(self, tag, attrs):
        self.item, self.text = dict(attrs)["id"], ""

    def handle_data(self, data):
        self.text += data

    def handle_endtag(self, tag):
        self.items.append((self.item, self.text))

    def take(self) -> list[tuple[str, str]]:
        items, self.items = self.items, []
        return items


def document(i: int) -> tuple[str, str]:
    """Item ``i`` in two pieces, cut inside its text."""
    return f'<item id="{i}">te', f"xt {i}</item>"


def new_scanner():
    return ItemScanner()


def scan(halves):
    scanner = ironpool.worker_state()
    for half in halves:
        scanner.feed(half)
    return worker_key(), id(scanner), scanner.token, scanner.take()


def scan_in_two_feeds(halves, barrier: threading.Barrier, shared: ItemScanner | None = None):
    scanner = shared if shared is not None else ironpool.worker_state()
    scanner.feed(halves[0])
    barrier.wait(timeout=30)  # both tasks are half-way through their documents
    scanner.feed(halves[1])
    return scanner.take()


def token_and_worker(_=None):
    return ironpool.worker_state().token, worker_key()


def block_on(event: threading.Event):
    event.wait()


def test_each_worker_has_its_own_scanner_instance(make_pool):
    pool = make_pool(2, initializer=new_scanner)
    out = list(pool.map(scan, [document(i) for i in range(40)], chunksize=1))
    assert [items for *_, items in out] == [[(str(i), f"text {i}")] for i in range(40)]
    instances_of: dict = {}
    worker_of: dict = {}
    for worker, address, token, _ in out:
        instances_of.setdefault(worker, set()).add(token)
        worker_of.setdefault((worker[0], address), set()).add(worker)
    assert all(len(tokens) == 1 for tokens in instances_of.values()), instances_of
    assert all(len(workers) == 1 for workers in worker_of.values()), "two workers shared one instance"
    assert len({t for tokens in instances_of.values() for t in tokens}) == len(instances_of)


def test_a_shared_scanner_breaks_under_threads_and_worker_state_does_not():
    # The seed-001 failure, made deterministic: two tasks on two threads
    # each feed half a document, wait for each other, then feed the rest.
    with ironpool.Pool(2, backend="threads", initializer=new_scanner) as pool:
        shared = ItemScanner()
        barrier = threading.Barrier(2)
        mixed = [pool.submit(scan_in_two_feeds, document(i), barrier, shared) for i in (1, 2)]
        assert [f.result(timeout=30) for f in mixed] != [[("1", "text 1")], [("2", "text 2")]]
        barrier = threading.Barrier(2)
        own = [pool.submit(scan_in_two_feeds, document(i), barrier) for i in (1, 2)]
        assert [f.result(timeout=30) for f in own] == [[("1", "text 1")], [("2", "text 2")]]


def test_a_recycled_worker_runs_the_initializer_again(make_pool):
    pool = make_pool(2, initializer=new_scanner, max_tasks_per_worker=1)
    out = list(pool.map(token_and_worker, range(6), chunksize=1))
    assert len({token for token, _ in out}) == 6, "a recycled worker kept its predecessor's state"
    assert len({worker for _, worker in out}) == 6


def test_a_crashed_worker_process_is_replaced_with_fresh_state():
    with ironpool.Pool(1, initializer=new_scanner) as pool:
        before = pool.submit(token_and_worker).result(timeout=30)
        assert isinstance(pool.submit(os._exit, 3).exception(timeout=30), ironpool.WorkerCrashed)
        after = pool.submit(token_and_worker).result(timeout=30)
    assert after[0] != before[0] and after[1][0] != before[1][0]


def test_an_abandoned_worker_thread_is_replaced_with_fresh_state():
    release = threading.Event()
    try:
        with ironpool.Pool(1, backend="threads", initializer=new_scanner, task_timeout=0.3) as pool:
            before = pool.submit(token_and_worker).result(timeout=30)
            assert isinstance(pool.submit(block_on, release).exception(timeout=30), ironpool.TaskTimeout)
            after = pool.submit(token_and_worker).result(timeout=30)
    finally:
        release.set()
    assert after[0] != before[0] and after[1] != before[1]


@pytest.mark.parametrize(("initializer", "state"), [(int, 0), (type(None), None)])
def test_whatever_the_initializer_returns_is_the_state(make_pool, initializer, state):
    pool = make_pool(1, initializer=initializer)  # None too: the initializer ran
    assert pool.submit(ironpool.worker_state).result(timeout=30) is state


@pytest.mark.parametrize("where", ["caller", "thread of the caller"])
def test_worker_state_outside_a_worker_names_the_problem(where):
    errors: list = []

    def read() -> None:
        try:
            ironpool.worker_state()
        except ironpool.NoWorkerState as exc:
            errors.append(exc)

    if where == "caller":
        read()
    else:
        thread = threading.Thread(target=read)
        thread.start()
        thread.join()
    assert len(errors) == 1 and "only available inside a task" in str(errors[0])
