"""The Ray backend: ``Pool(backend="ray", address=...)`` runs each call as a
Ray task, inside an ironpool process pool in the Ray worker process that
takes it (``_node``), so task timeouts kill, a segfault fails only its task
and memory caps hold there too. ``_cluster.ClusterBackend`` does the rest;
this module only speaks to Ray.

Example::

    with ironpool.Pool(backend="ray", address="auto", retries=2) as pool:
        results = list(pool.map(score, rows))
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .._options import PoolOptions
from ..errors import PoolClosed, WorkerCrashed
from . import _node
from ._cluster import ClusterBackend


def start(options: PoolOptions) -> ClusterBackend:
    """Connects to (or starts) the Ray ``options.address`` names."""
    import ray

    owned = False
    if options.address is not None:
        if ray.is_initialized():
            raise RuntimeError(
                f"Ray is already initialised in this process: give address=None to use it, not {options.address!r}"
            )
        ray.init(address=options.address)
        owned = True
    elif not ray.is_initialized():
        ray.init(num_cpus=options.workers, include_dashboard=False)
        owned = True
    return ClusterBackend(RayEngine(owned), options)


def _run_in_ray(key: bytes, options: bytes, spec: bytes, keys: list[str], *values: Any) -> tuple:
    """The task Ray runs: the call, in this Ray worker process's node pool
    (a Ray worker runs one task at a time: one slot)."""
    return _node.run(1, key, options, spec, keys, *values)


@functools.cache
def _remote() -> Any:
    import ray

    # Ray never re-runs it: retries are the node pool's, counted once.
    return ray.remote(num_cpus=1, max_retries=0, retry_exceptions=False)(_run_in_ray)


class RayEngine:
    """The Ray this process is connected to, as a cluster backend's engine."""

    def __init__(self, owned: bool) -> None:
        import ray

        self.owned = owned
        self.slots = int(ray.cluster_resources().get("CPU", 1))

    def store(self, value: Any) -> tuple[str, Any]:
        import ray

        ref = ray.put(value)
        return ref.hex(), ref

    def submit(self, key: bytes, options: bytes, spec: bytes, keys: list[str], refs: list,
               done: Callable[[], None]) -> Any:
        ref = _remote().remote(key, options, spec, keys, *refs)
        ref.future().add_done_callback(lambda _f: done())
        return ref

    def outcome(self, handle: Any, task: str) -> tuple:
        import ray

        try:
            return ray.get(handle)
        except ray.exceptions.TaskCancelledError:
            return (_node.ERROR, PoolClosed(f"Ray cancelled {task}"))
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as exc:
            return (_node.ERROR, WorkerCrashed(f"the Ray worker running {task} died: {exc}", task=task))
        except Exception as exc:
            return (_node.ERROR, exc)

    def cancel(self, handle: Any) -> None:
        import ray

        ray.cancel(handle)

    def node_stats(self, key: bytes) -> list[dict]:
        return []  # Ray cannot reach every worker process; see docs/scaling-out.md

    def close(self) -> None:
        import ray

        if self.owned:
            ray.shutdown()
