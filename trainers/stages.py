"""The stage table: for each stage, the data it reads, how Ray Data encodes it, the entry function every worker
runs, what a sweep ranks its trials by, and what its output_dir holds.

Adding a stage is one entry here plus its module (its entry function, and the collator and Trainer it builds).
"""

from collections.abc import Callable
from dataclasses import dataclass

from rayft.data.pipeline import (
    encode_batch,
    encode_grpo_batch,
    encode_kto_batch,
    encode_pairwise_batch,
    encode_query_batch,
    encode_text_batch,
)
from rayft.recipe.config import RecipeConfig
from rayft.recipe.plan import Plan
from rayft.trainers.dpo import run_dpo
from rayft.trainers.grpo import run_grpo
from rayft.trainers.kto import run_kto
from rayft.trainers.ppo import run_ppo
from rayft.trainers.rm import run_rm
from rayft.trainers.sft import run_pt, run_sft


@dataclass(frozen=True)
class Stage:
    """One stage of training."""

    data: str  # the kind of dataset it reads: "text" (any dataset, as text), "supervised", "preference", "kto"
    encoder: Callable[..., dict]  # Ray Data batch function: (batch, tokenizer_spec, settings) -> token columns
    run: Callable[[RecipeConfig, Plan], dict]  # what every Ray Train worker runs; returns the final metrics
    metric: str  # what a sweep ranks its trials by (eval_<metric> when the recipe evaluates, but for reward)
    outputs: str  # what output_dir holds besides metrics, logs and the config (the README's table)


STAGES: dict[str, Stage] = {
    "pt": Stage("text", encode_text_batch, run_pt, "loss", "the model or adapter, trained on (packed) text"),
    "sft": Stage("supervised", encode_batch, run_sft, "loss", "the model or adapter"),
    "rm": Stage("preference", encode_pairwise_batch, run_rm, "loss",
                "the adapter or model with its score head, and value_head.safetensors"),
    "dpo": Stage("preference", encode_pairwise_batch, run_dpo, "loss", "the model or adapter"),
    "kto": Stage("kto", encode_kto_batch, run_kto, "loss", "the model or adapter"),
    "ppo": Stage("supervised", encode_query_batch, run_ppo, "reward",
                 "the policy (model or adapter), value_head.safetensors and ppo checkpoints"),
    "grpo": Stage("supervised", encode_grpo_batch, run_grpo, "reward",
                  "the policy (model or adapter), completions.jsonl and grpo checkpoints"),
}


def sweep_metric(cfg: RecipeConfig) -> str:
    """The metric a sweep of `cfg` ranks by: the stage's, measured on the evaluation data where there is some."""
    metric = STAGES[cfg.finetuning.stage].metric
    evaluates = bool(cfg.data.eval_dataset or cfg.data.val_size)
    return f"eval_{metric}" if evaluates and metric != "reward" else metric
