"""Builds a tiny causal LM and its tokenizer entirely locally, saved the way a hub model is saved.

Tests and the demo load it back through `from_pretrained`, the same path a real model takes.
"""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    Gemma3Config,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    MllamaConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen3VLConfig,
)

CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
FAMILIES = ("qwen2", "llama", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next", "gemma3", "mllama")
VISION_LANGUAGE = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next", "gemma3", "mllama")
# Gemma 3's turn and image tokens, and the ones its tokenizer names: an image is <start_of_image>, 4
# <image_soft_token> in the tiny model (256 in Gemma 3's), <end_of_image>, between blank lines
GEMMA3_NAMED = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
GEMMA3_TOKENS = ["<start_of_turn>", "<end_of_turn>", *GEMMA3_NAMED.values()]
LLAVA_IMAGE = "<image>"  # LLaVA's image token: every image is (56 / 14)^2 = 16 of them in the tiny model
# LLaVA-NeXT's tile grids in the tiny model, (height, width): 1x2, 2x1 and 2x2 tiles of 56 px
LLAVA_NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112]]
# Llama 3.2 Vision's (Mllama's) turn and image tokens; an image is one <|image|>, read through cross-attention
MLLAMA_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                 "<|image|>"]
# Qwen2-VL's own special tokens: an image is <|vision_start|>, one <|image_pad|> per merged patch, <|vision_end|>
QWEN2_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# A little general English so that datasets other than the demo tokenise into sensible pieces.
EXTRA_TEXT = (
    "The quick brown fox jumps over the lazy dog. Describe, explain, write, list, give, create, summarize. "
    "What is the best way to learn a new language? Here are some steps you can follow to improve. "
    "You are a helpful assistant. Please answer the question in one sentence. Thank you very much. "
    "system user assistant question answer instruction input output example number word letters"
)


def corpus_from(dataset_files: list[Path]) -> list[str]:
    """Every string value of the given alpaca-style JSON files, plus some general English."""
    texts = [EXTRA_TEXT]
    for path in dataset_files:
        for row in json.loads(Path(path).read_text()):
            texts += [v for v in row.values() if isinstance(v, str) and v]
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = 2048, special_tokens: list[str] = SPECIAL_TOKENS,
                    eos_token: str = "<|im_end|>", pad_token: str = "<|endoftext|>", bos_token: str | None = None,
                    chat_template: str = CHATML_JINJA, named: dict | None = None):
    """A byte-level BPE tokenizer trained on `texts`; ChatML special tokens and chat template by default. `named`:
    special tokens the tokenizer names (Gemma 3's image_token, boi_token, eoi_token)."""

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=eos_token, pad_token=pad_token, bos_token=bos_token, model_max_length=1024,
        **({"extra_special_tokens": named} if named else {}))
    tokenizer.chat_template = chat_template
    return tokenizer


def text_shape(vocab_size: int, hidden_size: int, num_layers: int, eos_token_id: int | None,
               pad_token_id: int | None) -> dict:
    """The tiny text model's settings, the same in every family (the vision-language one's language model too)."""
    return dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 8 // 3,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=eos_token_id,
                pad_token_id=pad_token_id, bos_token_id=None)


