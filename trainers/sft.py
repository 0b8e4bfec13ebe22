"""Causal language modelling stages, run inside every Ray Train worker: `sft` and `pt`.

Both train next-token prediction on this worker's shard; what differs is prepared on the driver
(chat-templated conversations with the prompt masked, or packed plain text with every token learned).
"""

import functools

from transformers import set_seed

from rayft.data.collator import ImageCollator, SupervisedCollator
from rayft.data.encode import IGNORE_INDEX
from rayft.recipe.config import RecipeConfig
from rayft.recipe.plan import Plan
from rayft.trainers.common import ShardTrainer, fit, training_arguments, with_images
from rayft.trainers.losses import asft_loss, dft_loss, eaft_loss
from rayft.trainers.metrics import token_accuracy_hooks
from rayft.trainers.model import load_tokenizer, prepare_model
from rayft.trainers.reference import Reference


class ASFTTrainer(ShardTrainer):
    """SFT with ASFT's loss: DFT's weighted token loss plus the reference model's KL divergence from the policy."""

    def __init__(self, *args, reference: Reference, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference = reference
        reference.place(self)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**batch)
        ref_logits = self.reference.logits(self, model, **batch)
        loss = asft_loss(outputs.logits, ref_logits, inputs["labels"], self.finetuning.asft_alpha)
        return (loss, outputs) if return_outputs else loss


def run_sft(cfg: RecipeConfig, plan: Plan) -> dict:
    """Supervised fine-tuning on templated conversations; returns the final metrics."""
    f = cfg.finetuning
    args = training_arguments(cfg, plan)
    set_seed(args.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = prepare_model(cfg, plan.use_gpu)
    hooks = token_accuracy_hooks() if f.compute_accuracy else {}
    if f.use_dft_loss:
        hooks["compute_loss_func"] = dft_loss
    if f.use_eaft_loss:
        hooks["compute_loss_func"] = functools.partial(eaft_loss, alpha=f.eaft_alpha)
    if f.use_asft_loss:  # the reference: the policy with its adapter off, or a frozen copy (freeze, full)
        hooks.update(trainer_cls=ASFTTrainer, reference=Reference(cfg, plan.use_gpu))
    return fit(cfg, plan, args, model, tokenizer, supervised_collator(cfg, tokenizer), **hooks)


def run_pt(cfg: RecipeConfig, plan: Plan) -> dict:
    """(Continued) pre-training on plain text, packed by default; returns the final metrics."""
    args = training_arguments(cfg, plan)
    set_seed(args.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = prepare_model(cfg, plan.use_gpu)
    return fit(cfg, plan, args, model, tokenizer, supervised_collator(cfg, tokenizer))


def supervised_collator(cfg: RecipeConfig, tokenizer) -> SupervisedCollator | ImageCollator:
    """Padding is left out of the loss unless ignore_pad_token_for_loss is false (then pad tokens are learned).
    Under a multimodal template each batch's images are decoded and preprocessed here, in the worker."""
    label_pad = IGNORE_INDEX if cfg.data.ignore_pad_token_for_loss else tokenizer.pad_token_id
    return with_images(cfg, tokenizer, SupervisedCollator(tokenizer.pad_token_id, label_pad_id=label_pad))
