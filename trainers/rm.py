"""Stage `rm`: a reward model, the LM with a scalar value head trained on preference pairs.

The model is the checkpoint's sequence-classification form (its body plus a one-output `score` head,
read at each sequence's last token); the head is also written to `value_head.safetensors` beside the
adapter or model, as LLaMA-Factory and TRL's value-head models store it.
"""

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import set_seed

from rayft.data.collator import PairwiseCollator
from rayft.recipe.config import RecipeConfig
from rayft.recipe.plan import Plan
from rayft.recipe.values import VALUE_HEAD_FILE
from rayft.trainers import losses
from rayft.trainers.common import StatsTrainer, fit, training_arguments, with_images
from rayft.trainers.model import load_tokenizer, prepare_model


class RewardTrainer(StatsTrainer):
    """Pairwise ranking loss on the scores of the chosen and the rejected response."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = {k: v for k, v in inputs.items() if k != "labels"}  # with images: pixels, grids, token types
        scores = model(**batch).logits.float()
        scores = scores.squeeze(-1)
        n = len(scores) // 2
        chosen, rejected = scores[:n], scores[n:]
        self.record({"rewards/chosen": chosen, "rewards/rejected": rejected,
                     "accuracy": (chosen > rejected).float()})
        loss = losses.pairwise_ranking_loss(chosen, rejected).mean()
        return (loss, {}) if return_outputs else loss


def run_rm(cfg: RecipeConfig, plan: Plan) -> dict:
    """Trains the reward model on this worker's shard of preference pairs; returns the final metrics."""
    args = training_arguments(cfg, plan)
    set_seed(args.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = prepare_model(cfg, plan.use_gpu, value_head=True)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last token that is not padding
    metrics = fit(cfg, plan, args, model, tokenizer,
                  with_images(cfg, tokenizer, PairwiseCollator(tokenizer.pad_token_id), copies=2),
                  trainer_cls=RewardTrainer)
    if args.process_index == 0 and not plan.stop_at:  # a pbt segment saves no model, only its checkpoint
        save_value_head(args.output_dir)
    return metrics


def save_value_head(output_dir: str) -> Path:
    """Copies the trained `score` head out of the saved adapter or model into value_head.safetensors."""

    out = Path(output_dir)
    for path in sorted(out.glob("*.safetensors")):  # the adapter, the model, or the model's shards
        if path.name != VALUE_HEAD_FILE:
            with safe_open(str(path), framework="pt") as saved:
                keys = [k for k in saved.keys() if k.endswith("score.weight")]
                if keys:
                    weight = saved.get_tensor(keys[0]).float()
                    head = {"v_head.summary.weight": weight, "v_head.summary.bias": torch.zeros(weight.shape[0])}
                    save_file(head, str(out / VALUE_HEAD_FILE))
                    return out / VALUE_HEAD_FILE
    raise FileNotFoundError(f"no score head in the model saved to {out}")
