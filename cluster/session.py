"""Connecting to a Ray cluster (or starting a local one) and reading its nodes for the planner."""

import contextlib
import os

from rayft.orchestrator.args import RayArguments
from rayft.orchestrator.plan import Node


def local_machine() -> list[Node]:
    """This machine as the single node a local Ray instance would have, read before Ray starts."""
    import psutil
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # Ray gives tasks and actors what its object store leaves of the memory: about 70% by default
    resources = {"CPU": float(cpus), "memory": 0.7 * psutil.virtual_memory().available}
    if torch.cuda.is_available():
        resources["GPU"] = float(torch.cuda.device_count())
    return [Node(node_id="local", ip="127.0.0.1", resources=resources)]


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected cluster with their total resources, identified by node id."""
    import ray

    return [
        Node(node_id=n["NodeID"], ip=n["NodeManagerAddress"], resources=dict(n["Resources"]))
        for n in ray.nodes()
        if n["Alive"]
    ]


@contextlib.contextmanager
def ray_session(ray_args: RayArguments, log=print):
    """Connects to `ray_address`, or starts a local Ray instance that is stopped again on exit."""
    import ray

    kwargs = dict(ray_args.ray_init_kwargs or {})
    started_here = ray_args.ray_address is None and not ray.is_initialized()
    if started_here:
        log("[rayft] starting a local Ray instance for this run")
        kwargs.setdefault("num_cpus", int(local_machine()[0].resources["CPU"]))
        # Without a dashboard Ray Train's placement-group cleaner cannot query actor state and stays idle
        # (it logs a warning). With one, Ray 2.60's cleaner can look up another Ray cluster running on
        # the same machine, miss this run's controller there, and remove this run's placement group.
        kwargs.setdefault("include_dashboard", False)
        ray.init(address="local", **kwargs)
    elif not ray.is_initialized():
        log(f"[rayft] connecting to the Ray cluster at {ray_args.ray_address}")
        ray.init(address=ray_args.ray_address, **kwargs)
    try:
        yield cluster_nodes()
    finally:
        if started_here:
            ray.shutdown()


def ray_is_up() -> bool:
    import ray

    return ray.is_initialized()


def gpu_memory_bytes() -> int:
    """The memory of one GPU of the connected cluster, read by a one-GPU task (the smallest if they differ
    is not known: rayft plans with the first GPU it is given)."""
    import ray

    @ray.remote(num_gpus=1)
    def read() -> int:
        import torch

        return torch.cuda.get_device_properties(0).total_memory

    return ray.get(read.remote(), timeout=300)
