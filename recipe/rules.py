"""The rules a recipe's values must follow together. Each returns `Problem`s (key, fix); none edits another's.

Key-by-key type checks happen while loading (config.py); these see the typed sections.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from rayft.recipe.config import RecipeConfig
from rayft.recipe.deepspeed import SHORTHANDS
from rayft.recipe.derive import (
    is_prediction,
    reference_kind,
    replica_range,
    report_targets,
    reward_names,
    reward_weights,
    under,
    uses_reference,
    uses_swanlab,
    worker_range,
)
from rayft.recipe.optimizers import optimizer_problems
from rayft.recipe.problems import Problem
from rayft.recipe.schema import (
    LOOPBACK_HOSTS,
    FinetuningArguments,
    GeneratingArguments,
    RayArguments,
    ServingArguments,
    TrainingArguments,
    default_of,
)
from rayft.recipe.stages import ONLINE_STAGES, STAGE_SPECS, stage_spec, stages_reading, stages_where
from rayft.recipe.values import TOOL_FORMAT_NAMES, VALUE_HEAD_FILE, comma_list

RESERVED_KEYS = {"use_ref_model": "use_ref_model is derived from stage and pref_loss; remove it",
                 "stages": "this file is a pipeline of stages; run it with `rayft pipeline`, or plan it with "
                           "`rayft plan`"}

# `report_to` values rayft wires up (rank 0 only, W&B offline); other trackers are refused by name.
BUILT_TRACKERS = ("tensorboard", "mlflow", "wandb", "swanlab")
SWANLAB_KEYS = tuple(f.name for f in dataclasses.fields(FinetuningArguments) if f.name.startswith("swanlab_"))
GENERATION_KEYS = tuple(f.name for f in dataclasses.fields(GeneratingArguments))
SERVING_KEYS = tuple(f.name for f in dataclasses.fields(ServingArguments))
BUILT_FINETUNING_TYPES = {"lora", "oft", "freeze", "full"}

# Keys that only some settings read: key -> (does this config read it?, the settings that decide, what reads
# it). Setting one that the config does not read is refused rather than silently ignored.
_LORA, _OFT, _FREEZE = (lambda f: f.finetuning_type == "lora"), (lambda f: f.finetuning_type == "oft"), (
    lambda f: f.finetuning_type == "freeze")
# ref_model is read wherever a reference is used, except by PPO with an adapter, whose reference is its base
_REFERENCE = lambda f: uses_reference(f) and not (f.stage == "ppo" and f.finetuning_type in ("lora", "oft"))
_GRPO = lambda f: f.stage == "grpo"


def _read_by_stage(key: str) -> tuple:
    """ONLY_USED_WITH's entry for a key that only the stages whose spec lists it read."""
    # the text is a function too: it names the stages that read the key when a problem is written
    return ((lambda f: key in getattr(stage_spec(f.stage), "keys", ())), ("stage",),
            lambda: "stage: " + " or ".join(stages_reading(key)))


# a grpo recipe reads the reward model keys when reward_model is one of its rewards
_REWARD_MODEL = lambda f: f.stage == "ppo" or (f.stage == "grpo" and "reward_model" in reward_names(f))
ONLY_USED_WITH: dict[str, tuple] = {
    **{k: (_LORA, ("finetuning_type",), "finetuning_type: lora") for k in (
        "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_rslora", "use_dora", "pissa_init",
        "loraplus_lr_ratio")},
    **{k: (_OFT, ("finetuning_type",), "finetuning_type: oft") for k in (
        "oft_rank", "oft_block_size", "oft_target", "module_dropout")},
    **{k: (_FREEZE, ("finetuning_type",), "finetuning_type: freeze") for k in (
        "freeze_trainable_modules", "freeze_extra_modules")},
    "freeze_trainable_layers": (lambda f: f.finetuning_type == "freeze" or f.use_llama_pro,
                                ("finetuning_type", "use_llama_pro"), "finetuning_type: freeze, or use_llama_pro"),
    **{k: (lambda f: f.finetuning_type in ("lora", "oft"), ("finetuning_type",), "finetuning_type: lora or oft")
       for k in ("additional_target", "create_new_adapter")},
    "pissa_iter": (lambda f: f.pissa_init, ("pissa_init",), "pissa_init: true"),
    "pissa_convert": (lambda f: f.pissa_init, ("pissa_init",), "pissa_init: true"),
    "loraplus_lr_embedding": (lambda f: f.loraplus_lr_ratio is not None, ("loraplus_lr_ratio",),
                              "loraplus_lr_ratio set"),
    **{k: (lambda f: f.use_galore, ("use_galore",), "use_galore: true") for k in (
        "galore_target", "galore_rank", "galore_update_interval", "galore_scale", "galore_proj_type",
        "galore_layerwise")},
    **{k: (lambda f: f.use_apollo, ("use_apollo",), "use_apollo: true") for k in (
        "apollo_target", "apollo_rank", "apollo_update_interval", "apollo_scale", "apollo_proj", "apollo_proj_type",
        "apollo_scale_type", "apollo_layerwise", "apollo_scale_front")},
    **{k: (lambda f: f.use_badam, ("use_badam",), "use_badam: true") for k in (
        "badam_mode", "badam_start_block", "badam_switch_mode", "badam_switch_interval", "badam_verbose")},
    **{k: (lambda f: f.use_badam and f.badam_mode == "ratio", ("use_badam", "badam_mode"),
           "use_badam: true and badam_mode: ratio") for k in ("badam_update_ratio", "badam_mask_mode")},
    # the keys a stage's spec lists as its own (recipe/stages.py)
    **{k: _read_by_stage(k) for spec in STAGE_SPECS.values() for k in spec.keys},
    "dpo_label_smoothing": (lambda f: f.stage == "dpo" and f.pref_loss == "sigmoid", ("stage", "pref_loss"),
                            "stage: dpo with pref_loss: sigmoid"),
    "asft_alpha": (lambda f: f.use_asft_loss, ("use_asft_loss",), "use_asft_loss: true"),
    "eaft_alpha": (lambda f: f.use_eaft_loss, ("use_eaft_loss",), "use_eaft_loss: true"),
    "pref_bco_weight": (lambda f: f.stage == "dpo" and uses_reference(f), ("stage", "pref_loss"),
                        "stage: dpo with a pref_loss that compares with a reference model"),
    "simpo_gamma": (lambda f: f.stage == "dpo" and f.pref_loss == "simpo", ("stage", "pref_loss"),
                    "stage: dpo with pref_loss: simpo"),
    **{k: (_REFERENCE, ("stage", "pref_loss", "finetuning_type"), "a reference model (stage kto, stage dpo with a "
           "pref_loss other than orpo and simpo, or stage ppo with freeze or full fine-tuning; PPO with adapters "
           "uses the base model without them)") for k in ("ref_model", "ref_model_adapters")},
    **{k: (_REWARD_MODEL, ("stage", "reward_funcs"), "stage: ppo, or stage: grpo with reward_model in reward_funcs")
       for k in ("reward_model", "reward_model_type")},
    "reward_model_adapters": (lambda f: _REWARD_MODEL(f) and f.reward_model_type == "full",
                              ("stage", "reward_model_type"), "a reward model of reward_model_type: full"),
    "accuracy_extraction": (lambda f: _GRPO(f) and "accuracy" in reward_names(f), ("stage", "reward_funcs"),
                            "stage: grpo with accuracy in reward_funcs"),
    "format_pattern": (lambda f: _GRPO(f) and "format" in reward_names(f), ("stage", "reward_funcs"),
                       "stage: grpo with format in reward_funcs"),
}


