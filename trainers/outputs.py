"""What a finished run leaves in output_dir besides the model: resolved config, loss plot, model card."""

import json
from pathlib import Path

import yaml

from rayft.trainers.callbacks import read_log

CONFIG_FILE = "training_args.yaml"


def save_config(output_dir: str, masked_config: dict, plan: dict) -> Path:
    """Writes the resolved recipe (secrets already masked) and the plan it ran with."""
    path = Path(output_dir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in masked_config.items()}
    body["_plan"] = {k: plan[k] for k in ("num_workers", "resources_per_worker", "placement_strategy",
                                          "zero_stage", "offload", "global_batch_size", "total_steps")}
    path.write_text(yaml.safe_dump(body, sort_keys=False, allow_unicode=True))
    return path


def plot_loss(output_dir: str, keys: tuple[str, ...] = ("loss", "eval_loss")) -> list[Path]:
    """training_loss.png (and one plot per other key present) from trainer_log.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(output_dir)
    written = []
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        if not points:
            continue
        steps, values = zip(*points)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"{key} of {Path(output_dir).name}")
        ax.grid(alpha=0.3)
        path = Path(output_dir) / f"training_{key}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def write_model_card(output_dir: str, masked_config: dict, metrics: dict) -> Path:
    """README.md beside the model: base model, stage, method, data, key hyperparameters, final metrics."""
    c = masked_config
    hyper = ["learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
             "gradient_accumulation_steps", "lr_scheduler_type", "warmup_ratio", "cutoff_len", "lora_rank",
             "lora_alpha", "lora_dropout", "lora_target", "seed", "ray_num_workers", "deepspeed"]
    lines = [
        "---",
        f"base_model: {c.get('model_name_or_path')}",
        "library_name: peft" if c.get("finetuning_type") == "lora" else "library_name: transformers",
        "tags: [rayft, " + f"{c.get('stage')}, {c.get('finetuning_type')}]",
        "---",
        "",
        f"# {Path(output_dir).name}",
        "",
        f"Fine-tuned from `{c.get('model_name_or_path')}` by rayft: stage `{c.get('stage')}`, "
        f"method `{c.get('finetuning_type')}`, on `{c.get('dataset')}`.",
        "",
        "## Hyperparameters",
        "",
        *[f"- {k}: `{json.dumps(c[k]) if isinstance(c.get(k), dict) else c.get(k)}`" for k in hyper if k in c],
        "",
        "## Results",
        "",
        *[f"- {k}: {v:.6g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in sorted(metrics.items())],
        "",
    ]
    path = Path(output_dir) / "README.md"
    path.write_text("\n".join(lines))
    return path
