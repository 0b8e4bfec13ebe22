"""PPO's arithmetic as pure functions over per-token tensors: KL-penalised rewards, GAE, the clipped policy
and value losses, and the KL coefficient controllers (Ziegler et al., 2019; Schulman et al., 2017).

Shapes: [batch, response tokens]; `mask` is 1 on response tokens and 0 on padding after them. These are the
pieces `trainers/ppo.py` is built from.
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
