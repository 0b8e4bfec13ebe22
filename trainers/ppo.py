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
from ray.train.huggingface.transformers import RayTrainReportCallback
from safetensors.torch import save_file
from transformers import get_scheduler, set_seed
from transformers.trainer_callback import CallbackHandler, TrainerControl, TrainerState

from rayft.recipe.config import RecipeConfig
from rayft.recipe.derive import reference_kind
from rayft.recipe.logs import logger
from rayft.recipe.plan import Plan
from rayft.recipe.values import VALUE_HEAD_FILE
from rayft.trainers import outputs, rl
from rayft.trainers.callbacks import LogCallback, ReportEveryLog
from rayft.trainers.common import ShardStream, peak_memory, restored_checkpoint, train_shard, training_arguments
from rayft.trainers.generate import cut_at_stop, generation_kwargs, left_padded, stop_token_ids
from rayft.trainers.model import load_reference, load_tokenizer, prepare_model, trainable_summary
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
from rayft.trainers.tracking import close_trackers, prepare_trackers, tracker_callbacks

STATE_FILE = "ppo_state.pt"
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


class PPOTrainer:
    """PPO over this worker's prompts: rollout, score, advantages, `ppo_epochs` of clipped updates."""

    def __init__(self, cfg: RecipeConfig, plan: Plan, args, model: PolicyWithValueHead, tokenizer, reward, reference,
                 device):
        self.cfg, self.plan, self.args, self.tokenizer = cfg, plan, args, tokenizer
        self.reward, self.reference = reward, reference
        self.device, self.model = device, model
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.ddp = torch.nn.parallel.DistributedDataParallel(model) if self.world > 1 else model
        f, g = cfg.finetuning, cfg.generating
        self.stops = stop_token_ids(tokenizer, cfg)
        self.generate_kwargs = generation_kwargs(g, self.stops, tokenizer.pad_token_id)
        self.temperature = g.temperature if g.do_sample else 1.0  # rollouts sample from logits / temperature
        self.batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * f.ppo_buffer_size
        self.kl_control = rl.AdaptiveKLController(INIT_KL_COEF, f.ppo_target)
        self.score_moments = rl.RunningMoments()
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                           eps=args.adam_epsilon, weight_decay=args.weight_decay)
        total = plan.total_steps
        self.scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer, args.get_warmup_steps(total), total)
        self.state = TrainerState(max_steps=total, logging_steps=args.logging_steps, save_steps=args.save_steps,
                                  is_world_process_zero=args.process_index == 0,
                                  is_local_process_zero=args.local_process_index == 0)
        self.control = TrainerControl()
        callbacks = [LogCallback(args.output_dir, plan.progress_board), *tracker_callbacks(args.report_to)]

        callbacks += [RayTrainReportCallback(), *([ReportEveryLog()] if plan.report_every_log else [])]
        self.callbacks = CallbackHandler(callbacks, model.policy, tokenizer, self.optimizer, self.scheduler)

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
        self.kl_control.update(stats["kl"], self.batch_size * self.world)
        return stats

    # ---- the run --------------------------------------------------------------------------------------
    def train(self, prompts: ShardStream) -> int:
        """Runs total_steps PPO steps over this worker's share of the prompts, logging and checkpointing as the
        Trainer would; returns the steps done."""
        args, plan = self.args, self.plan
        resumed = restored_checkpoint() or args.resume_from_checkpoint
        if resumed:
            self.restore(resumed)
        self.callbacks.on_train_begin(args, self.state, self.control)
        stream = prompt_stream(prompts)
        batches = iter(lambda: [next(stream) for _ in range(self.batch_size)], None)
        for _ in range(self.state.global_step * self.batch_size):  # a resumed run continues where it stopped
            next(stream)
        window: list[dict] = []
        while self.state.global_step < self.state.max_steps:
            stats = self.learn(self.rollout(next(batches)))
            self.state.global_step += 1
            self.state.epoch = self.state.global_step / max(plan.steps_per_epoch, 1)
            window.append(stats)
            step = self.state.global_step
            if step % args.logging_steps == 0 or step == self.state.max_steps:
                self.log({k: round(sum(s[k] for s in window) / len(window), 6) for k in window[0]}
                         | {"learning_rate": self.scheduler.get_last_lr()[0]})
                window = []
            if args.save_strategy == "steps" and (step % args.save_steps == 0 or step == self.state.max_steps):
                self.save_checkpoint()
        return self.state.global_step

    def log(self, logs: dict) -> None:
        logs = {**logs, "epoch": round(self.state.epoch, 4)}
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control = self.callbacks.on_log(self.args, self.state, self.control, logs)

    def save_checkpoint(self) -> None:
        """checkpoint-<step>/ with the policy and value head as the run saves them, plus what resuming needs;
        Ray Train's callback then reports it to storage."""
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        if self.args.process_index == 0:
            save_policy(self.model, folder)
            trainable = {name: p.detach().cpu() for name, p in self.model.named_parameters() if p.requires_grad}
            torch.save({"trainable": trainable, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "kl_coef": self.kl_control.value,
                        "score_moments": vars(self.score_moments), "global_step": self.state.global_step,
                        "log_history": self.state.log_history}, folder / STATE_FILE)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank reports the checkpoint rank 0 wrote
        self.control = self.callbacks.on_save(self.args, self.state, self.control)

    def restore(self, folder: str) -> None:
        if not (Path(folder) / STATE_FILE).is_file():
            raise RuntimeError(f"resume_from_checkpoint: {folder} is not a checkpoint of a ppo run (it has no "
                               f"{STATE_FILE}); name a checkpoint-<step> folder of a ppo run's output_dir")
        state = torch.load(Path(folder) / STATE_FILE, map_location=self.device, weights_only=False)
        missing = {name for name, p in self.model.named_parameters() if p.requires_grad} - set(state["trainable"])
        if missing:
            raise RuntimeError(f"the checkpoint {folder} lacks trained weights of this policy ({sorted(missing)[:3]} "
                               "...); it was written by another recipe; choose another ray_run_name")
        self.model.load_state_dict(state["trainable"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_control.value = state["kl_coef"]
        vars(self.score_moments).update(state["score_moments"])
        self.state.global_step, self.state.log_history = state["global_step"], state["log_history"]
        self.state.epoch = self.state.global_step / max(self.plan.steps_per_epoch, 1)
        logger.info(f"ppo resumes at step {self.state.global_step} from {folder}")


def prompt_stream(prompts: ShardStream):
    """This worker's prompt ids, pass after pass (each shuffled anew by the share's buffer), without end: a step
    may span the end of a pass."""
    while True:
        yield from (row["input_ids"] for row in prompts)


def gathered(values: torch.Tensor) -> torch.Tensor:
    """Every worker's `values` (same length on each), concatenated in rank order."""
    if not torch.distributed.is_initialized():
        return values
    parts = [torch.empty_like(values) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, values)
    return torch.cat(parts)


def averaged(stats: dict[str, float]) -> dict[str, float]:
    """The mean of each statistic over all workers (each measured on an equal batch)."""
    if not torch.distributed.is_initialized():
        return stats
    keys = sorted(stats)
    values = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(values)
    return {k: v / torch.distributed.get_world_size() for k, v in zip(keys, values.tolist())}


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


def reward_and_reference(cfg: RecipeConfig, plan: Plan, policy, tokenizer, device):
    """The reward function and the reference this worker uses, in this process or on the reward actors."""
    f = cfg.finetuning
    actors = plan.reward_actors
    if actors:
        reward = ActorReward(actors, ray.train.get_context().get_world_rank())
        return reward, ActorReference(reward) if reference_kind(cfg) == "actor" else AdapterOff(policy)
    reward = {"lora": lambda: AdapterReward(policy, f.reward_model, tokenizer.pad_token_id, device),
              "full": lambda: ModelReward(cfg, plan.use_gpu),
              "api": lambda: ApiReward(f.reward_model)}[f.reward_model_type]()
    reference = FrozenCopy(cfg, plan.use_gpu, device) if reference_kind(cfg) == "copy" else AdapterOff(policy)
    return reward, reference


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


def finish(trainer: PPOTrainer, cfg: RecipeConfig, plan: Plan, tokenizer, metrics: dict) -> dict:
    """Saves policy, value head, tokenizer, metrics, plots, config and model card on rank 0; returns the metrics."""
    args = trainer.args
    last = {k: v for record in trainer.state.log_history for k, v in record.items() if k not in ("step", "epoch")}
    metrics = {**metrics, **{f"train_{k}": v for k, v in last.items()}, **peak_memory()}
    if args.process_index == 0:
        out = Path(args.output_dir)
        save_policy(trainer.model, out)
        for name in ("train_results.json", "all_results.json"):
            (out / name).write_text(json.dumps(metrics, indent=2, sort_keys=True))
        outputs.write_run_outputs(str(out), cfg, plan, tokenizer, metrics)
    trainer.callbacks.on_train_end(args, trainer.state, trainer.control)
    close_trackers(trainer.callbacks.callbacks)
    return metrics
