"""Preference and reward losses as pure functions of per-example log-probabilities or rewards.

Each returns (per-example losses, chosen rewards, rejected rewards); the stage trainers average the
losses and log the rewards. Formulas follow the papers named in each docstring.
"""

import torch
import torch.nn.functional as F

from rayft.data.encode import IGNORE_INDEX


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor,
                   ld_alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the log-probabilities of each row's labelled tokens, and how many tokens were labelled.

    Position t predicts token t+1; IGNORE_INDEX labels (prompt, padding) add nothing. With `ld_alpha` the rows are
    pairs (chosen rows first, then rejected) and each token is weighted as LD-DPO weighs it (`ld_weights`).
    """
    labels = labels[:, 1:]
    logits = logits[:, :-1]
    mask = labels != IGNORE_INDEX
    token_logps = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    weights = mask if ld_alpha is None else ld_weights(mask, ld_alpha)
    return (token_logps * weights).sum(-1), mask.sum(-1)


def ld_weights(mask: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO's token weights (Liu et al., 2024, length desensitisation) for a batch of pairs, chosen rows first.

    A pair's responses share a "public" length, the shorter one's: the labelled tokens within it (counted from the
    row's first labelled position, as LLaMA-Factory counts) weigh 1; the longer response's excess weighs ld_alpha,
    so a verbose answer's extra tokens count less in its log-probability.
    """
    n = len(mask) // 2
    lengths = mask.sum(-1)
    public = torch.minimum(lengths[:n], lengths[n:]).repeat(2)
    start = mask.int().argmax(-1)
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    inside = positions < (start + public).unsqueeze(1)
    return mask * torch.where(inside, 1.0, ld_alpha)


def dft_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Dynamic fine-tuning (Wu et al., 2025): each labelled token's cross-entropy weighted by its own probability
    (without gradient through the weight), summed over the batch's labelled tokens and averaged per token.

    Has the signature of the Trainer's `compute_loss_func`.
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    labels = labels[:, 1:].to(logits.device)
    mask = labels != IGNORE_INDEX
    token_logps = torch.gather(logits[:, :-1].float().log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    total = (-token_logps * token_logps.detach().exp() * mask).sum()
    count = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
    return total / count


def eaft_loss(outputs, labels: torch.Tensor, num_items_in_batch=None, alpha: float = 1.0) -> torch.Tensor:
    """EAFT (entropy-adaptive fine-tuning, LLaMA-Factory 0.9.5): each labelled token's cross-entropy weighted by
    (H / 3)^alpha, H the entropy of the model's distribution over its 20 most likely next tokens (no gradient
    through the weight): confident tokens weigh less. Summed and averaged per labelled token.

    Has the signature of the Trainer's `compute_loss_func` (with alpha bound).
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    logits, labels = logits[:, :-1].float(), labels[:, 1:].to(logits.device)
    mask = labels != IGNORE_INDEX
    token_logps = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    with torch.no_grad():
        top = logits.topk(min(20, logits.shape[-1]), dim=-1).values.log_softmax(-1)
        weight = (-(top.exp() * top).sum(-1) / 3.0) ** alpha
    total = (-token_logps * weight * mask).sum()
    count = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
    return total / count


def asft_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """ASFT (LLaMA-Factory 0.9.5): DFT's loss plus alpha times the reference model's KL divergence from the policy,
    KL(reference || policy) over the whole vocabulary at each labelled position, both averaged per labelled token."""
    mask = labels[:, 1:].to(logits.device) != IGNORE_INDEX
    policy = logits[:, :-1].float().log_softmax(-1)
    reference = ref_logits[:, :-1].float().softmax(-1)
    kl = F.kl_div(policy, reference, reduction="none").sum(-1)
    return dft_loss({"logits": logits}, labels) + alpha * (kl * mask).sum() / mask.sum().clamp(min=1)


def sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al., 2023): -log σ(β·Δ), Δ the policy's log-ratio margin over the reference's.

    With label smoothing ε (conservative DPO) the preference is taken to be flipped with probability ε.
    """
    margin = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    return losses, *_implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


def bco_pair_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, delta):
    """BCO on pairs (Jung et al., 2024), as LLaMA-Factory adds it to DPO: the chosen response classified as good and
    the rejected one as bad by σ(β·log-ratio - δ), δ the running mean of the implicit rewards (the caller's)."""
    chosen, rejected = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))
    return losses, chosen.detach(), rejected.detach()


