"""What the driver knows of each stage, as plain data: the kind of dataset it reads, the encoder that tokenises it
(by name: data/pipeline.py's ENCODERS), what a sweep ranks its trials by and what its output_dir holds.

The entry function every worker runs is trainers/stages.py's; a stage is one spec here and one entry there.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    """One stage of training, as the driver sees it."""

    data: str  # the kind of dataset it reads: "text" (any dataset, as text), "supervised", "preference", "kto"
    encoder: str  # data/pipeline.py ENCODERS[encoder]: Ray Data batch function (batch, tokenizer_spec, settings)
    metric: str  # what a sweep ranks its trials by (eval_<metric> when the recipe evaluates, but for reward)
    outputs: str  # what output_dir holds besides metrics, logs and the config (the README's table)
    online: bool = False  # it generates its own training data (rollouts) in a step loop of its own
    result: str = "policy"  # what it trains: a "policy" (a model later stages go on from) or a "reward model"


STAGE_SPECS: dict[str, StageSpec] = {
    "pt": StageSpec("text", "text", "loss", "the model or adapter, trained on (packed) text"),
    "sft": StageSpec("supervised", "supervised", "loss", "the model or adapter"),
    "rm": StageSpec("preference", "pairwise", "loss",
                    "the adapter or model with its score head, and value_head.safetensors", result="reward model"),
    "dpo": StageSpec("preference", "pairwise", "loss", "the model or adapter"),
    "kto": StageSpec("kto", "kto", "loss", "the model or adapter"),
    "ppo": StageSpec("supervised", "query", "reward",
                     "the policy (model or adapter), value_head.safetensors and ppo checkpoints", online=True),
    "grpo": StageSpec("supervised", "grpo", "reward",
                      "the policy (model or adapter), completions.jsonl and grpo checkpoints", online=True),
}
ONLINE_STAGES = tuple(name for name, spec in STAGE_SPECS.items() if spec.online)


def sweep_metric(cfg) -> str:
    """The metric a sweep of `cfg` ranks by: the stage's, measured on the evaluation data where there is some."""
    metric = STAGE_SPECS[cfg.finetuning.stage].metric
    evaluates = bool(cfg.data.eval_dataset or cfg.data.val_size)
    return f"eval_{metric}" if evaluates and metric != "reward" else metric
