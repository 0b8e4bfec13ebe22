"""Stage `grpo`: the critic-free, group-baseline methods (GRPO, Dr. GRPO, RLOO, REINFORCE++) inside every Ray Train
worker under DDP. Each step samples `num_generations` completions for each of the step's prompts (in the worker, or
on the rollout actors), scores them with the recipe's rewards, turns the scores into advantages
(advantage_estimator), and makes `ppo_epochs` clipped updates on them, with a KL term to the reference when beta > 0.
"""

import contextlib
import json
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from peft import PeftModel
from transformers import set_seed

from rayft.recipe.config import RecipeConfig
from rayft.recipe.derive import grpo_loss_type, reward_names
from rayft.recipe.logs import logger
from rayft.recipe.plan import Plan
from rayft.trainers import rl
from rayft.trainers.common import peak_memory, training_arguments
from rayft.trainers.generate import left_padded
from rayft.trainers.model import load_tokenizer, prepare_model, trainable_summary
from rayft.trainers.online import OnlineTrainer, averaged, finish, summed
from rayft.trainers.ppo import reference_here, reward_model_here
from rayft.trainers.rewards import model_logprobs, response_logits, right_padded, token_logprobs
from rayft.trainers.rollout import ActorRollouts, LocalRollouts, Sampled, Sampler, sample_seed
from rayft.trainers.shards import train_shard
from rayft.trainers.tracking import prepare_trackers
from rayft.trainers.verifiable import Rewards

COMPLETIONS_FILE = "completions.jsonl"
ROLLOUT_ACTORS_FILE = "rollout_actors.json"


