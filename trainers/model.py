"""Model and tokenizer loading through `from_pretrained`, and what each fine-tuning type makes trainable.

`FINETUNING` maps finetuning_type to the function that prepares a loaded model for training: a PEFT
adapter (lora, oft), the last or first layers (freeze), or everything (full).
"""

import hashlib
import math
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.fs
import torch
from peft import LoraConfig, OFTConfig, PeftModel, TaskType, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSequenceClassification,
)

from rayft.data import tokenizer as data_tokenizer
from rayft.data.files import resolve
from rayft.data.media import ImageGeometry, image_inputs
from rayft.data.pipeline import EncodingSettings
from rayft.data.tokenizer import TokenizerSpec
from rayft.recipe.logs import logger
from rayft.recipe.problems import ConfigError, Problem
from rayft.recipe.schema import FinetuningArguments, ModelArguments
from rayft.recipe.values import comma_list
from rayft.trainers.vision import frozen_parts, in_parts, is_vision_language, lora_modules, vision_family
from rayft.trainers.vocabulary import embedding_module_names, fit_vocabulary_of, grow_embeddings


def load_tokenizer(model_args: ModelArguments):
    """The tokenizer of the recipe's model keys, through the one loader Ray Data's tasks use too."""
    return data_tokenizer.load_tokenizer(TokenizerSpec.of(model_args))


def load_image_processor(model_args: ModelArguments):
    """The model's image processor (Transformers picks its PIL version where torchvision is not installed)."""
    from transformers import AutoImageProcessor

    m = model_args
    return AutoImageProcessor.from_pretrained(m.model_name_or_path, revision=m.model_revision, cache_dir=m.cache_dir,
                                              token=m.hf_hub_token, trust_remote_code=m.trust_remote_code)


@dataclass(frozen=True)
class ImageModel:
    """What a vision-language model needs beside its weights, in training (the collator) and in generation: its
    image processor, the template's image geometry (how many tokens an image becomes), the template's media tokens
    and the image token's id."""

    processor: object
    geometry: ImageGeometry
    tokens: dict
    token_id: int

    @classmethod
    def of(cls, cfg, tokenizer) -> "ImageModel | None":
        """The recipe's (a RecipeConfig), or None under a text template."""
        settings = EncodingSettings.of(cfg)
        if settings.images is None:
            return None
        tokens = settings.chat_template().media_tokens
        return cls(load_image_processor(cfg.model), settings.images, tokens,
                   tokenizer.convert_tokens_to_ids(tokens["image_token"]))

    def inputs(self, sources: list, input_ids: torch.Tensor, per_row: list[int] | None = None) -> dict:
        """`generate`'s image inputs for prompts `input_ids` holding the tokens of the images at `sources` (`per_row`:
        how many each prompt holds; None: one prompt)."""
        made = image_inputs(self.processor, self.geometry, sources, input_ids.cpu(), self.token_id, per_row=per_row)
        return {k: v.to(input_ids.device) for k, v in made.items()}


def model_dtype(use_gpu: bool, pure_bf16: bool = False) -> torch.dtype | str:
    """fp32 on CPU workers (bf16 matmuls are far slower there), the checkpoint's own dtype on GPU;
    bf16 weights throughout with pure_bf16."""
    if pure_bf16:
        if use_gpu and not torch.cuda.is_bf16_supported():
            raise RuntimeError("pure_bf16: this GPU has no bf16 support; remove pure_bf16 or use bf16-capable GPUs")
        return torch.bfloat16
    return "auto" if use_gpu else torch.float32


