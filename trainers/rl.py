"""The online stages' arithmetic as pure functions over per-token tensors. PPO's: KL-penalised rewards, GAE, the
clipped policy and value losses, and the KL coefficient controllers (Ziegler et al., 2019; Schulman et al., 2017).
The GRPO family's: group-relative advantages and the clipped surrogate with TRL's token aggregations.

Shapes: [batch, response tokens]; `mask` is 1 on response tokens and 0 on padding after them. These are the
pieces `trainers/ppo.py` and `trainers/grpo.py` are built from.
"""

from dataclasses import dataclass

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Values scaled to unit variance over the masked entries (and centred, with `shift_mean`)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def kl_penalised_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef x (log pi - log pi_ref) on every response token, plus the sequence's score
    on its last token. Returns (rewards, per-sequence KL estimate)."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.sum(dim=1).long().clamp(min=1) - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl.sum(dim=1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016), backwards over each response:
    δ_t = r_t + γ·V_{t+1} - V_t and A_t = δ_t + γλ·A_{t+1}, with V and A zero past the response's end.
    Returns (advantages, returns = advantages + values)."""
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantages[:, t]
    return advantages, (advantages + values) * mask


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_range: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate: mean of max(-A·r, -A·clip(r, 1-ε, 1+ε)), r = π/π_old per token.
    Returns (loss, share of tokens where the clipped term was taken)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip_range: float = 0.2) -> torch.Tensor:
    """Half the mean of max((V - R)², (V_clipped - R)²), V_clipped within ε of the value at rollout time."""
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


@dataclass
class AdaptiveKLController:
    """Adaptive KL control (Ziegler et al., 2019): the coefficient grows when the measured KL is above
    `target` and shrinks below it, by at most 20% of the error per `horizon` samples."""

    value: float
    target: float
    horizon: int = 10_000

    def update(self, current_kl: float, samples: int) -> float:
        error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + error * samples / self.horizon
        return self.value


@dataclass
class RunningMoments:
    """The mean and standard deviation of every score seen so far (ppo_score_norm), merged batch by batch
    (Chan et al.'s parallel update); starts at mean 0, std 1."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 1e-24

    def update(self, values: torch.Tensor) -> None:
        values = values.double()
        n, batch_mean = values.numel(), values.mean().item()
        batch_var = values.var(unbiased=False).item() if n > 1 else 0.0
        total = self.count + n
        delta = batch_mean - self.mean
        self.var = (self.var * self.count + batch_var * n + delta ** 2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        return max(self.var, 1e-12) ** 0.5


# ---- the GRPO family ---------------------------------------------------------------------------------------

def group_advantages(scores: torch.Tensor, group_size: int, estimator: str) -> torch.Tensor:
    """One advantage per completion from its group's scores (completions of one prompt are consecutive).

    - grpo: (r - group mean) / (group std + 1e-4), the std unbiased (Shao et al., 2024; TRL's scale_rewards=group);
    - dr_grpo: r - group mean, no std (Liu et al., 2025);
    - rloo: r minus the mean of the other completions of its group, G/(G-1) x (r - group mean) (Ahmadian et al.,
      2024).
    reinforce_pp works per token over the whole batch: see `reinforce_pp_advantages`.
    """
    groups = scores.view(-1, group_size).double()
    centred = groups - groups.mean(dim=1, keepdim=True)
    if estimator == "grpo":
        advantages = centred / (groups.std(dim=1, keepdim=True) + 1e-4)
    elif estimator == "dr_grpo":
        advantages = centred
    elif estimator == "rloo":
        advantages = centred * group_size / (group_size - 1)
    else:
        raise ValueError(f"no group advantage for estimator {estimator!r}")
    return advantages.view(-1).to(scores.dtype)


def reinforce_pp_advantages(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
                            mask: torch.Tensor, kl_coef: float, total=lambda t: t) -> torch.Tensor:
    """REINFORCE++ (Hu, 2025): each token's return is the sequence's score minus kl_coef x the KL estimate
    (log pi - log pi_ref) of this and every later token (gamma 1), whitened over every response token of the global
    batch. `total` sums a tensor over the workers (identity on one); the KL sits in the reward, not the loss."""
    kl = (logprobs - ref_logprobs) * mask if ref_logprobs is not None and kl_coef else torch.zeros_like(logprobs)
    rewards = -kl_coef * kl
    last = mask.sum(dim=1).long().clamp(min=1) - 1
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    returns = rewards.flip(1).cumsum(1).flip(1) * mask
    count, first, second = total(torch.stack([mask.sum(), returns.sum(), (returns ** 2 * mask).sum()]).double())
    mean = first / count.clamp(min=1)
    variance = second / count.clamp(min=1) - mean ** 2
    return ((returns - mean) * torch.rsqrt(variance.clamp(min=0) + 1e-8) * mask).to(logprobs.dtype)


def grpo_token_losses(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      ref_logprobs: torch.Tensor | None, beta: float, epsilon: float,
                      epsilon_high: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss of the clipped surrogate: -min(r·A, clip(r, 1-ε, 1+ε_high)·A) + β·r·KL, where r = π/π_old and
    KL is the k3 estimate exp(ref - logp) - (ref - logp) - 1 (Schulman's), weighted by r because the tokens were
    sampled from π_old (TRL's GRPOTrainer computes the same, its use_bias_correction_kl default).
    `advantages` is [batch] (one per completion) or [batch, tokens]. Returns (losses, per-token statistics)."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon_high)
    losses = -torch.min(ratio * advantages, clipped * advantages)
    stats = {"clip_low": ((ratio < 1 - epsilon) & (advantages < 0)).float(),
             "clip_high": ((ratio > 1 + epsilon_high) & (advantages > 0)).float()}
    if beta:
        delta = ref_logprobs - logprobs
        stats["kl"] = torch.exp(delta) - delta - 1
        losses = losses + beta * stats["kl"] * ratio
    return losses, stats


def aggregate(losses: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int,
              tokens_in_step: float | None = None) -> torch.Tensor:
    """One micro-batch's loss from its token losses, as TRL's loss_type names the ways:
    - grpo: mean over each sequence's tokens, then over sequences (long answers weigh less per token);
    - bnpo: mean over the micro-batch's tokens;
    - dr_grpo: sum over tokens / (sequences x max_completion_length), a constant (no length bias);
    - dapo: sum over tokens / `tokens_in_step`, the tokens of the whole optimizer step on all workers divided by the
      number of workers (TRL's normaliser): once DDP averages the gradients, every token of the step weighs the same.
    grpo, bnpo and dr_grpo are the mean of one micro-batch: the caller divides by gradient accumulation."""
    masked = losses * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return masked.sum() / (losses.shape[0] * max_completion_length)
    if loss_type == "dapo":
        return masked.sum() / max(tokens_in_step or 0.0, 1.0)
    raise ValueError(f"unknown loss_type {loss_type!r}")
