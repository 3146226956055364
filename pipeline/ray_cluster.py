"""Where a run's workers run: a local Ray on loopback with token authentication, or the
cluster the spec names; the explain workers' pool, their threads, and whether they fit.

The one place that knows how netloupe starts a local Ray: the driver, the tests and the
benchmarks all start it here.
"""

from __future__ import annotations

import os
import time

from netloupe.contract.errors import RunError
from netloupe.contract.spec import ExecutionSpec, JobSpec

LOCAL_RAY_ENVIRONMENT = {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Token authentication on, and every Ray process on 127.0.0.1 (unless the user chose otherwise)."""

WORKER_START_TIMEOUT_S = 600
"""How long the explain pass waits for all its workers to start before failing."""


def local_ray_environment() -> None:
    """Set :data:`LOCAL_RAY_ENVIRONMENT` where the user has not; Ray reads it when first
    imported, so this runs before anything imports ray."""
    for key, value in LOCAL_RAY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def local_cpus() -> int:
    """Logical CPUs of a local cluster: one more than the cores, since Ray Data's read tasks
    need a CPU slot and actors holding every slot would leave them (and the run) waiting."""
    return (os.cpu_count() or 1) + 1


_connected_to: list[str | None] = []
"""The ``execution.ray_address`` this process's Ray was started for (None: a local Ray)."""


def start_local_ray(log_to_driver: bool = True, **settings) -> None:
    """Start a local Ray of its own on 127.0.0.1 (``address="local"``: even when a cluster
    started by ``ray start`` runs on this machine, which a bare ``ray.init()`` would join)."""
    local_ray_environment()
    import ray

    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=local_cpus(), include_dashboard=False,
             log_to_driver=log_to_driver, **settings)
    _connected_to[:] = [None]


def ensure_ray(address: str | None) -> float:
    """Connect to the spec's cluster, or start a local one; return the seconds it took. In a
    process already connected (a notebook running a second job) the spec must name the same
    cluster: a run must not land silently on another one."""
    local_ray_environment()
    import ray

    if ray.is_initialized():
        current = _connected_to[0] if _connected_to else "a cluster this process connected to itself"
        if current != address:
            raise RunError(
                f"this process is already connected to Ray ({current or 'a local Ray'}), but the spec's "
                f"execution.ray_address is {address or 'unset (a local Ray)'}; run the job in a new process, "
                "or call ray.shutdown() first"
            )
        return 0.0
    started = time.perf_counter()
    if address is None:
        start_local_ray()
    else:
        ray.init(address=address, log_to_driver=True)
        _connected_to[:] = [address]
    return time.perf_counter() - started


def default_threads(spec: JobSpec) -> int:
    """Torch threads per worker: the spec's; on a local cluster the cores shared by the
    workers (one 2-thread actor beat two 1-thread actors here); elsewhere its CPUs."""
    execution = spec.execution
    if execution.threads_per_worker is not None:
        return execution.threads_per_worker
    if execution.ray_address is None:
        return max(1, (os.cpu_count() or 1) // execution.num_workers)
    return max(1, round(execution.cpus_per_worker))


def worker_pool(execution: ExecutionSpec):
    """Ray Data's pool of explain workers: ``num_workers`` of them, or an autoscaling pool
    from ``num_workers`` up to ``max_workers``."""
    import ray

    if execution.max_workers is None or execution.max_workers == execution.num_workers:
        return ray.data.ActorPoolStrategy(size=execution.num_workers)
    return ray.data.ActorPoolStrategy(min_size=execution.num_workers, max_size=execution.max_workers)


def check_cluster_fits(execution: ExecutionSpec) -> None:
    """Fail with a fix instead of waiting forever when the workers cannot all be placed."""
    import ray

    total = ray.cluster_resources()
    cpus_needed = execution.num_workers * execution.cpus_per_worker + 1
    gpus_needed = execution.num_workers * execution.gpus_per_worker
    if total.get("CPU", 0) < cpus_needed or total.get("GPU", 0) < gpus_needed:
        raise RunError(
            f"the Ray cluster has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs; "
            f"{execution.num_workers} workers with {execution.cpus_per_worker:g} CPUs and "
            f"{execution.gpus_per_worker:g} GPUs each, plus 1 CPU for reading, need "
            f"{cpus_needed:g} CPUs and {gpus_needed:g} GPUs. Lower execution.num_workers or "
            "the per-worker resources, or add nodes"
        )