def llamafactory_key_problems(cfg: RecipeConfig) -> list[Problem]:
    """Keys that LLaMA-Factory has and rayft maps onto other settings: the values the mapping can take."""
    d, f, t = cfg.data, cfg.finetuning, cfg.args
    problems = []
    if t.warmup_ratio is not None:
        if not 0 <= t.warmup_ratio < 1:
            problems.append(Problem("warmup_ratio", f"must be a fraction in [0, 1), got {t.warmup_ratio}"))
        if t.warmup_steps:
            problems.append(Problem("warmup_ratio and warmup_steps", "set one of them: warmup_steps takes a count, "
                                                                     "or a fraction below 1 as warmup_ratio does"))
    if t.logging_dir is not None and "tensorboard" not in report_targets(t.report_to):
        problems.append(Problem("logging_dir", "is where TensorBoard writes; add tensorboard to report_to or remove "
                                               "logging_dir"))
    if f.early_stopping_steps is not None:
        if f.early_stopping_steps < 1:
            problems.append(Problem("early_stopping_steps", f"must be a positive count, got {f.early_stopping_steps}"))
        if t.eval_strategy == "no":
            problems.append(Problem("early_stopping_steps", "counts evaluations without improvement; set "
                                                            "eval_strategy (and eval_dataset or val_size)"))
    if d.preprocessing_num_workers is not None and d.preprocessing_num_workers < 1:
        problems.append(Problem("preprocessing_num_workers", f"must be at least 1, got {d.preprocessing_num_workers}"))
    if d.tool_format is not None and d.tool_format not in TOOL_FORMAT_NAMES:
        problems.append(Problem("tool_format", f"{d.tool_format!r} is not built; built: "
                                               f"{', '.join(TOOL_FORMAT_NAMES)}"))
    if f.use_dft_loss and f.stage != "sft":
        problems.append(Problem("use_dft_loss", f"weighs supervised token losses (stage sft), not stage {f.stage!r}"))
    if cfg.model.shift_attn and cfg.model.flash_attn in ("disabled", "fa2"):
        problems.append(Problem("shift_attn and flash_attn", f"shifted sparse attention computes with SDPA; remove "
                                                             f"flash_attn: {cfg.model.flash_attn} or shift_attn"))
    return problems


QUANTIZED_FINETUNING = ("lora", "oft")


def frozen_quantization_problems(cfg: RecipeConfig, base_dir: Path) -> list[Problem]:
    """ref_model_quantization_bit and reward_model_quantization_bit: 4 or 8 bits, of a model that is loaded apart."""
    f = cfg.finetuning
    problems = []
    for key, bits in (("ref_model_quantization_bit", f.ref_model_quantization_bit),
                      ("reward_model_quantization_bit", f.reward_model_quantization_bit)):
        if bits is not None and bits not in (4, 8):
            problems.append(Problem(key, f"bitsandbytes loads 4 or 8 bits, got {bits}"))
    if f.ref_model_quantization_bit is not None:
        if reference_kind(cfg) not in ("copy", "actor"):
            problems.append(Problem("ref_model_quantization_bit", (
                "there is no separate reference model to quantise here (it is none, or the policy with its adapter "
                "off); remove it")))
        elif _zero_stage(cfg.args.deepspeed, base_dir) == 3:
            problems.append(Problem("ref_model_quantization_bit and deepspeed", (
                "ZeRO-3 partitions the reference copy, which bitsandbytes' layers cannot be; use z0-z2")))
    if f.reward_model_quantization_bit is not None and not (_REWARD_MODEL(f) and f.reward_model_type == "full"):
        problems.append(Problem("reward_model_quantization_bit", "quantises a full reward model (reward_model_type: "
                                                                 "full), as LLaMA-Factory; remove it"))
    return problems


def vocabulary_problems(cfg: RecipeConfig, base_dir: Path) -> list[Problem]:
    """New tokens: one list of special tokens, a readable description file, descriptions for desc_init, and the
    settings that cannot grow the embeddings."""
    m, t = cfg.model, cfg.args
    problems = []
    config = m.new_special_tokens_config
    if config is not None and m.add_special_tokens:
        problems.append(Problem("add_special_tokens and new_special_tokens_config", (
            "both name the new special tokens; keep one (LLaMA-Factory takes the config's and warns)")))
    if m.new_special_tokens and (m.add_special_tokens or config is not None):
        other = "add_special_tokens" if m.add_special_tokens else "new_special_tokens_config"
        problems.append(Problem(f"new_special_tokens and {other}", "new_special_tokens is the older name of "
                                                                   f"add_special_tokens; keep {other}"))
    if isinstance(config, str):
        path = under(base_dir, config)
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            problems.append(Problem("new_special_tokens_config", f"cannot read {path} as YAML "
                                                                 f"({' '.join(str(err).split())[:160]})"))
            config = {}
    if config is not None and not (isinstance(config, dict) and config and all(
            isinstance(k, str) and isinstance(v, str) for k, v in config.items())):
        problems.append(Problem("new_special_tokens_config", "must map each new special token to its description "
                                                             "text, e.g. \"<|start_of_svg|>\": \"Marks the beginning "
                                                             "of an SVG document\""))
    if m.init_special_tokens != "noise_init" and m.new_special_tokens_config is None:
        problems.append(Problem("init_special_tokens", f"{m.init_special_tokens} starts each token from its "
                                                       "description; set new_special_tokens_config (LLaMA-Factory "
                                                       "falls back to noise_init)"))
    grows = (m.resize_vocab or m.add_tokens or m.add_special_tokens or m.new_special_tokens
             or m.new_special_tokens_config)
    if grows and m.quantization_bit is not None:
        problems.append(Problem("quantization_bit and resize_vocab", "a quantised model's embeddings cannot grow; "
                                                                     "remove quantization_bit or the new tokens"))
    if grows and _zero_stage(t.deepspeed, base_dir) == 3:
        problems.append(Problem("resize_vocab and deepspeed", "growing the embeddings under ZeRO-3 is not built in "
                                                              "rayft yet; use ZeRO-2 (z2)"))
    return problems


