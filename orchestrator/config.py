"""Turns a YAML recipe plus `key=value` overrides into a validated, typed `RecipeConfig`.

Every problem is collected into one `ConfigError`; nothing here touches Ray or the file system's outputs.
"""

import dataclasses
import difflib
import enum
import json
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rayft.data.registry import comma_list
from rayft.orchestrator.args import (
    SECTIONS,
    DataArguments,
    FinetuningArguments,
    GeneratingArguments,
    ModelArguments,
    RayArguments,
    TrainingArguments,
)

# Keys of another tool's schema that rayft owns or computes itself and a recipe may not set.
RESERVED_KEYS = {"use_ref_model": "use_ref_model is derived from stage and pref_loss; remove it"}

SECRET_KEYS = {"hf_hub_token", "ms_hub_token", "om_hub_token", "swanlab_api_key", "hub_token"}
MASK = "***"

# Fields from the seeds whose feature rayft has not built yet, with what they belong to.
# Setting one to a non-default value is refused by name; it is never silently ignored.
NOT_BUILT: dict[str, str] = {
    **{k: "multimodal training" for k in (
        "image_max_pixels", "image_min_pixels", "video_max_pixels", "video_min_pixels", "video_fps",
        "video_maxlen", "media_dir", "train_mm_proj_only")},
    **{k: "vLLM inference" for k in (
        "vllm_maxlen", "vllm_gpu_util", "vllm_enforce_eager", "vllm_max_lora_rank", "vllm_config")},
    "infer_backend": "vLLM inference",
    **{k: "quantised training (QLoRA)" for k in (
        "quantization_bit", "quantization_method", "quantization_type", "double_quantization",
        "quantization_device_map", "ref_model_quantization_bit", "reward_model_quantization_bit")},
    **{k: "quantised export" for k in (
        "export_quantization_bit", "export_quantization_dataset", "export_quantization_nsamples",
        "export_quantization_maxlen")},
    "export_hub_model_id": "pushing an export to the hub",
    **{k: "the GaLore optimizer" for k in (
        "use_galore", "galore_target", "galore_rank", "galore_update_interval", "galore_scale",
        "galore_proj_type", "galore_layerwise")},
    **{k: "the APOLLO optimizer" for k in (
        "use_apollo", "apollo_target", "apollo_rank", "apollo_update_interval", "apollo_scale",
        "apollo_proj", "apollo_proj_type", "apollo_scale_type", "apollo_layerwise", "apollo_scale_front")},
    **{k: "the BAdam optimizer" for k in (
        "use_badam", "badam_mode", "badam_start_block", "badam_switch_mode", "badam_switch_interval",
        "badam_update_ratio", "badam_mask_mode", "badam_verbose")},
    **{k: "SwanLab tracking" for k in (
        "use_swanlab", "swanlab_project", "swanlab_workspace", "swanlab_run_name", "swanlab_mode",
        "swanlab_api_key")},
    **{k: "model patches" for k in (
        "rope_scaling", "shift_attn", "mixture_of_depths", "use_unsloth", "use_unsloth_gc",
        "enable_liger_kernel", "moe_aux_loss_coef", "upcast_layernorm", "upcast_lmhead_output",
        "resize_vocab", "new_special_tokens", "split_special_tokens", "use_llama_pro", "use_adam_mini")},
    "tool_format": "tool formats other than the template's own (qwen / chatml have tool formatting)",
    **{k: "inference settings (issue: after training)" for k in ("infer_dtype", "offload_folder")},
    "print_param_status": "printing every parameter's status (rayft logs the trainable count and share)",
    "preprocessing_num_workers": "a process count for preprocessing (Ray Data spreads tokenisation over the "
                                 "cluster itself; preprocessing_batch_size sets its batches)",
    **{k: "multimodal training" for k in ("freeze_vision_tower", "freeze_multi_modal_projector")},
    "adapter_folder": "loading adapters from a folder",
    "train_from_scratch": "training from scratch",
    "include_effective_tokens_per_second": "effective-token throughput (issue: performance)",
}

BUILT_STAGES = {"pt", "sft", "rm", "dpo", "kto", "ppo"}
# `report_to` values rayft wires up (rank 0 only, W&B offline); other trackers are refused by name.
BUILT_TRACKERS = ("tensorboard", "mlflow", "wandb")
GENERATION_KEYS = tuple(f.name for f in dataclasses.fields(GeneratingArguments))
BUILT_FINETUNING_TYPES = {"lora", "oft", "freeze", "full"}
REFERENCE_FREE_LOSSES = ("orpo", "simpo")

