"""``map(fn, items, checkpoint=path)``: a map that survives its caller.

Each item's result is appended to ``path`` as the map hands it out (pickle
protocol 5, its out-of-band buffers written raw beside the stream, every
record with a CRC); the file is fsync'ed at most once a second and when the
map ends. Run the same map again after a crash, a Ctrl-C or a killed
process and it reads what is recorded, checks that the function and every
recorded item are the ones that produced it, and computes only the rest,
yielding everything in order.

Layout: ``MAGIC``, a header record ``{"version", "kind", "function", "total"}``,
then one record ``(index, item digest, value)`` per finished item. A record
is ``<crc32, buffer count, stream length>``, the buffer lengths, the pickle
stream, the buffers. A torn record at the end (the process died writing it)
is cut off when the file is opened again.
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import pickle
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from .errors import IronpoolError

MAGIC = b"ironpool-checkpoint\n"
VERSION = 1
_HEAD = struct.Struct("<IIQ")  # crc32, buffer count, stream length
_LEN = struct.Struct("<Q")
#: Longest time a recorded result may sit in the page cache unsynced.
FSYNC_SECONDS = 1.0


class CheckpointMismatch(ValueError, IronpoolError):
    """A checkpoint file was written by another function or for other items::

        try:
            results = list(pool.map(convert, files, checkpoint="convert.ckpt"))
        except ironpool.CheckpointMismatch:
            os.remove("convert.ckpt")  # the inputs changed: start over
            results = list(pool.map(convert, files, checkpoint="convert.ckpt"))
    """


def digest(obj: Any) -> bytes:
    """A digest of an item (or argument tuple), from its pickle."""
    try:
        data = pickle.dumps(obj, protocol=5)
    except Exception:
        import cloudpickle

        data = cloudpickle.dumps(obj, protocol=5)
    return hashlib.blake2b(data, digest_size=16).digest()


def function_fingerprint(fn: Any) -> str:
    """What identifies ``fn``'s behaviour across runs: its name and, for
    Python code, its bytecode, constants, names and defaults (not its
    identity, which changes every run)."""
    h = hashlib.blake2b(digest_size=16)
    _feed_callable(h, fn)
    return h.hexdigest()


def _feed_callable(h: Any, fn: Any) -> None:
    if isinstance(fn, functools.partial):
        h.update(b"partial")
        _feed_callable(h, fn.func)
        h.update(digest((fn.args, sorted(fn.keywords.items()))))
        return
    target = getattr(fn, "__func__", fn)  # a bound method: its function (and its instance below)
    name = getattr(target, "__qualname__", type(target).__qualname__)
    h.update(f"{getattr(target, '__module__', '')}.{name}".encode())
    code = getattr(target, "__code__", None)
    if code is not None:
        _feed_code(h, code)
        h.update(digest((getattr(target, "__defaults__", None), getattr(target, "__kwdefaults__", None))))
    if target is not fn:
        h.update(digest(fn.__self__))


def _feed_code(h: Any, code: Any) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            _feed_code(h, const)
        else:
            h.update(repr(const).encode())


class Checkpoint:
    """One checkpoint file, open for a map: the recorded results, and the
    appending of new ones."""

    def __init__(self, path: str | os.PathLike[str], kind: str, fn: Callable[..., Any], total: int | None) -> None:
        self.path = os.fspath(path)
        self.done: dict[int, tuple[bytes, Any]] = {}
        self.synced_at = time.monotonic()
        header = {"version": VERSION, "kind": kind, "function": function_fingerprint(fn), "total": total}
        describe = getattr(fn, "__qualname__", repr(fn))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.file = os.fdopen(fd, "r+b", buffering=0)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                self.file.write(MAGIC)
                self._append(header)
                os.fsync(fd)
            else:
                end = self._load(size, header, describe)
                self.file.truncate(end)  # a torn last record
                self.file.seek(end)
        except BaseException:
            self.file.close()
            raise

    # Reading ---------------------------------------------------------------

    def _load(self, size: int, header: dict, describe: str) -> int:
        with mmap.mmap(self.file.fileno(), size, access=mmap.ACCESS_READ) as view:
            if view[: len(MAGIC)] != MAGIC:
                raise CheckpointMismatch(f"{self.path} is not an ironpool checkpoint file")
            records = _records(view, len(MAGIC))
            try:
                first, end = next(records)
            except StopIteration:
                raise CheckpointMismatch(f"{self.path}: its header is damaged; delete the file to start over") from None
            self._check_header(first, header, describe)
            for (index, item_digest, value), end in records:  # noqa: B007 (end: where the last good record ends)
                self.done[index] = (item_digest, value)
        return end

    def _check_header(self, found: Any, wanted: dict, describe: str) -> None:
        if not isinstance(found, dict) or found.get("version") != VERSION:
            raise CheckpointMismatch(f"{self.path} was written by another version of ironpool's checkpoints")
        whose = (("kind", "a call of another kind"), ("function", f"another function, or a changed {describe}"))
        for key, what in whose:
            if found.get(key) != wanted[key]:
                raise CheckpointMismatch(
                    f"{self.path} was written by {what} ({key} {found.get(key)!r}, now {wanted[key]!r}); "
                    "its results cannot be mixed with this map's: delete the file or pass another checkpoint path"
                )
        if None not in (found.get("total"), wanted["total"]) and found["total"] != wanted["total"]:
            raise CheckpointMismatch(
                f"{self.path} was written for {found['total']} items, this map has {wanted['total']}: "
                "delete the file or pass another checkpoint path"
            )

    def recorded(self, index: int, item_digest: bytes) -> tuple[bool, Any]:
        """``(True, value)`` if item ``index`` is recorded (and is this item)."""
        entry = self.done.pop(index, None)
        if entry is None:
            return False, None
        if entry[0] != item_digest:
            raise CheckpointMismatch(
                f"item {index} is not the item recorded at that place in {self.path}: the input changed "
                "since the checkpoint was written; delete the file or pass another checkpoint path"
            )
        return True, entry[1]

    def check_leftover(self, items: int) -> None:
        """After the input ended: results recorded past its end mean it shrank."""
        if self.done:
            raise CheckpointMismatch(
                f"the input ended after {items} items, but {self.path} holds results for item "
                f"{min(self.done)} and later: the input changed since the checkpoint was written"
            )

    # Writing ---------------------------------------------------------------

    def record(self, index: int, item_digest: bytes, value: Any) -> None:
        self._append((index, item_digest, value))
        if time.monotonic() - self.synced_at >= FSYNC_SECONDS:
            self.sync()

    def _append(self, obj: Any) -> None:
        buffers: list[pickle.PickleBuffer] = []
        stream = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        raws = [b.raw() for b in buffers]
        lengths = b"".join(_LEN.pack(r.nbytes) for r in raws)
        crc = zlib.crc32(lengths)
        crc = zlib.crc32(stream, crc)
        for r in raws:
            crc = zlib.crc32(r, crc)
        self.file.write(_HEAD.pack(crc, len(raws), len(stream)) + lengths + stream)
        for r in raws:
            self.file.write(r)

    def sync(self) -> None:
        os.fsync(self.file.fileno())
        self.synced_at = time.monotonic()

    def close(self) -> None:
        if not self.file.closed:
            self.sync()
            self.file.close()


def _records(view: mmap.mmap, at: int) -> Iterator[tuple[Any, int]]:
    """Each whole record's object and the offset after it; stops at the first
    torn or damaged one."""
    size = len(view)
    while at + _HEAD.size <= size:
        crc, count, stream_len = _HEAD.unpack_from(view, at)
        pos = at + _HEAD.size
        if pos + count * _LEN.size > size:
            return
        lengths = [_LEN.unpack_from(view, pos + i * _LEN.size)[0] for i in range(count)]
        body = pos + count * _LEN.size
        end = body + stream_len + sum(lengths)
        if end > size:
            return
        check = zlib.crc32(view[pos:body])
        check = zlib.crc32(view[body:end], check)
        if check != crc:
            return
        buffers, offset = [], body + stream_len
        for n in lengths:
            buffers.append(bytearray(view[offset : offset + n]))  # writable, as the value was
            offset += n
        yield pickle.loads(view[body : body + stream_len], buffers=buffers), end
        at = end


class Resumed:
    """The input of a checkpointed map, split: ``todo`` (an iterator) feeds
    the pool the items not recorded yet, and iterating this object yields
    every result in input order, recorded or computed, recording the new."""

    def __init__(self, checkpoint: Checkpoint, items: Iterator[Any]) -> None:
        self.checkpoint = checkpoint
        self.items = enumerate(items)
        #: In input order: (index, digest, value, recorded) for items scanned
        #: and not yet handed out; computed ones get their value from the pool.
        self.order: deque[tuple[int, bytes, Any, bool]] = deque()
        self.todo_stash: deque[Any] = deque()
        self.scanned = 0
        self.ended = False
        #: Results recorded by earlier runs (counted as done by progress).
        self.recorded = len(checkpoint.done)

    def _scan(self) -> bool:
        """Reads one input item; False at the end of the input."""
        try:
            index, item = next(self.items)
        except StopIteration:
            self.ended = True
            return False
        self.scanned = index + 1
        item_digest = digest(item)
        found, value = self.checkpoint.recorded(index, item_digest)
        self.order.append((index, item_digest, value, found))
        if not found:
            self.todo_stash.append(item)
        return True

    def todo(self) -> Iterator[Any]:
        """The items the pool computes, in order."""
        while True:
            while not self.todo_stash:
                if self.ended or not self._scan():
                    return
            yield self.todo_stash.popleft()

    def merge(self, computed: Iterator[Any]) -> Iterator[Any]:
        """Every result in order; computed ones are recorded as they pass."""
        try:
            while True:
                if not self.order and (self.ended or not self._scan()):
                    break
                index, item_digest, value, found = self.order.popleft()
                if not found:
                    value = next(computed)
                    if not isinstance(value, BaseException):  # a failed item is retried next run
                        self.checkpoint.record(index, item_digest, value)
                yield value
            self.checkpoint.check_leftover(self.scanned)
        finally:
            self.checkpoint.close()
            close = getattr(computed, "close", None)
            if close is not None:
                close()
