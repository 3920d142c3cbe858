"""ironpool: a process pool for Python with a Rust engine.

Quick start::

    import ironpool

    def work(x):
        return x * x

    if __name__ == "__main__":  # not required by ironpool, still good style
        with ironpool.Pool() as pool:
            print(list(pool.map(work, range(10))))

``Pool`` is a :class:`concurrent.futures.Executor`: ``submit`` returns real
futures that work with ``as_completed``, ``wait`` and ``asyncio.wrap_future``.
"""

# Names resolve on first use, so that worker processes (which import this
# package) do not pay for the executor machinery they never run.
_EXPORTS = {
    "Attempt": "errors",
    "CheckpointMismatch": "_checkpoint",
    "IronpoolError": "errors",
    "MemoryLimitExceeded": "errors",
    "NoWorkerState": "errors",
    "PoolClosed": "errors",
    "RemoteError": "errors",
    "SerializationError": "errors",
    "TaskTimeout": "errors",
    "WorkerCrashed": "errors",
    "WorkerStartError": "errors",
    "PerformanceHint": "_insight",
    "Pool": "pool",
    "PoolStats": "pool",
    "Shared": "pool",
    "WorkerInfo": "pool",
    "shared_memory": "_shared_memory",
    "worker_state": "_state",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ironpool' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"ironpool.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if False:  # for type checkers; typing itself is not imported at run time
    from ._checkpoint import CheckpointMismatch
    from ._insight import PerformanceHint
    from ._shared_memory import shared_memory
    from ._state import worker_state
    from .errors import (
        Attempt,
        IronpoolError,
        MemoryLimitExceeded,
        NoWorkerState,
        PoolClosed,
        RemoteError,
        SerializationError,
        TaskTimeout,
        WorkerCrashed,
        WorkerStartError,
    )
    from .pool import Pool, PoolStats, Shared, WorkerInfo
