"""Checking what users pass to ``Pool`` and its methods: every bad value is
refused here, with the argument's name, before anything starts."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ._progress import check_progress

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}


def parse_bytes(value: int | str | None, name: str) -> int | None:
    """``2GB``, ``512 MiB``, ``1_000_000`` or an int, as bytes."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number of bytes or a string like '2GB', not a bool")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        text = value.strip().upper().replace("_", "")
        digits = text.rstrip("KMGTIB ")
        unit = text[len(digits):].strip()
        try:
            n = int(float(digits) * _UNITS[unit])
        except (ValueError, KeyError):
            raise ValueError(f"{name}={value!r} is not a size such as '2GB' or '512MiB'") from None
    else:
        raise TypeError(f"{name} must be an int or a string like '2GB', not {type(value).__name__}")
    if n <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return n


def check_timeout(value: float | None, name: str) -> None:
    """A time limit: ``None`` or a positive number of seconds."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def check_map(
    fn: Any, chunksize: int | None, timeout: float | None, task_timeout: float | None, progress: Any = None
) -> None:
    """The arguments of ``map``, ``starmap`` and ``imap_unordered``."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if chunksize is not None and (isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1):
        raise ValueError(f"chunksize must be a positive int, got {chunksize!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0):
        raise ValueError(f"timeout must be a non-negative number of seconds, got {timeout!r}")
    check_timeout(task_timeout, "task_timeout")
    check_progress(progress)


@dataclass(frozen=True)
class PoolOptions:
    """What a pool was asked for, checked. Backends read what applies to them."""

    workers: int
    initializer: Callable[..., Any] | None
    initargs: tuple
    preload: tuple[str, ...]
    warm: bool
    task_timeout: float | None
    max_tasks_per_worker: int | None
    max_memory: int | None
    hard_memory_factor: float
    retries: int
    retry_on: tuple[type[BaseException], ...]
    thread_limit: int | None
    buffer_threshold: int
    forward_output: bool
    #: Where a cluster backend finds its engine (see ``Pool``); None: it starts one.
    address: Any = None


def pool_options(
    workers: int | None,
    *,
    default_workers: Callable[[], int],
    initializer: Callable[..., Any] | None,
    initargs: tuple,
    preload: Iterable[str],
    warm: bool,
    task_timeout: float | None,
    max_tasks_per_worker: int | None,
    max_memory_per_worker: int | str | None,
    hard_memory_factor: float,
    retries: int,
    retry_on: Iterable[type[BaseException]],
    thread_limit: int | None,
    buffer_threshold: int,
    forward_output: bool,
    max_workers: int | None,
    max_tasks_per_child: int | None,
    address: Any = None,
) -> PoolOptions:
    """Checks ``Pool``'s arguments, ``ProcessPoolExecutor``'s names included."""
    workers_name = "workers"
    if max_workers is not None:
        if workers is not None:
            raise TypeError("give workers or max_workers, not both")
        workers, workers_name = max_workers, "max_workers"
    if max_tasks_per_child is not None:
        if max_tasks_per_worker is not None:
            raise TypeError("give max_tasks_per_worker or max_tasks_per_child, not both")
        max_tasks_per_worker = max_tasks_per_child
    if address is not None and workers is not None:
        raise TypeError(
            f"{workers_name}= sizes a cluster the pool starts itself; with address= the cluster's own "
            f"workers run the tasks: drop {workers_name}={workers!r} or address="
        )
    if workers is None:
        workers = default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise TypeError(f"{workers_name} must be an int, got {type(workers).__name__}")
    if workers < 1:
        raise ValueError(f"{workers_name} must be greater than 0, got {workers!r}")
    if initializer is not None and not callable(initializer):
        raise TypeError(f"initializer must be callable, got {type(initializer).__name__}")
    if not isinstance(initargs, tuple):
        raise TypeError(f"initargs must be a tuple, got {type(initargs).__name__}")
    preload = (preload,) if isinstance(preload, str) else tuple(preload)
    for name in preload:
        if not isinstance(name, str) or not name:
            raise TypeError(f"preload must list module names, got {name!r}")
    if not isinstance(warm, bool):
        raise TypeError(f"warm must be True or False, got {warm!r}")
    check_timeout(task_timeout, "task_timeout")
    if max_tasks_per_worker is not None and (
        isinstance(max_tasks_per_worker, bool) or not isinstance(max_tasks_per_worker, int) or max_tasks_per_worker < 1
    ):
        raise ValueError(f"max_tasks_per_worker must be a positive int, got {max_tasks_per_worker!r}")
    max_memory = parse_bytes(max_memory_per_worker, "max_memory_per_worker")
    if not hard_memory_factor >= 1.0:
        raise ValueError(f"hard_memory_factor must be >= 1, got {hard_memory_factor!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be a non-negative int, got {retries!r}")
    retry_on = tuple(retry_on)
    for t in retry_on:
        if not (isinstance(t, type) and issubclass(t, BaseException)):
            raise TypeError(f"retry_on must hold exception types, got {t!r}")
    if isinstance(buffer_threshold, bool) or not isinstance(buffer_threshold, int) or buffer_threshold < 1:
        raise ValueError(f"buffer_threshold must be a positive int, got {buffer_threshold!r}")
    if thread_limit is not None and (isinstance(thread_limit, bool) or not isinstance(thread_limit, int)
                                     or thread_limit < 1):
        raise ValueError(f"thread_limit must be a positive int or None, got {thread_limit!r}")
    return PoolOptions(
        workers=workers,
        initializer=initializer,
        initargs=initargs,
        preload=preload,
        warm=warm,
        task_timeout=task_timeout,
        max_tasks_per_worker=max_tasks_per_worker,
        max_memory=max_memory,
        hard_memory_factor=float(hard_memory_factor),
        retries=retries,
        retry_on=retry_on,
        thread_limit=thread_limit,
        buffer_threshold=buffer_threshold,
        forward_output=bool(forward_output),
        address=address,
    )
