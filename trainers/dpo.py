"""Stage `dpo`: direct preference optimisation with any `pref_loss`, run inside every Ray Train worker.

sigmoid, hinge, ipo and kto_pair compare the policy's log-ratios with a reference model's (ipo on per-token
averages, as TRL and LLaMA-Factory compute it); orpo and simpo use per-token averages of the policy alone.
"""

import torch
from transformers import set_seed

from rayft.data.collator import PairwiseCollator
from rayft.recipe.config import RecipeConfig
from rayft.recipe.logs import logger
from rayft.recipe.plan import Plan
from rayft.trainers import losses
from rayft.trainers.common import StatsTrainer, fit, training_arguments, with_images
from rayft.trainers.model import load_tokenizer, prepare_model
from rayft.trainers.reference import Reference, held_parameters


class DPOTrainer(StatsTrainer):
    """Scores chosen and rejected responses in one forward pass and applies the configured preference loss."""

    def __init__(self, *args, reference: Reference | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference = reference
        if reference is not None:
            reference.place(self)
        self.bco_baseline = RunningMean()  # pref_bco_weight's δ

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        f = self.finetuning
        batch = {k: v for k, v in inputs.items() if k != "labels"}  # with images: pixels, grids, token types
        # ld_alpha weighs the policy's log-probabilities only, the reference's stay plain (as LLaMA-Factory)
        logps, counts = losses.sequence_logps(model(**batch).logits.float(), inputs["labels"], f.ld_alpha)
        n = len(logps) // 2
        chosen, rejected = logps[:n], logps[n:]
        chosen_avg, rejected_avg = chosen / counts[:n].clamp(min=1), rejected / counts[n:].clamp(min=1)
        if f.pref_loss in losses.REFERENCE_FREE_LOSSES:
            extra = {"gamma": f.simpo_gamma} if f.pref_loss == "simpo" else {}
            per_pair, chosen_rewards, rejected_rewards = losses.REFERENCE_FREE_LOSSES[f.pref_loss](
                chosen_avg, rejected_avg, beta=f.pref_beta, **extra)
        else:
            ref_logps, _ = losses.sequence_logps(self.reference.logits(self, model, **batch).float(), inputs["labels"])
            policy = logps
            if f.pref_loss in losses.LENGTH_AVERAGED:  # TRL and LLaMA-Factory regress IPO's margin per token
                policy, ref_logps = logps / counts.clamp(min=1), ref_logps / counts.clamp(min=1)
            extra = {"label_smoothing": f.dpo_label_smoothing} if f.pref_loss == "sigmoid" else {}
            sides = (policy[:n], policy[n:], ref_logps[:n], ref_logps[n:])
            per_pair, chosen_rewards, rejected_rewards = losses.REFERENCE_LOSSES[f.pref_loss](
                *sides, beta=f.pref_beta, **extra)
            if f.pref_bco_weight > 0:  # BCO beside the preference loss, re-weighted as LLaMA-Factory does
                delta = self.bco_baseline.update(torch.cat((chosen_rewards, rejected_rewards)).mean())
                bco = losses.bco_pair_loss(*sides, beta=f.pref_beta, delta=delta)[0]
                per_pair = (per_pair + f.pref_bco_weight * bco) / (1 + f.pref_bco_weight)
        if f.pref_ftx > 0:
            per_pair = per_pair - f.pref_ftx * chosen_avg  # an SFT term: the chosen responses' token NLL
        self.record({
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "logps/chosen": chosen.detach(),
            "logps/rejected": rejected.detach(),
            # the policy's own preference on the pair, in nats: unlike the rewards and the loss it is not scaled
            # by pref_beta, so a sweep over pref_beta can rank by it (eval_logps/margins)
            "logps/margins": (chosen - rejected).detach(),
        })
        loss = per_pair.mean()
        return (loss, {}) if return_outputs else loss


class RunningMean:
    """The mean of every value seen so far on every worker (BCO's reward baseline δ): each update gathers one value
    per worker, as TRL's RunningMoments does."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def update(self, value: torch.Tensor) -> float:
        value = value.detach().float().reshape(1).cpu()
        values = [value]
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            values = [torch.zeros(1) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather_object(values, value)
        self.total += float(sum(v.sum() for v in values))
        self.count += len(values)
        return self.total / self.count


def run_dpo(cfg: RecipeConfig, plan: Plan) -> dict:
    """Preference optimisation on this worker's shard of chosen/rejected pairs; returns the final metrics."""
    args = training_arguments(cfg, plan)
    set_seed(args.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = prepare_model(cfg, plan.use_gpu)
    reference = Reference(cfg, plan.use_gpu) if cfg.finetuning.use_ref_model else None
    held = held_parameters(model, reference.model if reference else None)
    if args.process_index == 0:
        logger.info(f"pref_loss {cfg.finetuning.pref_loss}, reference: "
            f"{reference.description if reference else 'none'}; parameters held: {held:,}")
    collator = with_images(cfg, tokenizer, PairwiseCollator(tokenizer.pad_token_id), copies=2)
    metrics = fit(cfg, plan, args, model, tokenizer, collator,
                  trainer_cls=DPOTrainer, reference=reference, extra_metrics={"held_parameters": held})
    return metrics
