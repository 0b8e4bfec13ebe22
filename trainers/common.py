"""What every stage's entry function shares: the training arguments, the Trainer over the worker's shard, and `fit`,
which trains and saves (the shards are trainers/shards.py; where a worker resumes, trainers/resume.py)."""

import resource
import shutil
from pathlib import Path
from types import MethodType

import ray.train
import torch
from ray.train.huggingface.transformers import RayTrainReportCallback
from torch.utils.data import DataLoader
from transformers import (
    EarlyStoppingCallback,
    PrinterCallback,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    TrainerCallback,
)

from rayft.data.collator import ImageCollator
from rayft.data.media import fake_image
from rayft.recipe.config import RecipeConfig
from rayft.recipe.logs import logger, quiet_import
from rayft.recipe.plan import Plan
from rayft.recipe.values import comma_list, read_log
from rayft.trainers import outputs, preemption, startup
from rayft.trainers.callbacks import LogCallback, ModuleTimes, RecipeInCheckpoint, ReportEveryLog, TorchProfiler
from rayft.trainers.model import ImageModel, save_pissa_converted, save_pissa_init, trainable_summary
from rayft.trainers.optimizers import build_optimizer, layerwise_schedulers
from rayft.trainers.preemption import CheckpointOnSigterm
from rayft.trainers.resume import UNIVERSAL_VIEWS, resume_point, resumed_epoch
from rayft.trainers.shards import eval_shards, train_shard
from rayft.trainers.tracking import (
    adapt_trackers,
    close_trackers,
    prepare_trackers,
    swanlab_callbacks,
    without_swanlab,
)
from rayft.trainers.training_args import transformers_arguments


def training_arguments(cfg: RecipeConfig, plan: Plan) -> Seq2SeqTrainingArguments:
    """The real TrainingArguments, built inside the worker with the planned device and DeepSpeed config."""
    if plan.deepspeed is not None:
        with quiet_import():
            import deepspeed  # heavy (about 2 s); only runs with a DeepSpeed config import it

        # Ray already made the torch process group; DeepSpeed must adopt it before ZeRO-3 builds the
        # model partitioned, or its batch-size check sees a world of one.
        deepspeed.init_distributed(dist_backend=plan.backend)
    kwargs = dict(cfg.training)
    deepspeed_config, resume = resume_point(plan)
    kwargs.update(deepspeed=deepspeed_config, use_cpu=not plan.use_gpu, remove_unused_columns=False)
    if resume:
        kwargs["resume_from_checkpoint"] = resume
    if plan.elastic:
        kwargs["gradient_accumulation_steps"] = plan.accumulation_at(ray.train.get_context().get_world_size())
    if kwargs.get("warmup_ratio") is not None:  # LLaMA-Factory's key; Transformers 5 takes a fraction here
        kwargs["warmup_steps"] = kwargs["warmup_ratio"]
    if not plan.use_gpu:  # a GPU recipe's bf16 / fp16 on CPU workers: fp32, as the plan says
        kwargs.update(bf16=False, fp16=False)
    if cfg.finetuning.early_stopping_steps is not None:
        kwargs.setdefault("metric_for_best_model", "loss")  # what early stopping watches unless told
    kwargs.setdefault("disable_tqdm", True)  # rayft prints its own progress line per logging step
    if "report_to" in kwargs:
        kwargs["report_to"] = without_swanlab(kwargs["report_to"])

    kwargs.setdefault("run_name", ray.train.get_context().get_experiment_name())  # the trackers' run name
    if not cfg.model.disable_gradient_checkpointing:
        # Plain DDP looking for unused parameters marks checkpointed (re-run) layers ready twice; the
        # Trainer would turn the search off itself had it enabled checkpointing (rayft does, in load_model).
        kwargs.setdefault("ddp_find_unused_parameters", False)
    return transformers_arguments(kwargs)


class FirstStep(TrainerCallback):
    """Marks the end of the first optimizer step, after which rank 0 logs where its start-up went."""

    def on_train_begin(self, args, state, control, **kwargs):
        startup.mark("train begin")

    def on_step_begin(self, args, state, control, **kwargs):
        if not any(name == "step begin" for name, _ in startup.STARTUP):
            startup.mark("step begin")

    def on_step_end(self, args, state, control, **kwargs):
        if not any(name == "first step" for name, _ in startup.STARTUP):
            startup.mark("first step")
            if args.process_index == 0 and len(startup.STARTUP) > 1:
                logger.info(f"worker start-up: {startup.startup_phases()}")
        return control


