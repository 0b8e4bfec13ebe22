"""Stage `ppo`: the policy answers its shard's prompts, a reward model scores the answers, and PPO updates the
policy and a value head on them (Ziegler et al., 2019), inside every Ray Train worker under DDP.

The reward model is an adapter on the policy's own base (`lora`), a whole model (`full`) in this worker or
in a group of Ray actors of its own (reward_model_workers), or an HTTP endpoint (`api`). The reference is
the base model without the policy's adapter, or a frozen copy (freeze / full fine-tuning). The loop drives
Transformers' callbacks, so the log, the trackers and Ray Train's checkpoints work as in the other stages.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import set_seed

from rayft.recipe.config import RecipeConfig
from rayft.recipe.derive import prompts_per_step, reference_kind
from rayft.recipe.logs import logger
from rayft.recipe.plan import Plan
from rayft.recipe.values import VALUE_HEAD_FILE
from rayft.trainers import rl
from rayft.trainers.common import peak_memory, training_arguments
from rayft.trainers.generate import cut_at_stop, generation_kwargs, left_padded, stop_token_ids
from rayft.trainers.model import load_reference, load_tokenizer, prepare_model, trainable_summary
from rayft.trainers.online import OnlineTrainer, averaged, finish, gathered
from rayft.trainers.rewards import (
    ActorReference,
    ActorReward,
    AdapterReward,
    ApiReward,
    ModelReward,
    model_logprobs,
    positions,
    response_logprobs,
    right_padded,
)
from rayft.trainers.shards import train_shard
from rayft.trainers.tracking import prepare_trackers

REWARD_ACTORS_FILE = "reward_actors.json"
# TRL's PPO defaults, which LLaMA-Factory keeps: the value loss weight, both clip ranges, GAE's γ and λ, and
# the KL coefficient the adaptive controller starts from
VALUE_LOSS_COEF, CLIP_RANGE, CLIP_RANGE_VALUE, GAMMA, LAM, INIT_KL_COEF = 0.1, 0.2, 0.2, 1.0, 0.95, 0.2


class PolicyWithValueHead(torch.nn.Module):
    """The causal LM (with its adapter) plus a scalar value head on its last hidden states."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy
        self.v_head = torch.nn.Linear(policy.config.hidden_size, 1)
        torch.nn.init.normal_(self.v_head.weight, std=1 / (policy.config.hidden_size + 1))
        torch.nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids, attention_mask):
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                          output_hidden_states=True)
        return out.logits, self.v_head(out.hidden_states[-1].to(self.v_head.weight.dtype)).squeeze(-1)


