"""Generation with a fine-tuned model: the settings `model.generate` takes, and the Ray Data actor that
answers batches of prompts for `do_predict` (each actor holds one whole model)."""

import json
import os

import numpy as np
import ray
import torch

from rayft.data.pipeline import EncodingSettings
from rayft.recipe.config import RecipeConfig
from rayft.recipe.schema import GeneratingArguments
from rayft.trainers.model import ImageModel, load_for_generation, load_tokenizer


def stop_token_ids(tokenizer, cfg: RecipeConfig) -> list[int]:
    """The eos token and the template's stop words (`<|im_end|>` for chatml and qwen, `<|eot_id|>` and
    `<|eom_id|>` for llama3, ...): a chat model ends its answer with one of them."""
    stops = EncodingSettings.of(cfg).chat_template().stop_ids(tokenizer)
    return [s for s in stops if s is not None]


def generation_kwargs(g: GeneratingArguments, stops: list[int], pad_id: int, num_beams: int | None = None) -> dict:
    """Keyword arguments for `model.generate` from the generation settings.

    max_new_tokens, when positive, bounds the answer and max_length is not passed; without sampling the
    sampling settings are left out (greedy or beam search ignores them).
    """
    kwargs = dict(do_sample=g.do_sample, num_beams=num_beams or g.num_beams, repetition_penalty=g.repetition_penalty,
                  length_penalty=g.length_penalty, eos_token_id=stops, pad_token_id=pad_id)
    if g.max_new_tokens > 0:
        kwargs["max_new_tokens"] = g.max_new_tokens
    else:
        kwargs["max_length"] = g.max_length
    if g.do_sample:
        kwargs.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
    return kwargs


def cut_at_stop(ids: list[int], stops: list[int]) -> list[int]:
    """An answer's ids up to and including its first stop token (what follows is padding)."""
    for position, token in enumerate(ids):
        if token in stops:
            return ids[: position + 1]
    return ids


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts padded on the left, so that every prompt ends where its answer begins, and their mask."""
    longest = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


class Generator:
    """A Ray Data actor: answers a batch of prompts (`prompt_ids`) with the base model plus merged adapters."""

    def __init__(self, recipe: dict, use_gpu: bool):
        cfg = RecipeConfig.from_dict(recipe)
        self.device = "cuda" if use_gpu else "cpu"
        self.tokenizer = load_tokenizer(cfg.model)
        self.model = load_for_generation(cfg.model, use_gpu)
        self.stops = stop_token_ids(self.tokenizer, cfg)
        self.kwargs = generation_kwargs(cfg.generating, self.stops, self.tokenizer.pad_token_id,
                                        cfg.data.eval_num_beams)
        self.skip_special_tokens = cfg.generating.skip_special_tokens
        self.images = ImageModel.of(cfg, self.tokenizer)
        torch.manual_seed(cfg.args.seed)

        self.name = f"{ray.get_runtime_context().get_node_id()[:8]}/{os.getpid()}"  # node id: nodes may share an IP

    def __call__(self, batch: dict) -> dict:
        prompts = [list(map(int, ids)) for ids in batch["prompt_ids"]]
        input_ids, attention_mask = left_padded(prompts, self.tokenizer.pad_token_id, self.device)
        longest = input_ids.shape[1]
        images = {}
        if self.images is not None:  # each prompt's images, in order, their pixels made here
            rows = [json.loads(row) for row in batch["images"]]
            images = self.images.inputs([path for row in rows for path in row], input_ids, [len(r) for r in rows])
        with torch.no_grad():
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **self.kwargs,
                                         **images)
        answers = [cut_at_stop(row.tolist(), self.stops) for row in output[:, longest:]]
        return {
            "index": batch["index"],
            "prompt": np.asarray(self.tokenizer.batch_decode(prompts, skip_special_tokens=False), dtype=object),
            "predict": np.asarray(self.tokenizer.batch_decode(answers, skip_special_tokens=self.skip_special_tokens),
                                  dtype=object),
            "label": batch["label"],
            "worker": np.asarray([self.name] * len(prompts), dtype=object),
        }