class ShardTrainer(Seq2SeqTrainer):
    """A Trainer over the worker's own Ray Data shard.

    The shard is already this worker's share of the data, so its loader must not be split again across
    processes (which the default accelerate-prepared loader would do).
    """

    def __init__(self, *args, finetuning=None, hyperparameters_from_recipe=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.finetuning = finetuning
        self.hyperparameters_from_recipe = hyperparameters_from_recipe

    def create_optimizer(self, model=None):
        """The factory's optimizer for the recipe (trainers/optimizers.py), or the Trainer's own (`optim`)."""
        if self.optimizer is None and self.finetuning is not None:
            opt_model = self.model if model is None else model
            self.optimizer = build_optimizer(opt_model, self.args, self.finetuning,
                                             set(self.get_decay_parameter_names(opt_model)))
            if self.finetuning.use_badam:
                from badam import BAdamCallback, clip_grad_norm_old_version

                # BAdam's sparse gradients need the norm computed as torch 1.13 did; this trainer's accelerator only
                self.accelerator.clip_grad_norm_ = MethodType(clip_grad_norm_old_version, self.accelerator)
                self.add_callback(BAdamCallback)
        optimizer = super().create_optimizer(model)
        # the recipe's learning rates and weight decay, as built: a checkpoint loaded later brings its own (under
        # DeepSpeed, the engine loads it before _load_optimizer_and_scheduler runs)
        self.recipe_hyperparameters = [(group["lr"], group.get("weight_decay"), bool(group["params"]))
                                       for group in optimizer.param_groups]
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        layerwise_schedulers(self.optimizer, self.args, num_training_steps)
        return super().create_scheduler(num_training_steps, optimizer)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # The loaded state carries the checkpoint's own learning rates and weight decay in its param groups and
        # schedule. A pbt segment continues another trial's checkpoint with its own (perturbed) values: they are
        # put back after loading (ray-project/ray#36660), the schedule's position kept.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.hyperparameters_from_recipe:
            built = getattr(self, "recipe_hyperparameters", None) or [  # a DeepSpeed config's own optimizer
                (self.args.learning_rate, self.args.weight_decay, True)] * len(self.optimizer.param_groups)
            if len(built) != len(self.optimizer.param_groups):  # DeepSpeed drops the empty groups it is given
                built = [group for group in built if group[2]]
            reapply_hyperparameters(self.optimizer, self.lr_scheduler, [(lr, decay) for lr, decay, _ in built])

    def _run_epoch(self, *args, **kwargs):
        # A run resumed from its final checkpoint (killed after saving the last step, before finishing) has
        # nothing left to train; Transformers would still run one more optimizer step past max_steps.
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def get_train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.args.per_device_train_batch_size)  # it shuffles itself

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, str):  # Trainer names one of several eval datasets
            dataset = self.eval_dataset[dataset]
        return self._loader(dataset, self.args.per_device_eval_batch_size)

    def _loader(self, dataset, batch_size: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=self.data_collator,
            drop_last=self.args.dataloader_drop_last,
            num_workers=0,  # the stream reads in this process; Ray Data prefetches (see train_shard)
        )


def reapply_hyperparameters(optimizer, scheduler, wanted: list[tuple[float, float | None]]) -> None:
    """Sets each param group's base learning rate and weight decay to `wanted` (as the optimizer was built for this
    run) and its current learning rate to the schedule's factor at the loaded step times the new base."""
    scheduler = getattr(scheduler, "scheduler", scheduler)  # DeepSpeed's wrapper holds the torch schedule
    factors = [lr / base if base else 1.0 for lr, base in zip(scheduler.get_last_lr(), scheduler.base_lrs)]
    scheduler.base_lrs = [lr for lr, _ in wanted]
    for group, (lr, decay), factor in zip(optimizer.param_groups, wanted, factors):
        group["initial_lr"], group["lr"] = lr, lr * factor
        if decay is not None:
            group["weight_decay"] = decay
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


