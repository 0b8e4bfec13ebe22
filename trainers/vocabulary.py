"""New tokens in the vocabulary (add_tokens, add_special_tokens, new_special_tokens_config): the embeddings grown to the
tokenizer that data/tokenizer.py extends the same way in every process, and their new rows initialised as
LLaMA-Factory does (the mean of the old rows plus noise, or the mean of a description's tokens).
"""

import math
from pathlib import Path

import torch

from rayft.recipe.logs import logger
from rayft.recipe.problems import ConfigError, Problem

PAD_TO_MULTIPLE = 64  # as LLaMA-Factory: the grown matrices' rows are a multiple of 64
NOISE_SEED = 0  # every worker, and every copy of the model (a reference), draws the same new rows


def grow_embeddings(model, tokenizer, init: str = "noise_init", descriptions: dict | None = None) -> int:
    """Grows the input (and an untied output) embeddings to `tokenizer`'s length, rounded up to a multiple of 64, and
    initialises the new rows; returns how many rows were added (0: the vocabulary fits already)."""
    before = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= before:
        return 0
    output = model.get_output_embeddings()
    if output is not None and not isinstance(output, torch.nn.Linear):
        raise ConfigError([Problem("resize_vocab", f"{type(model).__name__}'s output layer cannot be resized; remove "
                                                   "the new tokens")])
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=PAD_TO_MULTIPLE, mean_resizing=False)
    added = model.get_input_embeddings().weight.shape[0] - before
    tied = getattr(model.config, "tie_word_embeddings", False)
    with torch.no_grad():
        _initialise(model.get_input_embeddings().weight, added, init, descriptions, tokenizer, model)
        if output is not None and not tied:
            _initialise(output.weight, added, init, descriptions, tokenizer, model)
    logger.info(f"vocabulary: {len(tokenizer)} tokens; embeddings grown from {before} to {before + added} rows "
                f"({init})")
    return added


def _initialise(weight: torch.Tensor, added: int, init: str, descriptions: dict | None, tokenizer, model) -> None:
    """The last `added` rows of `weight`: noise_init, desc_init or desc_init_w_noise (LLaMA-Factory's three)."""
    old = weight[:-added]
    generator = torch.Generator().manual_seed(NOISE_SEED)
    scale = 1.0 / math.sqrt(weight.shape[1])

    def noise(rows: int) -> torch.Tensor:
        return (torch.randn(rows, weight.shape[1], generator=generator) * scale).to(weight.dtype)

    weight[-added:] = old.mean(dim=0, keepdim=True) + noise(added)
    if init == "noise_init" or not descriptions:
        return
    # each described token's row (at the token's own id) is the mean of its description's old-vocabulary embeddings
    known = len(weight) - added
    embeddings = model.get_input_embeddings().weight
    for token, text in descriptions.items():
        ids = torch.tensor([t for t in tokenizer(str(text), add_special_tokens=False)["input_ids"] if t < known],
                           dtype=torch.long)
        row = embeddings[ids].mean(dim=0) if len(ids) else old.mean(dim=0)
        weight[tokenizer.convert_tokens_to_ids(token)] = row + (noise(1)[0] if init == "desc_init_w_noise" else 0)


def embedding_module_names(model) -> list[str]:
    """The names (last part) of the input and output embedding modules, which LoRA trains whole when the vocabulary
    grew (LLaMA-Factory's additional_target then)."""
    wanted = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return sorted({name.split(".")[-1] for name, module in model.named_modules() if id(module) in wanted and name})


def fit_vocabulary_of(model, adapter: str | Path) -> int:
    """Before an adapter is loaded onto `model`: grows the embeddings to the vocabulary of the tokenizer saved beside
    the adapter (a run that added tokens saves it there), as that run grew them; returns the rows added."""
    folder = Path(adapter)
    if not (folder / "tokenizer_config.json").is_file():
        return 0
    from transformers import AutoTokenizer

    return grow_embeddings(model, AutoTokenizer.from_pretrained(folder))