def load_model(model_args: ModelArguments, use_gpu: bool, pure_bf16: bool = False, value_head: bool = False,
               path: str | None = None, trainable: bool = True, dtype: torch.dtype | str | None = None,
               scratch_seed: int | None = None, max_length: int | None = None, frozen_bits: int | None = None):
    """The model at `path` (default model_name_or_path) through `from_pretrained`.

    With `value_head` it is the sequence-classification form of the same checkpoint: the LM body plus a
    scalar head (`score`) read at each sequence's last token, which is how stage rm scores a response.
    A model loaded with `trainable=False` (a reference model) gets no gradient checkpointing. `dtype` overrides
    the training dtype (`model_dtype`), e.g. "auto" for an export in the checkpoint's own precision. With
    `scratch_seed` (train_from_scratch) the trained model is built from its config with random weights drawn from
    that seed, the same on every worker. With shift_attn the trained model attends through LongLoRA's shifted sparse
    attention (trainers/shift_attn.py). With rope_scaling, `max_length` (the run's cutoff_len) sets the factor;
    None (generation) doubles the model's length, as LLaMA-Factory does. `frozen_bits` (4 or 8) quantises a frozen
    model (`trainable=False`: a reference or reward model) with bitsandbytes; a trained one follows quantization_bit.
    """

    attn = {"auto": None, "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2"}[model_args.flash_attn]
    if model_args.shift_attn and trainable:  # a frozen copy (a reference model) attends whole, as LLaMA-Factory's
        from rayft.trainers import shift_attn

        attn = shift_attn.NAME
    kwargs = {"num_labels": 1} if value_head else {}
    bits = model_args.quantization_bit if trainable else frozen_bits
    if bits is not None:
        kwargs.update(quantization_config=bnb_config(replace(model_args, quantization_bit=bits),
                                                     model_dtype(use_gpu, pure_bf16)),
                      **quantized_placement(model_args, use_gpu))
    quantized = bits is not None and trainable
    source = dict(revision=model_args.model_revision, cache_dir=model_args.cache_dir, token=model_args.hf_hub_token,
                  trust_remote_code=model_args.trust_remote_code)
    config = AutoConfig.from_pretrained(path or model_args.model_name_or_path, **source)
    cls = reward_model_class(config) if value_head else model_class(config)
    from_scratch = scratch_seed is not None and trainable and path is None
    if path is None and (from_scratch or model_args.rope_scaling or trainable and model_args.moe_aux_loss_coef):
        # the one config, changed once, for whichever way the model is built (the value head's label count in it)
        if value_head:
            config.num_labels = kwargs.pop("num_labels")
        if trainable and model_args.moe_aux_loss_coef:
            config = with_router_loss(config, model_args.moe_aux_loss_coef)
        if model_args.rope_scaling:
            config = with_rope_scaling(config, model_args.rope_scaling, max_length)
        kwargs["config"] = config
    dtype = dtype or model_dtype(use_gpu, pure_bf16)
    if from_scratch:
        with torch.random.fork_rng():
            torch.manual_seed(scratch_seed)
            model = cls.from_config(kwargs["config"], dtype=dtype, attn_implementation=attn,
                                    trust_remote_code=model_args.trust_remote_code)
    else:
        model = cls.from_pretrained(path or model_args.model_name_or_path, dtype=dtype, attn_implementation=attn,
                                    low_cpu_mem_usage=model_args.low_cpu_mem_usage, **source, **kwargs)
    if model_args.resize_vocab and path is None:  # the tokenizer every process extends alike (data/tokenizer.py)
        descriptions = model_args.new_special_tokens_config if isinstance(
            model_args.new_special_tokens_config, dict) else None
        grow_embeddings(model, data_tokenizer.load_tokenizer(TokenizerSpec.of(model_args)),
                        model_args.init_special_tokens, descriptions)
    # The KV cache only costs memory in training, and with one Transformers ignores packed position_ids
    # (neat_packing's block-diagonal mask).
    model.config.use_cache = False
    if quantized:  # frozen quantised base; norms in fp32 and input gradients for the adapters
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if trainable and not model_args.disable_gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": model_args.use_reentrant_gc})
        model.enable_input_require_grads()
    if trainable and model_args.upcast_layernorm:  # as LLaMA-Factory: 1-D weights of modules named like a norm
        for name, param in model.named_parameters():
            if param.ndim == 1 and any(part in name for part in ("norm", "ln")):
                param.data = param.data.to(torch.float32)
    head = model.get_output_embeddings()
    if trainable and model_args.upcast_lmhead_output and isinstance(head, torch.nn.Linear):
        head.register_forward_hook(lambda _module, _inputs, output: output.to(torch.float32))
    return model