# Keys that only some settings read: key -> (does this config read it?, the settings that decide, what reads
# it). Setting one that the config does not read is refused rather than silently ignored.
_LORA, _OFT, _FREEZE = (lambda f: f.finetuning_type == "lora"), (lambda f: f.finetuning_type == "oft"), (
    lambda f: f.finetuning_type == "freeze")
_REFERENCE = lambda f: (f.stage == "kto" or (f.stage == "dpo" and f.pref_loss not in REFERENCE_FREE_LOSSES)
                        or (f.stage == "ppo" and f.finetuning_type in ("freeze", "full")))
_PPO = lambda f: f.stage == "ppo"
ONLY_USED_WITH: dict[str, tuple] = {
    **{k: (_LORA, ("finetuning_type",), "finetuning_type: lora") for k in (
        "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_rslora", "use_dora", "pissa_init",
        "loraplus_lr_ratio")},
    **{k: (_OFT, ("finetuning_type",), "finetuning_type: oft") for k in (
        "oft_rank", "oft_block_size", "oft_target", "module_dropout")},
    **{k: (_FREEZE, ("finetuning_type",), "finetuning_type: freeze") for k in (
        "freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules")},
    **{k: (lambda f: f.finetuning_type in ("lora", "oft"), ("finetuning_type",), "finetuning_type: lora or oft")
       for k in ("additional_target", "create_new_adapter")},
    "pissa_iter": (lambda f: f.pissa_init, ("pissa_init",), "pissa_init: true"),
    "pissa_convert": (lambda f: f.pissa_init, ("pissa_init",), "pissa_init: true"),
    "loraplus_lr_embedding": (lambda f: f.loraplus_lr_ratio is not None, ("loraplus_lr_ratio",), "loraplus_lr_ratio set"),
    "pref_loss": (lambda f: f.stage == "dpo", ("stage",), "stage: dpo"),
    "pref_beta": (lambda f: f.stage in ("dpo", "kto"), ("stage",), "stage: dpo or kto"),
    "pref_ftx": (lambda f: f.stage in ("dpo", "kto"), ("stage",), "stage: dpo or kto"),
    "dpo_label_smoothing": (lambda f: f.stage == "dpo" and f.pref_loss == "sigmoid", ("stage", "pref_loss"),
                            "stage: dpo with pref_loss: sigmoid"),
    "simpo_gamma": (lambda f: f.stage == "dpo" and f.pref_loss == "simpo", ("stage", "pref_loss"),
                    "stage: dpo with pref_loss: simpo"),
    **{k: (lambda f: f.stage == "kto", ("stage",), "stage: kto") for k in ("kto_chosen_weight", "kto_rejected_weight")},
    **{k: (_REFERENCE, ("stage", "pref_loss", "finetuning_type"), "a reference model (stage kto, stage dpo with a "
           "pref_loss other than orpo and simpo, or stage ppo with freeze or full fine-tuning; PPO with adapters "
           "uses the base model without them)") for k in ("ref_model", "ref_model_adapters")},
    **{k: (_PPO, ("stage",), "stage: ppo") for k in (
        "reward_model", "reward_model_type", "ppo_buffer_size", "ppo_epochs", "ppo_score_norm", "ppo_target",
        "ppo_whiten_rewards")},
    "reward_model_adapters": (lambda f: f.stage == "ppo" and f.reward_model_type == "full",
                              ("stage", "reward_model_type"), "stage: ppo with reward_model_type: full"),
    "compute_accuracy": (lambda f: f.stage == "sft", ("stage",), "stage: sft (token accuracy on the eval data)"),
}
DEEPSPEED_SHORTHANDS = ("z0", "z1", "z2", "z3", "z2_offload", "z3_offload", "auto")  # auto: the memory planner picks