class StopAt(TrainerCallback):
    """Ends a pbt segment after optimizer step `step`: the metric is logged and measured there, and a checkpoint
    saved for the next segment (this trial's or, after an exploit, another's)."""

    def __init__(self, step: int, evaluates: bool):
        self.step, self.evaluates = step, evaluates

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_log = control.should_save = control.should_training_stop = True
            control.should_evaluate = self.evaluates
        return control


def finish(trainer, cfg: RecipeConfig, plan: Plan, train_result, tokenizer) -> dict:
    """Saves model, tokenizer, metrics, plots, config and model card; returns the final metrics."""
    output_dir = trainer.args.output_dir
    trainer.save_model()  # every rank calls it: under ZeRO-3 the weights are gathered first
    metrics = dict(train_result.metrics)
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate(metric_key_prefix="eval"))
    peaks = peak_memory()
    if plan.elastic and trainer.is_world_process_zero():  # the summary of an elastic run: its sizes and resizes
        records = read_log(output_dir)
        peaks.update(world_size=trainer.args.world_size,
                     resizes=sum(1 for r in records if "previous_world_size" in r),
                     world_sizes=sorted({r["world_size"] for r in records if "world_size" in r}))
    metrics.update(peaks)
    train_result.metrics.update(peaks)
    trainer.save_metrics("train", train_result.metrics)
    if any(k.startswith("eval_") for k in metrics):
        trainer.save_metrics("eval", {k: v for k, v in metrics.items() if k.startswith("eval_")})
    trainer.save_state()
    close_trackers(trainer.callback_handler.callbacks)
    if trainer.is_world_process_zero():
        if cfg.finetuning.pissa_convert:  # ZeRO 0-2 only (validated): rank 0 holds the whole adapter
            save_pissa_converted(trainer.accelerator.unwrap_model(trainer.model), output_dir)
        outputs.write_run_outputs(output_dir, cfg, plan, tokenizer, metrics)
    return metrics


def peak_memory() -> dict[str, float]:
    """The highest resident memory of any worker process so far (and of any GPU), in GB: what the memory
    planner's estimate is checked against. Every rank must call it (it gathers from all of them)."""

    mine = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1024**3]  # Linux reports KiB
    if torch.cuda.is_available():
        mine.append(torch.cuda.max_memory_allocated() / 1024**3)
    every = [mine]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        every = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, mine)
    peaks = {"peak_rss_gb": round(max(m[0] for m in every), 3)}
    if len(mine) > 1:
        peaks["peak_gpu_gb"] = round(max(m[1] for m in every), 3)
    return peaks