def quantization_problems(cfg: RecipeConfig, base_dir: Path) -> list[Problem]:
    """QLoRA: a 4- or 8-bit bitsandbytes base under LoRA or OFT, trained with DDP or ZeRO-0/1/2."""
    m, f, t = cfg.model, cfg.finetuning, cfg.args
    if m.quantization_bit is None:
        unread = [k for k in ("quantization_method", "quantization_type", "double_quantization")
                  if getattr(m, k) != default_of(type(m), k)]
        return [Problem(f"{k} and quantization_bit", f"{k} is only read with quantization_bit (4 or 8); set it or "
                                                     f"remove {k}") for k in unread]
    problems = []
    if m.quantization_bit not in (4, 8):
        problems.append(Problem("quantization_bit", f"bitsandbytes loads 4 or 8 bits, got {m.quantization_bit}"))
    if m.quantization_method != "bnb":
        problems.append(Problem("quantization_method", f"{m.quantization_method!r} needs its own GPU kernels and is "
                                                       "not built; use bnb (bitsandbytes, GPU and CPU)"))
    if f.finetuning_type not in QUANTIZED_FINETUNING:
        problems.append(Problem("quantization_bit and finetuning_type", "a quantised base model cannot be trained "
                                                                        f"{f.finetuning_type}; use lora or oft"))
    if f.pissa_init:
        problems.append(Problem("quantization_bit and pissa_init", "PiSSA initialises from the full-precision "
                                                                   "weights; remove one of them"))
    if _zero_stage(t.deepspeed, base_dir) == 3:
        problems.append(Problem("quantization_bit and deepspeed", "ZeRO-3 partitions weights, which bitsandbytes' "
                                                                  "quantised layers cannot be; use z0, z1 or z2 (or "
                                                                  "no deepspeed)"))
    return problems


def generation_quantization_problems(cfg: RecipeConfig, for_training: bool) -> list[Problem]:
    """A quantised base at generation (chat, predict, serve): its one adapter stays apart, and
    quantization_device_map (with offload_folder) places a 4-bit model over the process's devices."""
    m, problems = cfg.model, []
    if m.quantization_device_map is not None:
        if for_training:
            problems.append(Problem("quantization_device_map", "places a quantised model for generation (chat, "
                                                               "predict, serve); a training worker keeps its model on "
                                                               "its own device, so remove it"))
        elif m.quantization_bit != 4:
            problems.append(Problem("quantization_device_map and quantization_bit", "an automatic device map is for "
                                                                                    "a 4-bit model (as LLaMA-Factory); "
                                                                                    "set quantization_bit: 4"))
    elif m.offload_folder != default_of(type(m), "offload_folder"):
        problems.append(Problem("offload_folder", "holds what quantization_device_map: auto does not fit in memory; "
                                                  "set it or remove offload_folder"))
    if not for_training and m.quantization_bit is not None:
        if len(comma_list(m.adapter_name_or_path)) > 1:
            problems.append(Problem("adapter_name_or_path and quantization_bit", (
                "a quantised base keeps its adapter apart, so it takes one; merge the others into the base first "
                "(rayft export) or remove quantization_bit")))
        if m.adapter_name_or_path and cfg.serving.serve_adapters:
            problems.append(Problem("adapter_name_or_path and serve_adapters", (
                "with quantization_bit the base keeps adapter_name_or_path apart; serve it as one of serve_adapters "
                "instead")))
    return problems


