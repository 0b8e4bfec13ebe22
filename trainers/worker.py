"""The function every Ray Train worker runs: rebuild the config from plain data, run the stage."""

import json
from pathlib import Path

from rayft.cluster.storage import upload_outputs
from rayft.orchestrator.config import RecipeConfig
from rayft.trainers.callbacks import say
from rayft.trainers.dpo import run_dpo
from rayft.trainers.kto import run_kto
from rayft.trainers.ppo import run_ppo
from rayft.trainers.rm import run_rm
from rayft.trainers.sft import run_pt, run_sft

STAGES = {"pt": run_pt, "sft": run_sft, "rm": run_rm, "ppo": run_ppo, "dpo": run_dpo, "kto": run_kto}
PLACEMENT_FILE = "placement.json"


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point handed to TorchTrainer; `loop_config` holds the resolved recipe and the plan as dicts."""
    import ray.train

    cfg = RecipeConfig.from_dict(loop_config["recipe"])
    record_placement(cfg.training["output_dir"])
    STAGES[cfg.finetuning.stage](cfg, loop_config["plan"])
    context = ray.train.get_context()
    if cfg.ray.ray_address is not None and context.get_world_rank() == 0:
        # on a cluster, output_dir is on rank 0's own disk: copy it once to the storage every node shares
        where = upload_outputs(cfg.training["output_dir"], cfg.ray.ray_storage_path, context.get_experiment_name(),
                               cfg.ray.ray_storage_filesystem)
        say(f"[rayft] outputs copied to {where}")


def record_placement(output_dir: str) -> list[dict]:
    """Gathers every worker's rank, node id and node IP; rank 0 logs them and writes placement.json.

    Nodes are identified by id: several nodes may share one IP (e.g. a test cluster on one machine).
    """
    import ray
    import ray.train
    import torch.distributed as dist

    context = ray.train.get_context()
    mine = {"rank": context.get_world_rank(), "local_rank": context.get_local_rank(),
            "node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}
    placement = [None] * context.get_world_size()
    if dist.is_initialized():
        dist.all_gather_object(placement, mine)
    else:
        placement = [mine]
    if mine["rank"] == 0:
        for worker in placement:
            say(f"[rayft] worker rank {worker['rank']} on node {worker['node_id']} ({worker['node_ip']})")
        path = Path(output_dir) / PLACEMENT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(placement, indent=1))
    return placement
