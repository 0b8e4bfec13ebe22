"""The entry function of each stage, which every Ray Train worker runs; what the driver knows of a stage is its
spec in recipe/stages.py. Adding a stage is one spec there, one entry here and its module (its entry function,
and the collator and Trainer it builds)."""

from collections.abc import Callable

from rayft.recipe.config import RecipeConfig
from rayft.recipe.plan import Plan
from rayft.trainers.dpo import run_dpo
from rayft.trainers.grpo import run_grpo
from rayft.trainers.kto import run_kto
from rayft.trainers.ppo import run_ppo
from rayft.trainers.rm import run_rm
from rayft.trainers.sft import run_pt, run_sft

ENTRIES: dict[str, Callable[[RecipeConfig, Plan], dict]] = {
    "pt": run_pt, "sft": run_sft, "rm": run_rm, "dpo": run_dpo, "kto": run_kto, "ppo": run_ppo, "grpo": run_grpo,
}