def validate(cfg: RecipeConfig, base_dir: Path = Path("."), for_training: bool = True) -> list[Problem]:
    """Checks the values against each other; returns every problem found (does not modify cfg)."""
    m, d, f, r, t = cfg.model, cfg.data, cfg.finetuning, cfg.ray, cfg.args
    problems = []
    if not m.model_name_or_path:
        problems.append(Problem("model_name_or_path", "required; set it to a local model folder or a hub id"))
    if for_training and t.do_train is not False and not d.dataset:
        problems.append(Problem("dataset", "required for training; name one or more datasets from dataset_info.json"))
    if t.eval_strategy != "no" and not d.eval_dataset and not d.val_size:
        problems.append(Problem("eval_strategy", f"{t.eval_strategy!r} needs data to evaluate on; set eval_dataset or "
                                                 "val_size"))
    if d.eval_on_each_dataset and not d.eval_dataset:
        problems.append(Problem("eval_on_each_dataset", "needs eval_dataset (a comma list of datasets to evaluate "
                                                        "separately)"))
    if d.val_size and d.eval_dataset:
        problems.append(Problem("val_size", "set either val_size (hold out part of dataset) or eval_dataset, not both"))
    if d.val_size < 0 or (d.val_size > 1 and d.val_size != int(d.val_size)):
        problems.append(Problem("val_size", f"{d.val_size} must be a fraction in [0, 1) or a whole number of examples"))
    if for_training and not t.output_dir:
        problems.append(Problem("output_dir", "required; set the folder the model, logs and metrics are written to"))
    if stage_spec(f.stage) is None:
        problems.append(Problem("stage", f"{f.stage!r} is not a stage; choose one of {', '.join(STAGE_SPECS)}"))
    if f.finetuning_type not in BUILT_FINETUNING_TYPES:
        problems.append(
            Problem("finetuning_type", f"{f.finetuning_type!r} is not built in rayft yet (built: "
                                       f"{sorted(BUILT_FINETUNING_TYPES)})")
        )
    if f.lora_rank < 1:
        problems.append(Problem("lora_rank", f"must be a positive integer, got {f.lora_rank}"))
    if f.lora_alpha is not None and f.lora_alpha <= 0:
        problems.append(Problem("lora_alpha", f"must be positive, got {f.lora_alpha}"))
    if not 0.0 <= f.lora_dropout < 1.0:
        problems.append(Problem("lora_dropout", f"must be in [0, 1), got {f.lora_dropout}"))
    for key, (used, settings, by) in ONLY_USED_WITH.items():
        if getattr(f, key) != default_of(FinetuningArguments, key) and not used(f):
            now = ", ".join(f"{name}: {getattr(f, name)!r}" for name in settings)
            by = by() if callable(by) else by
            problems.append(Problem(f"{key} and {' and '.join(settings)}", f"{key} is only used with {by}, but here "
                                                                           f"{now}; remove {key} or change "
                                                                           f"{' / '.join(settings)}"))
    problems += llamafactory_key_problems(cfg)
    problems += (quantization_problems(cfg, base_dir) + frozen_quantization_problems(cfg, base_dir)
                 + generation_quantization_problems(cfg, for_training))
    problems += vocabulary_problems(cfg, base_dir)
    profiler_keys = [k.name for k in dataclasses.fields(TrainingArguments) if k.name.startswith("profiler_")
                     and getattr(t, k.name) != default_of(TrainingArguments, k.name)]
    if profiler_keys and not t.enable_torch_profiler:
        problems.append(Problem(f"{profiler_keys[0]} and enable_torch_profiler", f"{profiler_keys[0]} is only used "
                                                                                 "with enable_torch_profiler: true; "
                                                                                 "set it or remove the profiler keys"))
    if f.include_effective_tokens_per_second and (d.streaming or f.stage in ONLINE_STAGES):
        problems.append(Problem("include_effective_tokens_per_second", "counts the tokens of a tokenised training "
                                                                       "set, which a stream (or the ppo and grpo "
                                                                       "loops' prompts) does not have; remove it"))
    if m.adapter_folder and not m.adapter_name_or_path:
        problems.append(Problem("adapter_folder", "names a folder inside each adapter of adapter_name_or_path, which "
                                                  "is not set; set it or remove adapter_folder"))
    if m.train_from_scratch and m.quantization_bit is not None:
        problems.append(Problem("train_from_scratch and quantization_bit", "random weights are not a quantised "
                                                                           "checkpoint; remove one of them"))
    if d.mask_history and d.train_on_prompt:
        problems.append(Problem("mask_history and train_on_prompt", "mask_history learns only the last response, "
                                                                    "train_on_prompt learns every prompt too; set "
                                                                    "one of them to false"))
    zero3 = _zero_stage(t.deepspeed, base_dir) == 3
    if len(comma_list(m.adapter_name_or_path)) > 1 and zero3:
        problems.append(Problem("adapter_name_or_path and deepspeed", "merging several adapters needs whole weights, "
                                                                      "which ZeRO-3 partitions; merge them "
                                                                      "beforehand or use ZeRO 0-2"))
    if f.pissa_convert and zero3:
        problems.append(Problem("pissa_convert and deepspeed", "converting PiSSA needs the whole adapter on one "
                                                               "worker, which ZeRO-3 partitions; use ZeRO 0-2 or "
                                                               "remove pissa_convert"))
    if m.adapter_name_or_path and f.finetuning_type not in ("lora", "oft"):
        problems.append(Problem("adapter_name_or_path and finetuning_type", "adapters continue lora or oft training, "
                                                                            f"not {f.finetuning_type!r}; merge them "
                                                                            "into the model first or use "
                                                                            "finetuning_type: lora"))
    if f.compute_accuracy and t.eval_strategy == "no" and not (d.eval_dataset or d.val_size):
        problems.append(Problem("compute_accuracy", "needs evaluation data; set eval_dataset or val_size"))
    token_losses = [k for k in ("use_dft_loss", "use_asft_loss", "use_eaft_loss") if getattr(f, k)]
    if len(token_losses) > 1:
        problems.append(Problem(" and ".join(token_losses), "each replaces SFT's token loss; keep one (LLaMA-Factory "
                                                            "takes the first of dft, eaft, asft silently)"))
    if f.ld_alpha is not None and not 0 <= f.ld_alpha <= 1:
        problems.append(Problem("ld_alpha", f"weighs the longer response's excess tokens, in [0, 1] (1 is plain DPO), "
                                            f"got {f.ld_alpha}"))
    if f.pref_bco_weight < 0:
        problems.append(Problem("pref_bco_weight", f"must be at least 0, got {f.pref_bco_weight}"))
    if f.use_llama_pro and f.finetuning_type not in ("freeze", "lora"):
        problems.append(Problem("use_llama_pro and finetuning_type", f"LLaMA Pro trains its inserted blocks with "
                                                                     f"freeze or lora, not {f.finetuning_type!r} (as "
                                                                     "LLaMA-Factory); use one of them"))
    if f.freeze_trainable_layers == 0:
        problems.append(Problem("freeze_trainable_layers", "0 trains nothing; use a positive n (last n blocks) or a "
                                                           "negative one (first n)"))
    modelling = stages_where("language_modelling")
    if (d.packing or d.neat_packing) and f.stage not in modelling:
        problems.append(Problem("packing", f"packs sequences for stages {' and '.join(modelling)}, not {f.stage!r}; "
                                           "remove packing"))
    if d.neat_packing and d.packing is False:
        problems.append(Problem("neat_packing", "needs packing; remove packing: false or neat_packing: true"))
    if d.streaming and t.max_steps <= 0:
        problems.append(Problem("streaming", "a streamed dataset has no length to count epochs by; set max_steps"))
    if d.streaming and d.tokenized_path:
        problems.append(Problem("tokenized_path and streaming", "saving the tokenised data materialises it, which "
                                                                "streaming avoids; remove one of them"))
    if not d.ignore_pad_token_for_loss and f.stage not in modelling:
        problems.append(Problem("ignore_pad_token_for_loss", (
            f"false makes stages {' and '.join(modelling)} learn padding; stage {f.stage!r} compares sequences and "
            "never learns padding; remove ignore_pad_token_for_loss")))
    if d.buffer_size < 1:
        problems.append(Problem("buffer_size", f"must be at least 1 example, got {d.buffer_size}"))
    if not 0 <= d.max_bad_row_ratio <= 1:
        problems.append(Problem("max_bad_row_ratio", f"must be a share between 0 and 1, got {d.max_bad_row_ratio}"))
    if d.cutoff_len < 8:
        problems.append(Problem("cutoff_len", f"must be at least 8 tokens, got {d.cutoff_len}"))
    if d.max_samples is not None and d.max_samples < 1:
        problems.append(Problem("max_samples", f"must be a positive integer, got {d.max_samples}"))
    if d.preprocessing_batch_size < 1:
        problems.append(Problem("preprocessing_batch_size", f"must be positive, got {d.preprocessing_batch_size}"))
    if r.ray_max_failures < -1:
        problems.append(Problem("ray_max_failures", f"{r.ray_max_failures} is not a number of restarts; use 0 or "
                                                    "more, or -1 for no limit"))
    problems += elastic_problems(cfg)
    workers = worker_range(r.ray_num_workers)
    problems += optimizer_problems(f, t.optim, t.deepspeed, workers[1] if workers else 1,
                                   t.gradient_accumulation_steps, f.stage in ONLINE_STAGES)
    problems += resource_problems("resources_per_worker", r.resources_per_worker)
    problems += _deepspeed_problems(t.deepspeed, base_dir)
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(t, key) < 1:
            problems.append(Problem(key, f"must be at least 1, got {getattr(t, key)}"))
    if t.learning_rate <= 0:
        problems.append(Problem("learning_rate", f"must be positive, got {t.learning_rate}"))
    problems += _run_kind_problems(cfg, for_training)
    problems += _ppo_problems(cfg)
    problems += grpo_problems(cfg)
    problems += serving_problems(cfg)
    problems += size_problems(cfg)
    if f.train_mm_proj_only:
        problems.append(Problem("train_mm_proj_only", "LLaMA-Factory 0.9.5 removed it; to train only the projector set "
                                                      "freeze_vision_tower: true, freeze_language_model: true and "
                                                      "freeze_multi_modal_projector: false"))
    problems += storage_problems(cfg, base_dir)
    return problems


