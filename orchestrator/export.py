"""`rayft export`: merges a run's adapters into its base model and saves a plain Hugging Face model.

It runs in the driver's own process (no Ray): merging is one pass over the weights.
"""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from peft import PeftModel

from rayft.data.tokenizer import TokenizerSpec, load_tokenizer
from rayft.recipe.config import RecipeConfig
from rayft.recipe.logs import logger
from rayft.recipe.problems import ConfigError, Problem
from rayft.recipe.values import VALUE_HEAD_FILE, comma_list, mask
from rayft.trainers.model import load_image_processor, load_model, model_class
from rayft.trainers.vision import is_vision_language
from rayft.trainers.vocabulary import fit_vocabulary_of


def export_problems(cfg: RecipeConfig) -> list[str]:
    """What stops an export before any weight is read (empty if nothing does)."""
    m = cfg.model
    problems = []
    if not m.export_dir:
        problems.append(Problem("export_dir", "required by `rayft export`; set the folder the merged model is "
                                              "written to"))
    elif Path(m.export_dir).exists() and any(Path(m.export_dir).iterdir()):
        problems.append(Problem("export_dir", f"{m.export_dir} exists and is not empty; choose another folder (an "
                                              "export never writes over existing files)"))
    if m.export_legacy_format:
        problems.append(Problem("export_legacy_format", "Transformers 5 saves safetensors only; remove "
                                                        "export_legacy_format (every current loader reads "
                                                        "safetensors)"))
    if m.quantization_bit is not None:
        problems.append(Problem("quantization_bit", "adapters merge into the full-precision base; remove "
                                                    "quantization_bit and the export loads the base unquantised"))
    if m.export_size < 1:
        problems.append(Problem("export_size", f"the largest shard in GB must be at least 1, got {m.export_size}"))
    if cfg.finetuning.finetuning_type not in ("lora", "oft") and m.adapter_name_or_path:
        problems.append(Problem("adapter_name_or_path", "adapters are merged for finetuning_type lora or oft; a "
                                                        "freeze or full run saves a whole model already, export it "
                                                        "by pointing model_name_or_path at it"))
    for adapter in comma_list(m.adapter_name_or_path):
        if not (Path(adapter) / "adapter_config.json").is_file():
            problems.append(Problem("adapter_name_or_path", f"{adapter} holds no adapter_config.json; name a folder a "
                                                            "LoRA or OFT run wrote (its output_dir)"))
    return problems


def run_export(cfg: RecipeConfig) -> Path:
    """Loads the base model, merges every adapter of adapter_name_or_path in order, and saves the result
    with its tokenizer to export_dir in shards of at most export_size GB."""
    problems = export_problems(cfg)
    if problems:
        raise ConfigError(problems)
    m = cfg.model
    device = "cuda" if m.export_device == "auto" and torch.cuda.is_available() else "cpu"
    # the checkpoint's own dtype: an export keeps the precision the model was published in
    model = load_model(m, use_gpu=device == "cuda", trainable=False, dtype="auto").to(device)
    adapters = comma_list(m.adapter_name_or_path)
    for adapter in adapters:
        fit_vocabulary_of(model, adapter)  # a run that added tokens saved its tokenizer beside its adapter
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        logger.info(f"merged the adapter {adapter}")
    out = Path(m.export_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=f"{m.export_size}GB")
    spec = TokenizerSpec.of(m)
    if adapters and (Path(adapters[-1]) / "tokenizer_config.json").is_file():  # the run saved its tokenizer
        spec = replace(spec, path=adapters[-1], revision="main")
    load_tokenizer(spec).save_pretrained(out)
    vision = is_vision_language(model.config)
    if vision:  # the image processor beside the model, so that the export loads as the base did
        load_image_processor(m).save_pretrained(out)
    if adapters and (Path(adapters[-1]) / VALUE_HEAD_FILE).is_file():  # a reward model's head travels along
        shutil.copy2(Path(adapters[-1]) / VALUE_HEAD_FILE, out / VALUE_HEAD_FILE)
    _write_card(out, cfg, adapters, model_class(model.config).__name__)
    logger.info(f"exported a plain Hugging Face model to {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return out


def export_recipe(recipe: dict) -> str:
    """`run_export` of a resolved recipe's dict (a pipeline's merge, called in the driver's helper process)."""
    return str(run_export(RecipeConfig.from_dict(recipe)))


def _write_card(out: Path, cfg: RecipeConfig, adapters: list[str], loader: str) -> None:
    settings = mask({"model_name_or_path": cfg.model.model_name_or_path, "adapter_name_or_path": adapters,
                     "export_size": cfg.model.export_size})
    lines = ["---", f"base_model: {cfg.model.model_name_or_path}", "library_name: transformers", "tags:",
             "- rayft", "- merged", "---", "", f"# {out.name}", "",
             f"`{cfg.model.model_name_or_path}` with {len(adapters)} adapter(s) merged into its weights by "
             f"`rayft export`; it loads with `{loader}.from_pretrained` and needs no PEFT.", "",
             "```json", json.dumps(settings, indent=1), "```", ""]
    (out / "README.md").write_text("\n".join(lines))
