"""DeepSpeed ZeRO configurations: the shorthands a recipe may name, and what a config says about itself.

Pure data, shared by the planner on the driver and the workers that hand the config to the Trainer.

Values left as "auto" are filled in by Hugging Face's Trainer from the training arguments.
"""

import copy

# The values a recipe's `deepspeed` key may name instead of a JSON file; auto: the memory planner picks one.
SHORTHANDS = ("z0", "z1", "z2", "z3", "z2_offload", "z3_offload", "auto")

_COMMON = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_allow_untested_optimizer": True,
    "fp16": {"enabled": "auto"},
    "bf16": {"enabled": "auto"},
}

_ZERO = {
    "z0": {"stage": 0},
    "z1": {"stage": 1},
    "z2": {"stage": 2, "allgather_partitions": True, "overlap_comm": False, "reduce_scatter": True,
           "contiguous_gradients": True},
    "z3": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True, "sub_group_size": 1e9,
           "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
           "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
           "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
}
_OFFLOAD = {"device": "cpu", "pin_memory": True}


def shorthand_config(name: str) -> dict:
    """The full DeepSpeed config for a shorthand: z0, z1, z2, z3, z2_offload or z3_offload."""
    stage, _, offload = name.partition("_")
    config = copy.deepcopy(_COMMON)
    config["zero_optimization"] = copy.deepcopy(_ZERO[stage])
    if offload:
        config["zero_optimization"]["offload_optimizer"] = dict(_OFFLOAD)
        if stage == "z3":
            config["zero_optimization"]["offload_param"] = dict(_OFFLOAD)
    return config


def materialize(spec: str | dict | None) -> dict | None:
    """A recipe's `deepspeed` value (already read from its file on the driver) as a config dict."""
    if spec is None or isinstance(spec, dict):
        return copy.deepcopy(spec)
    return shorthand_config(spec)


def zero_stage(config: dict | None) -> int | None:
    """The ZeRO stage a config asks for, or None without DeepSpeed."""
    if config is None:
        return None
    return int(config.get("zero_optimization", {}).get("stage", 0))


def offload_targets(config: dict | None) -> list[str]:
    """Which states the config offloads to CPU or NVMe: 'optimizer' and/or 'param'."""
    zero = (config or {}).get("zero_optimization", {})
    return [
        target
        for target in ("optimizer", "param")
        if zero.get(f"offload_{target}", {}).get("device", "none") not in ("none", None)
    ]