# The largest value of each number that sizes memory, time or processes: far beyond any real run, small enough that
# a typo (an extra digit or three) is refused here instead of reserving a cluster or allocating terabytes.
UPPER_BOUNDS: dict[str, int] = {
    "lora_rank": 65_536, "oft_rank": 65_536, "cutoff_len": 16_777_216, "per_device_train_batch_size": 65_536,
    "per_device_eval_batch_size": 65_536, "gradient_accumulation_steps": 65_536, "max_steps": 1_000_000_000,
    "num_train_epochs": 1_000_000, "num_generations": 65_536, "max_new_tokens": 16_777_216,
    "preprocessing_batch_size": 16_777_216, "ray_num_workers": 100_000,
}


def size_problems(cfg: RecipeConfig) -> list[Problem]:
    """Numbers that size the run: at most UPPER_BOUNDS, and an epoch count that trains at all."""
    problems, flat = [], cfg.to_dict(mask_secrets=False)
    for key, bound in UPPER_BOUNDS.items():
        value = flat[key] if key in flat else getattr(cfg.args, key)
        if key == "ray_num_workers":  # a count or a range: its largest end
            value = (worker_range(value) or (0, 0))[1]
        if isinstance(value, (int, float)) and value > bound:
            problems.append(Problem(key, f"{value} is beyond what rayft runs (at most {bound:,}); check for a typo"))
    t = cfg.args
    if t.max_steps <= 0 and t.num_train_epochs <= 0 and t.do_train is not False:
        problems.append(Problem("num_train_epochs", f"{t.num_train_epochs} trains nothing; set a positive number of "
                                                    "epochs, or max_steps"))
    return problems


def storage_problems(cfg: RecipeConfig, base_dir: Path) -> list[Problem]:
    """ray_run_name is a plain name inside ray_storage_path, and a local ray_storage_path is a folder (or nothing
    yet), never a file."""
    r, problems = cfg.ray, []
    name = r.ray_run_name
    if name is not None and (not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0")
                             or name.startswith("~")):
        problems.append(Problem("ray_run_name", f"{name!r} is not a plain name; the run's checkpoints live in a folder "
                                                "of that name inside ray_storage_path (use letters, digits, - _ .)"))
    storage = r.ray_storage_path
    if "://" not in storage and under(base_dir, storage).expanduser().is_file():
        problems.append(Problem("ray_storage_path", f"{storage} is a file; give a folder (or an s3:// / gs:// URI)"))
    return problems


def _run_kind_problems(cfg: RecipeConfig, for_training: bool) -> list[Problem]:
    """Checks that depend on what the recipe runs: training, or generation for evaluation and prediction.

    A recipe for `rayft chat` or `rayft export` (`for_training=False`) may hold generation settings.
    """
    d, f, g, t = cfg.data, cfg.finetuning, cfg.generating, cfg.args
    problems = []
    training = t.do_train is not False and for_training
    if t.predict_with_generate and training:
        problems.append(Problem("predict_with_generate", "generation runs in a recipe of its own after training (as "
                                                         "in LLaMA-Factory); set do_train: false and "
                                                         "adapter_name_or_path to the trained output_dir"))
    if t.do_predict and not t.predict_with_generate:
        problems.append(Problem("do_predict", "rayft predicts by generating; set predict_with_generate: true"))
    if is_prediction(cfg):
        if not (t.do_predict or t.do_eval):
            problems.append(Problem("predict_with_generate", "set do_predict: true (predictions and scores) or "
                                                             "do_eval: true (scores only)"))
        if not d.eval_dataset:
            problems.append(Problem("eval_dataset", "required for prediction; name the datasets to generate answers "
                                                    "for"))
        if d.dataset:
            problems.append(Problem("dataset", "prediction reads no training data; name the data to generate for in "
                                               "eval_dataset and remove dataset"))
        if f.stage != "sft":
            problems.append(Problem("stage", "prediction generates with a stage sft model; set stage: sft, not "
                                             f"{f.stage!r}"))
        if t.deepspeed is not None:
            problems.append(Problem("deepspeed", "prediction runs one whole model per worker, without DeepSpeed; "
                                                 "remove deepspeed"))
        if cfg.ray.placement_strategy != "PACK":
            problems.append(Problem("placement_strategy", "Ray Data places the generation actors wherever they fit; "
                                                          "remove placement_strategy"))
        if d.packing or d.neat_packing or d.streaming:
            problems.append(Problem("packing / neat_packing / streaming", "prediction generates for one example at a "
                                                                          "time in order; remove them"))
    elif for_training and not training:
        problems.append(Problem("do_train", "false leaves nothing to run; add do_predict: true and "
                                            "predict_with_generate: true to generate, or remove do_train"))
    elif training and f.stage not in ONLINE_STAGES:  # ppo and grpo generate their rollouts with them
        changed = [k for k in GENERATION_KEYS if getattr(g, k) != default_of(GeneratingArguments, k)]
        changed += ["eval_num_beams"] if d.eval_num_beams is not None else []
        problems += [Problem(k, "generation settings are read by prediction (do_train: false with do_predict and "
                                f"predict_with_generate) and by `rayft chat`, not by training; remove {k}")
                     for k in changed]
    if for_training:
        problems += [Problem(k, f"serving settings are read by `rayft serve`, not by training; remove {k}")
                     for k in SERVING_KEYS if getattr(cfg.serving, k) != default_of(ServingArguments, k)]
    targets = report_targets(t.report_to)
    problems += [Problem("report_to", f"{name!r} is not built in rayft (built: {', '.join(BUILT_TRACKERS)})")
                 for name in targets if name not in BUILT_TRACKERS]
    if f.mlflow_tracking_uri and "mlflow" not in targets:
        problems.append(Problem("mlflow_tracking_uri", "only read with report_to: mlflow; add mlflow to report_to or "
                                                       "remove mlflow_tracking_uri"))
    return problems + swanlab_problems(cfg)