class ConfigError(ValueError):
    """One or more problems in a recipe; `problems` lists them, each naming a key and the fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid recipe:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class RecipeConfig:
    """The resolved recipe: one instance of each argument section."""

    model: ModelArguments
    data: DataArguments
    finetuning: FinetuningArguments
    generating: GeneratingArguments
    ray: RayArguments
    training: dict  # keyword arguments of TrainingArguments; built for real inside each worker
    notes: list[str] = dataclasses.field(default_factory=list)  # what was derived, for the run log

    def to_dict(self, mask_secrets: bool = True) -> dict:
        """The flat key -> value form a recipe is written in (secrets masked unless told otherwise)."""
        flat: dict[str, Any] = {}
        for name in ("model", "data", "finetuning", "generating", "ray"):
            section = getattr(self, name)
            flat.update({f.name: getattr(section, f.name) for f in dataclasses.fields(section)})
        flat.update(self.training)
        return mask(flat) if mask_secrets else flat

    @classmethod
    def from_dict(cls, flat: dict) -> "RecipeConfig":
        """Rebuilds a config from `to_dict(mask_secrets=False)` (on the worker side of the boundary)."""
        sections = {}
        for name, section_cls in SECTIONS.items():
            if name == "training":
                continue
            fields = dataclasses.fields(section_cls)
            sections[name] = section_cls(**{f.name: flat[f.name] for f in fields if f.init and f.name in flat})
            for derived in (f for f in fields if not f.init):
                setattr(sections[name], derived.name, flat[derived.name])
        training_names = _field_names(TrainingArguments)
        return cls(**sections, training={k: v for k, v in flat.items() if k in training_names})


def is_secret(key: str) -> bool:
    """Secret by name: the known token keys and anything ending in token or api_key (any case)."""
    key = key.lower()
    return key in SECRET_KEYS or key.endswith("token") or key.endswith("api_key")


def mask(value: Any, key: str = "") -> Any:
    """Returns a copy of `value` with every secret-named entry (at any depth) replaced by `***`."""
    if isinstance(value, dict):
        return {k: mask(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v, key) for v in value]
    if key and is_secret(key) and value is not None:
        return MASK
    return value


def load_recipe(path: str | os.PathLike | None, overrides: list[str]) -> dict:
    """Reads the YAML recipe and merges `key=value` overrides over it (command line last)."""
    base = OmegaConf.create({})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"recipe file {str(path)!r} does not exist"])
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError([f"{path} is not valid YAML: {err}"]) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"{path} must be a mapping of key: value pairs, not a {type(loaded).__name__}"])
        base = OmegaConf.create(loaded)
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError([f"override {o!r} is not of the form key=value" for o in bad])
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError([f"could not merge the overrides: {err}"]) from None


def parse_config(raw: dict, base_dir: str | os.PathLike = ".", for_training: bool = True) -> RecipeConfig:
    """Type-checks, validates and resolves a merged recipe; raises ConfigError with every problem found.

    `for_training=False` (`rayft export`) does not ask for the keys only a training run needs (dataset,
    output_dir).
    """
    problems: list[str] = []
    known = _all_keys()
    by_section: dict[str, dict] = {name: {} for name in SECTIONS}
    for key, value in raw.items():
        if key in RESERVED_KEYS:
            problems.append(f"{key}: {RESERVED_KEYS[key]}")
            continue
        if key == "sweep":
            problems.append("sweep: this recipe describes a sweep; run it with `rayft sweep`, or remove the sweep "
                            "section to train once")
            continue
        section = known.get(key)
        if section is None:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{key}: unknown key{hint}")
            continue
        expected = _type_hints(SECTIONS[section])[key]
        if not type_matches(value, expected):
            hint = ""
            if isinstance(value, bool) and type_matches("no", expected):
                hint = f" (YAML reads no / off / yes / on as booleans: quote the word, e.g. {key}: \"no\")"
            problems.append(f"{key}: {value!r} is a {type(value).__name__}, expected {describe_type(expected)}{hint}")
            continue
        by_section[section][key] = value

    for key, feature in NOT_BUILT.items():
        section = known[key]
        if key in by_section[section] and by_section[section][key] != _default(SECTIONS[section], key):
            problems.append(f"{key}: {feature} is not built in rayft yet; remove {key} from the recipe")
    if problems:
        raise ConfigError(problems)

    cfg = RecipeConfig(
        model=ModelArguments(**by_section["model"]),
        data=DataArguments(**by_section["data"]),
        finetuning=FinetuningArguments(**by_section["finetuning"]),
        generating=GeneratingArguments(**by_section["generating"]),
        ray=RayArguments(**by_section["ray"]),
        training=by_section["training"],
    )
    problems = validate(cfg, Path(base_dir), for_training)
    if not for_training:
        problems = [p for p in problems if not p.startswith(("dataset: required", "output_dir: required"))]
    if problems:
        raise ConfigError(problems)
    cfg.notes = resolve(cfg, Path(base_dir))
    return cfg


def validate(cfg: RecipeConfig, base_dir: Path = Path("."), for_training: bool = True) -> list[str]:
    """Checks the values against each other; returns every problem found (does not modify cfg)."""
    m, d, f, r, t = cfg.model, cfg.data, cfg.finetuning, cfg.ray, cfg.training
    problems = []
    if not m.model_name_or_path:
        problems.append("model_name_or_path: required; set it to a local model folder or a hub id")
    if t.get("do_train", True) is not False and not d.dataset:
        problems.append("dataset: required for training; name one or more datasets from dataset_info.json")
    if t.get("eval_strategy", "no") != "no" and not d.eval_dataset and not d.val_size:
        problems.append(f"eval_strategy: {t['eval_strategy']!r} needs data to evaluate on; set eval_dataset or val_size")
    if d.eval_on_each_dataset and not d.eval_dataset:
        problems.append("eval_on_each_dataset: needs eval_dataset (a comma list of datasets to evaluate separately)")
    if d.val_size and d.eval_dataset:
        problems.append("val_size: set either val_size (hold out part of dataset) or eval_dataset, not both")
    if d.val_size < 0 or (d.val_size > 1 and d.val_size != int(d.val_size)):
        problems.append(f"val_size: {d.val_size} must be a fraction in [0, 1) or a whole number of examples")
    if not t.get("output_dir"):
        problems.append("output_dir: required; set the folder the model, logs and metrics are written to")
    if f.stage not in BUILT_STAGES:
        problems.append(f"stage: {f.stage!r} is not built in rayft yet (built: {sorted(BUILT_STAGES)})")
    if f.finetuning_type not in BUILT_FINETUNING_TYPES:
        problems.append(
            f"finetuning_type: {f.finetuning_type!r} is not built in rayft yet (built: {sorted(BUILT_FINETUNING_TYPES)})"
        )
    if f.lora_rank < 1:
        problems.append(f"lora_rank: must be a positive integer, got {f.lora_rank}")
    if f.lora_alpha is not None and f.lora_alpha <= 0:
        problems.append(f"lora_alpha: must be positive, got {f.lora_alpha}")
    if not 0.0 <= f.lora_dropout < 1.0:
        problems.append(f"lora_dropout: must be in [0, 1), got {f.lora_dropout}")
    for key, (used, settings, by) in ONLY_USED_WITH.items():
        if getattr(f, key) != _default(FinetuningArguments, key) and not used(f):
            now = ", ".join(f"{name}: {getattr(f, name)!r}" for name in settings)
            problems.append(f"{key} and {' and '.join(settings)}: {key} is only used with {by}, but here {now}; "
                            f"remove {key} or change {' / '.join(settings)}")
    if d.mask_history and d.train_on_prompt:
        problems.append("mask_history and train_on_prompt: mask_history learns only the last response, "
                        "train_on_prompt learns every prompt too; set one of them to false")
    zero3 = _zero_stage(t.get("deepspeed"), base_dir) == 3
    if len(comma_list(m.adapter_name_or_path)) > 1 and zero3:
        problems.append("adapter_name_or_path and deepspeed: merging several adapters needs whole weights, which "
                        "ZeRO-3 partitions; merge them beforehand or use ZeRO 0-2")
    if f.pissa_convert and zero3:
        problems.append("pissa_convert and deepspeed: converting PiSSA needs the whole adapter on one worker, "
                        "which ZeRO-3 partitions; use ZeRO 0-2 or remove pissa_convert")
    if m.adapter_name_or_path and f.finetuning_type not in ("lora", "oft"):
        problems.append(f"adapter_name_or_path and finetuning_type: adapters continue lora or oft training, "
                        f"not {f.finetuning_type!r}; merge them into the model first or use finetuning_type: lora")
    if f.compute_accuracy and t.get("eval_strategy", "no") == "no" and not (d.eval_dataset or d.val_size):
        problems.append("compute_accuracy: needs evaluation data; set eval_dataset or val_size")
    if f.freeze_trainable_layers == 0:
        problems.append("freeze_trainable_layers: 0 trains nothing; use a positive n (last n blocks) or a negative one (first n)")
    if (d.packing or d.neat_packing) and f.stage not in ("pt", "sft"):
        problems.append(f"packing: packs sequences for stages pt and sft, not {f.stage!r}; remove packing")
    if d.neat_packing and d.packing is False:
        problems.append("neat_packing: needs packing; remove packing: false or neat_packing: true")
    if d.streaming and t.get("max_steps", -1) <= 0:
        problems.append("streaming: a streamed dataset has no length to count epochs by; set max_steps")
    if d.streaming and 0 < d.val_size < 1:
        problems.append(f"val_size: with streaming, hold out a whole number of examples (e.g. 100), not a "
                        f"fraction ({d.val_size})")
    if d.streaming and d.tokenized_path:
        problems.append("tokenized_path and streaming: saving the tokenised data materialises it, which streaming "
                        "avoids; remove one of them")
    if d.buffer_size != _default(DataArguments, "buffer_size") and not d.streaming:
        problems.append("buffer_size and streaming: buffer_size is the shuffle buffer of a streamed dataset, but "
                        "streaming is off; remove buffer_size or set streaming: true")
    if not d.ignore_pad_token_for_loss and f.stage not in ("pt", "sft"):
        problems.append(f"ignore_pad_token_for_loss: false makes stages pt and sft learn padding; stage {f.stage!r} "
                        "compares sequences and never learns padding; remove ignore_pad_token_for_loss")
    if d.buffer_size < 1:
        problems.append(f"buffer_size: must be at least 1 example, got {d.buffer_size}")
    if d.cutoff_len < 8:
        problems.append(f"cutoff_len: must be at least 8 tokens, got {d.cutoff_len}")
    if d.max_samples is not None and d.max_samples < 1:
        problems.append(f"max_samples: must be a positive integer, got {d.max_samples}")
    if d.preprocessing_batch_size < 1:
        problems.append(f"preprocessing_batch_size: must be positive, got {d.preprocessing_batch_size}")
    if r.ray_max_failures < -1:
        problems.append(f"ray_max_failures: {r.ray_max_failures} is not a number of restarts; use 0 or more, or -1 for no limit")
    if r.ray_num_workers < 1:
        problems.append(f"ray_num_workers: must be at least 1, got {r.ray_num_workers}")
    problems += _resource_problems(r.resources_per_worker)
    problems += _deepspeed_problems(t.get("deepspeed"), base_dir)
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if key in t and t[key] < 1:
            problems.append(f"{key}: must be at least 1, got {t[key]}")
    if t.get("learning_rate", 1.0) <= 0:
        problems.append(f"learning_rate: must be positive, got {t['learning_rate']}")
    problems += _run_kind_problems(cfg, for_training)
    problems += _ppo_problems(cfg)
    if not problems:
        problems += _training_arguments_problems(t)
    return problems


def report_targets(report_to: Any) -> list[str]:
    """The trackers a `report_to` value names (a string, a comma list or a list; "none" names none)."""
    names = comma_list(report_to) if isinstance(report_to, str) or report_to is None else list(report_to)
    return [name for name in names if name != "none"]


def is_prediction(training: dict) -> bool:
    """A recipe that generates instead of training: do_train false with predict_with_generate."""
    return training.get("do_train", True) is False and bool(training.get("predict_with_generate"))


def _run_kind_problems(cfg: RecipeConfig, for_training: bool) -> list[str]:
    """Checks that depend on what the recipe runs: training, or generation for evaluation and prediction.

    A recipe for `rayft chat` or `rayft export` (`for_training=False`) may hold generation settings.
    """
    d, f, g, t = cfg.data, cfg.finetuning, cfg.generating, cfg.training
    problems = []
    training = t.get("do_train", True) is not False and for_training
    if t.get("predict_with_generate") and training:
        problems.append("predict_with_generate: generation runs in a recipe of its own after training (as in "
                        "LLaMA-Factory); set do_train: false and adapter_name_or_path to the trained output_dir")
    if t.get("do_predict") and not t.get("predict_with_generate"):
        problems.append("do_predict: rayft predicts by generating; set predict_with_generate: true")
    if is_prediction(t):
        if not (t.get("do_predict") or t.get("do_eval")):
            problems.append("predict_with_generate: set do_predict: true (predictions and scores) or do_eval: true "
                            "(scores only)")
        if not d.eval_dataset:
            problems.append("eval_dataset: required for prediction; name the datasets to generate answers for")
        if d.dataset:
            problems.append("dataset: prediction reads no training data; name the data to generate for in "
                            "eval_dataset and remove dataset")
        if f.stage != "sft":
            problems.append(f"stage: prediction generates with a stage sft model; set stage: sft, not {f.stage!r}")
        if t.get("deepspeed") is not None:
            problems.append("deepspeed: prediction runs one whole model per worker, without DeepSpeed; remove "
                            "deepspeed")
        if cfg.ray.placement_strategy != "PACK":
            problems.append("placement_strategy: Ray Data places the generation actors wherever they fit; remove "
                            "placement_strategy")
        if d.packing or d.neat_packing or d.streaming:
            problems.append("packing / neat_packing / streaming: prediction generates for one example at a time "
                            "in order; remove them")
    elif for_training and not training:
        problems.append("do_train: false leaves nothing to run; add do_predict: true and predict_with_generate: "
                        "true to generate, or remove do_train")
    elif training and f.stage != "ppo":  # PPO generates its rollouts with them
        changed = [k for k in GENERATION_KEYS if getattr(g, k) != _default(GeneratingArguments, k)]
        changed += ["eval_num_beams"] if d.eval_num_beams is not None else []
        problems += [f"{k}: generation settings are read by prediction (do_train: false with do_predict and "
                     f"predict_with_generate) and by `rayft chat`, not by training; remove {k}" for k in changed]
    targets = report_targets(t.get("report_to"))
    problems += [f"report_to: {name!r} is not built in rayft (built: {', '.join(BUILT_TRACKERS)})"
                 for name in targets if name not in BUILT_TRACKERS]
    if f.mlflow_tracking_uri and "mlflow" not in targets:
        problems.append("mlflow_tracking_uri: only read with report_to: mlflow; add mlflow to report_to or remove "
                        "mlflow_tracking_uri")
    return problems


def _ppo_problems(cfg: RecipeConfig) -> list[str]:
    """Checks of a stage ppo recipe: its reward model, and what rayft's PPO loop does not do."""
    d, f, r, t = cfg.data, cfg.finetuning, cfg.ray, cfg.training
    if f.stage != "ppo":
        return [f"{key}: only read by stage ppo (reward model actors); remove {key}"
                for key in ("reward_model_workers", "reward_model_resources") if getattr(r, key) not in (0, None)]
    problems = []
    kind = f.reward_model_type
    if not f.reward_model:
        problems.append("reward_model: stage ppo needs a reward model: the output_dir of a `stage: rm` run "
                        "(reward_model_type: lora), a reward model folder (full), or an http(s) URL (api)")
    elif kind == "api" and not f.reward_model.startswith(("http://", "https://")):
        problems.append(f"reward_model: with reward_model_type: api it is the URL of the reward endpoint "
                        f"(http:// or https://), not {f.reward_model!r}")
    if kind == "lora" and f.finetuning_type != "lora":
        problems.append(f"reward_model_type and finetuning_type: a lora reward model is an adapter on the "
                        f"policy's own base, so the policy must be trained with finetuning_type: lora, not "
                        f"{f.finetuning_type!r}; or use reward_model_type: full")
    if r.reward_model_workers < 0:
        problems.append(f"reward_model_workers: must be 0 (reward model inside each worker) or more, got "
                        f"{r.reward_model_workers}")
    if r.reward_model_workers and kind != "full":
        problems.append(f"reward_model_workers: a separate group of reward actors serves a whole reward model "
                        f"(reward_model_type: full), not {kind!r}; set reward_model_type: full (for an rm adapter: "
                        "reward_model = its base model and reward_model_adapters = the adapter) or remove "
                        "reward_model_workers")
    if r.reward_model_resources is not None and not r.reward_model_workers:
        problems.append("reward_model_resources: only read with reward_model_workers > 0; remove it or set "
                        "reward_model_workers")
    problems += [p.replace("resources_per_worker", "reward_model_resources")
                 for p in _resource_problems(r.reward_model_resources)]
    for key in ("ppo_epochs", "ppo_buffer_size"):
        if getattr(f, key) < 1:
            problems.append(f"{key}: must be at least 1, got {getattr(f, key)}")
    if f.ppo_target <= 0:
        problems.append(f"ppo_target: the KL target must be positive, got {f.ppo_target}")
    not_built = {
        "deepspeed": t.get("deepspeed") is not None,
        "streaming": d.streaming,
        "eval_dataset": bool(d.eval_dataset or d.val_size or t.get("eval_strategy", "no") != "no"),
        "loraplus_lr_ratio": f.loraplus_lr_ratio is not None,
        "pissa_convert": f.pissa_convert,
        "optim": t.get("optim", "adamw_torch") not in ("adamw_torch", "adamw_torch_fused"),
    }
    what = {"deepspeed": "DeepSpeed ZeRO for PPO (the PPO loop trains with DDP)",
            "streaming": "streamed prompts for PPO", "eval_dataset": "evaluation during PPO (eval_dataset, "
            "val_size, eval_strategy)", "loraplus_lr_ratio": "LoRA+ for PPO", "pissa_convert": "PiSSA conversion "
            "for PPO", "optim": "optimizers other than AdamW for PPO"}
    problems += [f"{key}: {what[key]} is not built in rayft yet; remove {key}" for key, used in not_built.items() if used]
    g = cfg.generating
    if g.num_beams != 1:
        problems.append(f"num_beams: PPO samples its rollouts one sequence per prompt; remove num_beams ({g.num_beams})")
    unread = [k for k in ("default_system", "skip_special_tokens", "length_penalty")
              if getattr(g, k) != _default(GeneratingArguments, k)] + (["eval_num_beams"] if d.eval_num_beams else [])
    problems += [f"{k}: not read by PPO's rollouts (prompts keep their dataset's system prompt; answers are scored "
                 f"with their special tokens); remove {k}" for k in unread]
    return problems


