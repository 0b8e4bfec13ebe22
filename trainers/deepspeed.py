"""DeepSpeed ZeRO configurations: the shorthands a recipe may name, and what a config says about itself.

Values left as "auto" are filled in by Hugging Face's Trainer from the training arguments.
"""

import copy

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


def prebuild_cpu_ops(log=print) -> None:
    """Compiles DeepSpeed's shared-memory collective op once, before CPU workers start.

    Without a GPU, DeepSpeed JIT-compiles this op on first use; two workers compiling it at once crash,
    so the driver builds it into the shared torch extensions cache first (about a minute, then cached).
    """
    import torch

    if torch.cuda.is_available():
        return
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible(verbose=False):
        return
    log("[rayft] preparing DeepSpeed's CPU shared-memory op (compiled once, then cached)")
    builder.load(verbose=False)
