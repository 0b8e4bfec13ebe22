"""Every stage's optimizer from one factory (LLaMA-Factory's create_custom_optimizer): LoRA+, GaLore, APOLLO, BAdam,
Adam-mini and Muon. `None` leaves the choice to the Trainer (`optim`, AdamW by default); which one a recipe asks for
is decided once, in recipe/optimizers.py, where its rules and its memory also live."""

from collections import defaultdict

import torch
from transformers.optimization import get_scheduler

from rayft.recipe.logs import logger
from rayft.recipe.optimizers import optimizer_kind
from rayft.trainers.model import target_modules


class Chained(torch.optim.Optimizer):
    """Several optimizers stepped as one (Muon for the matrices, AdamW for the rest). The Trainer's scheduler and
    gradient clipping see their parameter groups (the same dicts), and a checkpoint holds each one's state."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        super().__init__([p for o in optimizers for g in o.param_groups for p in g["params"]], {})
        self.param_groups = [g for o in optimizers for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict):
        for optimizer, state in zip(self.optimizers, state_dict["optimizers"], strict=True):
            optimizer.load_state_dict(state)


class LayerwiseDummy(torch.optim.Optimizer):
    """What the Trainer steps when layer-wise GaLore or APOLLO update each parameter in its own gradient hook (the
    memory saving: no parameter's gradient outlives its own backward). It holds the per-parameter optimizers."""

    def __init__(self, lr: float, per_param: dict):
        self.per_param = per_param
        super().__init__([torch.zeros(1)], {"lr": lr})

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True):
        return None


def build_optimizer(model, args, finetuning, decay_names: set[str]) -> torch.optim.Optimizer | None:
    """The optimizer `finetuning` asks for over `model`'s trainable parameters, or None for the Trainer's own.

    `decay_names` are the parameters that take weight decay (the Trainer's rule: not norms, not biases)."""
    kind = optimizer_kind(finetuning)
    if kind == "default":
        return None
    optimizer = BUILDERS[kind](model, args, finetuning, decay_names)
    logger.info(f"optimizer: {describe(kind, finetuning)}")
    return optimizer


def describe(kind: str, f) -> str:
    if kind == "loraplus":
        return f"LoRA+ (B matrices at {f.loraplus_lr_ratio:g}x the learning rate)"
    if kind == "galore":
        return (f"GaLore (rank {f.galore_rank}, projection every {f.galore_update_interval} steps, scale "
                f"{f.galore_scale:g}{', layer-wise' if f.galore_layerwise else ''})")
    if kind == "apollo":
        return (f"APOLLO (rank {f.apollo_rank}, {f.apollo_proj} projection, {f.apollo_scale_type} scale "
                f"{f.apollo_scale:g}{', layer-wise' if f.apollo_layerwise else ''})")
    return {"badam": f"BAdam ({f.badam_mode} mode)", "adam_mini": "Adam-mini",
            "muon": "Muon for the matrices, AdamW for embeddings, head, norms and biases"}[kind]


def decay_names(model) -> set[str]:
    """The parameters that take weight decay, by the Trainer's own rule (not norms, not biases)."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))  # it reads no state of the trainer


def adamw_kwargs(args) -> dict:
    return {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}


def split_by_decay(model, decay_names: set[str], leave_out: set[int] = frozenset()) -> tuple[list, list]:
    """The trainable parameters not in `leave_out` (by id): (with weight decay, without)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in leave_out:
            (decay if name in decay_names else no_decay).append(param)
    return decay, no_decay


def loraplus(model, args, f, decay_names):
    """LoRA+ (Hayou et al., 2024): the B matrices learn `loraplus_lr_ratio` times faster than A; adapters on
    embeddings use `loraplus_lr_embedding`. Weight decay as the Trainer would apply it."""
    groups: dict[tuple, list] = defaultdict(list)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_embedding_" in name:
            rate = f.loraplus_lr_embedding
        elif "lora_B" in name:
            rate = args.learning_rate * f.loraplus_lr_ratio
        else:
            rate = args.learning_rate
        groups[(rate, args.weight_decay if name in decay_names else 0.0)].append(param)
    kwargs = adamw_kwargs(args)
    return torch.optim.AdamW([{"params": params, "lr": rate, "weight_decay": decay}
                              for (rate, decay), params in groups.items()], **kwargs)


def projected_params(model, target: str) -> list:
    """The 2-D weights of the linear layers `target` names (`all`: every one but the output head), as GaLore and
    APOLLO project them."""
    names = target_modules(model, target)
    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(t in name for t in names):
            found += [p for p in module.parameters() if p.requires_grad and p.dim() > 1]
    return found