def swanlab_problems(cfg: RecipeConfig) -> list[Problem]:
    """SwanLab's keys are read only when SwanLab tracks the run, its key only by cloud mode, which logs in."""
    f = cfg.finetuning
    if not uses_swanlab(cfg):
        return [Problem(k, "only read with use_swanlab: true; set it or remove " + k)
                for k in SWANLAB_KEYS if getattr(f, k) != default_of(type(f), k)]
    problems = []
    if f.swanlab_api_key and f.swanlab_mode != "cloud":
        problems.append(Problem("swanlab_api_key", f"only read with swanlab_mode: cloud ({f.swanlab_mode} mode logs "
                                                   "to a folder without logging in); remove it or use cloud"))
    if f.swanlab_lark_secret and not f.swanlab_lark_webhook_url:
        problems.append(Problem("swanlab_lark_secret", "signs swanlab_lark_webhook_url's messages; set the webhook "
                                                       "or remove the secret"))
    return problems


BUILT_REWARDS = ("accuracy", "format", "length", "reward_model")


def grpo_problems(cfg: RecipeConfig) -> list[Problem]:
    """Checks of a stage grpo recipe: its groups, rewards, rollout actors, and what its loop does not do."""
    f, g, r, t = cfg.finetuning, cfg.generating, cfg.ray, cfg.args
    if f.stage != "grpo":
        return [Problem(key, f"only read by stage grpo (the rollout actors); remove {key}")
                for key in ("rollout_workers", "rollout_resources") if getattr(r, key) not in (0, None)]
    problems = []
    completions = t.per_device_train_batch_size * t.gradient_accumulation_steps
    if f.num_generations < 2:
        problems.append(Problem("num_generations", f"a group needs at least 2 completions per prompt to compare, got "
                                                   f"{f.num_generations}"))
    elif completions % f.num_generations:
        problems.append(Problem("num_generations", f"{completions} completions per worker and step "
                                                   "(per_device_train_batch_size x gradient_accumulation_steps) are "
                                                   f"not whole groups of {f.num_generations}; make them a multiple"))
    if f.epsilon <= 0 or (f.epsilon_high is not None and f.epsilon_high <= 0):
        problems.append(Problem("epsilon / epsilon_high", "clip ranges must be positive"))
    if f.beta < 0:
        problems.append(Problem("beta", f"the KL weight must be 0 or more, got {f.beta}"))
    if f.ppo_epochs < 1:
        problems.append(Problem("ppo_epochs", f"must be at least 1, got {f.ppo_epochs}"))
    names = reward_names(f)
    if not names:
        problems.append(Problem("reward_funcs", "stage grpo needs at least one reward: accuracy, format, length, "
                                                "reward_model or package.module:function"))
    for name in names:
        if name not in BUILT_REWARDS and (":" not in name or not all(name.partition(":")[::2])):
            problems.append(Problem("reward_funcs", f"{name!r} is neither a built-in reward "
                                                    f"({', '.join(BUILT_REWARDS)}) nor package.module:function"))
    if len(set(names)) != len(names):
        problems.append(Problem("reward_funcs", "names a reward twice; give it a larger weight instead"))
    try:
        weights = reward_weights(f)
    except ValueError:
        problems.append(Problem("reward_weights", f"{f.reward_weights!r} must be numbers, one per reward"))
    else:
        if len(weights) != len(names):
            problems.append(Problem("reward_weights", f"{len(weights)} weight(s) for {len(names)} reward(s); give "
                                                      "one per reward_funcs entry, in the same order"))
    if "format" in names and not f.format_pattern:
        problems.append(Problem("format_pattern", "the format reward needs the regular expression a completion must "
                                                  "match, e.g. '^The answer is \\d+'"))
    if f.format_pattern:
        import re

        try:
            re.compile(f.format_pattern)
        except re.error as err:
            problems.append(Problem("format_pattern", f"not a regular expression ({err})"))
    if "reward_model" in names:
        problems += _reward_model_key_problems(f)
    if f.async_rollouts and not r.rollout_workers:
        problems.append(Problem("async_rollouts", "overlaps generation on the rollout actors with learning; set "
                                                  "rollout_workers (1 or more) or remove async_rollouts"))
    if r.rollout_workers < 0:
        problems.append(Problem("rollout_workers", f"must be 0 (every worker generates) or more, got "
                                                   f"{r.rollout_workers}"))
    if r.rollout_resources is not None and not r.rollout_workers:
        problems.append(Problem("rollout_resources", "only read with rollout_workers > 0; remove it or set "
                                                     "rollout_workers"))
    problems += resource_problems("rollout_resources", r.rollout_resources)
    if g.num_beams != 1:
        problems.append(Problem("num_beams", "grpo samples its completions; remove num_beams"))
    if not g.do_sample:
        problems.append(Problem("do_sample", "grpo compares sampled completions of one prompt; greedy decoding makes "
                                             "them all alike. Remove do_sample: false"))
    return problems + _online_not_built(cfg, "grpo")


def _reward_model_key_problems(f) -> list[Problem]:
    """The reward model keys a ppo recipe, or a grpo recipe that scores with one, must get right."""
    problems = []
    if not f.reward_model:
        problems.append(Problem("reward_model", f"stage {f.stage} needs a reward model: the output_dir of a "
                                                "`stage: rm` run (reward_model_type: lora), a reward model folder "
                                                "(full), or an http(s) URL (api)"))
    elif f.reward_model_type == "api" and not f.reward_model.startswith(("http://", "https://")):
        problems.append(Problem("reward_model", "with reward_model_type: api it is the URL of the reward endpoint "
                                                f"(http:// or https://), not {f.reward_model!r}"))
    if f.reward_model_type == "lora" and f.finetuning_type != "lora":
        problems.append(Problem("reward_model_type and finetuning_type", "a lora reward model is an adapter on the "
                                                                         "policy's own base, so the policy must be "
                                                                         "trained with finetuning_type: lora, not "
                                                                         f"{f.finetuning_type!r}; or use "
                                                                         "reward_model_type: full"))
    return problems


