"""What a finished run leaves in output_dir besides the model: resolved config, loss plot, model card."""

import json
from pathlib import Path

import yaml

from rayft.data.templates import plugin_of
from rayft.recipe.config import RecipeConfig
from rayft.recipe.plan import Plan
from rayft.recipe.stages import stages_reading
from rayft.recipe.values import comma_list, read_log

CONFIG_FILE = "training_args.yaml"


def write_run_outputs(output_dir: str, cfg: RecipeConfig, plan: Plan, tokenizer, metrics: dict) -> None:
    """Rank 0's finish line of every stage: the tokenizer, the resolved config with its plan (secrets masked),
    the plots when plot_loss asks for them, and the model card."""
    tokenizer.save_pretrained(output_dir)
    if plugin_of(cfg.data.template) is not None:  # a vision-language run's processor, as LLaMA-Factory saves it
        from rayft.trainers.model import load_image_processor

        load_image_processor(cfg.model).save_pretrained(output_dir)
    masked = cfg.to_dict(mask_secrets=True)
    save_config(output_dir, masked, plan)
    if cfg.finetuning.plot_loss:
        plot_loss(output_dir)
    write_model_card(output_dir, masked, metrics)


def save_config(output_dir: str, masked_config: dict, plan: Plan) -> Path:
    """Writes the resolved recipe (secrets already masked) and the plan it ran with."""
    path = Path(output_dir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in masked_config.items()}
    shown = ("num_workers", "resources_per_worker", "placement_strategy", "zero_stage", "offload", "global_batch_size",
             "total_steps")
    body["_plan"] = {k: list(v) if isinstance(v, tuple) else v for k, v in plan.to_dict().items() if k in shown}
    path.write_text(yaml.safe_dump(body, sort_keys=False, allow_unicode=True))
    return path


# What `plot_loss` draws, each with its eval_ series beside it where the run evaluated: the loss of every
# stage, the reward accuracy and margin of the preference stages, rm's accuracy, kto's and ppo's KL estimate,
# ppo's mean reward.
PLOTTED = ("loss", "rewards/accuracies", "rewards/margins", "accuracy", "kl", "reward")


def plot_loss(output_dir: str, keys: tuple[str, ...] = PLOTTED) -> list[Path]:
    """training_<key>.png for every key of `keys` that trainer_log.jsonl holds (train and eval series)."""
    import matplotlib  # optional output (plot_loss), and its backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(output_dir)
    written = []
    for key in keys:
        series = {name: [(r["step"], r[name]) for r in records if name in r] for name in (key, f"eval_{key}")}
        if not any(series.values()):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, points in series.items():
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"{key} of {Path(output_dir).name}")
        ax.grid(alpha=0.3)
        ax.legend()
        path = Path(output_dir) / f"training_{key.replace('/', '_')}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


# Hyperparameters the model card lists when the recipe has them (secrets never: the config is masked).
CARD_KEYS = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
             "gradient_accumulation_steps", "lr_scheduler_type", "warmup_ratio", "cutoff_len", "template",
             "packing", "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "freeze_trainable_layers",
             "pref_loss", "pref_beta", "pref_ftx", "simpo_gamma", "kto_chosen_weight", "kto_rejected_weight",
             "seed", "ray_num_workers", "deepspeed")
_LOSS_KEYS = {"simpo_gamma": ("dpo",)}  # besides the keys a stage's spec lists as its own
_METHOD_KEYS = {"lora_rank": "lora", "lora_alpha": "lora", "lora_dropout": "lora", "lora_target": "lora",
                "freeze_trainable_layers": "freeze"}


def write_model_card(output_dir: str, masked_config: dict, metrics: dict) -> Path:
    """README.md beside the model: base model, stage, method, data, key hyperparameters, final metrics."""
    c = masked_config
    stage, method = c.get("stage"), c.get("finetuning_type")
    datasets = comma_list(c.get("dataset")) + comma_list(c.get("eval_dataset"))
    shown = [k for k in CARD_KEYS if c.get(k) is not None and _METHOD_KEYS.get(k, method) == method
             and stage in (_LOSS_KEYS.get(k) or stages_reading(k) or (stage,))]
    lines = [
        "---",
        f"base_model: {c.get('model_name_or_path')}",
        f"library_name: {'peft' if method in ('lora', 'oft') else 'transformers'}",
        "tags:", "- rayft", f"- {stage}", f"- {method}",
        *(["datasets:", *[f"- {name}" for name in dict.fromkeys(datasets)]] if datasets else []),
        "---",
        "",
        f"# {Path(output_dir).name}",
        "",
        f"Fine-tuned from `{c.get('model_name_or_path')}` by rayft: stage `{stage}`, method `{method}`, on "
        f"`{c.get('dataset')}`" + (f", evaluated on `{c.get('eval_dataset')}`." if c.get("eval_dataset") else "."),
        "",
        "## Hyperparameters",
        "",
        *[f"- {k}: `{json.dumps(c[k]) if isinstance(c[k], (dict, list)) else c[k]}`" for k in shown],
        "",
        "## Results",
        "",
        *[f"- {k}: {v:.6g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in sorted(metrics.items())],
        "",
    ]
    path = Path(output_dir) / "README.md"
    path.write_text("\n".join(lines))
    return path
