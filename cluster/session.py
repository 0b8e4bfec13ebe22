"""Connecting to a Ray cluster (or starting a local one) and reading its nodes for the planner."""

import contextlib
import logging
import os

import psutil
import ray
from ray._private.accelerators import NvidiaGPUAcceleratorManager

from rayft.recipe.logs import logger
from rayft.recipe.plan import Node
from rayft.recipe.schema import RayArguments


def local_machine() -> list[Node]:
    """This machine as the single node a local Ray instance would have, read before Ray starts."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # Ray gives tasks and actors what its object store leaves of the memory: about 70% by default
    resources = {"CPU": float(cpus), "memory": 0.7 * psutil.virtual_memory().available}
    # the GPUs a local Ray instance would find, counted as Ray counts them (NVML), without importing torch
    gpus = NvidiaGPUAcceleratorManager.get_current_node_num_accelerators()
    if gpus:
        resources["GPU"] = float(gpus)
    return [Node(node_id="local", ip="127.0.0.1", resources=resources)]


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected cluster with their total resources, identified by node id."""
    return [
        Node(node_id=n["NodeID"], ip=n["NodeManagerAddress"], resources=dict(n["Resources"]))
        for n in ray.nodes()
        if n["Alive"]
    ]


def only_this_machine() -> bool:
    """Whether the connected cluster is one node, the driver's own (a `ray start --head` session on this machine):
    as on an instance started for the run, no other node can be preempted or lost while the driver lives."""
    nodes = cluster_nodes()
    return len(nodes) == 1 and nodes[0].node_id == ray.get_runtime_context().get_node_id()


def available_nodes() -> list[Node]:
    """The alive nodes with the resources not held by anything now (what a new worker group could take)."""
    free = ray._private.state.available_resources_per_node()  # no public per-node form in Ray 2.60
    return [Node(n.node_id, n.ip, dict(free.get(n.node_id, {}))) for n in cluster_nodes()]


@contextlib.contextmanager
def ray_session(ray_args: RayArguments):
    """Connects to `ray_address`, or starts a local Ray instance that is stopped again on exit; yields the
    cluster's nodes. A process that has already connected (a test session, a sweep's trial) keeps its connection."""
    kwargs = dict(ray_args.ray_init_kwargs or {})
    # below --verbose, Ray's own start-up lines and its task workers' warnings stay off the console
    verbose = logger.isEnabledFor(logging.DEBUG)
    kwargs.setdefault("logging_level", logging.DEBUG if verbose else logging.ERROR)
    # Below --verbose the workers' own output (Ray's internal actors, library warnings) stays in Ray's log files;
    # rank 0's rayft messages reach the driver through its progress board.
    kwargs.setdefault("log_to_driver", verbose)
    started_here = ray_args.ray_address is None and not ray.is_initialized()
    if started_here:
        logger.info("starting a local Ray instance for this run")
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":  # Ray 2.60 binds its ports beyond loopback
            logger.warning("RAY_AUTH_MODE=disabled: this local Ray instance's ports take anyone who reaches this "
                           "machine; leave RAY_AUTH_MODE unset (Ray turns on token authentication) off a trusted "
                           "network")
        kwargs.setdefault("num_cpus", int(local_machine()[0].resources["CPU"]))
        # Without a dashboard Ray Train's placement-group cleaner cannot query actor state and stays idle
        # (it logs a warning). With one, Ray 2.60's cleaner can look up another Ray cluster running on
        # the same machine, miss this run's controller there, and remove this run's placement group.
        kwargs.setdefault("include_dashboard", False)
        ray.init(address="local", **kwargs)
    elif not ray.is_initialized():
        logger.info(f"connecting to the Ray cluster at {ray_args.ray_address}")
        ray.init(address=ray_args.ray_address, **kwargs)
    try:
        yield cluster_nodes()
    finally:
        if started_here:
            ray.shutdown()


def gpu_memory_bytes() -> int:
    """The memory of one GPU of the connected cluster, read by a one-GPU task (the smallest if they differ
    is not known: rayft plans with the first GPU it is given)."""
    @ray.remote(num_gpus=1)
    def read() -> int:
        import torch  # runs in the remote GPU task, not here

        return torch.cuda.get_device_properties(0).total_memory

    return ray.get(read.remote(), timeout=300)