def _online_not_built(cfg: RecipeConfig, stage: str) -> list[Problem]:
    """What the ppo and grpo loops (DDP, AdamW, no evaluation) do not do, refused by name."""
    d, f, t = cfg.data, cfg.finetuning, cfg.args
    not_built = {
        "deepspeed": t.deepspeed is not None,
        "streaming": d.streaming,
        "eval_dataset": bool(d.eval_dataset or d.val_size or t.eval_strategy != "no"),
        "pissa_convert": f.pissa_convert,
        "optim": t.optim not in ("adamw_torch", "adamw_torch_fused"),
        "enable_torch_profiler": t.enable_torch_profiler,
        "profile_modules": t.profile_modules is not None,
    }
    name = stage.upper()
    what = {"deepspeed": f"DeepSpeed ZeRO for {name} (the {name} loop trains with DDP)",
            "streaming": f"streamed prompts for {name}", "eval_dataset": f"evaluation during {name} (eval_dataset, "
            "val_size, eval_strategy)", "pissa_convert": "PiSSA conversion "
            f"for {name}", "optim": f"optimizers other than AdamW for {name}",
            "enable_torch_profiler": f"the torch profiler in the {name} loop",
            "profile_modules": f"module timing in the {name} loop"}
    return [Problem(key, f"{what[key]} is not built in rayft yet; remove {key}")
            for key, used in not_built.items() if used]


def _ppo_problems(cfg: RecipeConfig) -> list[Problem]:
    """Checks of a stage ppo recipe: its reward model, and what rayft's PPO loop does not do."""
    d, f, r = cfg.data, cfg.finetuning, cfg.ray
    if f.stage != "ppo":
        return [Problem(key, f"only read by stage ppo (reward model actors); remove {key}")
                for key in ("reward_model_workers", "reward_model_resources") if getattr(r, key) not in (0, None)]
    problems = _reward_model_key_problems(f)
    kind = f.reward_model_type
    if r.reward_model_workers < 0:
        problems.append(Problem("reward_model_workers", "must be 0 (reward model inside each worker) or more, got "
                                                        f"{r.reward_model_workers}"))
    if r.reward_model_workers and kind != "full":
        problems.append(Problem("reward_model_workers", "a separate group of reward actors serves a whole reward "
                                                        f"model (reward_model_type: full), not {kind!r}; set "
                                                        "reward_model_type: full (for an rm adapter: reward_model = "
                                                        "its base model and reward_model_adapters = the adapter) or "
                                                        "remove reward_model_workers"))
    if r.reward_model_resources is not None and not r.reward_model_workers:
        problems.append(Problem("reward_model_resources", "only read with reward_model_workers > 0; remove it or set "
                                                          "reward_model_workers"))
    problems += resource_problems("reward_model_resources", r.reward_model_resources)
    for key in ("ppo_epochs", "ppo_buffer_size"):
        if getattr(f, key) < 1:
            problems.append(Problem(key, f"must be at least 1, got {getattr(f, key)}"))
    if f.ppo_target <= 0:
        problems.append(Problem("ppo_target", f"the KL target must be positive, got {f.ppo_target}"))
    problems += _online_not_built(cfg, "ppo")
    g = cfg.generating
    if g.num_beams != 1:
        problems.append(Problem("num_beams", "PPO samples its rollouts one sequence per prompt; remove num_beams "
                                             f"({g.num_beams})"))
    unread = [k for k in ("skip_special_tokens", "length_penalty")
              if getattr(g, k) != default_of(GeneratingArguments, k)] + (["eval_num_beams"] if d.eval_num_beams else [])
    problems += [Problem(k, "not read by PPO's rollouts (answers are scored with their special tokens); "
                            f"remove {k}") for k in unread]
    return problems


def serving_problems(cfg: RecipeConfig) -> list[Problem]:
    """`rayft serve`'s settings: an API key off loopback, sane bounds, a replica count or range, adapter names."""
    s = cfg.serving
    problems = []
    if s.serve_host not in LOOPBACK_HOSTS and not s.serve_api_key:
        problems.append(Problem("serve_api_key", f"required when serve_host is {s.serve_host!r}, which other machines "
                                                 "can reach; set serve_api_key (or API_KEY), or serve_host: 127.0.0.1"))
    if s.serve_api_key is not None and len(s.serve_api_key) < 8:
        problems.append(Problem("serve_api_key", "must be at least 8 characters; use a long random string"))
    if not 1 <= s.serve_port <= 65535:
        problems.append(Problem("serve_port", f"{s.serve_port} is not a TCP port; use 1-65535"))
    if replica_range(s.serve_replicas) is None:
        problems.append(Problem("serve_replicas", f"{s.serve_replicas!r} is neither a number of replicas (1 or more) "
                                                  "nor a range such as \"1-4\" (minimum 0 or more, at most the "
                                                  "maximum)"))
    problems += resource_problems("serve_resources", s.serve_resources)
    if s.serve_max_batch_size is not None and s.serve_max_batch_size > s.serve_max_concurrent:
        problems.append(Problem("serve_max_batch_size", f"{s.serve_max_batch_size} is more than the "
                                                        f"{s.serve_max_concurrent} requests a replica holds "
                                                        "(serve_max_concurrent); raise that or lower this"))
    for key, least in (("serve_max_concurrent", 1), ("serve_max_batch_size", 1), ("serve_max_tokens", 1),
                       ("serve_max_prompt_tokens", 8),
                       ("serve_max_body_bytes", 1024)):
        value = getattr(s, key)
        if value is not None and value < least:
            problems.append(Problem(key, f"must be at least {least}, got {value}"))
    if not s.serve_route_prefix.startswith("/") or (len(s.serve_route_prefix) > 1 and
                                                     s.serve_route_prefix.endswith("/")):
        problems.append(Problem("serve_route_prefix", f"{s.serve_route_prefix!r} must start with / and not end with "
                                                      "one, e.g. /math"))
    adapters = s.serve_adapters
    if isinstance(adapters, str):
        try:
            adapters = json.loads(adapters)
        except json.JSONDecodeError as err:
            return problems + [Problem("serve_adapters", f"not valid JSON ({err.msg}); write a mapping such as "
                                                         "'{\"math\": \"saves/math-lora\"}'")]
    if adapters is not None:
        if not isinstance(adapters, dict) or not adapters:
            problems.append(Problem("serve_adapters", "must be a non-empty mapping of name to adapter folder or URI"))
        else:
            problems += [Problem("serve_adapters", f"{name!r}: a name is letters, digits and . _ - : / (no spaces), "
                                                   "and the folder or URI a string")
                         for name, where in adapters.items()
                         if not isinstance(where, str) or not where or not _api_name(str(name))]
    if s.served_model_name is not None and not _api_name(s.served_model_name):
        problems.append(Problem("served_model_name", f"{s.served_model_name!r}: use letters, digits and . _ - : /"))
    return problems


