"""Derived values, each decided in one place: the reference model, packing, lora_alpha, absolute paths.

Every part of rayft that needs one of these decisions calls the function here instead of deciding again.
"""

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml

from rayft.recipe.config import RecipeConfig
from rayft.recipe.deepspeed import SHORTHANDS
from rayft.recipe.stages import stage_spec, stages_where
from rayft.recipe.values import comma_list

ReferenceKind = Literal["none", "adapter_off", "copy", "actor"]


def uses_reference(finetuning) -> bool:
    """Whether the stage compares the policy with a reference model at all (its spec says: kto, ppo, dpo but orpo /
    simpo, and grpo with a KL term: beta > 0)."""
    spec = stage_spec(finetuning.stage)
    return spec is not None and spec.reference(finetuning)


def reward_names(finetuning) -> list[str]:
    """The rewards a grpo recipe names (reward_funcs, a list or a comma list), in order."""
    names = finetuning.reward_funcs
    return comma_list(names) if isinstance(names, str) or names is None else [str(n).strip() for n in names]


def reward_weights(finetuning) -> list[float]:
    """One weight per reward: reward_weights as given (a list or a comma list of numbers), or 1 each."""
    weights = finetuning.reward_weights
    if weights is None:
        return [1.0] * len(reward_names(finetuning))
    return [float(w) for w in (comma_list(weights) if isinstance(weights, str) else weights)]


def grpo_loss_type(finetuning) -> str:
    """How token losses are averaged (TRL's loss_type): as set, else dr_grpo for Dr. GRPO (whose point is to drop
    the per-sequence length normalisation) and TRL's default, dapo, for the others."""
    f = finetuning
    return f.loss_type or ("dr_grpo" if f.advantage_estimator == "dr_grpo" else "dapo")