def model_class(config):
    """The Auto class that builds a model of `config` with its language-model head: image-text-to-text for a
    vision-language model (its vision tower included), causal LM otherwise."""
    return AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM


def reward_model_class(config):
    """The class that builds the sequence-classification form of a model of `config` (stage rm's reward model):
    Transformers' own for a text model, a vision-language model's own class with a `score` head for one
    (`ScoredImageText`: Transformers builds none for most of them)."""
    if not is_vision_language(config):
        return AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    base = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]
    return type(f"{base.__name__}WithScore", (ScoredImageText, base), {})


class ScoredImageText:
    """A vision-language model read as a reward model: its base model's last hidden state at each sequence's last
    attended token, through a one-output `score` head (LLaMA-Factory's value head, read where its reward trainer
    reads it; the language-model head goes unused). Mixed into the model's own class by `reward_model_class`, so
    that `from_pretrained` loads the checkpoint's weights into it and starts `score` new."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.score = torch.nn.Linear(config.get_text_config().hidden_size, 1, bias=False)

    @classmethod
    def from_config(cls, config, **kwargs):
        """Built from `config` with random weights, as an Auto class's `from_config` builds one."""
        return cls._from_config(config, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_dict=None, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutputWithPast

        kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in ("output_attentions", "use_cache")}
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            **kwargs).last_hidden_state
        values = self.score(hidden).squeeze(-1)
        if attention_mask is None:
            attention_mask = torch.ones_like(values, dtype=torch.long)
        # the rightmost attended token, with the padding on either side (and a fake image's tokens unattended)
        last = (attention_mask * torch.arange(1, values.shape[1] + 1, device=values.device)).argmax(-1)
        return SequenceClassifierOutputWithPast(logits=values.gather(-1, last[:, None]))


# Mixture-of-experts model types whose router (load-balancing) loss Transformers adds to the loss, and the config
# key of its coefficient (LLaMA-Factory's table); for the others moe_aux_loss_coef is refused on the driver.
ROUTER_LOSS_KEYS = {**{t: "router_aux_loss_coef" for t in (
    "ernie4_5_moe", "granitemoe", "jamba", "llama4", "mixtral", "olmoe", "phimoe", "qwen2_moe", "qwen3_moe")},
    "dbrx": None, "jetmoe": "aux_loss_coef", "deepseek": "aux_loss_alpha"}


def with_router_loss(config, coefficient: float):
    """`config` set to return its router logits and add their load-balancing loss, at `coefficient`, to the loss."""
    kind = config.model_type
    if kind != "deepseek":
        config.output_router_logits = True
    if ROUTER_LOSS_KEYS.get(kind):
        setattr(config, ROUTER_LOSS_KEYS[kind], coefficient)
    return config