def low_rank(model, args, decay_names, optimizer_cls, target: str, layerwise: bool, extra: dict):
    """GaLore's or APOLLO's three groups (projected matrices with their settings; the rest with and without
    weight decay), in one optimizer or, layer-wise, one per parameter stepped in its gradient hook."""
    projected = projected_params(model, target)
    decay, no_decay = split_by_decay(model, decay_names, {id(p) for p in projected})
    kwargs = adamw_kwargs(args)
    if not layerwise:
        return optimizer_cls([{"params": no_decay, "weight_decay": 0.0},
                              {"params": decay, "weight_decay": args.weight_decay},
                              {"params": projected, "weight_decay": args.weight_decay, **extra}], **kwargs)
    per_param = {}
    for params, group in ((no_decay, {"weight_decay": 0.0}), (decay, {"weight_decay": args.weight_decay}),
                          (projected, {"weight_decay": args.weight_decay, **extra})):
        for param in params:
            per_param[param] = optimizer_cls([{"params": [param], **group}], **kwargs)

    def step(param):
        if param.grad is not None:
            per_param[param].step()
            per_param[param].zero_grad()

    for param in per_param:
        param.register_post_accumulate_grad_hook(step)
    return LayerwiseDummy(args.learning_rate, per_param)


def galore(model, args, f, decay_names):
    from galore_torch import GaLoreAdafactor, GaLoreAdamW

    cls = GaLoreAdafactor if args.optim == "adafactor" else GaLoreAdamW
    return low_rank(model, args, decay_names, cls, f.galore_target, f.galore_layerwise,
                    {"rank": f.galore_rank, "update_proj_gap": f.galore_update_interval, "scale": f.galore_scale,
                     "proj_type": f.galore_proj_type})


def apollo(model, args, f, decay_names):
    from apollo_torch import APOLLOAdamW

    return low_rank(model, args, decay_names, APOLLOAdamW, f.apollo_target, f.apollo_layerwise,
                    {"rank": f.apollo_rank, "proj": f.apollo_proj, "proj_type": f.apollo_proj_type,
                     "update_proj_gap": f.apollo_update_interval, "scale": f.apollo_scale,
                     "scale_type": f.apollo_scale_type, "scale_front": f.apollo_scale_front})


def badam(model, args, f, decay_names):
    """BAdam: Adam on one block of layers at a time (`layer`), or on a sparse share of every matrix (`ratio`)."""
    decay, no_decay = split_by_decay(model, decay_names)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": args.weight_decay}]
    named = list(model.named_parameters())
    if f.badam_mode == "layer":
        from badam import BlockOptimizer

        return BlockOptimizer(base_optimizer=torch.optim.AdamW(groups, **adamw_kwargs(args)),
                              named_parameters_list=named, block_prefix_list=None,
                              switch_block_every=f.badam_switch_interval, start_block=f.badam_start_block,
                              switch_mode=f.badam_switch_mode, verbose=f.badam_verbose, ds_zero3_enabled=False)
    from badam import BlockOptimizerRatio

    return BlockOptimizerRatio(param_groups=groups, named_parameters_list=named, update_ratio=f.badam_update_ratio,
                               mask_mode=f.badam_mask_mode, verbose=f.badam_verbose, include_embedding=False,
                               **adamw_kwargs(args))


def adam_mini(model, args, f, decay_names):
    """Adam-mini: one second moment per block of the attention heads and the MLP instead of one per weight."""
    from adam_mini import Adam_mini

    config = model.config
    return Adam_mini(named_parameters=[(n, p) for n, p in model.named_parameters() if p.requires_grad],
                     weight_decay=args.weight_decay, model_sharding=False, dim=config.hidden_size,
                     n_heads=config.num_attention_heads, n_kv_heads=getattr(config, "num_key_value_heads", None),
                     verbose=False, **adamw_kwargs(args))


def muon(model, args, f, decay_names):
    """torch's Muon on the 2-D weights but embeddings and the output head (its learning rate scaled to match
    AdamW's update size, as Moonlight and LLaMA-Factory do), AdamW on the rest; one weight decay for both."""
    matrices, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            is_matrix = param.dim() == 2 and "embed" not in name and "lm_head" not in name
            (matrices if is_matrix else rest).append(param)
    parts = [torch.optim.Muon(matrices, lr=args.learning_rate, weight_decay=args.weight_decay,
                              adjust_lr_fn="match_rms_adamw")] if matrices else []
    if rest:
        parts.append(torch.optim.AdamW(rest, weight_decay=args.weight_decay, **adamw_kwargs(args)))
    return Chained(parts)


BUILDERS = {"loraplus": loraplus, "galore": galore, "apollo": apollo, "badam": badam, "adam_mini": adam_mini,
            "muon": muon}


def layerwise_schedulers(optimizer, args, total_steps: int) -> None:
    """Layer-wise GaLore/APOLLO: each parameter's own optimizer follows the run's schedule, one step per update."""
    if not isinstance(optimizer, LayerwiseDummy):
        return
    schedulers = {param: get_scheduler(args.lr_scheduler_type, optimizer=opt,
                                       num_warmup_steps=args.get_warmup_steps(total_steps),
                                       num_training_steps=total_steps,
                                       scheduler_specific_kwargs=args.lr_scheduler_kwargs)
                  for param, opt in optimizer.per_param.items()}
    for param, scheduler in schedulers.items():
        param.register_post_accumulate_grad_hook(lambda _p, s=scheduler: s.step())
