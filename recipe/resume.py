"""Resuming, decided without touching anything: how a worker group starts from what storage holds, and what a
resumed run changed (the recipe saved in its checkpoint against the one it resumes with). Pure."""

from dataclasses import dataclass
from typing import Literal

from rayft.recipe.schema import key_sections

# The training arguments that change what the optimizer steps produce. The others (logging, evaluation, saving,
# reporting, output paths) and the ray, generating and serving sections may change on a resume without changing
# what is trained.
TRAINING_KEYS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
                 "num_train_epochs", "max_steps", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
                 "warmup_ratio", "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "data_seed",
                 "optim", "optim_args", "bf16", "fp16", "gradient_checkpointing", "label_smoothing_factor",
                 "neftune_noise_alpha", "deepspeed")

# Keys of the model, data and finetuning sections that do not change what is trained.
BOOKKEEPING = frozenset({
    "cache_dir", "hf_hub_token", "ms_hub_token", "om_hub_token", "print_param_status", "low_cpu_mem_usage",
    "trust_remote_code", "offload_folder", "use_kv_cache", "infer_backend", "infer_dtype", "use_cache",
    "eval_dataset", "eval_on_each_dataset", "dataset_dir", "media_dir", "data_shared_file_system", "overwrite_cache",
    "preprocessing_batch_size", "preprocessing_num_workers", "eval_num_beams", "tokenized_path", "max_bad_row_ratio",
    "plot_loss", "compute_accuracy", "include_effective_tokens_per_second", "mlflow_tracking_uri", "pissa_convert",
    "log_completions_steps", "early_stopping_steps",
})


def _counts(key: str, section: str | None) -> bool:
    if key in BOOKKEEPING or key.startswith(("vllm_", "sglang_", "export_", "swanlab_", "kt_")) or key == "use_swanlab":
        return False
    return key in TRAINING_KEYS if section == "training" else section in ("model", "data", "finetuning")


def recipe_changes(saved: dict, now: dict) -> list[str]:
    """`key: saved -> now` for every key that changes training and differs between a checkpoint's recipe and the
    recipe resuming from it (secrets masked in both)."""
    sections = key_sections()
    return [f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(saved) | set(now))
            if _counts(key, sections.get(key)) and saved.get(key) != now.get(key)]


@dataclass(frozen=True)
class ResumeDecision:
    """How a worker group starts, as Ray Train V2's policies return decisions: `fresh`, from `checkpoint` as it is
    (`same_size`), or from it converted from `saved_world` ZeRO partitions to `world` (`convert`)."""

    kind: Literal["fresh", "same_size", "convert"]
    checkpoint: str | None = None
    saved_world: int | None = None
    world: int | None = None


def decide_resume(checkpoint: str | None, zero_partitions: int | None, world: int) -> ResumeDecision:
    """The start of a group of `world` workers, given the checkpoint found (None: none) and how many ranks
    partitioned its ZeRO optimizer state (None: not partitioned, or no DeepSpeed)."""
    if checkpoint is None:
        return ResumeDecision("fresh")
    if zero_partitions is None or zero_partitions == world:
        return ResumeDecision("same_size", checkpoint)
    return ResumeDecision("convert", checkpoint, zero_partitions, world)