class GRPOTrainer(OnlineTrainer):
    """Sample groups, score, group-relative advantages, `ppo_epochs` clipped updates; the policy's weights go to
    the rollout actors after each step."""

    state_file = "grpo_state.pt"

    def __init__(self, cfg: RecipeConfig, plan: Plan, args, policy, tokenizer, rewards: Rewards, reference, rollouts,
                 device):
        super().__init__(cfg, plan, args, policy, policy, tokenizer, device)
        self.rewards, self.reference, self.rollouts = rewards, reference, rollouts
        self.ddp = torch.nn.parallel.DistributedDataParallel(policy) if self.world > 1 else policy
        f = cfg.finetuning
        self.group, self.loss_type = f.num_generations, grpo_loss_type(f)
        self.epsilon_high = f.epsilon if f.epsilon_high is None else f.epsilon_high
        self.temperature = cfg.generating.temperature
        self.pending: list[dict] | None = None  # the prompt rows the rollouts are sampling (async_rollouts)

    # ---- sampling -----------------------------------------------------------------------------------------
    def weights(self) -> dict:
        """The trainable parameters (a LoRA adapter's, the trained blocks', or all), for the rollout actors."""
        return {name: p.detach().cpu() for name, p in self.policy.named_parameters() if p.requires_grad}

    def next_rollout(self, batches) -> tuple[list[dict], Sampled]:
        """The next batch of prompt rows and their completions. In step with the policy, or with async_rollouts one
        step behind it: the actors sample the following batch with the current weights while this one is learnt."""
        step = self.state.global_step
        if self.pending is None:
            self.rollouts.publish(self.weights, step)
            self.pending = next(batches)
            self.rollouts.submit([row["input_ids"] for row in self.pending], self.sample_seed(step))
        rows, sampled = self.pending, self.rollouts.collect()
        self.pending = None
        if self.cfg.finetuning.async_rollouts and step + 1 < self.state.max_steps:
            self.rollouts.publish(self.weights, step)
            self.pending = next(batches)
            self.rollouts.submit([row["input_ids"] for row in self.pending], self.sample_seed(step + 1))
        return rows, sampled

    def sample_seed(self, step: int) -> int:
        return sample_seed(self.args.seed, step, self.args.process_index)

    # ---- one step -----------------------------------------------------------------------------------------
    def step(self, batches) -> dict[str, float]:
        f, args = self.cfg.finetuning, self.args
        rows, sampled = self.next_rollout(batches)
        prompts = [row["input_ids"] for row in rows for _ in range(self.group)]
        completions = sampled.completions
        pad = self.tokenizer.pad_token_id
        prompt_ids, prompt_mask = left_padded(prompts, pad, self.device)
        completion_ids, mask = right_padded(completions, pad, self.device)
        input_ids, attention_mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, mask], 1)
        length, mask = prompt_ids.shape[1], mask.float()

        scores, table = self.score(rows, prompts, completions)
        micro = args.per_device_train_batch_size
        batches_of = [slice(start, start + micro) for start in range(0, len(completions), micro)]
        old = None
        if sampled.logprobs is not None:
            old = right_padded([list(map(float, lp)) for lp in sampled.logprobs], 0, self.device)[0].float()
        elif f.ppo_epochs > 1:  # later passes compare with the policy that sampled: keep its log-probabilities
            old = self.measure(self.policy, input_ids, attention_mask, length, batches_of)
        ref = None
        if self.reference is not None:
            ref = torch.cat([self.reference(input_ids[b], attention_mask[b], length, self.temperature).float()
                             for b in batches_of])
        if f.advantage_estimator == "reinforce_pp":
            behaviour = old if old is not None else self.measure(self.policy, input_ids, attention_mask, length,
                                                                 batches_of)
            advantages = rl.reinforce_pp_advantages(scores, behaviour, ref, mask, f.beta, total=summed)
            beta = 0.0  # the KL is in REINFORCE++'s reward, not in its loss
        else:
            advantages, beta = rl.group_advantages(scores, self.group, f.advantage_estimator), f.beta
        tokens_in_step = summed(mask.sum()).item() / self.world
        totals = {"loss": 0.0, "clip_ratio": 0.0, "entropy": 0.0, "kl": 0.0}
        self.policy.train()
        for _ in range(f.ppo_epochs):
            for index, rows_of in enumerate(batches_of):
                last = index == len(batches_of) - 1
                # gradients are averaged over the workers once per update, on its last micro-batch
                with self.ddp.no_sync() if self.world > 1 and not last else contextlib.nullcontext():
                    logits = response_logits(self.ddp, input_ids[rows_of], attention_mask[rows_of], length)
                    logprobs = token_logprobs(logits, input_ids[rows_of, length:], self.temperature)
                    losses, stats = rl.grpo_token_losses(
                        logprobs, logprobs.detach() if old is None else old[rows_of], advantages[rows_of],
                        None if ref is None else ref[rows_of], beta, f.epsilon, self.epsilon_high)
                    loss = rl.aggregate(losses, mask[rows_of], self.loss_type, self.cfg.generating.max_new_tokens,
                                        tokens_in_step)
                    if self.loss_type != "dapo":
                        loss = loss / len(batches_of)  # the mean over the step's micro-batches
                    loss.backward()
                m = mask[rows_of]
                with torch.no_grad():
                    share = m.sum().item() / max(mask.sum().item(), 1) / f.ppo_epochs
                    totals["loss"] += loss.item() / f.ppo_epochs
                    totals["clip_ratio"] += rl.masked_mean(stats["clip_low"] + stats["clip_high"], m).item() * share
                    totals["entropy"] += rl.masked_mean(entropy(logits, self.temperature), m).item() * share
                    if "kl" in stats:
                        totals["kl"] += rl.masked_mean(stats["kl"], m).item() * share
            if args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), args.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        stats = {**totals, "reward": scores.mean().item(), "reward_std": scores.std().item(),
                 **{f"rewards/{name}": table[:, i].mean().item() for i, name in enumerate(self.rewards.functions)},
                 **{f"rewards/{name}_std": table[:, i].std().item() for i, name in enumerate(self.rewards.functions)},
                 "completion_length": mask.sum(1).mean().item(),
                 "rollout_lag": float(self.state.global_step - sampled.version)}
        stats = averaged(stats)  # over every worker's batch
        self.record_completions(rows, completions, scores, table)
        return stats

    def score(self, rows: list[dict], prompts: list[list[int]], completions: list[list[int]]):
        """The weighted reward of every completion and each reward's own, from the decoded texts."""
        prompt_texts = self.tokenizer.batch_decode(prompts, skip_special_tokens=False)
        completion_texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        total, table = self.rewards.score(prompt_texts, completion_texts, reward_columns(rows, self.group, prompts,
                                                                                          completions))
        return total.to(self.device), table

    @torch.no_grad()
    def measure(self, model, input_ids, attention_mask, length: int, batches_of) -> torch.Tensor:
        """The log-probabilities `model` gives the completions, micro-batch by micro-batch."""
        return torch.cat([model_logprobs(model, input_ids[rows_of], attention_mask[rows_of], length, self.temperature)
                          .float() for rows_of in batches_of])

    def record_completions(self, rows, completions, scores, table) -> None:
        """Every log_completions_steps steps, rank 0 appends its first prompt's group to completions.jsonl."""
        every, step = self.cfg.finetuning.log_completions_steps, self.state.global_step + 1
        if not every or step % every or self.args.process_index != 0:
            return
        names = list(self.rewards.functions)
        record = {"step": step, "prompt": self.tokenizer.decode(rows[0]["input_ids"], skip_special_tokens=False),
                  "answer": rows[0].get("answer"),
                  "completions": [{"text": self.tokenizer.decode(completions[i], skip_special_tokens=True),
                                   "reward": round(scores[i].item(), 6),
                                   "rewards": {n: round(table[i, j].item(), 6) for j, n in enumerate(names)}}
                                  for i in range(self.group)]}
        with open(Path(self.args.output_dir) / COMPLETIONS_FILE, "a", encoding="utf-8") as out:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")

    def save_model(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(self.policy, PeftModel):
            self.policy.save_pretrained(str(folder), selected_adapters=["default"])  # not a reward adapter
        else:
            self.policy.save_pretrained(str(folder))


# what a reward function is given besides the dataset's columns; a dataset column of one of these names is not passed
GIVEN = ("prompts", "completions", "completion_ids", "sequences")


def reward_columns(rows: list[dict], group: int, prompts: list[list[int]], completions: list[list[int]]) -> dict:
    """The keyword arguments of the reward functions, one value per completion: `answer` (the example's response,
    unless its row has a column of that name), the row's other columns (None where a row lacks one), and the token
    ids."""
    others = [{"answer": row.get("answer"), **json.loads(row.get("columns") or "{}")} for row in rows]
    names = dict.fromkeys(name for columns in others for name in columns if name not in GIVEN)
    columns = {name: [row_columns.get(name) for row_columns in others for _ in range(group)] for name in names}
    return {**columns, "completion_ids": completions, "sequences": [p + c for p, c in zip(prompts, completions)]}


def entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The entropy of each completion token's sampling distribution (logits / temperature)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def rollouts_of(cfg: RecipeConfig, plan: Plan, policy, tokenizer, device):
    """The worker's rollouts: its rollout actor's client, or sampling with the policy it trains."""
    if plan.rollout_actors:
        return ActorRollouts(list(plan.rollout_actors), ray.train.get_context().get_world_rank())
    return LocalRollouts(Sampler(policy, tokenizer, cfg, device))


def run_grpo(cfg: RecipeConfig, plan: Plan) -> dict:
    """GRPO-family training on this worker's shard of prompts; saves the policy; returns the final metrics."""
    args = training_arguments(cfg, plan)
    set_seed(args.seed)
    device = ray.train.torch.get_device()
    tokenizer = load_tokenizer(cfg.model)
    policy = prepare_model(cfg, plan.use_gpu).to(device)
    f = cfg.finetuning
    named = reward_names(f)
    reward_model = reward_model_here(cfg, plan, policy, tokenizer, device) if "reward_model" in named else None
    rewards = Rewards.of(cfg, reward_model)
    reference = reference_here(cfg, plan, policy, device) if f.beta > 0 else None
    rollouts = rollouts_of(cfg, plan, policy, tokenizer, device)
    if args.process_index == 0:
        logger.info(f"{f.finetuning_type}: {trainable_summary(policy)}")
        logger.info(f"grpo: {f.advantage_estimator} advantages over groups of {f.num_generations}, loss_type "
                    f"{grpo_loss_type(f)}; rewards {', '.join(rewards.functions)}; reference: "
                    f"{reference.description if reference is not None else 'none (beta 0)'}; sampling "
                    f"{rollouts.description}")
    prepare_trackers(cfg, args.output_dir)
    trainer = GRPOTrainer(cfg, plan, args, policy, tokenizer, rewards, reference, rollouts, device)
    steps = trainer.train(train_shard(cfg, plan))
    if isinstance(rollouts, ActorRollouts) and args.process_index == 0:
        (Path(args.output_dir) / ROLLOUT_ACTORS_FILE).write_text(json.dumps(rollouts.where(), indent=1))
    metrics = {"train_steps": steps, **{f"training_{k}": v for k, v in peak_memory().items()}}
    return finish(trainer, cfg, plan, tokenizer, metrics)