class StatsTrainer(ShardTrainer):
    """A ShardTrainer whose loss also yields statistics (rewards, accuracies) that are logged per step.

    `compute_loss` records per-example values under the same keys on every step (an empty tensor when a
    batch has none); `log` adds their means over the examples since the last log on all workers, with an
    `eval_` prefix during evaluation.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded = {"train": {}, "eval": {}}  # key -> [sum, count]
        # compute_loss returns a mean over the micro-batch's examples, not a sum over num_items_in_batch: the
        # Trainer must divide it by the accumulation steps (it does not for a model that takes loss kwargs)
        self.model_accepts_loss_kwargs = False

    def record(self, stats: dict[str, torch.Tensor]) -> None:
        recorded = self.recorded["train" if self.model.training else "eval"]
        for key, value in stats.items():
            value = value.detach().double().reshape(-1)
            total = recorded.setdefault(key, [0.0, 0])
            total[0] += value.sum().item()
            total[1] += value.numel()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict, start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        recorded = self.recorded[mode]
        if recorded:
            keys = sorted(recorded)
            totals = torch.tensor([recorded[k] for k in keys], dtype=torch.float64)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(totals)  # every worker logs at the same step, with the same keys
            prefix = "eval_" if mode == "eval" else ""
            logs.update({f"{prefix}{k}": round(total / count, 6)
                         for k, (total, count) in zip(keys, totals.tolist()) if count})
            recorded.clear()
        super().log(logs, start_time)


def fit(cfg: RecipeConfig, plan: Plan, args: Seq2SeqTrainingArguments, model, tokenizer, collator,
        trainer_cls: type = ShardTrainer, extra_metrics: dict | None = None, **trainer_kwargs) -> dict:
    """Trains `model` on this worker's shard with `trainer_cls` and saves everything; returns the metrics."""

    startup.mark("model")
    if args.process_index == 0:
        bits = cfg.model.quantization_bit
        quantized = f", base model in {bits} bits (bitsandbytes)" if bits else ""
        logger.info(f"{cfg.finetuning.finetuning_type}: {trainable_summary(model)}{quantized}")
    prepare_trackers(cfg, args.output_dir)
    grace = 0 if plan.in_process else cfg.ray.ray_preemption_grace_s  # local mode: no checkpoint to save on SIGTERM
    if grace:
        preemption.install_in_this_worker(grace)
    train_data, eval_data = train_shard(cfg, plan), eval_shards(cfg)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[LogCallback(args.output_dir, plan.progress_board, args.world_size,
                               args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
                               args.resume_from_checkpoint),
                   RecipeInCheckpoint(cfg.to_dict(mask_secrets=True), plan), RayTrainReportCallback(), FirstStep(),
                   *([CheckpointOnSigterm(grace)] if grace else []),
                   *([ReportEveryLog()] if plan.report_every_log else []),
                   *([EarlyStoppingCallback(cfg.finetuning.early_stopping_steps)]
                     if cfg.finetuning.early_stopping_steps is not None else []),
                   *([TorchProfiler(cfg.args, args.output_dir, args.process_index)]
                     if cfg.args.enable_torch_profiler else []),
                   *([ModuleTimes(comma_list(cfg.args.profile_modules), args.output_dir, args.process_index)]
                     if cfg.args.profile_modules else []),
                   *([StopAt(plan.stop_at, eval_data is not None)] if plan.stop_at else []),
                   *swanlab_callbacks(cfg, args.output_dir, args.process_index, args.run_name)],
        finetuning=cfg.finetuning,
        hyperparameters_from_recipe=plan.start_from is not None,
        **trainer_kwargs,
    )
    if isinstance(collator, ImageCollator) and trainer.model_accepts_loss_kwargs:
        # LLaMA-Factory 0.9.5 averages a vision-language model's loss over each micro-batch's own tokens (it turns the
        # Trainer's count of tokens across devices and accumulation steps off whenever it loads a processor): the
        # same examples train the same way here
        trainer.model_accepts_loss_kwargs = False
    startup.mark("trainer")
    trainer.remove_callback(PrinterCallback)  # LogCallback prints one line per logging step instead
    adapt_trackers(trainer)
    if cfg.finetuning.pissa_convert and args.process_index == 0:
        save_pissa_init(model, args.output_dir)
    resume = args.resume_from_checkpoint  # the restored checkpoint when Ray Train restarted the run (see resume_point)
    if resume:
        train_data.resume_at(resumed_epoch(resume))
    try:
        train_result = trainer.train(resume_from_checkpoint=resume)
    finally:
        if resume and Path(resume).parent == UNIVERSAL_VIEWS:  # this start's own view; every rank may try
            shutil.rmtree(resume, ignore_errors=True)
    if plan.stop_at:  # a pbt segment: its checkpoint is what it leaves; the trial's outputs come at its end
        return {"step": trainer.state.global_step}
    train_result.metrics.update(extra_metrics or {})
    if plan.train_tokens:  # include_effective_tokens_per_second, as LLaMA-Factory counts it: per device
        m = train_result.metrics
        m["effective_tokens_per_sec"] = round(plan.train_tokens * m["epoch"] / m["train_runtime"] / args.world_size, 2)
    # before saving, which under ZeRO-3 gathers the whole model on rank 0
    train_result.metrics.update({f"training_{k}": v for k, v in peak_memory().items()})
    return finish(trainer, cfg, plan, train_result, tokenizer)


def with_images(cfg: RecipeConfig, tokenizer, pad, copies: int = 1):
    """The stage's collator `pad`, under a multimodal template wrapped so that each batch carries its images'
    pixels, made here in the worker (data/collator.py's ImageCollator; `copies` 2 for preference pairs), or the
    fake image where it has none."""
    images = ImageModel.of(cfg, tokenizer)
    if images is None:
        return pad
    return ImageCollator(pad, images.processor, images.token_id, images.geometry, copies=copies,
                         fake=fake_image(tokenizer, images.geometry, images.tokens))
