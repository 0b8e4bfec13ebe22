"""The reference model of stages dpo and kto: the policy with its adapter switched off, or a frozen copy.

With a LoRA/OFT policy and no explicit ref_model the base weights are shared (one copy per worker);
with freeze/full training, or an explicit ref_model, a frozen copy is loaded, partitioned under ZeRO-3.
"""

import copy

import torch

from rayft.recipe.config import RecipeConfig
from rayft.recipe.derive import reference_kind
from rayft.trainers.model import load_reference, parameter_count


class Reference:
    """Reference-model logits, computed without gradient."""

    def __init__(self, cfg: RecipeConfig, use_gpu: bool):
        self.model = load_reference(cfg, use_gpu) if reference_kind(cfg) == "copy" else None
        self.description = ("a frozen copy" if self.model is not None
                            else "the policy with its adapter disabled (no second copy of the weights)")

    def place(self, trainer) -> None:
        """Puts the copy where the policy is; under ZeRO-3 it becomes a DeepSpeed inference engine, so
        that its partitioned weights are gathered layer by layer like the policy's."""
        if self.model is None:
            return
        if trainer.is_deepspeed_enabled:
            config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
            if int(config.get("zero_optimization", {}).get("stage", 0)) == 3:
                import deepspeed  # heavy; only a ZeRO-3 reference needs it

                self.model, *_ = deepspeed.initialize(model=self.model, config=inference_config(config, self.model))
                self.model.eval()
                return
        self.model.to(trainer.args.device)

    def logits(self, trainer, policy, **batch) -> torch.Tensor:
        with torch.no_grad():
            if self.model is None:
                with trainer.accelerator.unwrap_model(policy).disable_adapter():
                    return policy(**batch).logits
            return self.model(**batch).logits


def inference_config(train_config: dict, model) -> dict:
    """The training DeepSpeed config without optimizer and scheduler, and with ZeRO-3's model-dependent
    sizes (left as "auto" for the Trainer to fill in for the policy) computed from the hidden size."""
    config = copy.deepcopy(train_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    hidden = model.config.hidden_size
    sizes = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
             "stage3_param_persistence_threshold": 10 * hidden}
    zero = config.setdefault("zero_optimization", {})
    for key, value in list(zero.items()):
        if value == "auto":
            zero[key] = sizes.get(key)
            if zero[key] is None:
                del zero[key]
    return config


def held_parameters(*models) -> int:
    """Elements of all distinct parameters the given models hold (shared weights counted once)."""
    seen, total = set(), 0
    for model in models:
        if model is None:
            continue
        for param in model.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                total += parameter_count(param)
    return total