def with_rope_scaling(config, kind: str, max_length: int | None):
    """`config` with its rotary embedding stretched to hold `max_length` tokens (LLaMA-Factory's rule: the factor is
    the whole number of times the model's own length fits into it; none when it already holds them; 2 when
    generating), written into Transformers 5's `rope_parameters` so that the model's own rope_theta stays."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    original = params.get("original_max_position_embeddings") or config.max_position_embeddings
    if max_length is not None and max_length <= original:
        logger.info(f"rope_scaling: cutoff_len {max_length} fits the model's {original} positions; not scaled")
        return config
    factor = float(math.ceil(max_length / original)) if max_length is not None else 2.0
    params.update(rope_type=kind, factor=factor)
    if kind in ("dynamic", "yarn", "llama3"):
        params["original_max_position_embeddings"] = original
    if kind == "llama3":
        params.update(low_freq_factor=1.0, high_freq_factor=4.0)
    config.rope_parameters = params
    config.max_position_embeddings = int(original * factor)
    logger.info(f"rope_scaling: {kind}, factor {factor:g}: {original} -> {config.max_position_embeddings} positions")
    return config


def bnb_config(model_args: ModelArguments, compute_dtype: torch.dtype | str):
    """bitsandbytes' settings for a 4- or 8-bit base model (QLoRA); its layers run on GPUs and on CPUs."""
    from transformers import BitsAndBytesConfig

    if not isinstance(compute_dtype, torch.dtype):  # "auto" on GPUs: the widest 16-bit type they have
        compute_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    if model_args.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_args.quantization_type,
                              bnb_4bit_use_double_quant=model_args.double_quantization,
                              bnb_4bit_compute_dtype=compute_dtype)


