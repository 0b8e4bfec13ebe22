"""Stage `kto`: Kahneman-Tversky optimisation on unpaired examples tagged desirable or undesirable.

Each batch also carries mismatched prompt/response pairs, whose policy-vs-reference log-ratio (averaged
over all workers) is the KL reference point of the loss.
"""

import torch
from transformers import set_seed

from rayft.data.collator import KTOCollator
from rayft.data.media import PIXEL_KEYS, SEQUENCE_IMAGE_KEYS
from rayft.recipe.config import RecipeConfig
from rayft.recipe.logs import logger
from rayft.recipe.plan import Plan
from rayft.trainers import losses
from rayft.trainers.common import StatsTrainer, fit, training_arguments, with_images
from rayft.trainers.model import load_tokenizer, prepare_model
from rayft.trainers.reference import Reference, held_parameters


class KTOTrainer(StatsTrainer):
    def __init__(self, *args, reference: Reference, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference = reference
        reference.place(self)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        f = self.finetuning
        n = len(inputs["input_ids"])
        # with images, both sides carry the examples' pixels; the mismatched side its own image-token types
        pixels = {k: inputs[k] for k in PIXEL_KEYS if k in inputs}
        sequences = [k for k in ("input_ids", "attention_mask", *SEQUENCE_IMAGE_KEYS) if k in inputs]
        batch = {**{k: inputs[k] for k in sequences}, **pixels}
        mismatched = {**{k: inputs[f"kl_{k}"] for k in sequences}, **pixels}
        logps, counts = losses.sequence_logps(model(**batch).logits.float(), inputs["labels"])
        with torch.no_grad():
            kl_logps, _ = losses.sequence_logps(model(**mismatched).logits.float(), inputs["kl_labels"])
        both = {k: torch.cat([batch[k], mismatched[k]]) for k in batch}
        ref_logps, _ = losses.sequence_logps(self.reference.logits(self, model, **both).float(),
                                             torch.cat([inputs["labels"], inputs["kl_labels"]]))
        kl = (kl_logps - ref_logps[n:]).mean().detach()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(kl)  # one reference point for the whole global batch
            kl /= torch.distributed.get_world_size()
        desirable = inputs["kto_tag"].bool()
        per_example, rewards, kl = losses.kto_loss(
            logps, ref_logps[:n], desirable, kl_logps, ref_logps[n:], beta=f.pref_beta,
            chosen_weight=f.kto_chosen_weight, rejected_weight=f.kto_rejected_weight, kl=kl.clamp(min=0))
        if f.pref_ftx > 0:  # an SFT term on the desirable responses
            per_example = per_example + f.pref_ftx * desirable * -(logps / counts.clamp(min=1))
        self.record({"kl": kl, "rewards/chosen": rewards[desirable], "rewards/rejected": rewards[~desirable]})
        loss = per_example.mean()
        return (loss, {}) if return_outputs else loss


def run_kto(cfg: RecipeConfig, plan: Plan) -> dict:
    """KTO on this worker's shard of tagged examples; returns the final metrics."""
    args = training_arguments(cfg, plan)
    set_seed(args.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = prepare_model(cfg, plan.use_gpu)
    reference = Reference(cfg, plan.use_gpu)
    held = held_parameters(model, reference.model)
    if args.process_index == 0:
        logger.info(f"kto reference: {reference.description}; parameters held: {held:,}")
    return fit(cfg, plan, args, model, tokenizer, with_images(cfg, tokenizer, KTOCollator(tokenizer.pad_token_id)),
               trainer_cls=KTOTrainer, reference=reference, extra_metrics={"held_parameters": held})