def prompts_per_step(cfg: RecipeConfig) -> int:
    """Prompts one worker answers per step: ppo answers per_device x accumulation x ppo_buffer_size prompts once
    each; grpo fills per_device x accumulation completions with groups of num_generations per prompt."""
    f, t = cfg.finetuning, cfg.args
    completions = t.per_device_train_batch_size * t.gradient_accumulation_steps
    if f.stage == "grpo":
        return max(completions // f.num_generations, 1)
    return completions * (f.ppo_buffer_size if f.stage == "ppo" else 1)


def reference_kind(cfg: RecipeConfig) -> ReferenceKind:
    """What the reference model is, for the loader, the memory planner, PPO and the launcher alike.

    - "none": the stage has no reference;
    - "adapter_off": the policy with its LoRA/OFT adapter switched off (no second copy of the weights);
    - "copy": a frozen copy in every worker (freeze / full policies, or an explicit ref_model or
      ref_model_adapters), partitioned under ZeRO-3;
    - "actor": a frozen copy on the reward model's actors (stage ppo with reward_model_workers).
    """
    f = cfg.finetuning
    if not uses_reference(f):
        return "none"
    separate = f.finetuning_type not in ("lora", "oft") or f.ref_model is not None or f.ref_model_adapters is not None
    if not separate:
        return "adapter_off"
    if f.stage == "ppo" and cfg.ray.reward_model_workers:
        return "actor"
    return "copy"


def report_targets(report_to: Any) -> list[str]:
    """The trackers a `report_to` value names (a string, a comma list or a list; "none" names none)."""
    names = comma_list(report_to) if isinstance(report_to, str) or report_to is None else list(report_to)
    return [name for name in names if name != "none"]


def uses_swanlab(cfg: RecipeConfig) -> bool:
    """SwanLab tracks the run: use_swanlab, or report_to naming swanlab (LLaMA-Factory treats the two alike)."""
    return cfg.finetuning.use_swanlab or "swanlab" in report_targets(cfg.args.report_to)


def is_prediction(cfg: RecipeConfig) -> bool:
    """A recipe that generates instead of training: do_train false with predict_with_generate."""
    return cfg.args.do_train is False and bool(cfg.args.predict_with_generate)




def default_do_train(training: dict) -> str | None:
    """rayft trains unless told not to; a recipe that asks for do_predict and says nothing of do_train only
    predicts, as in LLaMA-Factory (whose default is false). Sets do_train in `training`; returns the note."""
    if "do_train" in training or not training.get("do_predict"):
        return None
    training["do_train"] = False
    return "do_train = false (the recipe sets do_predict and not do_train, as LLaMA-Factory's predict recipes do)"


def replica_range(value: Any) -> tuple[int, int] | None:
    """serve_replicas as (minimum, maximum): 2 -> (2, 2), "1-4" -> (1, 4); None when it is neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value) if value >= 1 else None
    low, dash, high = str(value).partition("-")
    if not dash or not low.strip().isdigit() or not high.strip().isdigit():
        return None
    low, high = int(low), int(high)
    return (low, high) if 0 <= low <= high and high >= 1 else None


def worker_range(value: Any) -> tuple[int, int] | None:
    """ray_num_workers as (minimum, maximum): 2 -> (2, 2), [1, 4] or "1-4" -> (1, 4); None when it is neither."""
    if isinstance(value, list):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return None
        value = f"{value[0]}-{value[1]}"
    found = replica_range(value)
    return found if found and found[0] >= 1 else None


def is_elastic(ray_args) -> bool:
    """Whether the run's group may change size (ray_num_workers a range; after resolve)."""
    return ray_args.min_workers < ray_args.max_workers


def resolve(cfg: RecipeConfig, base_dir: Path) -> list[str]:
    """Computes every derived value in one place; returns the log lines that say what was derived."""
    notes = []
    f, r, t = cfg.finetuning, cfg.ray, cfg.training
    if f.lora_alpha is None:
        f.lora_alpha = 2 * f.lora_rank
        notes.append(f"lora_alpha = 2 * lora_rank = {f.lora_alpha}")
    f.use_ref_model = uses_reference(f)
    r.min_workers, r.max_workers = worker_range(r.ray_num_workers)
    if is_elastic(r):
        notes.append(f"elastic: between {r.min_workers} and {r.max_workers} workers; the global batch is the "
                     f"recipe's at {r.max_workers}, and gradient accumulation follows the group's size")
    if f.stage == "grpo":
        notes.append(f"grpo: loss_type {grpo_loss_type(f)}"
                     + (" (derived from advantage_estimator)" if f.loss_type is None else "")
                     + f", clip range {f.epsilon} / {f.epsilon if f.epsilon_high is None else f.epsilon_high}")
    if isinstance(r.rollout_resources, str):
        r.rollout_resources = json.loads(r.rollout_resources)
    if f.use_ref_model:
        notes.append(f"reference model: {reference_kind(cfg)} (stage {f.stage}"
                     + (f", pref_loss {f.pref_loss}" if f.stage == "dpo" else "")
                     + f", finetuning_type {f.finetuning_type})")
    m = cfg.model
    if m.adapter_folder and m.adapter_name_or_path:
        # as LLaMA-Factory's `subfolder`: each adapter is read from that folder inside it (once: the saved recipe
        # carries the joined paths and no adapter_folder, so that a worker resolving it again joins nothing)
        m.adapter_name_or_path = ",".join(f"{a.rstrip('/')}/{m.adapter_folder.strip('/')}"
                                          for a in comma_list(m.adapter_name_or_path))
        notes.append(f"adapter_name_or_path = {m.adapter_name_or_path} (adapter_folder {m.adapter_folder} in each)")
        m.adapter_folder = None
    d = cfg.data
    if d.packing is None:
        d.packing = d.neat_packing or stage_spec(f.stage).packs_by_default
        notes.append(f"packing = {d.packing} (on for stage {' and '.join(stages_where('packs_by_default'))} and for "
                     "neat_packing, off otherwise)")
    if isinstance(r.resources_per_worker, str):
        r.resources_per_worker = json.loads(r.resources_per_worker)
    if isinstance(r.reward_model_resources, str):
        r.reward_model_resources = json.loads(r.reward_model_resources)
    s = cfg.serving
    if isinstance(s.serve_resources, str):
        s.serve_resources = json.loads(s.serve_resources)
    if isinstance(s.serve_adapters, str):
        s.serve_adapters = json.loads(s.serve_adapters)
    if s.serve_adapters:  # the driver checks, and local replicas load, the same folders
        s.serve_adapters = {name: absolute_storage(base_dir, str(where)) for name, where in s.serve_adapters.items()}
    notes += vocabulary_notes(cfg.model, base_dir)
    if f.stage in ("ppo", "grpo") and f.reward_model_type in ("lora", "full") and f.reward_model:
        reward_path = under(base_dir, f.reward_model)
        if reward_path.exists():
            f.reward_model = str(reward_path)
        f.reward_model_adapters = ",".join(str(under(base_dir, a)) for a in comma_list(f.reward_model_adapters)) or None
    if t.get("dataloader_num_workers"):
        notes.append(f"dataloader_num_workers = {t['dataloader_num_workers']}: Ray Data prefetches that many batches "
                     "of each worker's share in its own threads; the DataLoader itself reads in the worker's process")
    deepspeed = t.get("deepspeed")
    if isinstance(deepspeed, str) and deepspeed not in SHORTHANDS:
        t["deepspeed"] = json.loads(under(base_dir, deepspeed).read_text())
        notes.append(f"deepspeed config read from {deepspeed} (it travels inside the job)")
    if t.get("output_dir"):
        t["output_dir"] = str(under(base_dir, t["output_dir"]))
    if cfg.model.export_dir:
        cfg.model.export_dir = str(under(base_dir, cfg.model.export_dir))
    if r.ray_address is None and os.environ.get("RAY_ADDRESS"):
        r.ray_address = os.environ["RAY_ADDRESS"]
        notes.append(f"ray_address = {r.ray_address} from RAY_ADDRESS (set for a `ray job submit` job): joining that "
                     "cluster")
    r.storage_was_relative = "://" not in r.ray_storage_path and not Path(r.ray_storage_path).expanduser().is_absolute()
    r.ray_storage_path = absolute_storage(base_dir, r.ray_storage_path)
    cfg.data.dataset_dir = absolute_storage(base_dir, cfg.data.dataset_dir)
    if cfg.data.tokenized_path:
        cfg.data.tokenized_path = absolute_storage(base_dir, cfg.data.tokenized_path)
    model_path = under(base_dir, cfg.model.model_name_or_path)
    if model_path.exists():
        cfg.model.model_name_or_path = str(model_path)
    return notes


def vocabulary_notes(m, base_dir: Path) -> list[str]:
    """New tokens: new_special_tokens_config read into its mapping (it travels inside the recipe, to workers that may
    not see the file), and resize_vocab on when tokens are added (as LLaMA-Factory turns it on)."""
    notes = []
    if m.new_special_tokens:  # the seed's (an older LLaMA-Factory's) name of add_special_tokens
        m.add_special_tokens, m.new_special_tokens = m.new_special_tokens, None
        notes.append("add_special_tokens = new_special_tokens (its older name)")
    if isinstance(m.new_special_tokens_config, str):
        path = under(base_dir, m.new_special_tokens_config)
        m.new_special_tokens_config = yaml.safe_load(path.read_text(encoding="utf-8"))
        notes.append(f"new_special_tokens_config read from {path}: {len(m.new_special_tokens_config)} special tokens")
    if (m.add_tokens or m.add_special_tokens or m.new_special_tokens_config) and not m.resize_vocab:
        m.resize_vocab = True
        notes.append("resize_vocab = True (tokens are added to the vocabulary)")
    return notes


def under(base_dir: Path, path: str) -> Path:
    """`path` made absolute against `base_dir` (the folder rayft was started from)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base_dir / p).resolve()


def absolute_storage(base_dir: Path, storage: str) -> str:
    """A storage, dataset or cache path made absolute; a URI (s3://, gs://) stays as it is."""
    if "://" in storage:
        return storage
    return str(under(base_dir, storage))