def reward_model_problems(cfg: RecipeConfig) -> list[str]:
    """What is missing from a ppo recipe's reward model folders; checked by the driver before Ray starts (a
    shipped recipe may name the output of a run that has not happened yet)."""
    f = cfg.finetuning
    if f.stage != "ppo" or f.reward_model_type == "api":
        return []
    problems = []
    folder = Path(f.reward_model)
    if f.reward_model_type == "lora" and not all((folder / name).is_file() for name in (
            "adapter_config.json", "value_head.safetensors")):
        problems.append(f"reward_model: {folder} holds no reward adapter (adapter_config.json and "
                        "value_head.safetensors, what a `stage: rm` run with finetuning_type: lora saves); run "
                        "that stage first, or point reward_model at such a run's output_dir")
    if f.reward_model_type == "full" and folder.is_absolute() and not (folder / "config.json").is_file():
        problems.append(f"reward_model: {folder} holds no model (config.json); point it at a model folder, e.g. "
                        "the output_dir of a `stage: rm` run with full fine-tuning, or the base model with the rm "
                        "adapter in reward_model_adapters")
    for adapter in comma_list(f.reward_model_adapters):
        if not (Path(adapter) / "adapter_config.json").is_file():
            problems.append(f"reward_model_adapters: {adapter} holds no adapter (adapter_config.json)")
    return problems