def hinge_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """SLiC-style hinge on the DPO margin (Zhao et al., 2023): max(0, 1 - β·Δ)."""
    margin = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = torch.relu(1 - beta * margin)
    return losses, *_implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """IPO (Azar et al., 2023): (Δ - 1/(2β))², which regresses the margin instead of maximising it.

    Callers pass per-token average log-probabilities: with sums Δ grows with length and the loss reaches the
    hundreds where the target 1/(2β) is 5."""
    margin = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = (margin - 1 / (2 * beta)) ** 2
    return losses, *_implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


def kto_pair_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """KTO on preference pairs (Ethayarajh et al., 2024): each side is valued against the other side's KL.

    The reference point of the chosen responses is the batch's (clamped, detached) rejected KL estimate
    and vice versa; a pair's loss is the mean of its two halves.
    """
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    chosen_kl = chosen_ratio.mean().clamp(min=0).detach()
    rejected_kl = rejected_ratio.mean().clamp(min=0).detach()
    losses = (2 - torch.sigmoid(beta * (chosen_ratio - rejected_kl))
              - torch.sigmoid(beta * (chosen_kl - rejected_ratio))) / 2
    return losses, *_implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


def orpo_loss(chosen_avg, rejected_avg, beta: float):
    """ORPO (Hong et al., 2024): NLL of the chosen response + β · -log σ(log odds(chosen) - log odds(rejected)).

    Inputs are length-normalised (per-token mean) log-probabilities; no reference model.
    odds(y) = p / (1 - p), so log odds = logp - log(1 - exp(logp)).
    """
    log_odds = (chosen_avg - rejected_avg) - (
        torch.log1p(-torch.exp(chosen_avg)) - torch.log1p(-torch.exp(rejected_avg)))
    losses = -chosen_avg - beta * F.logsigmoid(log_odds)
    return losses, (beta * chosen_avg).detach(), (beta * rejected_avg).detach()


def simpo_loss(chosen_avg, rejected_avg, beta: float, gamma: float):
    """SimPO (Meng et al., 2024): -log σ(β·avg logp(chosen) - β·avg logp(rejected) - γ); no reference model."""
    losses = -F.logsigmoid(beta * (chosen_avg - rejected_avg) - gamma)
    return losses, (beta * chosen_avg).detach(), (beta * rejected_avg).detach()


def kto_loss(policy_logps, ref_logps, desirable, policy_kl_logps, ref_kl_logps, beta: float,
             chosen_weight: float = 1.0, rejected_weight: float = 1.0, kl: torch.Tensor | None = None):
    """KTO (Ethayarajh et al., 2024) on unpaired examples tagged desirable or not.

    A desirable response's value is σ(β(r - z)), an undesirable one's σ(β(z - r)), with r the policy's
    log-ratio over the reference and z the reference point: the KL estimate from mismatched
    prompt/response pairs (clamped at zero, no gradient). The loss is weight · (1 - value).
    `kl` overrides the batch's own estimate (the trainer passes one averaged over all workers).
    Returns (per-example losses, per-example rewards β·r, the KL estimate used).
    """
    if kl is None:
        kl = (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()
    ratio = policy_logps - ref_logps
    desirable = desirable.bool()
    value = torch.where(desirable, torch.sigmoid(beta * (ratio - kl)), torch.sigmoid(beta * (kl - ratio)))
    weight = torch.where(desirable, torch.full_like(ratio, chosen_weight), torch.full_like(ratio, rejected_weight))
    return weight * (1 - value), (beta * ratio).detach(), kl


def pairwise_ranking_loss(chosen_scores, rejected_scores):
    """The reward model's Bradley-Terry loss: -log σ(r(chosen) - r(rejected))."""
    return -F.logsigmoid(chosen_scores - rejected_scores)


def _implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """DPO's implicit rewards β·(log π - log π_ref) of each side, without gradient."""
    return (beta * (policy_chosen - ref_chosen)).detach(), (beta * (policy_rejected - ref_rejected)).detach()


# stage dpo's pref_loss -> loss; the first four compare against a reference model
REFERENCE_LOSSES = {"sigmoid": sigmoid_loss, "hinge": hinge_loss, "ipo": ipo_loss, "kto_pair": kto_pair_loss}
REFERENCE_FREE_LOSSES = {"orpo": orpo_loss, "simpo": simpo_loss}
# losses computed on per-token average log-probabilities (policy and reference), not sums
LENGTH_AVERAGED = frozenset({"ipo", "orpo", "simpo"})
