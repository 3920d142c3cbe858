"""The machinery behind ``map``, ``starmap`` and ``imap_unordered``: a bounded
window of chunks in flight over any backend, refilled as results are taken,
handed out at C speed."""

from __future__ import annotations

import itertools
import time
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future
from concurrent.futures import wait as _wait
from typing import Any

from ._core import atoms_only
from ._insight import MapClock
from ._progress import Progress, make_progress
from ._send_once import call_started
from ._serialize import describe_call
from .backends import CHUNK, KEEP_GOING, SINGLE, Backend, Call
from .errors import SerializationError, TaskTimeout, WorkerCrashed

#: A chunk failing as a whole with one of these is run again an item at a
#: time, so that only the item at fault fails (with ``return_exceptions``,
#: a pickling failure too: a neighbour's result may be the one at fault).
_ITEM_FAULTS = (WorkerCrashed, TaskTimeout)
_ITEM_FAULTS_KEPT = (WorkerCrashed, TaskTimeout, SerializationError)


#: A chunk's values are handed out by a plain iterator, which holds them
#: all until the last is taken, only if no ``str`` among them is this long.
_SMALL_STR = 256

#: A chunk of a ``range`` input travels as a range from this many items
#: (pickling a list of small ints costs ~35 ns an item; a range, a fixed ~3.5 µs).
_RANGE_CHUNK_MIN = 128

#: Chunks smaller than this go in lanes (``submit_lane``), where a chunk
#: costs no ticket or future of its own; larger ones are few enough that
#: their tickets cost nothing worth saving.
_LANE_CHUNK_MAX = _RANGE_CHUNK_MIN

#: Items in flight per worker a ``map`` with a small ``chunksize`` keeps at
#: least: twice what the engine lets a worker hold of tiny tasks
#: (``DEEP_QUEUE`` in ``supervisor/scheduler.rs``), so that, as a worker's
#: queue is topped up in one frame, the next top-up is already waiting.
_WINDOW_ITEMS = 64


def sliceable(iterable: Any) -> Any:
    """A list or a ``range`` as it is (``MapRun`` cuts its chunks by slicing:
    a slice of a range is a range, made and pickled without its items),
    anything else as an iterator."""
    return iterable if type(iterable) in (list, range) else iter(iterable)


def common_len(iterables: tuple) -> int | None:
    """The length ``map`` will have, if the inputs tell it."""
    try:
        return min(len(it) for it in iterables)
    except TypeError:
        return None


class Results:
    """The iterator ``map`` returns. Iterating it runs at C speed over whole
    chunks (``__iter__`` hands out a ``chain`` over them); ``close()``, or
    dropping it, withdraws the chunks not yet started."""

    __slots__ = ("_chunks", "_items", "_run")

    def __init__(self, run: MapRun, chunks: Generator[Iterator[Any], None, None]) -> None:
        self._run = run
        self._chunks = chunks
        self._items = itertools.chain.from_iterable(chunks)
        # Dropped without ever being started, a generator skips its finally:
        # let go of the run's hold when the generator goes, however it is
        # iterated (a for loop keeps only the chain, not this object).
        weakref.finalize(chunks, run.close)

    def __iter__(self) -> Iterator[Any]:
        return self._items

    def __next__(self) -> Any:
        return next(self._items)

    def close(self) -> None:
        self._chunks.close()
        self._run.close()  # the generator's own close() skips that if it never started


