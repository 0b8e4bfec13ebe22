"""Transformers' own Seq2SeqTrainingArguments from a recipe's training keys.

The schema records Transformers' keys as data (recipe/training_keys.json) so that the driver never imports it; here,
where Transformers is loaded, its class is built and its own checks (`__post_init__`) run.
"""

import dataclasses
import functools

from transformers import Seq2SeqTrainingArguments

from rayft.recipe.schema import rayft_training_defaults


@functools.cache
def _known() -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(Seq2SeqTrainingArguments) if f.init)


def transformers_arguments(values: dict) -> Seq2SeqTrainingArguments:
    """Seq2SeqTrainingArguments of `values` (the recipe's training keys, with rayft's defaults where they differ);
    rayft's own keys (overwrite_output_dir, warmup_ratio, logging_dir, ...) are read from the recipe, not from here."""
    kwargs = {**rayft_training_defaults(), **values}
    return Seq2SeqTrainingArguments(**{k: v for k, v in kwargs.items() if k in _known()})


def transformers_problems(values: dict) -> list[tuple[str, str]]:
    """Transformers' own checks of the training keys, run without DeepSpeed or a device: (key, message) problems."""
    kwargs = {**values, "deepspeed": None, "use_cpu": True}
    kwargs.setdefault("output_dir", "unused")
    try:
        transformers_arguments(kwargs)
    except (ValueError, TypeError) as err:
        return [("training arguments", " ".join(str(err).split()))]
    return []
