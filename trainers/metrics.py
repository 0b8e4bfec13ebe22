"""Evaluation metrics computed from predictions: token accuracy for sft's `compute_accuracy`."""

import numpy as np
import torch

from rayft.data.encode import IGNORE_INDEX


def keep_argmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Keeps only each position's predicted token, so evaluation does not hold vocabulary-sized logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def token_accuracy(eval_prediction) -> dict[str, float]:
    """Share of labelled tokens whose next-token prediction is right (position t predicts token t+1)."""
    predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
    predicted, target = np.asarray(predictions)[:, :-1], np.asarray(labels)[:, 1:]
    mask = target != IGNORE_INDEX
    return {"accuracy": float((predicted[mask] == target[mask]).mean()) if mask.any() else 0.0}


def token_accuracy_hooks() -> dict:
    """The Trainer keyword arguments that make evaluation report token accuracy."""
    return {"compute_metrics": token_accuracy, "preprocess_logits_for_metrics": keep_argmax}
