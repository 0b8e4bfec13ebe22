"""Causal language modelling stages, run inside every Ray Train worker: `sft` and `pt`.

Both train next-token prediction on this worker's shard; what differs is prepared on the driver
(chat-templated conversations with the prompt masked, or packed plain text with every token learned).
"""

from transformers import set_seed

from rayft.data.collator import SupervisedCollator
from rayft.data.encode import IGNORE_INDEX
from rayft.recipe.config import RecipeConfig
from rayft.recipe.plan import Plan
from rayft.trainers.common import fit, training_arguments
from rayft.trainers.losses import dft_loss
from rayft.trainers.metrics import token_accuracy_hooks
from rayft.trainers.model import load_tokenizer, prepare_model


def run_sft(cfg: RecipeConfig, plan: Plan) -> dict:
    """Supervised fine-tuning on templated conversations; returns the final metrics."""
    args = training_arguments(cfg, plan)
    set_seed(args.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = prepare_model(cfg, plan.use_gpu)
    hooks = token_accuracy_hooks() if cfg.finetuning.compute_accuracy else {}
    if cfg.finetuning.use_dft_loss:
        hooks["compute_loss_func"] = dft_loss
    return fit(cfg, plan, args, model, tokenizer, supervised_collator(cfg, tokenizer), **hooks)


def run_pt(cfg: RecipeConfig, plan: Plan) -> dict:
    """(Continued) pre-training on plain text, packed by default; returns the final metrics."""
    args = training_arguments(cfg, plan)
    set_seed(args.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = prepare_model(cfg, plan.use_gpu)
    return fit(cfg, plan, args, model, tokenizer, supervised_collator(cfg, tokenizer))


def supervised_collator(cfg: RecipeConfig, tokenizer) -> SupervisedCollator:
    """Padding is left out of the loss unless ignore_pad_token_for_loss is false (then pad tokens are learned)."""
    label_pad = IGNORE_INDEX if cfg.data.ignore_pad_token_for_loss else tokenizer.pad_token_id
    return SupervisedCollator(tokenizer.pad_token_id, label_pad_id=label_pad)