def elastic_problems(cfg: RecipeConfig) -> list[Problem]:
    """Checks of ray_num_workers, and of what an elastic range (min < max) needs: a stage whose Trainer resumes across
    sizes, materialised data, and a global batch that every size in the range divides evenly."""
    r, f, t = cfg.ray, cfg.finetuning, cfg.args
    found = worker_range(r.ray_num_workers)
    if found is None:
        return [Problem("ray_num_workers", f"{r.ray_num_workers!r} is neither a number of workers (1 or more) nor a "
                                           "range [min, max] / \"min-max\" with 1 <= min <= max")]
    low, high = found
    problems = []
    for key, value in (("ray_resize_interval_s", r.ray_resize_interval_s),
                       ("ray_preemption_grace_s", r.ray_preemption_grace_s)):
        if value < 0:
            problems.append(Problem(key, f"must be 0 or more seconds, got {value}"))
    if r.ray_preemption_grace_s != default_of(RayArguments, "ray_preemption_grace_s") and f.stage in ONLINE_STAGES:
        problems.append(Problem("ray_preemption_grace_s", f"a checkpoint on SIGTERM is not built for stage {f.stage} "
                                                          "(its own loop); remove ray_preemption_grace_s"))
    if low == high:
        if r.ray_resize_interval_s != default_of(RayArguments, "ray_resize_interval_s"):
            problems.append(Problem("ray_resize_interval_s", "only read by an elastic run (ray_num_workers a range "
                                                             "[min, max]); remove ray_resize_interval_s"))
        return problems
    if f.stage in ONLINE_STAGES:
        problems.append(Problem("ray_num_workers", f"elastic runs of stage {f.stage} are not built (its own loop "
                                                   "resumes at one size); use a number of workers"))
    if cfg.data.streaming:
        problems.append(Problem("ray_num_workers", "an elastic run of streamed data is not built (every worker "
                                                   "reads the whole, materialised dataset); remove streaming"))
    per_device = t.per_device_train_batch_size
    batch = per_device * t.gradient_accumulation_steps * high
    uneven = [n for n in range(low, high + 1) if batch % (per_device * n)]
    if uneven:
        even = [n for n in range(low, high + 1) if n not in uneven]
        problems.append(Problem("ray_num_workers", (
            f"the global batch of {batch} (per_device_train_batch_size {per_device} x gradient_accumulation_steps "
            f"{t.gradient_accumulation_steps} x {high} workers) cannot be shared evenly by {uneven} worker(s); "
            f"choose a range whose sizes all divide {batch // per_device} micro-batches"
            + (f" (here {even})" if even else "") + " or a gradient_accumulation_steps that every size divides")))
    return problems


def _api_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "._-:/" for c in name)


def reward_model_problems(cfg: RecipeConfig) -> list[Problem]:
    """What is missing from a ppo recipe's reward model folders; checked by the driver before Ray starts (a
    shipped recipe may name the output of a run that has not happened yet)."""
    f = cfg.finetuning
    if not _REWARD_MODEL(f) or f.reward_model_type == "api" or not f.reward_model:
        return []
    problems = []
    folder = Path(f.reward_model)
    if f.reward_model_type == "lora" and not all((folder / name).is_file() for name in (
            "adapter_config.json", VALUE_HEAD_FILE)):
        problems.append(Problem("reward_model", f"{folder} holds no reward adapter (adapter_config.json and "
                                                "value_head.safetensors, what a `stage: rm` run with "
                                                "finetuning_type: lora saves); run that stage first, or point "
                                                "reward_model at such a run's output_dir"))
    if f.reward_model_type == "full" and folder.is_absolute() and not (folder / "config.json").is_file():
        problems.append(Problem("reward_model", f"{folder} holds no model (config.json); point it at a model folder, "
                                                "e.g. the output_dir of a `stage: rm` run with full fine-tuning, or "
                                                "the base model with the rm adapter in reward_model_adapters"))
    for adapter in comma_list(f.reward_model_adapters):
        if not (Path(adapter) / "adapter_config.json").is_file():
            problems.append(Problem("reward_model_adapters", f"{adapter} holds no adapter (adapter_config.json)"))
    return problems


def resource_problems(key: str, resources: Any) -> list[Problem]:
    """What is wrong with a resources mapping (or its JSON text) given as `key`."""
    if resources is None:
        return []
    if isinstance(resources, str):
        try:
            resources = json.loads(resources)
        except json.JSONDecodeError as err:
            return [Problem(key, f"{resources!r} is not valid JSON ({err.msg}); write e.g. '{{\"CPU\": 2}}'")]
    if not isinstance(resources, dict) or not resources:
        return [Problem(key, "must be a non-empty mapping of resource name to amount, e.g. {CPU: 2}")]
    return [
        Problem(key, f"{name} must be a non-negative number, got {amount!r}")
        for name, amount in resources.items()
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0
    ]


def _deepspeed_problems(deepspeed: Any, base_dir: Path) -> list[Problem]:
    if deepspeed is None or isinstance(deepspeed, dict) or deepspeed in SHORTHANDS:
        return []
    path = under(base_dir, deepspeed)
    if not path.is_file():
        return [Problem("deepspeed", f"{deepspeed!r} is neither a shorthand ({', '.join(SHORTHANDS)}) nor an existing "
                                     "JSON file")]
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return [Problem("deepspeed", f"{deepspeed} is not valid JSON: {err}")]
    return []


def _zero_stage(spec: Any, base_dir: Path) -> int | None:
    """The ZeRO stage of a recipe's deepspeed value (shorthand, dict or JSON path), None without one."""
    if spec == "auto":
        return None  # decided by the memory planner
    if isinstance(spec, str) and spec in SHORTHANDS:
        return int(spec[1])
    if isinstance(spec, str):
        try:
            spec = json.loads(under(base_dir, spec).read_text())
        except (OSError, json.JSONDecodeError):
            return None
    if isinstance(spec, dict):
        return int(spec.get("zero_optimization", {}).get("stage", 0))
    return None
