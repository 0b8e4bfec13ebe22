"""The model probe: the model built once per run on the meta device (no weights), for the driver's checks of
module names and for the memory planner's shape. It runs in the driver's helper process (trainers/preflight.py)."""

import threading

from accelerate import init_empty_weights
from transformers import AutoConfig

from rayft.data.templates import plugin_of
from rayft.recipe.config import RecipeConfig
from rayft.recipe.problems import ConfigError, Problem
from rayft.recipe.stages import STAGE_SPECS
from rayft.recipe.values import comma_list, module_matches
from rayft.trainers.model import (
    FINETUNING,
    ROUTER_LOSS_KEYS,
    freeze_trainable_prefixes,
    linear_module_names,
    model_class,
    reward_model_class,
    trainable_layers,
)
from rayft.trainers.vision import VISION_FAMILIES, is_vision_language, vision_family

# accelerate's init_empty_weights patches torch.nn.Module for the whole process while it is active; two probes
# in two threads (runs started side by side in one driver) would leave the patch in place when they interleave.
_EMPTY_WEIGHTS = threading.Lock()


def probe_model(cfg: RecipeConfig) -> dict:
    """The memory planner's shape of the model (ModelShape's fields), from the empty model built once; raises
    ConfigError when the model cannot be read or a module name is wrong."""
    with _EMPTY_WEIGHTS:
        return _probe(cfg)


def _probe(cfg: RecipeConfig) -> dict:
    try:
        model = empty_model(cfg)
    except (OSError, ValueError) as err:
        raise ConfigError([Problem("model_name_or_path", "cannot read a model config from "
                                                         f"{cfg.model.model_name_or_path!r} "
                                                         f"({' '.join(str(err).split())})")]) from None
    problems = module_problems(cfg, model) + vision_problems(cfg, model.config)
    if cfg.model.moe_aux_loss_coef and model.config.model_type not in ROUTER_LOSS_KEYS:
        known = ", ".join(sorted(ROUTER_LOSS_KEYS))
        problems.append(Problem("moe_aux_loss_coef", f"{model.config.model_type} is not a mixture of experts with a "
                                                     f"router loss rayft knows ({known}); remove moe_aux_loss_coef"))
    if problems:
        raise ConfigError(problems)
    return model_shape(cfg, model)


def empty_model(cfg: RecipeConfig):
    """The model built from its config on the meta device: its modules and shapes, no weights, no memory."""
    m = cfg.model
    config = AutoConfig.from_pretrained(m.model_name_or_path, revision=m.model_revision, cache_dir=m.cache_dir,
                                        token=m.hf_hub_token, trust_remote_code=m.trust_remote_code)
    with init_empty_weights():
        if STAGE_SPECS[cfg.finetuning.stage].result == "reward model":  # a score head instead of the LM head
            config.num_labels = 1
            model = reward_model_class(config).from_config(config)
        else:
            model = model_class(config).from_config(config)
    model.tie_weights()  # from_config on the meta device leaves tied embeddings apart: counted twice otherwise
    return model


def model_shape(cfg: RecipeConfig, model=None) -> dict:
    """The counts the memory planner needs, from the empty model made trainable as finetuning_type says.

    Adapters named in adapter_name_or_path are counted as a new adapter of the recipe's settings.
    """
    model = model if model is not None else empty_model(cfg)
    config = model.config.get_text_config()  # a vision-language model's language model (its tower is counted too)
    with init_empty_weights():
        trainable = FINETUNING[cfg.finetuning.finetuning_type](model, cfg.finetuning, None)
    unique = {id(p): p for p in trainable.parameters()}.values()  # tied weights once
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in trainable.modules())
    return dict(
        total_params=sum(p.numel() for p in unique), trainable_params=sum(p.numel() for p in unique if p.requires_grad),
        largest_layer_params=largest, hidden_size=config.hidden_size,
        intermediate_size=getattr(config, "intermediate_size", 4 * config.hidden_size),
        num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads, vocab_size=config.vocab_size)


def vision_problems(cfg: RecipeConfig, config) -> list[Problem]:
    """A multimodal template needs a vision-language model of a family rayft has built, whose images that template's
    plugin encodes; a vision-language model of another family is refused even with a text template."""
    plugin, vision = plugin_of(cfg.data.template), is_vision_language(config)
    family = vision_family(config)
    if vision and family is None:
        built = ", ".join(sorted(VISION_FAMILIES))
        return [Problem("model_name_or_path", f"{config.model_type} is a vision-language model of a family rayft has "
                                              f"not built yet (built: {built})")]
    if getattr(config, "is_yi_vl_derived_model", False):
        return [Problem("model_name_or_path", "Yi-VL's projector (LLaMA-Factory patches LLaVA's for it) is not built "
                                              "yet")]
    if plugin is not None and not vision:
        return [Problem("template", f"{cfg.data.template!r} is a multimodal template, and {config.model_type} is a "
                                    "text-only model; use the family's text template, or a vision-language model")]
    if plugin is not None and family.plugin != plugin:
        return [Problem("template", f"{cfg.data.template!r} encodes images for LLaMA-Factory's {plugin!r} models, not "
                                    f"{config.model_type}; use its family's template (one with the {family.plugin!r} "
                                    "plugin, e.g. qwen2_vl)")]
    return []


def module_problems(cfg: RecipeConfig, model) -> list[Problem]:
    """Module names in lora_target, oft_target, additional_target and the freeze keys that `model` (empty)
    lacks, so that a typo fails on the driver rather than inside every worker."""
    f = cfg.finetuning
    names = [name for name, _ in model.named_modules()]
    keys = {"lora": ("lora_target", "additional_target"), "oft": ("oft_target", "additional_target")}
    problems = []
    for key in keys.get(f.finetuning_type, ()):
        value = getattr(f, key)
        wanted = [] if value is None or value.strip() == "all" else comma_list(value)
        missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            problems.append(Problem(key, f"{', '.join(missing)} not found in {type(model).__name__}; its linear "
                                         f"layers are {', '.join(linear_module_names(model))}"))
    patterns = comma_list(cfg.args.profile_modules)
    if patterns and not any(module_matches(n, patterns) for n in names):
        problems.append(Problem("profile_modules", f"{', '.join(patterns)} matches no module of "
                                                   f"{type(model).__name__}; its modules are named like "
                                                   f"{names[-1]!r} (fnmatch patterns, e.g. *.layers.0.self_attn)"))
    try:
        if f.finetuning_type == "freeze":
            freeze_trainable_prefixes(model, f)
        elif f.use_llama_pro:
            trainable_layers(model.config.get_text_config().num_hidden_layers, f)
    except ConfigError as err:
        problems += err.problems
    return problems