def resolve(cfg: RecipeConfig, base_dir: Path) -> list[str]:
    """Computes every derived value in one place; returns the log lines that say what was derived."""
    notes = []
    f, r, t = cfg.finetuning, cfg.ray, cfg.training
    if f.lora_alpha is None:
        f.lora_alpha = 2 * f.lora_rank
        notes.append(f"lora_alpha = 2 * lora_rank = {f.lora_alpha}")
    f.use_ref_model = (f.stage in ("kto", "ppo")) or (f.stage == "dpo" and f.pref_loss not in REFERENCE_FREE_LOSSES)
    if f.stage in ("dpo", "kto"):
        notes.append(f"use_ref_model = {f.use_ref_model} (stage {f.stage}"
                     + (f", pref_loss {f.pref_loss})" if f.stage == "dpo" else ")"))
    d = cfg.data
    if d.packing is None:
        d.packing = d.neat_packing or f.stage == "pt"
        notes.append(f"packing = {d.packing} (on for stage pt and for neat_packing, off otherwise)")
    if isinstance(r.resources_per_worker, str):
        r.resources_per_worker = json.loads(r.resources_per_worker)
    if isinstance(r.reward_model_resources, str):
        r.reward_model_resources = json.loads(r.reward_model_resources)
    if f.stage == "ppo" and f.reward_model_type in ("lora", "full") and f.reward_model:
        reward_path = _under(base_dir, f.reward_model)
        if reward_path.exists():
            f.reward_model = str(reward_path)
        f.reward_model_adapters = ",".join(str(_under(base_dir, a)) for a in comma_list(f.reward_model_adapters)) or None
    deepspeed = t.get("deepspeed")
    if isinstance(deepspeed, str) and deepspeed not in DEEPSPEED_SHORTHANDS:
        t["deepspeed"] = json.loads(_under(base_dir, deepspeed).read_text())
        notes.append(f"deepspeed config read from {deepspeed} (it travels inside the job)")
    if t.get("output_dir"):
        t["output_dir"] = str(_under(base_dir, t["output_dir"]))
    if cfg.model.export_dir:
        cfg.model.export_dir = str(_under(base_dir, cfg.model.export_dir))
    if r.ray_address is None and os.environ.get("RAY_ADDRESS"):
        r.ray_address = os.environ["RAY_ADDRESS"]
        notes.append(f"ray_address = {r.ray_address} from RAY_ADDRESS (set for a `ray job submit` job): joining that cluster")
    r.storage_was_relative = "://" not in r.ray_storage_path and not Path(r.ray_storage_path).expanduser().is_absolute()
    r.ray_storage_path = _absolute_storage(base_dir, r.ray_storage_path)
    cfg.data.dataset_dir = str(_under(base_dir, cfg.data.dataset_dir))
    if cfg.data.tokenized_path:
        cfg.data.tokenized_path = str(_under(base_dir, cfg.data.tokenized_path))
    model_path = _under(base_dir, cfg.model.model_name_or_path)
    if model_path.exists():
        cfg.model.model_name_or_path = str(model_path)
    return notes


