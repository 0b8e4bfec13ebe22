"""Which optimizer a recipe asks for, the rules it must follow with the rest of the recipe, and how many bytes of
state it keeps: decided here once and read by the checks, the memory planner and the workers' factory
(trainers/optimizers.py)."""

from rayft.recipe.problems import Problem

# The switches of the optimizers the factory builds, each with its name in messages.
SWITCHES = {"use_galore": "GaLore", "use_apollo": "APOLLO", "use_badam": "BAdam", "use_adam_mini": "Adam-mini",
            "use_muon": "Muon"}
ADAMW = ("adamw_torch", "adamw_torch_fused")


def switches(f) -> dict[str, tuple[str, bool]]:
    """switch -> (kind, whether the recipe turns it on)."""
    return {"use_galore": ("galore", f.use_galore), "use_apollo": ("apollo", f.use_apollo),
            "use_badam": ("badam", f.use_badam), "use_adam_mini": ("adam_mini", f.use_adam_mini),
            "use_muon": ("muon", f.use_muon)}


def optimizer_kind(f) -> str:
    """`default` (the Trainer's `optim`), `loraplus`, `galore`, `apollo`, `badam`, `adam_mini` or `muon`. The rules
    below refuse a recipe that switches on more than one."""
    for kind, on in switches(f).values():
        if on:
            return kind
    return "loraplus" if f.loraplus_lr_ratio is not None else "default"


# Transformers' `optim` values whose optimizers bitsandbytes provides (its trainer_optimizer's list, kept equal by
# tests/test_optimizers.py), e.g. QLoRA recipes' paged_adamw_8bit
BITSANDBYTES_OPTIMS = frozenset({
    "adamw_8bit", "adamw_bnb_8bit", "ademamix", "ademamix_8bit", "lion_32bit", "lion_8bit", "paged_adamw_32bit",
    "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit",
    "rmsprop_bnb", "rmsprop_bnb_32bit", "rmsprop_bnb_8bit"})


def uses_bitsandbytes(cfg) -> bool:
    """Whether the workers need bitsandbytes: a quantised base, reference or reward model, one of its optimizers as
    `optim`, or GaLore or APOLLO (their packages import it), by switch or by Transformers' optim name."""
    f, optim = cfg.finetuning, cfg.args.optim
    return bool(cfg.model.quantization_bit or f.ref_model_quantization_bit or f.reward_model_quantization_bit) or (
        optimizer_kind(f) in ("galore", "apollo") or optim in BITSANDBYTES_OPTIMS
        or optim.startswith(("galore_", "apollo_")))


def optimizer_problems(f, optim: str, deepspeed, max_workers: int, accumulation: int, online: bool) -> list[Problem]:
    """What cannot work together, before Ray: one optimizer at a time, the low-rank and block methods on whole
    matrices only, the layer-wise forms on one worker, and what DeepSpeed's optimizer would replace."""
    on = [switch for switch, (_, used) in switches(f).items() if used]
    on += ["loraplus_lr_ratio"] if f.loraplus_lr_ratio is not None else []
    if len(on) > 1:
        return [Problem(" and ".join(on), "choose one optimizer; remove all but one of them")]
    if not on:
        return []
    switch, problems = on[0], []
    name = SWITCHES.get(switch, "LoRA+")
    if switch in ("use_galore", "use_apollo", "use_badam") and f.finetuning_type in ("lora", "oft"):
        problems.append(Problem(f"{switch} and finetuning_type", f"{name} trains whole weight matrices, not "
                                                                 f"adapters (as in LLaMA-Factory); use "
                                                                 "finetuning_type: full or freeze"))
    if switch == "use_adam_mini" and f.finetuning_type in ("lora", "oft"):  # found in a worker's first step
        problems.append(Problem("use_adam_mini and finetuning_type", "Adam-mini splits whole attention and MLP "
                                                                     "matrices by head, which an adapter's small "
                                                                     "matrices cannot be; use finetuning_type: full or "
                                                                     "freeze"))
    if switch in SWITCHES and deepspeed is not None:
        problems.append(Problem(f"{switch} and deepspeed", f"DeepSpeed's ZeRO optimizer would replace {name}'s "
                                                           "parameter groups (LLaMA-Factory refuses GaLore and APOLLO "
                                                           "under DeepSpeed; rayft all five); set deepspeed: null"))
    layerwise = (switch == "use_galore" and f.galore_layerwise) or (switch == "use_apollo" and f.apollo_layerwise)
    key = "galore_layerwise" if switch == "use_galore" else "apollo_layerwise"
    if layerwise and max_workers > 1:
        problems.append(Problem(f"{key} and ray_num_workers", f"layer-wise {name} updates each weight inside the "
                                                              "backward pass, before the workers average its "
                                                              f"gradient; set {key}: false for several workers (a "
                                                              "plain optimizer, which DDP averages)"))
    if layerwise and accumulation != 1:
        problems.append(Problem(f"{key} and gradient_accumulation_steps", f"layer-wise {name} steps at every "
                                                                          "backward pass; set "
                                                                          "gradient_accumulation_steps: 1"))
    if switch == "use_badam" and max_workers > 1:
        problems.append(Problem("use_badam and ray_num_workers", "BAdam across several workers (LLaMA-Factory runs "
                                                                 "it only under ZeRO-3) is not built in rayft yet; "
                                                                 "set ray_num_workers: 1"))
    allowed = ADAMW + (("adafactor",) if switch == "use_galore" else ())
    if switch in ("use_galore", "use_apollo", "use_badam") and optim not in allowed:
        problems.append(Problem(f"{switch} and optim", f"{name} wraps {' or '.join(allowed)}, not {optim!r}; "
                                                       "remove optim"))
    if online and (switch == "use_badam" or layerwise):
        problems.append(Problem(switch, f"{'layer-wise ' if layerwise else ''}{name} in the ppo and grpo loops is "
                                        f"not built in rayft yet; remove {switch}"))
    return problems


def state_bytes(kind: str, f, trainable: int, matrices: list[tuple[int, int]], num_layers: int) -> int:
    """fp32 bytes of optimizer state for `trainable` parameters, of which `matrices` (rows, columns) are the
    decoder's linear weights (what GaLore, APOLLO and Muon treat apart)."""
    in_matrices = sum(m * n for m, n in matrices)
    rest = max(trainable - in_matrices, 0)
    if kind in ("galore", "apollo"):
        rank = f.galore_rank if kind == "galore" else f.apollo_rank
        # Adam's two moments of the projected gradient (rank x the long side) and the projection (short side x rank)
        projected = sum(2 * min(rank, m, n) * max(m, n) + min(rank, m, n) * min(m, n) for m, n in matrices)
        return 4 * (projected + 2 * rest)
    if kind == "badam":
        share = 1 / max(num_layers, 1) if f.badam_mode == "layer" else f.badam_update_ratio
        return int(4 * 2 * trainable * share)  # Adam's moments of the active block (or share) only
    if kind == "adam_mini":
        return 4 * trainable  # the first moment; one second moment per block
    if kind == "muon":
        return 4 * (in_matrices + 2 * rest)  # momentum for the matrices, Adam's two moments for the rest
    return 4 * 2 * trainable
