"""The function every Ray Train worker runs: rebuild the config from plain data, run the stage."""

from rayft.orchestrator.config import RecipeConfig
from rayft.trainers.sft import run_pt, run_sft

STAGES = {"pt": run_pt, "sft": run_sft}


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point handed to TorchTrainer; `loop_config` holds the resolved recipe and the plan as dicts."""
    cfg = RecipeConfig.from_dict(loop_config["recipe"])
    STAGES[cfg.finetuning.stage](cfg, loop_config["plan"])
