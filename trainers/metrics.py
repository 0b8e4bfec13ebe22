"""Evaluation metrics: token accuracy for sft's `compute_accuracy`, and ROUGE / BLEU of generated answers."""

import logging

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


def words(text: str) -> list[str]:
    """Words as jieba segments them: Chinese into words, other text at spaces and punctuation."""
    import jieba  # heavy dictionaries; only prediction's scores segment text

    jieba.setLogLevel(logging.WARNING)  # it announces loading its dictionary on first use
    return [w for w in jieba.cut(text) if w.strip()]


class _JiebaTokenizer:
    """The tokenizer interface rouge_score asks for (its own keeps only a-z and 0-9)."""

    def tokenize(self, text: str) -> list[str]:
        return words(text)


def similarity_scores(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 over jieba words and sentence BLEU-4 over characters, in percent.

    These are the figures LLaMA-Factory reports for predict_with_generate (BLEU with smoothing method 3 of
    Chen and Cherry, 2014); an empty prediction or label scores 0 on ROUGE.
    """
    # only prediction scores answers; both libraries load models or corpora on import
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_JiebaTokenizer())
    smoothing = SmoothingFunction().method3
    totals = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    for prediction, label in zip(predictions, labels, strict=True):
        if words(prediction) and words(label):
            scores = scorer.score(label, prediction)
            for name, key in (("rouge-1", "rouge1"), ("rouge-2", "rouge2"), ("rouge-l", "rougeL")):
                totals[name] += scores[key].fmeasure
        if prediction and label:
            totals["bleu-4"] += sentence_bleu([list(label)], list(prediction), smoothing_function=smoothing)
    count = max(len(predictions), 1)
    return {name: 100 * total / count for name, total in totals.items()}
