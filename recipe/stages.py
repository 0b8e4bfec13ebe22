"""Every fact the driver knows of each stage, as data: the kind of dataset it reads, the encoder that tokenises it (by
name: data/pipeline.py's ENCODERS), the keys only it reads, whether it compares the policy with a reference model,
whether it learns plain next-token prediction (packing applies), what a sweep ranks its trials by, what it trains and
what its output_dir holds.

The entry function every worker runs is trainers/stages.py's; a stage is one spec here and one entry there.
"""

from collections.abc import Callable
from dataclasses import dataclass

# Preference losses that compare the policy with nothing but itself.
REFERENCE_FREE_LOSSES = ("orpo", "simpo")


def _never(finetuning) -> bool:
    return False


def _always(finetuning) -> bool:
    return True


@dataclass(frozen=True)
class StageSpec:
    """One stage of training, as the driver sees it."""

    data: str  # the kind of dataset it reads: "text" (any dataset, as text), "supervised", "preference", "kto"
    encoder: str  # data/pipeline.py ENCODERS[encoder]: Ray Data batch function (batch, tokenizer_spec, settings)
    metric: str  # what a sweep ranks its trials by (eval_<metric> when the recipe evaluates, but for reward)
    outputs: str  # what output_dir holds besides metrics, logs and the config (the README's table)
    online: bool = False  # it generates its own training data (rollouts) in a step loop of its own
    result: str = "policy"  # what it trains: a "policy" (a model later stages go on from) or a "reward model"
    keys: tuple[str, ...] = ()  # the finetuning keys only this stage (and the others listing them) reads
    reference: Callable = _never  # (finetuning arguments) -> whether the policy is compared with a reference model
    language_modelling: bool = False  # it learns its labels token by token: packing and padding rules apply
    packs_by_default: bool = False  # packing is on unless the recipe says packing: false
    keeps_columns: bool = False  # its encoder reads the dataset's other columns too (grpo's answers, for rewards)
    images: bool = False  # its encoder, collator and trainer carry a dataset's images (data/media.py)


_PREFERENCE = ("pref_beta", "pref_ftx")
STAGE_SPECS: dict[str, StageSpec] = {
    "pt": StageSpec("text", "text", "loss", "the model or adapter, trained on (packed) text",
                    language_modelling=True, packs_by_default=True),
    "sft": StageSpec("supervised", "supervised", "loss", "the model or adapter",
                     keys=("compute_accuracy", "use_asft_loss", "use_eaft_loss"), language_modelling=True,
                     reference=lambda f: f.use_asft_loss, images=True),
    "rm": StageSpec("preference", "pairwise", "loss",
                    "the adapter or model with its score head, and value_head.safetensors", result="reward model",
                    images=True),
    "dpo": StageSpec("preference", "pairwise", "loss", "the model or adapter",
                     keys=("pref_loss", "ld_alpha", *_PREFERENCE),
                     reference=lambda f: f.pref_loss not in REFERENCE_FREE_LOSSES, images=True),
    "kto": StageSpec("kto", "kto", "loss", "the model or adapter",
                     keys=(*_PREFERENCE, "kto_chosen_weight", "kto_rejected_weight"), reference=_always,
                     images=True),
    "ppo": StageSpec("supervised", "query", "reward",
                     "the policy (model or adapter), value_head.safetensors and ppo checkpoints", online=True,
                     keys=("ppo_buffer_size", "ppo_score_norm", "ppo_target", "ppo_whiten_rewards", "ppo_epochs"),
                     reference=_always),
    "grpo": StageSpec("supervised", "grpo", "reward",
                      "the policy (model or adapter), completions.jsonl and grpo checkpoints", online=True,
                      keys=("advantage_estimator", "num_generations", "epsilon", "epsilon_high", "beta", "loss_type",
                            "reward_funcs", "reward_weights", "log_completions_steps", "async_rollouts",
                            "ppo_epochs"),
                      reference=lambda f: f.beta > 0, keeps_columns=True),
}
ONLINE_STAGES = tuple(name for name, spec in STAGE_SPECS.items() if spec.online)


def stage_spec(stage: str) -> StageSpec | None:
    """The spec of `stage`, or None for a name that is no stage."""
    return STAGE_SPECS.get(stage)


def stages_reading(key: str) -> list[str]:
    """The stages whose spec lists `key` among the keys only they read."""
    return [name for name, spec in STAGE_SPECS.items() if key in spec.keys]


def stages_where(fact: str) -> list[str]:
    """The stages whose spec has the boolean `fact` (e.g. "language_modelling") set."""
    return [name for name, spec in STAGE_SPECS.items() if getattr(spec, fact)]


def sweep_metric(cfg) -> str:
    """The metric a sweep of `cfg` ranks by: the stage's, measured on the evaluation data where there is some."""
    metric = STAGE_SPECS[cfg.finetuning.stage].metric
    evaluates = bool(cfg.data.eval_dataset or cfg.data.val_size)
    return f"eval_{metric}" if evaluates and metric != "reward" else metric
