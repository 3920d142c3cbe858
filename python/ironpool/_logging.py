"""``logging`` records made in workers, handled by the caller's loggers.

A worker's root logger gets one handler, :class:`Forward`, which pickles
each record's state (message formatted, exception as text) and sends it to
the pool over the worker's own channel (a ``Log`` frame, one datagram per
record, sent before ``logging`` returns). The caller takes the records after
every wait, before it settles futures (``ProcessBackend``), and hands each to
``logging.getLogger(record.name).handle(record)`` if that logger is enabled
for the record's level: the caller's levels, filters and handlers decide, as
for its own records.

Besides the usual attributes (``process`` is the worker's pid), a record
from a worker carries:

* ``record.worker_pid``: the worker's pid;
* ``record.task``: the call the worker was running when the record was
  made, as error messages name it (``"mod.work(3)"``; in a ``map`` chunk,
  the item being run), the ``initializer`` call during set-up, ``None``
  between tasks.

Workers start with the caller's logger levels, read when the pool starts,
so records nobody would see are not even made there.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from ._imported import IMPORTED

#: Attributes every record has; anything else came from ``extra=``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def levels() -> dict:
    """The caller's logging levels, for workers to start with: the root's,
    every logger's own (where set) and ``logging.disable``'s."""
    manager = logging.root.manager
    named = {
        name: logger.level
        for name, logger in list(manager.loggerDict.items())
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET
    }
    return {"root": logging.root.level, "named": named, "disable": manager.disable}


# The worker side ---------------------------------------------------------


class Forward(logging.Handler):
    """Sends each record it handles to the pool (in a worker)."""

    def __init__(self, sender: Any, threshold: int, task: Callable[[], str | None]) -> None:
        super().__init__()
        self.sender = sender
        self.threshold = threshold
        self.task = task

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = _dump(record, self.task())
        except Exception:
            self.handleError(record)
            return
        try:
            self.sender.send([data], self.threshold)
        except OSError:
            # The pool is gone (the worker is being stopped): nobody can
            # take the record any more but this process's stderr.
            sys.stderr.write(self.format(record) + "\n")


def _dump(record: logging.LogRecord, task: str | None) -> bytes:
    """The record's state as pickle bytes: what the caller needs to format
    and route it; objects that do not pickle become their repr."""
    state = dict(record.__dict__)
    state["msg"] = record.getMessage()
    state["args"] = None
    if record.exc_info:
        if not record.exc_text:
            record.exc_text = _FORMATTER.formatException(record.exc_info)
        state["exc_text"] = record.exc_text
    state["exc_info"] = None
    state["worker_pid"] = os.getpid()
    state["task"] = task
    if state.get("processName") == "MainProcess":
        state["processName"] = "ironpool-worker"
    try:
        return pickle.dumps(state, protocol=5)
    except Exception:
        for key, value in state.items():
            if key not in _STANDARD or key == "msg":
                try:
                    pickle.dumps(value, protocol=5)
                except Exception:
                    state[key] = repr(value)
        return pickle.dumps(state, protocol=5)


_FORMATTER = logging.Formatter()


def install(sender: Any, threshold: int, caller_levels: dict, task: Callable[[], str | None]) -> None:
    """Routes this worker's records to the pool, filtered by the caller's
    levels (the worker's own are ``NOTSET`` until now)."""
    root = logging.getLogger()
    root.setLevel(caller_levels["root"])
    for name, level in caller_levels["named"].items():
        logging.getLogger(name).setLevel(level)
    if caller_levels["disable"]:
        logging.disable(caller_levels["disable"])
    root.addHandler(Forward(sender, threshold, task))


# The caller side ---------------------------------------------------------

#: Taken and handled under one lock, so records keep their arrival order
#: whichever thread (the results thread, a caller waiting) takes them.
_handling = threading.RLock()


def handle_records(take: Callable[[], list], imported: Callable[[list[str]], None] | None = None) -> None:
    """Takes the records workers sent (``take``: the engine's ``take_logs``)
    and lets the caller's loggers handle them; a worker's report of the
    packages its tasks imported (``(IMPORTED, names)``) goes to
    ``imported``. A record that cannot be rebuilt or whose filter raises is
    reported on stderr; the thread delivering results goes on."""
    with _handling:
        for parts in take():
            try:
                state = pickle.loads(parts[0])
                if type(state) is tuple:  # a report, not a record
                    if imported is not None and state[0] == IMPORTED:
                        imported(state[1])
                    continue
                record = logging.makeLogRecord(state)
                logger = logging.getLogger(record.name) if record.name != "root" else logging.getLogger()
                if logger.isEnabledFor(record.levelno):
                    logger.handle(record)
            except Exception:
                traceback.print_exc()