def build_model(vocab_size: int, family: str = "qwen2", hidden_size: int = 256, num_layers: int = 4,
                seed: int = 0, eos_token_id: int | None = None, pad_token_id: int | None = None):
    """A randomly initialised Qwen2- or Llama-style causal LM of a few million parameters."""

    config_cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[family]
    config = config_cls(**text_shape(vocab_size, hidden_size, num_layers, eos_token_id, pad_token_id))
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def build_qwen2_vl(tokenizer, hidden_size: int = 256, num_layers: int = 4, seed: int = 0, family: str = "qwen2_vl"):
    """A randomly initialised Qwen2-VL (or Qwen2.5-VL, Qwen3-VL): the tiny Qwen2 text model (M-RoPE sections of
    Qwen2-VL's proportions) under a vision tower of two blocks, 64 wide, with Qwen2-VL's patch (14), temporal patch
    (2) and 2x2 merge; Qwen2.5-VL's tower attends in windows except in its last block, as the real one does in every
    eighth; Qwen3-VL's has 16 px patches, a learned position grid and one deepstack merger."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_TOKENS}
    text = {**text_shape(len(tokenizer), hidden_size, num_layers, tokenizer.eos_token_id, tokenizer.pad_token_id),
            "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]}}
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if family == "qwen3_vl":  # Qwen3's text model (interleaved M-RoPE) and a 16 px patch with a learned position grid
        text = {**{k: v for k, v in text.items() if k != "rope_scaling"}, "head_dim": hidden_size // 4,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [12, 10, 10],
                                    "mrope_interleaved": True}}
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=hidden_size, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])
        config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **tokens)
    elif family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=hidden_size,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=56,
                      fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **tokens)
    else:
        vision = dict(depth=2, embed_dim=64, num_heads=4, hidden_size=hidden_size, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **tokens)
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config, dtype=torch.float32)


def build_llava(tokenizer, hidden_size: int = 256, num_layers: int = 4, seed: int = 0, family: str = "llava"):
    """A randomly initialised LLaVA: the tiny Qwen2 text model under a two-block CLIP vision tower (56 px images in
    14 px patches, LLaVA-1.5's second-to-last layer without its CLS feature) and LLaVA's two-layer projector; with
    `family` llava_next, LLaVA-NeXT's, whose images are tiled in 56 px tiles on LLAVA_NEXT_PINPOINTS."""
    text = {"model_type": "qwen2",
            **text_shape(len(tokenizer), hidden_size, num_layers, tokenizer.eos_token_id, tokenizer.pad_token_id)}
    vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, image_size=56, patch_size=14, projection_dim=64)
    config_cls, tiles = (LlavaNextConfig, {"image_grid_pinpoints": LLAVA_NEXT_PINPOINTS}) if family == "llava_next" \
        else (LlavaConfig, {})
    config = config_cls(text_config=text, vision_config=vision, image_token_id=tokenizer.convert_tokens_to_ids(
        LLAVA_IMAGE), vision_feature_select_strategy="default", vision_feature_layer=-2, tie_word_embeddings=True,
        **tiles)
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config, dtype=torch.float32)


def build_gemma3(tokenizer, hidden_size: int = 256, num_layers: int = 4, seed: int = 0):
    """A randomly initialised Gemma 3: a tiny Gemma 3 text model under a two-block SigLIP tower (56 px images in
    14 px patches, 4x4 of them) whose features Gemma 3's projector pools 2x2 into 4 image tokens."""
    text = {**text_shape(len(tokenizer), hidden_size, num_layers, tokenizer.eos_token_id, tokenizer.pad_token_id),
            "head_dim": hidden_size // 4, "sliding_window": 512}
    vision = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, image_size=56, patch_size=14)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in GEMMA3_NAMED.items()}
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          image_token_id=ids["image_token"], boi_token_id=ids["boi_token"],
                          eoi_token_id=ids["eoi_token"], tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    # Transformers initialises the projection to zeros: the tower's features would reach nothing, and learn nothing
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.02)
    return model


def build_mllama(tokenizer, hidden_size: int = 256, num_layers: int = 4, seed: int = 0):
    """A randomly initialised Mllama (Llama 3.2 Vision): a tiny Llama text model whose second block is a
    cross-attention block, under a two-block tiled vision encoder (56 px tiles in 14 px patches, up to 2 tiles an
    image, one global block) whose features it reads."""
    text = {**text_shape(len(tokenizer), hidden_size, num_layers, tokenizer.eos_token_id, tokenizer.pad_token_id),
            "cross_attention_layers": [1], "tie_word_embeddings": False,
            "bos_token_id": tokenizer.bos_token_id}
    vision = dict(image_size=56, patch_size=14, hidden_size=64, num_hidden_layers=2, num_global_layers=1,
                  attention_heads=4, intermediate_size=128, max_num_tiles=2, intermediate_layers_indices=[0],
                  supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]], vision_output_dim=128)
    config = MllamaConfig(text_config=text, vision_config=vision,
                          image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"), tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    # Transformers starts the cross-attention block's gates (tanh-gated) at zero: the text would read nothing of the
    # images, and the tower would learn nothing, until the gates moved; a trained Llama 3.2 Vision's are open
    for layer in text["cross_attention_layers"]:
        block = model.model.language_model.layers[layer]
        torch.nn.init.constant_(block.cross_attn_attn_gate, 0.5)
        torch.nn.init.constant_(block.cross_attn_mlp_gate, 0.5)
    return model


def save_mllama_processor(tokenizer, out_dir: Path) -> None:
    """Mllama's image processor (the PIL one: 56 px tiles, up to 2 an image) and its processor, as Llama 3.2 Vision's
    models ship them."""
    from transformers import MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    images = MllamaImageProcessorPil(size={"height": 56, "width": 56}, max_image_tiles=2)
    images.save_pretrained(out_dir)
    MllamaProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out_dir)