class MapRun:
    """One ``map`` over a backend: submits chunks, keeps ``window`` of them in
    flight, and yields their values in order (or as they finish)."""

    def __init__(
        self,
        backend: Backend,
        fn: Callable[..., Any],
        items: Iterator[Any] | list | range,
        *,
        total: int | None,
        timeout: float | None,
        chunksize: int | None,
        task_timeout: float | None,
        retries: int,
        ordered: bool,
        single: bool,
        keep_going: bool = False,
        progress: Any = None,
        name: str = "map",
        recorded: int = 0,
    ) -> None:
        backend.check_open()
        self.backend = backend
        self.fn = fn
        self.function: Any = backend.function(fn)
        self.items = items
        self.cut = 0  # where the next chunk of a list or range input starts
        # recorded: items a checkpoint already holds, which are not run again
        self.remaining = None if total is None else max(0, total - recorded)
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.chunksize = chunksize
        self.task_timeout = task_timeout
        self.retries = retries
        self.ordered = ordered
        self.flags = CHUNK | SINGLE if single else CHUNK  # single: items are arguments, not tuples
        if keep_going:
            self.flags |= KEEP_GOING
        self.faults = _ITEM_FAULTS_KEPT if keep_going else _ITEM_FAULTS
        self.progress: Progress | None = None
        self.reached = recorded  # items handed out, for the progress count's end
        self.name = name
        self.clock: MapClock | None = MapClock(backend)
        # Chunks in flight: enough that a worker always has the next one
        # queued, and, for chunks of few items, enough items that the
        # caller waits once per batch of results rather than once per chunk.
        per_chunk = chunksize or _WINDOW_ITEMS
        self.window = max(4, 4 * backend.workers, _WINDOW_ITEMS * backend.workers // per_chunk)
        # In order: (ticket, call) for a chunk sent alone, or a backend's
        # lane (``submit_lane``) of several; ``pending`` counts their chunks.
        self.inflight: deque[Any] = deque()
        self.pending = 0
        self.submit_lane: Any = None
        # Out of order, a backend that waits for any of a map's entries
        # lets it send tickets (``submit_many``), not futures.
        self.wait_any: Any = getattr(backend, "wait_any", None)
        self.error: BaseException | None = None
        self.exhausted = False
        self.since = call_started()  # every chunk is part of this one call
        try:
            self.progress = make_progress(progress, total, name)
            if self.progress is not None:
                self.progress.advance(recorded)
            self.submit_lane = getattr(backend, "submit_lane", None)
            self._fill()
        except BaseException:
            self.close()
            raise

    def _call(self, items: list, rerun_of: Call | None = None) -> Call:
        return Call(
            self.fn, items, None, chunk=self.flags, timeout=self.task_timeout, retries=self.retries,
            since=self.since, rerun_of=rerun_of,
        )

    def _submit(self, items: list, rerun_of: Call | None = None) -> tuple[Future, Call]:
        call = self._call(items, rerun_of)
        return self._watch(self.backend.submit(call, self.function)), call

    def _watch(self, future: Any) -> Any:
        if self.progress is not None:
            self.progress.expect()
            future.add_done_callback(self._count)
        return future

    def _count(self, future: Future) -> None:
        assert self.progress is not None
        items = 0
        if not future.cancelled() and future.exception() is None:  # else a rerun counts them
            values, error = future.result()
            items = len(values) + (error is not None)
        self.progress.settled(items)

    def _fill(self) -> None:
        """Tops the window up once half of it has been taken (all of it at
        first), in one batch: a backend that takes batches (``submit_many``)
        then sends a worker several chunks at once."""
        if self.exhausted or self.pending > self.window // 2:
            return
        calls: list[Call] = []
        while not self.exhausted and self.pending + len(calls) < self.window:
            n = self.chunksize or self.backend.chunk_size(self.function, self.remaining)
            if self.submit_lane is not None and n < _LANE_CHUNK_MAX:
                self._send(calls)  # first: the window stays in input order
                calls = []
                self._fill_lane(n)
                continue
            batch = self._next_items(n)
            if not batch:
                self.exhausted = True
                self.items = iter(())  # let go of a list input once it is cut
                break
            if self.remaining is not None:
                self.remaining -= len(batch)
            calls.append(self._call(batch))
            if self.pending < self.backend.workers:
                # A worker may be idle: it starts on this chunk while the
                # rest of the window is cut and pickled.
                self._send(calls)
                calls = []
        self._send(calls)

    def _fill_lane(self, n: int) -> None:
        """Tops the window up with one lane of chunks of ``n`` items, or,
        if the backend cannot take these items in a lane, with tickets.
        While a worker may be idle, the lane is of one chunk per such
        worker: they start on it while the rest of the window is read."""
        chunks = self.window - self.pending
        if self.pending < self.backend.workers:
            chunks = self.backend.workers - self.pending
        items = self._next_items(chunks * n)
        if not len(items):
            self.exhausted = True
            self.items = iter(())
            return
        if self.remaining is not None:
            self.remaining -= len(items)
        lane = self.submit_lane(
            self.function, items, n, self.task_timeout, self.retries, self.flags, self.ordered, self.progress
        )
        if lane is not None:
            self.inflight.append(lane)
            self.pending += lane.left
            return
        self._send([self._call(list(items[i:i + n])) for i in range(0, len(items), n)])

    def _next_items(self, n: int) -> Any:
        items = self.items
        if isinstance(items, (list, range)):  # exactly these (see sliceable)
            start, self.cut = self.cut, self.cut + n
            chunk = items[start:self.cut]
            # A range pickles by name (~3.5 µs to pickle and unpickle): a
            # short one travels quicker as a list of its items.
            return list(chunk) if type(chunk) is range and len(chunk) < _RANGE_CHUNK_MIN else chunk
        return list(itertools.islice(items, n))

    def _send(self, calls: list[Call]) -> None:
        if not calls:
            return
        # In order, a map waits on one chunk at a time, which the lighter
        # tickets of submit_many allow; out of order it waits on any, with
        # the backend's wait_any, or else on real futures.
        submit_many = getattr(self.backend, "submit_many", None) if self.ordered or self.wait_any else None
        if submit_many is not None:
            handles = submit_many(calls, self.function)
        else:
            handles = [self.backend.submit(call, self.function) for call in calls]
        for handle, call in zip(handles, calls, strict=True):
            self.inflight.append((self._watch(handle), call))
        self.pending += len(calls)

    def results(self) -> Results:
        """What the caller iterates: the values of each chunk in turn."""
        return Results(self, self._chunks())

    def _chunks(self) -> Generator[Iterator[Any], None, None]:
        """Each chunk's values in order, refilling the window as chunks are
        taken; withdraws what is left when closed, interrupted or collected."""
        try:
            while self.inflight:
                if not self.ordered:
                    values, self.error = self._take_any()
                elif type(self.inflight[0]) is tuple:
                    values, self.error = self._outcome(*self._take())
                else:
                    values, self.error = self._take_lane(self.inflight[0])
                if self.ordered and self.error is None:
                    self._take_finished(values)
                if self.progress is not None and self.progress.error is not None and self.error is None:
                    self.error, self.progress.error = self.progress.error, None
                try:
                    self._fill()
                except BaseException as exc:  # the input raised: the values taken go out first
                    if self.error is None:
                        self.error = exc
                handed_out = time.monotonic()
                self.reached += len(values)
                if atoms_only(values, _SMALL_STR):  # a plain iterator is quicker, and holds only small values
                    yield iter(values)
                else:
                    # Handed out by popping, so the iterator keeps no value it
                    # has yielded, inside a chunk too (at C speed).
                    values.reverse()
                    yield itertools.starmap(values.pop, itertools.repeat((), len(values)))
                if self.clock is not None:  # the caller's own time, spent on this chunk's values
                    self.clock.caller_seconds += time.monotonic() - handed_out
                if self.error is not None:
                    raise self._pop_error()  # no local may hold it: its traceback has this frame
        finally:
            self.close()

    def _take_finished(self, values: list) -> None:
        """Appends to ``values`` those of the chunks next in line that have
        already returned, so that a batch of results is handed out at once
        (tiny chunks arrive in batches). Stops at one that failed as a whole,
        which ``_take`` and ``_outcome`` then handle."""
        inflight = self.inflight
        while inflight:
            entry = inflight[0]
            if type(entry) is not tuple:  # a lane
                if not entry.done():
                    return
                more, self.error = self._take_lane(entry)
            else:
                future = entry[0]
                if not future.done() or future.cancelled() or future.exception() is not None:
                    return
                more, self.error = future.result()
                inflight.popleft()
                self.pending -= 1
            values.extend(more)
            if self.error is not None:
                return

    def _take_any(self) -> tuple[list, BaseException | None]:
        """Out of order: the values of an entry in flight that finished
        (waiting for one), taken as ``_take_lane`` or ``_outcome`` take
        them. Entries mostly finish in the order they were sent, so the
        search for a finished one is short; only a wait looks at them all."""
        inflight = self.inflight
        index = self._first_done()
        if index is None:
            if self.wait_any is not None:
                self.wait_any(inflight, self._remaining())
            else:
                _wait([future for future, _ in inflight], self._remaining(), return_when=FIRST_COMPLETED)
            index = self._first_done()
            if index is None:
                raise TimeoutError("map() results not ready within the timeout")
        entry = inflight[index]
        if type(entry) is not tuple:
            return self._take_lane(entry)
        del inflight[index]
        self.pending -= 1
        return self._outcome(*entry)

    def _first_done(self) -> int | None:
        for i, entry in enumerate(self.inflight):
            if entry[0].done() if type(entry) is tuple else entry.done():
                return i
        return None

    def _take_lane(self, lane: Any) -> tuple[list, BaseException | None]:
        """The values of the finished chunks of ``lane`` (waiting for one):
        at its front, in order, or any, out of order. A chunk that failed
        comes back as a settled ticket: it goes to the front of the window
        if values were taken before it, else it is handled here, as any
        ticket's chunk."""
        if not lane.done():
            lane.wait(self._remaining())
            if not lane.done():
                raise TimeoutError("map() results not ready within the timeout")
        values, taken, stuck = lane.take(self._call)
        self.pending -= taken
        if not lane.left:
            for i, entry in enumerate(self.inflight):
                if entry is lane:
                    del self.inflight[i]
                    break
        if stuck is None:
            return values, None
        if values:
            # Those go out first; the failed chunk waits at the front of the
            # window (its reruns, if any, can take a while).
            self.inflight.appendleft(stuck)
            self.pending += 1
            return values, None
        try:
            more, error = self._outcome(*stuck)
        except BaseException as exc:  # after the values taken before it
            return values, exc
        values.extend(more)
        return values, error

    def _remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def _pop_error(self) -> BaseException:
        err, self.error = self.error, None
        assert err is not None
        return err

    def _take(self) -> tuple[Future, Call]:
        """The chunk at the front, in order, once it is done."""
        self.pending -= 1  # the chunk taken, or the map ends with a TimeoutError
        future = self.inflight[0][0]
        try:
            future.exception(self._remaining())  # the backend may deliver in this thread while it waits
        except TimeoutError:
            raise TimeoutError("map() results not ready within the timeout") from None
        except CancelledError:
            pass
        return self.inflight.popleft()

    def _outcome(self, future: Future, call: Call) -> tuple[list, BaseException | None]:
        """The values a chunk produced and the error at its end, if any
        (with ``return_exceptions``, errors stand in their items' places)."""
        keep_going = self.flags & KEEP_GOING
        try:
            return future.result()
        except self.faults as exc:
            if len(call.args) == 1:
                if not keep_going:
                    raise
                self._advance(1)
                return [exc], None
        # A chunk whose worker died: run its items one by one so that only the
        # item that kills a worker fails. Items before it may run twice.
        values: list = []
        for item in call.args:
            try:
                vals, failure = self._submit([item], rerun_of=call)[0].result()
            except self.faults as exc:
                if not keep_going:
                    return values, exc
                self._advance(1)
                vals, failure = [exc], None
            values.extend(vals)
            if failure is not None:
                return values, failure
        return values, None

    def _advance(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(n)

    def close(self) -> None:
        """Withdraws chunks not yet started."""
        cancelled = bool(self.inflight)
        for entry in self.inflight:
            (entry[0] if type(entry) is tuple else entry).cancel()
        self.inflight.clear()
        self.pending = 0
        self.exhausted = True
        self.items = iter(())
        function, self.function = self.function, None
        if function is not None:
            function.release()
        if self.progress is not None:
            self.progress.close(finished=not cancelled, reached=self.reached)
        clock, self.clock = self.clock, None
        if clock is not None and not cancelled and self.error is None:
            clock.advise(f"{self.name}({describe_call(self.fn)[:-2]})", self.chunksize, self.backend.workers)
