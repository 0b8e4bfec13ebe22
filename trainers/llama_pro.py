"""`rayft expand`: LLaMA Pro's block expansion. After every num_layers / num_expand blocks a copy of the block before it
is inserted whose attention output (o_proj) and MLP output (down_proj) projections are zero: the new block adds
nothing to the residual stream, so the expanded model answers exactly as the original until it is trained.
`use_llama_pro` then trains only the inserted blocks (trainers/model.py: trainable_layers).
"""

import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rayft.recipe.problems import ConfigError, Problem
from rayft.trainers.model import layer_stack

# The projections that write a block's attention and MLP results into the residual stream (LLaMA, Mistral, Qwen2,
# Yi and their kin); zeroed in an inserted block.
OUTPUT_PROJECTIONS = ("o_proj", "down_proj")


def expansion_order(num_layers: int, num_expand: int) -> list[tuple[int, bool]]:
    """The expanded model's blocks in order, each as (the original block it copies, whether it is a new one)."""
    if num_expand < 1 or num_layers % num_expand:
        raise ConfigError([Problem("--num-expand", f"the model's {num_layers} blocks must divide into {num_expand} "
                                                   f"equal groups; choose a divisor of {num_layers}")])
    every = num_layers // num_expand
    order = []
    for i in range(num_layers):
        order.append((i, False))
        if (i + 1) % every == 0:
            order.append((i, True))
    return order


def expand_blocks(model_dir: str | Path, out_dir: str | Path, num_expand: int) -> Path:
    """Writes the model of `model_dir` with `num_expand` identity-initialised blocks inserted, and its tokenizer, to
    `out_dir` (which must not hold files); returns it."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError([Problem("out_dir", f"{out} exists and is not empty; choose a new folder")])
    config = AutoConfig.from_pretrained(model_dir)
    order = expansion_order(config.num_hidden_layers, num_expand)  # refused before any weight is read
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    stack, count = layer_stack(model)
    if not any(k.startswith(f"{stack}.0.") and any(p in k for p in OUTPUT_PROJECTIONS) for k in model.state_dict()):
        raise ConfigError([Problem("model_dir", f"{type(model).__name__}'s blocks have no "
                                                f"{' or '.join(OUTPUT_PROJECTIONS)}; rayft expand knows LLaMA-style "
                                                "blocks (LLaMA, Mistral, Qwen2, Yi)")])
    state = model.state_dict()
    expanded_state = {k: v for k, v in state.items() if not k.startswith(f"{stack}.")}
    for index, (source, new) in enumerate(order):
        prefix = f"{stack}.{source}."
        for key, value in state.items():
            if key.startswith(prefix):
                rest = key[len(prefix):]
                zero = new and any(p in rest.split(".") for p in OUTPUT_PROJECTIONS)
                expanded_state[f"{stack}.{index}.{rest}"] = torch.zeros_like(value) if zero else value.clone()
    config.num_hidden_layers = count + num_expand
    if isinstance(getattr(config, "layer_types", None), list):  # one entry per block (e.g. sliding or full attention)
        config.layer_types = [config.layer_types[source] for source, _ in order]
    expanded = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    missing, unexpected = expanded.load_state_dict(expanded_state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"the expanded weights do not fit the expanded model: missing "
                           f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    out.mkdir(parents=True, exist_ok=True)
    expanded.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    template = Path(model_dir) / "chat_template.jinja"
    if template.is_file() and not (out / template.name).is_file():
        shutil.copy2(template, out / template.name)
    return out
