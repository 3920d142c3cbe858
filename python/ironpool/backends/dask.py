"""The Dask backend: ``Pool(backend="dask", address=...)`` runs each call on a
``distributed`` cluster, inside an ironpool process pool on the Dask worker
that takes it (``_node``), so task timeouts kill, a segfault fails only its
task and memory caps hold there too. ``_cluster.ClusterBackend`` does the
rest; this module only speaks to Dask.

Example::

    with ironpool.Pool(backend="dask", address="tcp://scheduler:8786", task_timeout=60) as pool:
        results = list(pool.map(score, rows))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._options import PoolOptions
from ..errors import PoolClosed, WorkerCrashed
from . import _node
from ._cluster import ClusterBackend


def start(options: PoolOptions) -> ClusterBackend:
    """Connects to (or starts) the cluster ``options.address`` names."""
    import distributed

    address = options.address
    cluster = None
    owned = True
    if address is None:
        import dask

        # One Dask worker whose node pool has `workers` processes: crash
        # isolation is ironpool's, so more Dask workers would only add
        # processes. The scheduler never re-runs a task whose Dask worker
        # died: retries are the node pool's, counted once.
        with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
            cluster = distributed.LocalCluster(
                n_workers=1, threads_per_worker=options.workers, processes=True, dashboard_address=":0"
            )
        client = distributed.Client(cluster)
    elif isinstance(address, str):
        client = distributed.Client(address)
    elif isinstance(address, distributed.Client):
        client, owned = address, False
    else:
        raise TypeError(
            f"address must be a scheduler address, a distributed.Client or None, got {type(address).__name__}"
        )
    return ClusterBackend(DaskEngine(client, cluster if owned else None, owned), options)


def _run_on_worker(key: bytes, options: bytes, spec: bytes, keys: list[str], *values: Any) -> tuple:
    """The task Dask runs: the call, in this Dask worker's node pool."""
    from distributed import get_worker

    return _node.run(get_worker().state.nthreads, key, options, spec, keys, *values)


class DaskEngine:
    """A ``distributed.Client`` as a cluster backend's engine."""

    def __init__(self, client: Any, cluster: Any, owned: bool) -> None:
        self.client = client
        self.cluster = cluster
        self.owned = owned
        self.slots = sum(client.nthreads().values())

    def store(self, value: Any) -> tuple[str, Any]:
        future = self.client.scatter([value], hash=False)[0]  # a list: the value itself is one datum
        return str(future.key), future

    def submit(self, key: bytes, options: bytes, spec: bytes, keys: list[str], refs: list,
               done: Callable[[], None]) -> Any:
        future = self.client.submit(_run_on_worker, key, options, spec, keys, *refs, pure=False, retries=0)
        future.add_done_callback(lambda _f: done())
        return future

    def outcome(self, handle: Any, task: str) -> tuple:
        from concurrent.futures import CancelledError

        from distributed.scheduler import KilledWorker

        try:
            return handle.result()
        except KilledWorker as exc:
            return (_node.ERROR, WorkerCrashed(f"the Dask worker running {task} died: {exc}", task=task))
        except CancelledError:
            return (_node.ERROR, PoolClosed(f"Dask cancelled {task} (its client or cluster closed)"))
        except Exception as exc:
            return (_node.ERROR, exc)

    def cancel(self, handle: Any) -> None:
        handle.cancel()

    def node_stats(self, key: bytes) -> list[dict]:
        by_worker = self.client.run(_node.stats, key)
        return [info for address in sorted(by_worker) for info in by_worker[address]]

    def close(self) -> None:
        if self.owned:
            self.client.close()
            if self.cluster is not None:
                self.cluster.close()
