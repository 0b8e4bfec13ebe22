"""The function every Ray Train worker runs: rebuild the config and the plan from plain data, run the stage."""

import json
from pathlib import Path

import ray
import ray.train
import torch
import torch.distributed as dist

from rayft.cluster.storage import upload_outputs
from rayft.recipe.config import RecipeConfig
from rayft.recipe.logs import QUIET, configure, logger, relay_to, verbosity_of
from rayft.recipe.plan import Plan
from rayft.trainers.stages import ENTRIES

PLACEMENT_FILE = "placement.json"


def run_worker(loop_config: dict) -> None:
    """What every worker runs (through trainers/entry.py); `loop_config` holds the resolved recipe and the plan as
    plain data, and the driver's log level."""
    context = ray.train.get_context()
    cfg = RecipeConfig.from_dict(loop_config["recipe"])
    plan = Plan.from_dict(loop_config["plan"])
    threads = torch.get_num_threads()
    if not plan.in_process:  # the driver's own process (local mode) keeps its console and its log level
        # rank 0 speaks at the driver's level, through the driver's progress board when it has one; the others warn
        rank_zero = context.get_world_rank() == 0
        configure(verbosity_of(loop_config["log_level"]) if rank_zero else QUIET)
        if rank_zero and plan.progress_board:
            relay_to(ray.get_actor(plan.progress_board).post.remote)
    if not plan.use_gpu:  # a CPU worker computes on the CPUs of its bundle, no more (oversubscribed) and no fewer
        torch.set_num_threads(max(1, int(plan.resources_per_worker.get("CPU", 1))))
    try:
        record_placement(cfg.args.output_dir)
        ENTRIES[cfg.finetuning.stage](cfg, plan)
    finally:
        if plan.in_process:
            torch.set_num_threads(threads)  # the driver's process goes on after its run
    if cfg.ray.ray_address is not None and context.get_world_rank() == 0:
        # on a cluster, output_dir is on rank 0's own disk: copy it once to the storage every node shares
        where = upload_outputs(cfg.args.output_dir, cfg.ray.ray_storage_path, context.get_experiment_name(),
                               cfg.ray.ray_storage_filesystem)
        logger.info(f"outputs copied to {where}")


def record_placement(output_dir: str) -> list[dict]:
    """Gathers every worker's rank, node id and node IP; rank 0 logs them and writes placement.json.

    Nodes are identified by id: several nodes may share one IP (e.g. a test cluster on one machine).
    """
    context = ray.train.get_context()
    mine = {"rank": context.get_world_rank(), "local_rank": context.get_local_rank(),
            "node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "threads": torch.get_num_threads()}
    placement = [None] * context.get_world_size()
    if dist.is_initialized():
        dist.all_gather_object(placement, mine)
    else:
        placement = [mine]
    if mine["rank"] == 0:
        for worker in placement:
            logger.debug(f"worker rank {worker['rank']} on node {worker['node_id']} ({worker['node_ip']})")
        nodes = len({worker["node_id"] for worker in placement})
        logger.info(f"{len(placement)} worker(s) on {nodes} node(s); ranks and nodes in {PLACEMENT_FILE}")
        path = Path(output_dir) / PLACEMENT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(placement, indent=1))
    return placement
