"""``progress=`` of ``map``, ``starmap`` and ``imap_unordered``: a tqdm bar,
the caller's own tqdm, or a ``(done, total)`` callback, advanced as chunks
finish, at most once per chunk (never once per item)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def check_progress(progress: Any) -> None:
    """Refuses a ``progress=`` that is none of the accepted kinds."""
    if progress is None or isinstance(progress, bool) or _is_bar(progress) or callable(progress):
        return
    raise TypeError(
        "progress must be True, a tqdm instance or a callable (done, total), "
        f"got {type(progress).__name__}"
    )


def _is_bar(obj: Any) -> bool:
    return hasattr(obj, "update") and hasattr(obj, "total") and not isinstance(obj, type)


class Progress:
    """Counts finished items for one map, from the thread that delivers a
    chunk (the caller's or the results thread): a ticket's chunk by its done
    callback, a lane's chunks by the binding as it puts them in their slots
    (``Lanes::publish``), a batch of them at a time."""

    __slots__ = ("_bar", "_callback", "_changed", "_owed", "_owned", "_unsettled", "done", "error", "total")

    def __init__(self, progress: Any, total: int | None, desc: str) -> None:
        self.done = 0
        self.total = total
        self._changed = threading.Condition(threading.Lock())
        self._unsettled = 0  # chunks submitted whose callback has not run
        self._owed = 0  # items counted already that will be counted again
        #: What the bar or the callback raised: counting stops, and the map
        #: raises it once the values taken before are handed out. Never
        #: raised here, which may be the thread that delivers every result.
        self.error: BaseException | None = None
        self._bar: Any = None
        self._callback: Callable[[int, int | None], Any] | None = None
        self._owned = False
        if progress is True:
            self._bar = _new_bar(total, desc)
            self._owned = True
        elif _is_bar(progress):
            self._bar = progress
            if progress.total is None and total is not None:
                progress.total = total
                progress.refresh()
        else:
            self._callback = progress

    def expect(self) -> None:
        """A chunk was submitted; its future will call :meth:`settled`."""
        with self._changed:
            self._unsettled += 1

    def settled(self, items: int) -> None:
        """A submitted chunk ended, with ``items`` finished (0: cancelled or failed)."""
        with self._changed:
            self._unsettled -= 1
            try:
                self._advance(items)
            finally:
                self._changed.notify_all()

    def advance(self, items: int) -> None:
        """Counts items finished outside a submitted chunk's callback."""
        with self._changed:
            self._advance(items)

    def owe(self, items: int) -> None:
        """``items`` counted already will be counted again (a lane chunk
        counted as it returned, run again item by item): the next ones
        counted are not."""
        with self._changed:
            self._owed += items

    def _advance(self, items: int) -> None:
        paid = min(items, self._owed)
        self._owed -= paid
        items -= paid
        if items <= 0:
            return
        self.done += items
        try:
            if self._bar is not None:
                self._bar.update(items)
            elif self._callback is not None:
                self._callback(self.done, self.total)
        except Exception as exc:
            if self.error is None:
                self.error = exc
            bar, self._bar, self._callback = self._bar, None, None
            if bar is not None and self._owned:
                try:
                    bar.close()
                except Exception:  # broken already; the map raises the first error
                    pass
            self._owned = False

    def close(self, finished: bool, reached: int | None = None) -> None:
        """Ends an ironpool-made bar (the caller's own bar is left open, redrawn).
        ``finished``: every chunk is done, so wait the moment it takes their
        last callbacks to run, and the count ends complete: at least
        ``reached``, the items the map handed out (a lane's last count may
        still be on its way from the thread that delivered it, after the
        map took the values: it is not counted again once closed)."""
        with self._changed:
            if finished:
                self._changed.wait_for(lambda: self._unsettled <= 0, timeout=1.0)
                if reached is not None and self.done < reached:
                    self._owed = 0
                    self._advance(reached - self.done)
            bar, self._bar = self._bar, None
            self._callback = None
        if bar is None:
            return
        if self._owned:
            bar.close()
        else:
            bar.refresh()  # tqdm skips some updates; show where the map ended


def _new_bar(total: int | None, desc: str) -> Any:
    try:
        from tqdm.auto import tqdm  # the notebook widget under Jupyter, text elsewhere
    except ImportError:
        raise ImportError(
            "progress=True draws a tqdm bar, and tqdm is not installed: pip install 'ironpool[progress]'"
        ) from None
    return tqdm(total=total, desc=desc, unit="item", dynamic_ncols=True)


def make_progress(progress: Any, total: int | None, desc: str) -> Progress | None:
    """The counter for ``progress=`` (None or False: no counting at all)."""
    if progress is None or progress is False:
        return None
    return Progress(progress, total, desc)