def type_matches(value: Any, tp: Any) -> bool:
    """True when `value` (as parsed from YAML) is acceptable for the annotation `tp`."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(type_matches(value, arg) for arg in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (dict, typing.Dict) or tp is dict:
        return isinstance(value, dict)
    if origin in (list, typing.List, tuple) or tp in (list, tuple):
        return isinstance(value, (list, tuple))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, tp) or value in {member.value for member in tp}
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def describe_type(tp: Any) -> str:
    """A readable name for an annotation, e.g. 'an integer or null' or 'one of sft, dpo'."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe_type(a) for a in typing.get_args(tp)))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    names = {type(None): "null", bool: "a boolean (true/false)", int: "an integer", float: "a number",
             str: "a string", dict: "a mapping", list: "a list"}
    return names.get(origin or tp, getattr(tp, "__name__", str(tp)))


def _resource_problems(resources: Any) -> list[str]:
    if resources is None:
        return []
    if isinstance(resources, str):
        try:
            resources = json.loads(resources)
        except json.JSONDecodeError as err:
            return [f"resources_per_worker: {resources!r} is not valid JSON ({err.msg}); write e.g. '{{\"CPU\": 2}}'"]
    if not isinstance(resources, dict) or not resources:
        return ["resources_per_worker: must be a non-empty mapping of resource name to amount, e.g. {CPU: 2}"]
    return [
        f"resources_per_worker: {name} must be a non-negative number, got {amount!r}"
        for name, amount in resources.items()
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0
    ]


