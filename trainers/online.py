"""The loop the online stages (ppo, grpo) share: each step draws prompts from the worker's shard, the stage samples
answers and learns from them, and the loop logs, checkpoints and resumes through Transformers' callbacks, so the log,
the trackers and Ray Train's checkpoints work as in the other stages.

A stage subclasses `OnlineTrainer` with `step` (one rollout and its updates) and `save_model`.
"""

import json
from pathlib import Path

import torch
from ray.train.huggingface.transformers import RayTrainReportCallback
from transformers import get_scheduler
from transformers.trainer_callback import CallbackHandler, TrainerControl, TrainerState

from rayft.recipe.config import RecipeConfig
from rayft.recipe.derive import prompts_per_step
from rayft.recipe.logs import logger
from rayft.recipe.plan import Plan
from rayft.trainers import outputs
from rayft.trainers.callbacks import LogCallback, RecipeInCheckpoint, ReportEveryLog
from rayft.trainers.common import peak_memory
from rayft.trainers.optimizers import adamw_kwargs, build_optimizer, decay_names
from rayft.trainers.shards import ShardStream
from rayft.trainers.tracking import close_trackers, swanlab_callbacks, tracker_callbacks


class OnlineTrainer:
    """Steps of sampling and learning over this worker's prompts, logged and checkpointed as the Trainer would."""

    state_file = "online_state.pt"  # what a checkpoint holds besides the model, for resuming

    def __init__(self, cfg: RecipeConfig, plan: Plan, args, model: torch.nn.Module, policy, tokenizer, device):
        self.cfg, self.plan, self.args, self.tokenizer, self.device = cfg, plan, args, tokenizer, device
        self.model, self.policy = model, policy  # what the optimizer trains (policy, plus PPO's value head)
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.optimizer = build_optimizer(model, args, cfg.finetuning, decay_names(model)) or torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], weight_decay=args.weight_decay, **adamw_kwargs(args))
        total = plan.total_steps
        self.scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer, args.get_warmup_steps(total), total)
        self.state = TrainerState(max_steps=total, logging_steps=args.logging_steps, save_steps=args.save_steps,
                                  is_world_process_zero=args.process_index == 0,
                                  is_local_process_zero=args.local_process_index == 0)
        self.control = TrainerControl()
        callbacks = [LogCallback(args.output_dir, plan.progress_board, args.world_size),
                     *tracker_callbacks(args.report_to),
                     *swanlab_callbacks(cfg, args.output_dir, args.process_index, args.run_name)]
        callbacks += [RecipeInCheckpoint(cfg.to_dict(mask_secrets=True), plan), RayTrainReportCallback(),
                      *([ReportEveryLog()] if plan.report_every_log else [])]
        self.callbacks = CallbackHandler(callbacks, policy, tokenizer, self.optimizer, self.scheduler)

    # ---- what a stage provides ------------------------------------------------------------------------
    def step(self, batches) -> dict[str, float]:
        """One step: takes the next batch of prompt rows from `batches`, samples, learns; returns its statistics."""
        raise NotImplementedError

    def save_model(self, folder: Path) -> None:
        """The trained model as `from_pretrained` loads it."""
        raise NotImplementedError

    def extra_state(self) -> dict:
        """The stage's own state a resumed run needs (PPO's KL coefficient, ...)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # ---- the run --------------------------------------------------------------------------------------
    def train(self, prompts: ShardStream) -> int:
        """Runs total_steps steps over this worker's share of the prompts; returns the steps done."""
        args, plan = self.args, self.plan
        resumed = args.resume_from_checkpoint  # the restored checkpoint when Ray Train restarted the run
        if resumed:
            self.restore(resumed)
        self.callbacks.on_train_begin(args, self.state, self.control)
        stream = prompt_stream(prompts)
        per_step = prompts_per_step(self.cfg)
        batches = iter(lambda: [next(stream) for _ in range(per_step)], None)
        for _ in range(self.state.global_step * per_step):  # a resumed run continues where it stopped
            next(stream)
        window: list[dict] = []
        while self.state.global_step < self.state.max_steps:
            stats = self.step(batches)
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
        """checkpoint-<step>/ with the model as the run saves it, plus what resuming needs; Ray Train's callback
        then reports it to storage."""
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        if self.args.process_index == 0:
            self.save_model(folder)
            trainable = {name: p.detach().cpu() for name, p in self.model.named_parameters() if p.requires_grad}
            torch.save({"trainable": trainable, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "global_step": self.state.global_step,
                        "log_history": self.state.log_history, **self.extra_state()}, folder / self.state_file)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank reports the checkpoint rank 0 wrote
        self.control = self.callbacks.on_save(self.args, self.state, self.control)

    def restore(self, folder: str) -> None:
        stage = self.cfg.finetuning.stage
        if not (Path(folder) / self.state_file).is_file():
            raise RuntimeError(f"resume_from_checkpoint: {folder} is not a checkpoint of a {stage} run (it has no "
                               f"{self.state_file}); name a checkpoint-<step> folder of a {stage} run's output_dir")
        state = torch.load(Path(folder) / self.state_file, map_location=self.device, weights_only=False)
        missing = {name for name, p in self.model.named_parameters() if p.requires_grad} - set(state["trainable"])
        if missing:
            raise RuntimeError(f"the checkpoint {folder} lacks trained weights of this policy ({sorted(missing)[:3]} "
                               "...); it was written by another recipe; choose another ray_run_name")
        self.model.load_state_dict(state["trainable"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.load_extra_state(state)
        self.state.global_step, self.state.log_history = state["global_step"], state["log_history"]
        self.state.epoch = self.state.global_step / max(self.plan.steps_per_epoch, 1)
        logger.info(f"{stage} resumes at step {self.state.global_step} from {folder}")


def prompt_stream(prompts: ShardStream):
    """This worker's prompt rows, pass after pass (each shuffled anew by the share's buffer), without end: a step
    may span the end of a pass."""
    while True:
        yield from prompts


def gathered(values: torch.Tensor) -> torch.Tensor:
    """Every worker's `values` (same length on each), concatenated in rank order."""
    if not torch.distributed.is_initialized():
        return values
    parts = [torch.empty_like(values) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, values)
    return torch.cat(parts)


def summed(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over every worker (itself on one)."""
    if torch.distributed.is_initialized():
        values = values.clone()
        torch.distributed.all_reduce(values)
    return values


def averaged(stats: dict[str, float]) -> dict[str, float]:
    """The mean of each statistic over all workers (each measured on an equal batch)."""
    if not torch.distributed.is_initialized():
        return stats
    keys = sorted(stats)
    values = summed(torch.tensor([stats[k] for k in keys], dtype=torch.float64))
    return {k: v / torch.distributed.get_world_size() for k, v in zip(keys, values.tolist())}


def finish(trainer: OnlineTrainer, cfg: RecipeConfig, plan: Plan, tokenizer, metrics: dict) -> dict:
    """Saves the model, tokenizer, metrics, plots, config and model card on rank 0; returns the metrics."""
    args = trainer.args
    last = {k: v for record in trainer.state.log_history for k, v in record.items() if k not in ("step", "epoch")}
    metrics = {**metrics, **{f"train_{k}": v for k, v in last.items()}, **peak_memory()}
    if args.process_index == 0:
        out = Path(args.output_dir)
        trainer.save_model(out)
        for name in ("train_results.json", "all_results.json"):
            (out / name).write_text(json.dumps(metrics, indent=2, sort_keys=True))
        outputs.write_run_outputs(str(out), cfg, plan, tokenizer, metrics)
    trainer.callbacks.on_train_end(args, trainer.state, trainer.control)
    close_trackers(trainer.callbacks.callbacks)
    return metrics