@dataclass
class Rollout:
    """One batch of answered prompts: prompt left-padded to `prompt_length`, response right-padded after it."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int
    mask: torch.Tensor  # [batch, response] 1 on response tokens
    logprobs: torch.Tensor
    values: torch.Tensor
    ref_logprobs: torch.Tensor
    scores: torch.Tensor


class PPOTrainer(OnlineTrainer):
    """PPO over this worker's prompts: rollout, score, advantages, `ppo_epochs` of clipped updates."""

    state_file = "ppo_state.pt"

    def __init__(self, cfg: RecipeConfig, plan: Plan, args, model: PolicyWithValueHead, tokenizer, reward, reference,
                 device):
        super().__init__(cfg, plan, args, model, model.policy, tokenizer, device)
        self.reward, self.reference = reward, reference
        self.ddp = torch.nn.parallel.DistributedDataParallel(model) if self.world > 1 else model
        f, g = cfg.finetuning, cfg.generating
        self.stops = stop_token_ids(tokenizer, cfg)
        self.generate_kwargs = generation_kwargs(g, self.stops, tokenizer.pad_token_id)
        self.temperature = g.temperature if g.do_sample else 1.0  # rollouts sample from logits / temperature
        self.kl_control = rl.AdaptiveKLController(INIT_KL_COEF, f.ppo_target)
        self.score_moments = rl.RunningMoments()

    # ---- one step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: list[list[int]]) -> Rollout:
        """Answers `prompts` with the policy and measures everything PPO needs about the answers."""
        pad = self.tokenizer.pad_token_id
        prompt_ids, prompt_mask = left_padded(prompts, pad, self.device)
        longest = prompt_ids.shape[1]
        self.model.eval()
        generated = self.model.policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True,
                                               **self.generate_kwargs)
        responses = [cut_at_stop(row.tolist(), self.stops) for row in generated[:, longest:]]
        response_ids, mask = right_padded(responses, pad, self.device)
        input_ids = torch.cat([prompt_ids, response_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, mask], dim=1)
        logits, values = self.model(input_ids, attention_mask)
        logprobs = response_logprobs(logits, input_ids, longest, self.temperature)
        ref_logprobs = self.reference(input_ids, attention_mask, longest, self.temperature)
        sequences = [p + r for p, r in zip(prompts, responses)]
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=False)
        scores = self.reward(texts, sequences).to(self.device, torch.float32)
        return Rollout(input_ids, attention_mask, longest, mask.float(), logprobs, values[:, longest - 1:-1].float(),
                       ref_logprobs.to(self.device), scores)

    def learn(self, rollout: Rollout) -> dict[str, float]:
        """PPO's update: KL-penalised rewards, GAE, then ppo_epochs passes of clipped losses in mini-batches."""
        f, args = self.cfg.finetuning, self.args
        scores = rollout.scores
        if f.ppo_score_norm:
            self.score_moments.update(gathered(scores))  # every worker updates with the same global batch
            scores = (scores - self.score_moments.mean) / self.score_moments.std
        mask = rollout.mask
        rewards, kl = rl.kl_penalised_rewards(scores, rollout.logprobs, rollout.ref_logprobs, mask,
                                              self.kl_control.value)
        if f.ppo_whiten_rewards:
            rewards = rl.whiten(rewards, mask, shift_mean=False)
        advantages, returns = rl.gae(rewards, rollout.values, mask, GAMMA, LAM)
        advantages = rl.whiten(advantages, mask)
        self.model.train()
        totals = {"policy_loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0}
        micro, accumulation, updates = args.per_device_train_batch_size, args.gradient_accumulation_steps, 0
        order_seed = self.args.seed + self.state.global_step
        for epoch in range(f.ppo_epochs):
            order = torch.randperm(len(scores), generator=torch.Generator().manual_seed(order_seed * 1000 + epoch))
            for start in range(0, len(order), micro):
                rows = order[start:start + micro].to(self.device)
                logits, values = self.ddp(rollout.input_ids[rows], rollout.attention_mask[rows])
                p = rollout.prompt_length
                logprobs = response_logprobs(logits, rollout.input_ids[rows], p, self.temperature)
                policy_loss, clipfrac = rl.clipped_policy_loss(logprobs, rollout.logprobs[rows], advantages[rows],
                                                               mask[rows], CLIP_RANGE)
                value_loss = rl.clipped_value_loss(values[:, p - 1:-1].float(), rollout.values[rows], returns[rows],
                                                   mask[rows], CLIP_RANGE_VALUE)
                ((policy_loss + VALUE_LOSS_COEF * value_loss) / accumulation).backward()
                updates += 1
                if updates % accumulation == 0:
                    if args.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                for key, value in (("policy_loss", policy_loss), ("value_loss", value_loss), ("clipfrac", clipfrac)):
                    totals[key] += value.item() / (f.ppo_epochs * -(-len(order) // micro))
        self.scheduler.step()
        mean_kl = kl.mean().item()
        stats = {
            "reward": rollout.scores.mean().item(),
            "kl": mean_kl,
            "response_length": mask.sum(dim=1).mean().item(),
            **totals,
        }
        stats = averaged(stats)  # over every worker's batch
        stats["loss"] = stats["policy_loss"] + VALUE_LOSS_COEF * stats["value_loss"]
        stats["kl_coef"] = self.kl_control.value
        self.kl_control.update(stats["kl"], prompts_per_step(self.cfg) * self.world)
        return stats

    def step(self, batches) -> dict[str, float]:
        return self.learn(self.rollout([row["input_ids"] for row in next(batches)]))

    def save_model(self, folder: Path) -> None:
        save_policy(self.model, folder)

    def extra_state(self) -> dict:
        return {"kl_coef": self.kl_control.value, "score_moments": vars(self.score_moments)}

    def load_extra_state(self, state: dict) -> None:
        self.kl_control.value = state["kl_coef"]
        vars(self.score_moments).update(state["score_moments"])


def save_policy(model: PolicyWithValueHead, folder: Path) -> None:
    """The policy as `from_pretrained` loads it (the adapter alone for lora and oft) and its value head in
    value_head.safetensors (LLaMA-Factory's layout)."""

    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(model.policy, PeftModel):
        model.policy.save_pretrained(str(folder), selected_adapters=["default"])  # not the reward adapter
    else:
        model.policy.save_pretrained(str(folder))
    save_file({"v_head.summary.weight": model.v_head.weight.detach().float().cpu().contiguous(),
               "v_head.summary.bias": model.v_head.bias.detach().float().cpu().contiguous()},
              str(folder / VALUE_HEAD_FILE))


class AdapterOff:
    """The reference of a policy trained with an adapter: the same model with the adapter switched off."""

    description = "the base model without the policy's adapter"

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, input_ids, attention_mask, prompt_length: int, temperature: float) -> torch.Tensor:
        with self.policy.disable_adapter():
            return model_logprobs(self.policy, input_ids, attention_mask, prompt_length, temperature)


class FrozenCopy:
    """The reference of a freeze or full policy: a frozen copy of the base model (or ref_model) in this worker."""

    def __init__(self, cfg: RecipeConfig, use_gpu: bool, device):
        self.model = load_reference(cfg, use_gpu).to(device)
        self.description = f"a frozen copy of {cfg.finetuning.ref_model or cfg.model.model_name_or_path}"

    def __call__(self, input_ids, attention_mask, prompt_length: int, temperature: float) -> torch.Tensor:
        return model_logprobs(self.model, input_ids, attention_mask, prompt_length, temperature)


def reward_model_here(cfg: RecipeConfig, plan: Plan, policy, tokenizer, device):
    """The reward model (reward_model_type lora, full or api) as this worker uses it."""
    f = cfg.finetuning
    return {"lora": lambda: AdapterReward(policy, f.reward_model, tokenizer.pad_token_id, device),
            "full": lambda: ModelReward(cfg, plan.use_gpu),
            "api": lambda: ApiReward(f.reward_model)}[f.reward_model_type]()


def reference_here(cfg: RecipeConfig, plan: Plan, policy, device):
    """The reference in this worker: a frozen copy, or the policy with its adapter switched off."""
    return FrozenCopy(cfg, plan.use_gpu, device) if reference_kind(cfg) == "copy" else AdapterOff(policy)


def reward_and_reference(cfg: RecipeConfig, plan: Plan, policy, tokenizer, device):
    """The reward function and the reference this worker uses, in this process or on the reward actors."""
    actors = plan.reward_actors
    if actors:
        reward = ActorReward(actors, ray.train.get_context().get_world_rank())
        return reward, ActorReference(reward) if reference_kind(cfg) == "actor" else AdapterOff(policy)
    return reward_model_here(cfg, plan, policy, tokenizer, device), reference_here(cfg, plan, policy, device)


def run_ppo(cfg: RecipeConfig, plan: Plan) -> dict:
    """PPO on this worker's shard of prompts; saves the policy and its value head; returns the final metrics."""

    args = training_arguments(cfg, plan)
    set_seed(args.seed)
    device = ray.train.torch.get_device()
    tokenizer = load_tokenizer(cfg.model)
    policy = prepare_model(cfg, plan.use_gpu)
    reward, reference = reward_and_reference(cfg, plan, policy, tokenizer, device)
    model = PolicyWithValueHead(policy).to(device)
    if args.process_index == 0:
        logger.info(f"{cfg.finetuning.finetuning_type}: {trainable_summary(policy)}; value head "
            f"{sum(p.numel() for p in model.v_head.parameters())} params")
        logger.info(f"ppo reward: {reward.description}; reference: {reference.description}")
    prepare_trackers(cfg, args.output_dir)
    trainer = PPOTrainer(cfg, plan, args, model, tokenizer, reward, reference, device)
    steps = trainer.train(train_shard(cfg, plan))
    if isinstance(reward, ActorReward) and args.process_index == 0:  # where the scores came from, and how many
        (Path(args.output_dir) / REWARD_ACTORS_FILE).write_text(json.dumps(reward.where(), indent=1))
    metrics = {"train_steps": steps, **{f"training_{k}": v for k, v in peak_memory().items()}}
    return finish(trainer, cfg, plan, tokenizer, metrics)