def _deepspeed_problems(deepspeed: Any, base_dir: Path) -> list[str]:
    if deepspeed is None or isinstance(deepspeed, dict) or deepspeed in DEEPSPEED_SHORTHANDS:
        return []
    path = _under(base_dir, deepspeed)
    if not path.is_file():
        return [f"deepspeed: {deepspeed!r} is neither a shorthand ({', '.join(DEEPSPEED_SHORTHANDS)}) nor an existing JSON file"]
    try:
        json.loads(path.read_text())
    except json.JSONDecodeError as err:
        return [f"deepspeed: {deepspeed} is not valid JSON: {err}"]
    return []


def _zero_stage(spec: Any, base_dir: Path) -> int | None:
    """The ZeRO stage of a recipe's deepspeed value (shorthand, dict or JSON path), None without one."""
    if spec == "auto":
        return None  # decided by the memory planner
    if isinstance(spec, str) and spec in DEEPSPEED_SHORTHANDS:
        return int(spec[1])
    if isinstance(spec, str):
        try:
            spec = json.loads(_under(base_dir, spec).read_text())
        except (OSError, json.JSONDecodeError):
            return None
    if isinstance(spec, dict):
        return int(spec.get("zero_optimization", {}).get("stage", 0))
    return None


def _training_arguments_problems(training: dict) -> list[str]:
    """Lets Hugging Face's own __post_init__ checks run on the driver, without DeepSpeed or a device."""
    kwargs = dict(training)
    kwargs["deepspeed"] = None
    kwargs["use_cpu"] = True
    kwargs.setdefault("output_dir", "unused")
    try:
        TrainingArguments(**kwargs)
    except (ValueError, TypeError) as err:
        return [f"training arguments: {err}"]
    return []


def _under(base_dir: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base_dir / p).resolve()


def _absolute_storage(base_dir: Path, storage: str) -> str:
    if "://" in storage:
        return storage
    return str(_under(base_dir, storage))


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _default(cls: type, key: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == key:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    return None


_HINTS: dict[type, dict] = {}


def _type_hints(cls: type) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _all_keys() -> dict[str, str]:
    """Every settable key -> the section it belongs to (first section wins on a shared name)."""
    keys: dict[str, str] = {}
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.init and not f.name.startswith("_"):
                keys.setdefault(f.name, name)
    return keys