def save_gemma3_processor(tokenizer, out_dir: Path) -> None:
    """Gemma 3's image processor (the PIL one: 56x56 in the tiny model) and its processor settings (4 image tokens an
    image), as Gemma 3's models ship them."""
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    images = Gemma3ImageProcessorPil(size={"height": 56, "width": 56})
    images.save_pretrained(out_dir)
    Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=4).save_pretrained(out_dir)


def save_llava_processor(tokenizer, out_dir: Path, family: str = "llava") -> None:
    """LLaVA's image processor (CLIP's, the PIL one; LLaVA-NeXT's own for `family` llava_next) and its processor
    settings (patch, extra CLS token, feature strategy), as llava-hf's models ship them: preprocessor_config.json and
    processor_config.json."""
    from transformers import LlavaNextProcessor, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    sizes = dict(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    if family == "llava_next":
        images, processor_cls = LlavaNextImageProcessorPil(**sizes, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS), \
            LlavaNextProcessor
    else:
        images, processor_cls = CLIPImageProcessorPil(**sizes), LlavaProcessor
    images.save_pretrained(out_dir)
    processor_cls(image_processor=images, tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                  num_additional_image_tokens=1, image_token=LLAVA_IMAGE).save_pretrained(out_dir)


def qwen2_vl_image_processor(patch_size: int = 14):
    """Qwen2-VL's image processor (the PIL one: it needs no torchvision), its images held to (2 patches)^2 ..
    128x128 pixels so that a tiny model sees a few dozen patches per image (Qwen3-VL's has 16 px patches)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=(2 * patch_size) ** 2, max_pixels=128 * 128, patch_size=patch_size,
                                    merge_size=2, temporal_patch_size=2)


def write_tiny_model(out_dir: str | Path, dataset_files: list[Path], family: str = "qwen2", seed: int = 0,
                     num_layers: int = 4) -> Path:
    """Writes tokenizer and model (`num_layers` blocks) to `out_dir` with save_pretrained, and for a vision-language
    family its image processor; returns the folder."""
    out_dir = Path(out_dir)
    vision = family in VISION_LANGUAGE
    extra = {"llava": [LLAVA_IMAGE], "llava_next": [LLAVA_IMAGE], "gemma3": GEMMA3_TOKENS,
             "mllama": MLLAMA_TOKENS}.get(family, QWEN2_VL_TOKENS if vision else [])
    ends = {"eos_token": "<|eot_id|>", "bos_token": "<|begin_of_text|>"} if family == "mllama" else {}
    tokenizer = build_tokenizer(corpus_from(dataset_files), special_tokens=SPECIAL_TOKENS + extra,
                                named=GEMMA3_NAMED if family == "gemma3" else None, **ends)
    if family == "gemma3":
        model = build_gemma3(tokenizer, num_layers=num_layers, seed=seed)
    elif family == "mllama":
        model = build_mllama(tokenizer, num_layers=num_layers, seed=seed)
    elif family in ("llava", "llava_next"):
        model = build_llava(tokenizer, num_layers=num_layers, seed=seed, family=family)
    elif vision:
        model = build_qwen2_vl(tokenizer, num_layers=num_layers, seed=seed, family=family)
    else:
        model = build_model(len(tokenizer), family=family, seed=seed, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, num_layers=num_layers)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    if family == "gemma3":
        save_gemma3_processor(tokenizer, out_dir)
    elif family == "mllama":
        save_mllama_processor(tokenizer, out_dir)
    elif family in ("llava", "llava_next"):
        save_llava_processor(tokenizer, out_dir, family)
    elif vision:
        qwen2_vl_image_processor(16 if family == "qwen3_vl" else 14).save_pretrained(out_dir)
    return out_dir


def write_sized_model(out_dir: str | Path, tokenizer_dir: str | Path, hidden_size: int, num_layers: int) -> Path:
    """A random Qwen2-style model of the given size with the tokenizer of `tokenizer_dir`, saved to `out_dir`
    (once: an existing one is kept); for benchmarks and memory checks that need more than the tiny model."""
    out_dir = Path(out_dir)
    if not (out_dir / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = build_model(len(tokenizer), hidden_size=hidden_size, num_layers=num_layers,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return out_dir