def linear_module_names(model) -> list[str]:
    """The distinct names of the model's linear layers, but not the output head (or a value head)."""
    heads = {id(model.get_output_embeddings()), id(getattr(model, "score", None))}
    return sorted({name.split(".")[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and id(module) not in heads})


def target_modules(model, target: str) -> list[str]:
    """`all` means every linear layer but the output head; otherwise the comma list as given."""
    return linear_module_names(model) if target.strip() == "all" else comma_list(target)


def modules_to_save(model, finetuning_args: FinetuningArguments, model_args: ModelArguments | None) -> list | None:
    """additional_target's modules, trained whole beside the adapter; when the vocabulary grew and it is unset, the
    embeddings (so that the new tokens' rows learn), as LLaMA-Factory does."""
    if finetuning_args.additional_target:
        return comma_list(finetuning_args.additional_target)
    if model_args is not None and model_args.resize_vocab:
        return embedding_module_names(model)
    return None


def lora_target_modules(model, finetuning_args: FinetuningArguments) -> list[str]:
    """lora_target's modules; under use_llama_pro only those inside the blocks rayft expand inserted."""
    family = vision_family(model.config)
    if family is not None:  # the frozen parts, and the projector under lora_target: all, as LLaMA-Factory does
        target = finetuning_args.lora_target
        return lora_modules(model, family, finetuning_args, None if target.strip() == "all" else comma_list(target))
    targets = target_modules(model, finetuning_args.lora_target)
    if not finetuning_args.use_llama_pro:
        return targets
    stack, count = layer_stack(model)
    blocks = tuple(f"{stack}.{i}." for i in trainable_layers(count, finetuning_args))
    return [name for name, _ in model.named_modules() if name.startswith(blocks) and name.split(".")[-1] in targets]


def task_type(model):

    return TaskType.SEQ_CLS if getattr(model, "score", None) is not None else TaskType.CAUSAL_LM


INFER_DTYPES = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def quantized_placement(model_args: ModelArguments, use_gpu: bool) -> dict:
    """Where a quantised model's weights go: with quantization_device_map: auto (generation only), accelerate's map
    over the process's devices, spilling to offload_folder what does not fit (as LLaMA-Factory loads a 4-bit model
    for inference); otherwise all on this process's device."""
    if model_args.quantization_device_map == "auto":
        return {"device_map": "auto", "offload_folder": model_args.offload_folder}
    return {"device_map": {"": torch.cuda.current_device() if use_gpu else "cpu"}}


def load_for_generation(model_args: ModelArguments, use_gpu: bool):
    """The base model with every adapter of adapter_name_or_path merged into it, ready to generate. With
    quantization_bit the base loads in 4 or 8 bits and its one adapter stays apart (merging it into quantised weights
    would round it away), as in LLaMA-Factory."""

    dtype = INFER_DTYPES[model_args.infer_dtype]  # None ("auto"): the training dtype, fp32 on a CPU
    bits = model_args.quantization_bit
    model = load_model(model_args, use_gpu, trainable=False, dtype=dtype, frozen_bits=bits)
    for adapter in comma_list(model_args.adapter_name_or_path):
        fit_vocabulary_of(model, adapter)
        model = PeftModel.from_pretrained(model, adapter)
        if bits is None:
            model = model.merge_and_unload()
    # on by default: generation reuses earlier keys and values (use_kv_cache is LLaMA-Factory's name for it)
    model.config.use_cache = model_args.use_cache and model_args.use_kv_cache
    if use_gpu and bits is None:  # (a quantised model is where its device map put it)
        model = model.to("cuda")
    return model.eval()


ADAPTER_CONFIG = "adapter_config.json"


def find_adapter(location: str):
    """(file system, folder) of the adapter at `location`: a folder holding adapter_config.json (an output_dir,
    a `checkpoint-N`), or a Ray checkpoint folder with the Trainer's checkpoint in `checkpoint/`; local or a URI.
    None when neither holds one."""
    fs, path = resolve(location)
    for folder in (path, f"{path.rstrip('/')}/checkpoint"):
        if fs.get_file_info(f"{folder}/{ADAPTER_CONFIG}").type == pyarrow.fs.FileType.File:
            return fs, folder
    return None


def local_adapter(location: str, downloads: str) -> str:
    """The adapter at `location` as a local folder: itself when local, else a copy downloaded under `downloads`."""
    found = find_adapter(location)
    if found is None:
        raise FileNotFoundError(f"{location}: no {ADAPTER_CONFIG} in it or in its checkpoint/ folder")
    fs, folder = found
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        return folder
    target = Path(downloads) / hashlib.sha256(location.encode()).hexdigest()[:16]
    target.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(folder, str(target), source_filesystem=fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    return str(target)


def load_for_serving(model_args: ModelArguments, adapters: dict[str, str], use_gpu: bool):
    """The base model (with adapter_name_or_path merged, as for chat) carrying every adapter of `adapters`
    (name -> local folder) by name, for a caller that picks one per request with `set_adapter`."""
    model = load_for_generation(model_args, use_gpu)
    if not adapters:
        return model
    (first, folder), *rest = adapters.items()
    fit_vocabulary_of(model, folder)
    model = PeftModel.from_pretrained(model, folder, adapter_name=first)
    for name, folder in rest:
        model.load_adapter(folder, adapter_name=name)
    return model.eval()


def load_adapters(model, model_args: ModelArguments, finetuning_args: FinetuningArguments):
    """Applies adapter_name_or_path: earlier adapters are merged into the weights; the last one is
    trained further, or merged too when create_new_adapter asks for a fresh adapter on top.

    Returns (model, whether an adapter was left to train).
    """

    adapters = comma_list(model_args.adapter_name_or_path)
    if not adapters:
        return model, False
    to_merge = adapters if finetuning_args.create_new_adapter else adapters[:-1]
    for adapter in to_merge:
        fit_vocabulary_of(model, adapter)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if finetuning_args.create_new_adapter:
        return model, False
    fit_vocabulary_of(model, adapters[-1])
    return PeftModel.from_pretrained(model, adapters[-1], is_trainable=True), True


def new_or_continued_adapter(model, finetuning_args: FinetuningArguments, model_args: ModelArguments | None,
                             config_for):
    """The adapter of adapter_name_or_path trained further, or a new one from `config_for(model)`."""

    if model_args is not None:
        model, continued = load_adapters(model, model_args, finetuning_args)
        if continued:
            return model
    return get_peft_model(model, config_for(model))


def apply_lora(model, finetuning_args: FinetuningArguments, model_args: ModelArguments | None = None):
    """A trainable LoRA adapter: continued from adapter_name_or_path, or new (rsLoRA, DoRA, PiSSA init)."""

    f = finetuning_args
    init = True
    if f.pissa_init:
        init = "pissa" if f.pissa_iter == -1 else f"pissa_niter_{f.pissa_iter}"
    return new_or_continued_adapter(model, f, model_args, lambda base: LoraConfig(
        task_type=task_type(base),
        r=f.lora_rank,
        lora_alpha=f.lora_alpha,
        lora_dropout=f.lora_dropout,
        target_modules=lora_target_modules(base, f),
        modules_to_save=modules_to_save(base, f, model_args),
        use_rslora=f.use_rslora,
        use_dora=f.use_dora,
        init_lora_weights=init,
    ))


def apply_oft(model, finetuning_args: FinetuningArguments, model_args: ModelArguments | None = None):
    """A trainable OFT adapter: block-diagonal orthogonal rotations of the targeted layers' weights."""

    f = finetuning_args
    return new_or_continued_adapter(model, f, model_args, lambda base: OFTConfig(
        task_type=task_type(base),
        r=f.oft_rank,
        oft_block_size=f.oft_block_size,
        module_dropout=f.module_dropout,
        target_modules=target_modules(base, f.oft_target),
        modules_to_save=modules_to_save(base, f, model_args),
    ))


PISSA_INIT, PISSA_CONVERTED = "pissa_init", "pissa_converted"


def save_pissa_init(model, output_dir: str) -> None:
    """Saves the PiSSA adapter as initialised, before training; pissa_convert needs it at the end."""
    model.save_pretrained(str(Path(output_dir) / PISSA_INIT))


def save_pissa_converted(model, output_dir: str) -> Path:
    """Saves the trained PiSSA adapter as a plain LoRA adapter (twice the rank) for the original base model.

    A PiSSA adapter alone only fits the residual base weights PiSSA left behind; the converted one loads
    over the unchanged base model with `PeftModel.from_pretrained`.
    """
    out = Path(output_dir)
    model.save_pretrained(str(out / PISSA_CONVERTED), path_initial_model_for_weight_conversion=str(out / PISSA_INIT))
    return out / PISSA_CONVERTED


def layer_stack(model) -> tuple[str, int]:
    """The name of the module list holding the transformer blocks, and how many blocks it has."""
    count = model.config.get_text_config().num_hidden_layers
    family = vision_family(model.config)
    tower = family.vision if family else ()  # a vision tower as deep as the language model is not the stack
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and not in_parts(name, tower):
            return name, count
    raise ValueError(f"cannot find the {count} transformer blocks of {type(model).__name__}")


def trainable_layers(count: int, finetuning_args: FinetuningArguments) -> range:
    """The blocks (of `count`) that freeze training trains, and that LoRA targets under use_llama_pro.

    freeze_trainable_layers n > 0: the last n, n < 0: the first n. With use_llama_pro, the n blocks `rayft expand`
    inserted: one at the end of every count / n (LLaMA-Factory's rule)."""
    f = finetuning_args
    n = f.freeze_trainable_layers
    if f.use_llama_pro:
        if n <= 0 or count % n:
            raise ConfigError([Problem("freeze_trainable_layers", (
                f"use_llama_pro trains the n blocks rayft expand inserted, one every {count} / n blocks; {n} does not "
                f"divide the model's {count} blocks: set it to the --num-expand the model was expanded with"))])
        stride = count // n
        return range(stride - 1, count, stride)
    return range(max(0, count - n), count) if n > 0 else range(min(-n, count))


def freeze_trainable_prefixes(model, finetuning_args: FinetuningArguments) -> list[str]:
    """Parameter-name prefixes that freeze fine-tuning trains.

    freeze_trainable_layers > 0 trains the last n blocks, < 0 the first n; freeze_trainable_modules picks
    modules inside those blocks (all, or a comma list such as `mlp,self_attn`); freeze_extra_modules adds
    modules outside the blocks (e.g. `embed_tokens,norm`). An unknown module name is an error.
    """
    f = finetuning_args
    stack, count = layer_stack(model)
    layers = trainable_layers(count, f)
    modules = [""] if f.freeze_trainable_modules.strip() == "all" else comma_list(f.freeze_trainable_modules)
    in_block = {name.split(".")[0] for name, _ in model.get_submodule(f"{stack}.0").named_modules() if name}
    unknown = [m for m in modules if m and m not in in_block]
    if unknown:
        raise ConfigError([Problem("freeze_trainable_modules", f"{unknown} are not modules of a block; choose from "
                                                               f"{sorted(in_block)}")])
    prefixes = [f"{stack}.{i}.{m}".rstrip(".") + "." for i in layers for m in modules]
    outside = {}
    for name, _ in model.named_modules():
        if name and not name.startswith(stack + ".") and name != stack:
            outside.setdefault(name.split(".")[-1], name)
    for extra in comma_list(f.freeze_extra_modules):
        if extra not in outside:
            raise ConfigError([Problem("freeze_extra_modules", f"{extra!r} is not a module outside the blocks; choose "
                                                               f"from {sorted(outside)}")])
        prefixes.append(outside[extra] + ".")
    return prefixes


def apply_freeze(model, finetuning_args: FinetuningArguments, model_args: ModelArguments | None = None):
    """Trains only the chosen blocks (and extra modules); every other weight is frozen."""
    prefixes = freeze_trainable_prefixes(model, finetuning_args)
    heads = ("score.",) if getattr(model, "score", None) is not None else ()  # a new value head must learn
    family = vision_family(model.config)
    projector = family.projector if family and not finetuning_args.freeze_multi_modal_projector else ()
    frozen = frozen_parts(family, finetuning_args) if family else ()
    for name, param in model.named_parameters():
        chosen = name.startswith(tuple(prefixes) + heads) or in_parts(name, projector)
        param.requires_grad_(chosen and not in_parts(name, frozen))
    return model


def apply_full(model, finetuning_args: FinetuningArguments, model_args: ModelArguments | None = None):
    """Trains every weight, but a vision-language model's frozen parts (freeze_vision_tower, ...)."""
    family = vision_family(model.config)
    frozen = frozen_parts(family, finetuning_args) if family else ()
    for name, param in model.named_parameters():
        param.requires_grad_(not in_parts(name, frozen))
    return model


FINETUNING = {"lora": apply_lora, "oft": apply_oft, "freeze": apply_freeze, "full": apply_full}


def prepare_model(cfg, use_gpu: bool, value_head: bool = False):
    """The model a stage trains: loaded, then made trainable as its finetuning_type says."""
    f = cfg.finetuning
    model = load_model(cfg.model, use_gpu, pure_bf16=f.pure_bf16, value_head=value_head,
                       scratch_seed=cfg.args.seed if cfg.model.train_from_scratch else None,
                       max_length=cfg.data.cutoff_len)
    model = FINETUNING[f.finetuning_type](model, f, cfg.model)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if cfg.model.print_param_status and rank == 0:
        for name, param in model.named_parameters():
            logger.info(f"parameter {name}: {param.dtype}, {param.device}, "
                        f"{'trainable' if param.requires_grad else 'frozen'}")
    return model


def load_reference(cfg, use_gpu: bool):
    """A frozen reference model: ref_model (with ref_model_adapters merged) or a copy of the base model."""

    f = cfg.finetuning
    model = load_model(cfg.model, use_gpu, pure_bf16=f.pure_bf16, path=f.ref_model, trainable=False,
                       max_length=cfg.data.cutoff_len, frozen_bits=f.ref_model_quantization_bit)
    for adapter in comma_list(f.ref_model_adapters):
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.requires_grad_(False)
    return model.eval()


def parameter_count(param) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it away from this process."""
    return getattr(param, "ds_numel", None) or param.numel()


def trainable_counts(model) -> tuple[int, int]:
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(parameter_count(p) for p in model.parameters())


def trainable_summary(model) -> str:
    trainable, total = trainable_counts(model)
    return f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)"
