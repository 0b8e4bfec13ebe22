"""Vision-language model families: where each keeps its vision tower, projector and language model (LLaMA-Factory
0.9.5's composite-model table), which of LLaMA-Factory's multimodal plugins encodes its images, and what the freeze
keys (freeze_vision_tower, freeze_multi_modal_projector, freeze_language_model) make trainable.

Module keys are matched as LLaMA-Factory matches them: a parameter or module belongs to a part when its name contains
one of the part's keys.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class VisionFamily:
    plugin: str  # LLaMA-Factory's multimodal plugin that encodes this family's images (data/media.py)
    vision: tuple[str, ...]
    projector: tuple[str, ...]
    language: tuple[str, ...] = ("language_model", "lm_head")
    lora_conflicts: tuple[str, ...] = ()  # modules LoRA never targets (a convolution named like a linear layer)


_QWEN2_VL = VisionFamily("qwen2_vl", vision=("visual.patch_embed", "visual.blocks"), projector=("visual.merger",),
                         lora_conflicts=("patch_embed",))
_QWEN3_VL = VisionFamily("qwen3_vl", vision=("visual.pos_embed", "visual.patch_embed", "visual.blocks",
                                           "visual.deepstack_merger_list"), projector=("visual.merger",),
                         lora_conflicts=("patch_embed",))
VISION_FAMILIES = {"qwen2_vl": _QWEN2_VL, "qwen2_5_vl": _QWEN2_VL, "qwen3_vl": _QWEN3_VL,
                   **{name: VisionFamily(name, vision=("vision_tower",), projector=("multi_modal_projector",))
                      for name in ("llava", "llava_next", "gemma3")},
                   "mllama": VisionFamily("mllama", vision=("vision_model",), projector=("multi_modal_projector",))}


def vision_family(config) -> VisionFamily | None:
    """The family of a model's config; None for a text-only model or a family rayft has not built."""
    return VISION_FAMILIES.get(getattr(config, "model_type", None))


def is_vision_language(config) -> bool:
    """Whether a model's config describes a vision-language model (it has a vision tower's config)."""
    return getattr(config, "vision_config", None) is not None


def frozen_parts(family: VisionFamily, finetuning) -> tuple[str, ...]:
    """The module keys that the freeze keys keep frozen (LLaMA-Factory's forbidden modules)."""
    f = finetuning
    return ((family.vision if f.freeze_vision_tower else ()) + (family.projector if f.freeze_multi_modal_projector
                                                                 else ()) + (family.language if f.freeze_language_model
                                                                             else ()))


def in_parts(name: str, keys: tuple[str, ...]) -> bool:
    return any(key in name for key in keys)


def lora_modules(model, family: VisionFamily, finetuning, targets: list[str] | None) -> list[str]:
    """The full names of the modules LoRA adapts in a vision-language model: those named in `targets` (leaf names),
    or with None (lora_target: all) every linear layer but the output head and the projector, as LLaMA-Factory
    chooses them; in either case none in a frozen part or among the family's conflicts."""
    import torch

    forbidden = frozen_parts(family, finetuning) + family.lora_conflicts
    if targets is None:  # not the output head, nor a reward model's score head (trained whole)
        heads = (model.get_output_embeddings(), getattr(model, "score", None))
        return [name for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and not any(module is head for head in heads)
                and not in_parts(name, forbidden + family.projector)]
    return [name for name, _ in model.named_modules()
            if name.split(".")[-1] in targets and not in_parts(name, forbidden)]
