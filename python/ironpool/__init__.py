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

from .errors import (
    IronpoolError,
    MemoryLimitExceeded,
    PoolClosed,
    RemoteError,
    SerializationError,
    TaskTimeout,
    WorkerCrashed,
    WorkerStartError,
)
from .pool import Pool, WorkerInfo

__all__ = [
    "IronpoolError",
    "MemoryLimitExceeded",
    "Pool",
    "PoolClosed",
    "RemoteError",
    "SerializationError",
    "TaskTimeout",
    "WorkerCrashed",
    "WorkerInfo",
    "WorkerStartError",
]
__version__ = "0.1.0"
