"""The seam: ``Pool`` reaches its backend only through the ``Backend``
protocol, so a backend is one module. This one runs calls in the calling
thread; ``Pool``'s submit, map, starmap, imap_unordered and errors work over
it unchanged."""

from __future__ import annotations

from concurrent.futures import as_completed

import ironpool
import pytest
from ironpool import backends
from ironpool._futures import TaskFuture


class InlineBackend:
    def __init__(self, options) -> None:
        self.workers = options.workers
        self.calls: list[backends.Call] = []
        self.closed = False

    def check_open(self) -> None:
        if self.closed:
            raise ironpool.PoolClosed("closed")

    def function(self, fn):
        return self

    def release(self, _future=None) -> None:
        pass

    def submit(self, call, function=None) -> TaskFuture:
        self.check_open()
        self.calls.append(call)
        future = TaskFuture()
        if call.chunk:
            values = []
            try:
                for item in call.args:
                    values.append(call.fn(item) if call.chunk & backends.SINGLE else call.fn(*item))
            except Exception as exc:
                future.set_result((values, exc))
            else:
                future.set_result((values, None))
            return future
        try:
            future.set_result(call.fn(*call.args, **(call.kwargs or {})))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def chunk_size(self, function, remaining) -> int:
        return 3

    def share(self, value, reuse):
        raise NotImplementedError

    def stats(self):
        return []

    def counts(self):
        return backends.no_counts()

    def shutdown(self, wait, cancel_futures) -> None:
        self.closed = True

    def terminate(self) -> None:
        self.closed = True


def start(options):
    return InlineBackend(options)


@pytest.fixture
def inline(monkeypatch):
    monkeypatch.setitem(backends._BACKENDS, "inline", __name__)


def half(x):
    if x == 7:
        raise ValueError("seven")
    return x / 2


def test_the_api_runs_over_a_backend_module(inline):
    with ironpool.Pool(2, backend="inline") as pool:
        assert pool.submit(pow, 2, 5).result() == 32
        assert list(pool.map(half, range(6))) == [0, 0.5, 1, 1.5, 2, 2.5]
        assert list(pool.starmap(pow, [(2, 3), (3, 2)])) == [8, 9]
        assert sorted(pool.imap_unordered(half, [2, 4])) == [1, 2]
        futures = [pool.submit(half, x) for x in (2, 7)]
        assert {type(f.exception()) for f in as_completed(futures)} == {type(None), ValueError}
        with pytest.raises(ValueError, match="seven"):
            list(pool.map(half, range(10)))
        calls = pool._backend.calls
        assert {c.chunk for c in calls} == {0, backends.CHUNK | backends.SINGLE, backends.CHUNK}
        assert all(len(c.args) <= 3 for c in calls if c.chunk), "chunks follow the backend's chunk_size"
    with pytest.raises(ironpool.PoolClosed):
        pool.submit(pow, 2, 2)


def test_an_unknown_backend_is_refused_by_name():
    with pytest.raises(ValueError, match="backend must be one of 'processes', 'threads', 'dask', 'ray', got 'nope'"):
        ironpool.Pool(1, backend="nope")
