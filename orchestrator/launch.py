"""The Ray driver: check everything, tokenise with Ray Data, plan once, and run the trainer.

Every check that a user's input can fail runs before a Ray instance is started or resources reserved. The driver
never imports torch or Transformers: the checks and small jobs that need them run in its helper process
(orchestrator/helper.py), and Ray Train's workers and controller import torch themselves (trainers/entry.py).
"""

import contextlib
import functools
import json
import logging
import os
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.data
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from rayft.cluster.session import available_nodes, gpu_memory_bytes, local_machine, only_this_machine, ray_session
from rayft.cluster.storage import checkpoint_recipe, filesystem, latest_checkpoint
from rayft.data.examples import Rows, mixed, shuffled, split_off, union
from rayft.data.mixing import parse_probs
from rayft.data.pipeline import (
    EncodingSettings,
    check_encoding,
    describe_with,
    encode_tables,
    first_row,
    locate_datasets,
    read_dataset,
    sample_examples,
    stage_encoder,
    token_stats,
    tokenize,
    tokenize_cached,
    user_errors_as_data_errors,
)
from rayft.data.source import Source
from rayft.data.templates import template_problem
from rayft.data.tokenizer import TokenizerSpec
from rayft.orchestrator.helper import Helper, driver_helper
from rayft.orchestrator.memory import ModelShape
from rayft.orchestrator.plan import check_placement, make_plan, startable_now
from rayft.orchestrator.progress import ProgressBar
from rayft.recipe.config import RecipeConfig
from rayft.recipe.derive import reference_kind
from rayft.recipe.logs import logger, requiet
from rayft.recipe.optimizers import uses_bitsandbytes
from rayft.recipe.plan import Node, Plan
from rayft.recipe.problems import ConfigError, Problem
from rayft.recipe.resume import recipe_changes
from rayft.recipe.rules import reward_model_problems
from rayft.recipe.stages import STAGE_SPECS
from rayft.trainers import WORKER_WITHOUT_BITSANDBYTES
from rayft.trainers.deepspeed_ops import prebuild_cpu_ops, shm_op_is_built
from rayft.trainers.entry import TorchBackend, train_loop_per_worker


@dataclass(frozen=True)
class Prepared:
    """What the driver knows before it touches the cluster: the datasets located and sampled, not read."""

    cfg: RecipeConfig
    shape: ModelShape  # the memory planner's counts, from the model built empty in the helper
    train_sources: list[Source]
    eval_sources: list[Source]
    helper: Helper  # the driver's helper process, until the data is tokenised

    def rows_identity(self) -> dict:
        """What the examples of every split are made from: the datasets' files and the settings that select rows."""
        d, f = self.cfg.data, self.cfg.finetuning
        return {"train": [s.identity() for s in self.train_sources], "eval": [s.identity() for s in self.eval_sources],
                "selection": [d.max_samples, d.mix_strategy, d.interleave_probs, d.val_size, d.max_bad_row_ratio,
                              d.eval_on_each_dataset, d.buffer_size, f.disable_shuffling, self.cfg.args.seed]}

    @property
    def sources(self) -> list[Source]:
        """Every dataset of the run, training and evaluation."""
        return self.train_sources + self.eval_sources

    @property
    def all_small(self) -> bool:
        """Every dataset is a few MB of local files, which the driver reads itself."""
        return all(s.small for s in self.sources)


def prepare(cfg: RecipeConfig, helper: Helper | None = None, trains: bool = True) -> Prepared:
    """Everything checked before Ray: output_dir (when the command `trains`), the model's modules, the datasets
    (located, and the first rows of each encoded), and (for a local run) the resource request. Raises ConfigError
    or DataError; touches no output and starts nothing. The checks that need Transformers run in `helper` (None:
    in this process, as tests do)."""
    return start_checks(cfg, helper or Helper("rayft", here=True), trains).finish()


@dataclass(frozen=True)
class Checks:
    """The checks of a run under way: the driver's own are done, the helper's (the model, Transformers' own
    checks, the encoding of each dataset's first rows) may still run while the driver starts Ray."""

    cfg: RecipeConfig
    helper: Helper
    train_sources: list[Source]
    eval_sources: list[Source]
    model: Future
    encodings: tuple[Future, ...]

    def finish(self) -> Prepared:
        """Waits for the helper's checks; raises the first ConfigError or DataError they found."""
        shape = ModelShape(**self.helper.result(self.model))
        for encoding in self.encodings:
            self.helper.result(encoding)
        return Prepared(self.cfg, shape, self.train_sources, self.eval_sources, self.helper)


def start_checks(cfg: RecipeConfig, helper: Helper, trains: bool = True) -> Checks:
    """`prepare`'s checks: the driver's own here and now (raising ConfigError or DataError), the helper's started."""
    if trains:
        output_dir = Path(cfg.args.output_dir)
        resume_from = latest_checkpoint(cfg.ray.ray_storage_path, cfg.ray.ray_run_name, cfg.ray.ray_storage_filesystem)
        if resume_from:
            logger.info(f"run {cfg.ray.ray_run_name!r} has a checkpoint in storage: resuming from {resume_from} "
                        "(choose another ray_run_name for a fresh run)")
            saved = checkpoint_recipe(resume_from, cfg.ray.ray_storage_filesystem)
            changes = recipe_changes(saved, cfg.to_dict(mask_secrets=True)) if saved is not None else []
            if changes:
                logger.warning(f"the recipe differs from the one that checkpoint was trained with, in keys that "
                               f"change training: {'; '.join(changes)} (the run goes on with the new values)")
        # a resumed run finds its own earlier outputs there
        refuse_occupied(output_dir, overwrite=bool(resume_from) or cfg.args.overwrite_output_dir)
        earlier = sorted(p.name + ("/" if p.is_dir() else "") for p in output_dir.iterdir()) if (
            output_dir.is_dir() and not resume_from) else []
        if earlier:
            shown = ", ".join(earlier[:4]) + (", ..." if len(earlier) > 4 else "")
            logger.warning(f"output_dir {output_dir} holds {len(earlier)} entries from before ({shown}); "
                           "overwrite_output_dir: true writes this run's files over them and leaves the others there")
    problems = reward_model_problems(cfg)
    template_refusal = template_problem(cfg.data.template, cfg.data.tool_format)
    if template_refusal:
        problems.append(Problem("template", template_refusal))
    if problems:
        raise ConfigError(problems)
    model = helper.submit("rayft.trainers.preflight:check_recipe", cfg.to_dict(mask_secrets=False))
    d, stage = cfg.data, STAGE_SPECS[cfg.finetuning.stage]
    encoder = stage_encoder(cfg.finetuning.stage)
    locate = dict(data=stage.data, stage=cfg.finetuning.stage, token=cfg.model.hf_hub_token, template=d.template,
                  media_dir=d.media_dir)
    spec, settings = TokenizerSpec.of(cfg.model), EncodingSettings.of(cfg)
    train_sources = locate_datasets(d.dataset, d.dataset_dir, **locate)
    eval_sources = locate_datasets(d.eval_dataset, d.dataset_dir, **locate) if d.eval_dataset else []
    if d.mix_strategy != "concat":
        parse_probs(d.interleave_probs, len(train_sources))
    if cfg.ray.ray_address is None:
        check_cluster(cfg, local_machine())  # this machine is the cluster rayft will start: refuse now, not after
    encodings = [helper.submit(check_encoding, d.dataset, sample_examples(train_sources), spec, settings, encoder)]
    if eval_sources:
        encodings.append(helper.submit(check_encoding, d.eval_dataset, sample_examples(eval_sources), spec, settings,
                                       encoder))
    return Checks(cfg, helper, train_sources, eval_sources, model, tuple(encodings))


def refuse_occupied(output_dir: Path, overwrite: bool) -> None:
    """An existing, non-empty output_dir (or a file in its place) is refused unless overwrite_output_dir."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError([Problem("output_dir", f"{output_dir} is a file, not a folder")])
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ConfigError([Problem("output_dir", f"{output_dir} exists and is not empty; choose another output_dir or "
                                                 "set overwrite_output_dir: true")])


def check_cluster(cfg: RecipeConfig, nodes: list[Node], sources: Sequence[Source] = ()) -> None:
    """Refuses a run the cluster can never hold, or whose checkpoints or images (those of `sources`) its nodes could
    not all reach."""
    if len(nodes) > 1 and cfg.ray.storage_was_relative:
        raise ConfigError([Problem("ray_storage_path", (
            f"a relative path means a folder on each node's own disk ({cfg.ray.ray_storage_path} here), but this "
            f"cluster has {len(nodes)} nodes, whose workers must all reach the checkpoints; use a shared file "
            "system path or an s3:// / gs:// URI"))])
    media = sorted({s.media_dir for s in sources if s.media_dir is not None})
    if len(nodes) > 1 and media and not cfg.data.data_shared_file_system:
        raise ConfigError([Problem("media_dir", (
            f"the workers open each example's images by path on their own nodes ({', '.join(media)} here), and this "
            f"cluster has {len(nodes)} nodes; put the images on a file system every node mounts at the same path and "
            "set data_shared_file_system: true"))])
    check_placement(cfg, nodes)


def plan_run(prepared: Prepared, nodes: list[Node], num_train_examples: int, report_every_log: bool = False,
             trials_at_once: int = 1, train_tokens: int = 0) -> Plan:
    """The run's one Plan, against the connected cluster's nodes (shared by `trials_at_once` trials of a sweep)."""
    cfg = prepared.cfg
    return make_plan(cfg, nodes, num_train_examples, shape=prepared.shape, gpu_memory=planning_gpu_memory(cfg, nodes),
                     report_every_log=report_every_log, run_id=uuid.uuid4().hex[:8], trials_at_once=trials_at_once,
                     train_tokens=train_tokens)


def planning_gpu_memory(cfg: RecipeConfig, nodes: list[Node]) -> int | None:
    """The memory of one GPU, which `deepspeed: auto` plans against on a cluster with GPUs; else None."""
    if cfg.args.deepspeed == "auto" and any(n.resources.get("GPU", 0) for n in nodes):
        return gpu_memory_bytes()
    return None


def show_config(cfg: RecipeConfig, plan: Plan) -> None:
    """The keys that differ from their defaults and the plan (everything with --verbose)."""
    changed = cfg.changed_keys()
    logger.info("recipe (keys that differ from their defaults; all of them in training_args.yaml): "
                + ", ".join(f"{k}={_short(v)}" for k, v in changed.items()))
    logger.debug("resolved config (secrets masked):\n"
                 + json.dumps(cfg.to_dict(mask_secrets=True), indent=1, default=str, sort_keys=True))
    for note in cfg.notes:
        logger.info(f"derived: {note}")
    logger.info("plan:\n" + plan.summary())


def run_plan(cfg: RecipeConfig, helper: Helper | None = None) -> Plan:
    """`rayft plan`: validates config and data and prints the plan, without training. Ray is started (or joined) only
    when the data is too large for the driver to count, or the run goes to a cluster (ray_address). `helper`: the
    command's own, already started (default: one started here)."""
    with helper or driver_helper("rayft plan") as helper:
        prepared = prepare(cfg, helper)
    return plan_prepared(prepared)


def plan_prepared(prepared: Prepared) -> Plan:
    """`rayft plan`'s plan of a recipe already checked, printed with the recipe."""
    cfg = prepared.cfg
    if cfg.ray.ray_address is None and prepared.all_small:
        nodes = local_machine()  # the cluster rayft would start: this machine
        plan, free = plan_run(prepared, nodes, example_rows(prepared)["train"].count()), nodes
    else:
        with ray_session(cfg.ray) as nodes:
            check_cluster(cfg, nodes, prepared.sources)
            configure_ray_data()
            plan = plan_run(prepared, nodes, example_rows(prepared)["train"].count())
            free = available_nodes()
    show_config(cfg, plan)
    if plan.elastic:
        logger.info(startable_now(plan, free))
    if cfg.data.packing:
        logger.info("packing: the counts are of unpacked examples; `rayft train` plans after packing")
    return plan


def run_train(cfg: RecipeConfig, helper: Helper | None = None, keep_helper: bool = False):
    """`rayft train`: the whole run. Returns Ray Train's Result; raises on a failed run.

    Ray starts while the helper process still checks the model and the data (a few seconds each on a small machine):
    a problem it finds stops the run before any worker is started, and Ray with it. `helper`: the command's own,
    already started (default: one started here), closed once the data is tokenised unless `keep_helper` (a pipeline
    checks and tokenises every stage with one)."""
    helper = helper or driver_helper("rayft train")
    try:
        checks = start_checks(cfg, helper)
        with ray_session(cfg.ray) as nodes:
            prepared = checks.finish()
            # the connected cluster can hold the workers, and they can reach the images
            check_cluster(cfg, nodes, prepared.sources)
            tokenised = tokenize_splits(prepared)
            if not keep_helper:
                helper.close()  # the driver holds no torch while its run trains
            return launch(cfg, plan_run(prepared, nodes, tokenised.train_count, train_tokens=tokenised.train_tokens),
                          tokenised.datasets)
    finally:
        if not keep_helper:
            helper.close()


@dataclass(frozen=True)
class Tokenised:
    """Every split's tokenised Dataset, and how many training sequences the plan counts steps by."""

    datasets: dict
    train_count: int
    train_tokens: int = 0  # counted only for include_effective_tokens_per_second


def run_tokenize(cfg: RecipeConfig, helper: Helper | None = None) -> dict[str, str]:
    """`rayft tokenize`: reads, converts and tokenises every split on the cluster into its cache (tokenized_path,
    or the automatic one under ray_storage_path) and stops; a training run of the same inputs then starts from
    it, on a cluster whose CPUs can be spent elsewhere meanwhile. Returns split -> where it is kept."""
    if cfg.data.streaming:
        raise ConfigError([Problem("streaming", "a streamed dataset is tokenised while training, never kept; remove "
                                                "streaming to tokenise ahead")])
    with helper or driver_helper("rayft tokenize") as helper:
        prepared = prepare(cfg, helper, trains=False)
        with ray_session(cfg.ray) as nodes:
            check_cluster(cfg, nodes)
            splits = split_names(prepared)
            where = {split: tokenized_cache(cfg, split)[0] for split in splits}
            if None in where.values():
                raise ConfigError([Problem("tokenized_path", "this cluster's nodes may not share ray_storage_path, "
                                                             "where the automatic cache lives; set tokenized_path to a "
                                                             "shared folder or an s3:// / gs:// URI")])
            tokenize_splits(prepared, keep=True)
    return where


def split_names(prepared: Prepared) -> list[str]:
    """The run's splits: train, and eval (or eval_<dataset> for each, with eval_on_each_dataset)."""
    d = prepared.cfg.data
    if d.eval_on_each_dataset:
        return ["train"] + [f"eval_{s.attr.name}" for s in prepared.eval_sources]
    return ["train"] + (["eval"] if prepared.eval_sources or d.val_size else [])


def tokenize_splits(prepared: Prepared, keep: bool = False) -> Tokenised:
    """Reads, mixes and tokenises every split with Ray Data on the connected cluster (or reuses their caches).

    A few MB of local data is tokenised again by every run unless `keep` (rayft tokenize) asks for a cache."""
    configure_ray_data()
    cfg = prepared.cfg
    made: dict = {}

    def rows_of(split: str) -> Rows:  # read once, for every split, only when some split is not cached
        if not made:
            made.update(example_rows(prepared))
        return made[split]

    tokenised = {split: _tokenized(prepared, rows_of, split, keep) for split in split_names(prepared)}
    datasets = {split: dataset for split, (dataset, _) in tokenised.items()}
    stats = tokenised["train"][1]  # None for a stream, which is never counted
    if stats is None:
        return Tokenised(datasets, made["train"].count())
    tokens = stats["tokens"] if cfg.finetuning.include_effective_tokens_per_second else 0
    return Tokenised(datasets, stats["examples"], tokens)


def example_rows(prepared: Prepared) -> dict[str, Rows]:
    """Every split's examples, read and checked across the cluster (here when small), sampled, mixed, split
    off for validation and, when larger than a worker's shuffle buffer, shuffled once."""
    cfg = prepared.cfg
    d, seed = cfg.data, cfg.args.seed
    read = dict(max_samples=d.max_samples, seed=seed, max_bad_ratio=d.max_bad_row_ratio, template=d.template,
                tool_format=d.tool_format, node_id=reading_node(cfg))
    parts = [read_dataset(source, **read) for source in prepared.train_sources]
    train, counts = mixed(parts, d.mix_strategy, parse_probs(d.interleave_probs, len(parts)), seed)
    if len(parts) > 1:
        logger.info(f"{d.mix_strategy} of {[p.count() for p in parts]} examples takes {counts}")
    splits = {}
    if prepared.eval_sources:
        evaluation = [read_dataset(source, **read) for source in prepared.eval_sources]
        if d.eval_on_each_dataset:
            splits = {f"eval_{s.attr.name}": rows for s, rows in zip(prepared.eval_sources, evaluation)}
        else:
            splits["eval"] = union(evaluation)
    if d.val_size:
        train, splits["eval"] = split_off(train, d.val_size, seed)
        logger.info(f"val_size={d.val_size}: {splits['eval'].count()} examples held out for evaluation")
    if not cfg.finetuning.disable_shuffling and train.count() > d.buffer_size:
        train = shuffled(train, seed)
    return {"train": train, **splits}


def reading_node(cfg: RecipeConfig) -> str | None:
    """The driver's node, where local dataset files are read on a cluster of several nodes unless
    data_shared_file_system says every node sees them (URIs are read anywhere)."""
    if "://" in cfg.data.dataset_dir or cfg.data.data_shared_file_system or not ray.is_initialized():
        return None
    if sum(1 for node in ray.nodes() if node["Alive"]) < 2:
        return None
    return ray.get_runtime_context().get_node_id()


class MetricReport(TuneReportCallback):
    """Hands a sweep trial's Ray Train reports that carry the sweep's metric on to Tune's scheduler.

    Checkpoint reports are left out: they repeat the last metrics at the save step, and Ray Train keeps the
    checkpoint itself. Reports without the metric (e.g. training-loss records when the metric is eval_loss)
    would fail Tune's check that every result carries the metric.
    """

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if checkpoint is None and self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def launch(cfg: RecipeConfig, plan: Plan, datasets: dict, sweep_metric: str | None = None):
    """Runs Ray Train's torch trainer for a planned run on tokenised datasets; returns Ray Train's Result.

    `sweep_metric` is set when the run is a trial of `rayft sweep`: its plan reports every logged record,
    and those carrying the metric reach Ray Tune's scheduler. (The sweep's driver has built DeepSpeed's op.)
    """
    callbacks = [MetricReport(sweep_metric)] if sweep_metric is not None else []
    if sweep_metric is None:
        show_config(cfg, plan)
        if plan.deepspeed is not None and not plan.use_gpu:
            build_deepspeed_op()
    t = cfg.args
    progress = ProgressBar(plan.progress_board, plan.total_steps, plan.global_batch_size)
    worker_env = {} if uses_bitsandbytes(cfg) else {WORKER_WITHOUT_BITSANDBYTES: "1"}
    # an instance started for this run, or a running one of one node on this machine (a working session, whose
    # dashboard may collect Ray Train's metrics: they stay on there)
    started = cfg.ray.ray_address is None
    local = started or only_this_machine()
    with reward_actors(cfg, plan), progress, ray_train_settings(local=local, metrics=not started):
        # Ray's TorchTrainer, but for its backend config, whose torch half runs in the controller and the workers
        trainer = (LocalRunTrainer if local else DataParallelTrainer)(
            train_loop_per_worker,
            train_loop_config={"recipe": cfg.to_dict(mask_secrets=False), "plan": plan.to_dict(),
                               "log_level": logger.getEffectiveLevel()},
            backend_config=TorchBackend(backend=plan.backend),
            scaling_config=ScalingConfig(
                num_workers=0 if plan.in_process else (plan.min_workers, plan.num_workers) if plan.elastic
                else plan.num_workers,
                elastic_resize_monitor_interval_s=cfg.ray.ray_resize_interval_s,
                use_gpu=plan.use_gpu,
                resources_per_worker=plan.resources_per_worker,
                placement_strategy=plan.placement_strategy,
            ),
            run_config=RunConfig(
                name=cfg.ray.ray_run_name,
                storage_path=cfg.ray.ray_storage_path,
                storage_filesystem=filesystem(cfg.ray.ray_storage_filesystem),
                checkpoint_config=CheckpointConfig(num_to_keep=t.save_total_limit),
                failure_config=FailureConfig(max_failures=cfg.ray.ray_max_failures),
                callbacks=callbacks,
                logging_config=LoggingConfig(log_level="DEBUG" if logger.isEnabledFor(logging.DEBUG) else "ERROR"),
                worker_runtime_env={"env_vars": worker_env},
            ),
            datasets=datasets,
            # an elastic run's workers each read the whole training set and keep their share of every global
            # batch (trainers.shards.GlobalBatchShare): a split would change with the group's size
            dataset_config=DataConfig(datasets_to_split=[n for n in datasets if n != "train"]) if plan.elastic
            else None,
        )
        with user_errors_as_data_errors():  # bad input found inside a worker: one line, not its traceback
            return trainer.fit()


def build_deepspeed_op() -> None:
    """DeepSpeed's CPU op, compiled once before CPU workers start (they would crash compiling it side by side); a
    quick look for the cached op, else the build in a helper process (the driver does not import DeepSpeed)."""
    if not shm_op_is_built():
        with driver_helper("DeepSpeed's CPU op") as helper:
            helper.call(prebuild_cpu_ops)


class LocalRunTrainer(DataParallelTrainer):
    """Ray Train's trainer for a run on a local instance, without the placement-group cleaner: a detached actor
    process per run (about 2 s of a core here) that frees the run's placement group if its controller dies
    abruptly. A local instance ends with its driver, and the group with it; on a running one of this machine
    alone, Ray removes the group with the driver's job (tests/test_fault_tolerance.py kills the driver and
    reruns)."""

    def _create_default_callbacks(self):
        return [c for c in super()._create_default_callbacks() if not isinstance(c, PlacementGroupCleanerCallback)]


@contextlib.contextmanager
def ray_train_settings(local: bool, metrics: bool = False):
    """Ray Train's own settings for one run, which it reads from the driver's environment when the run starts.

    On a local Ray instance (no ray_address, or a running one of this machine alone) no node can be preempted, so
    Ray Train's preemption watcher (one more actor process per run, polling the nodes' drain state) is left out,
    and its controller polls the workers every 0.5 s instead of every 2 s: it sees the group up, a report, a
    fault and the end that much sooner (about 3.5 s of every short run), for a status call per worker that costs
    nothing next to a step. Its Prometheus metrics are left out too unless `metrics` (about 1 s of the
    controller's CPU per run; an instance rayft starts has no dashboard to collect them). The environment's own
    values win.
    """
    wanted = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
              **({} if metrics else {"RAY_TRAIN_METRICS_ENABLED": "0"})} if local else {}
    added = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def actor_options(bundle: dict) -> dict:
    """Ray actor options that reserve `bundle` (CPU, GPU, memory and custom resources)."""
    bundle = dict(bundle)
    options = {"num_cpus": bundle.pop("CPU", 0), "num_gpus": bundle.pop("GPU", 0)}
    if "memory" in bundle:
        options["memory"] = bundle.pop("memory")
    if bundle:
        options["resources"] = bundle
    return options


@contextlib.contextmanager
def reward_actors(cfg: RecipeConfig, plan: Plan):
    """Starts the run's own groups of Ray actors, the reward model's (plan.reward_actors, stage ppo) and the rollout
    generators (plan.rollout_actors, stage grpo), waits until each has loaded its model, and stops them when the
    run ends."""
    recipe = cfg.to_dict(mask_secrets=False)
    actors, names = [], []
    if plan.reward_actors:
        from rayft.trainers.rewards import RewardServer  # torch: only runs with a reward actor group import it here

        options = actor_options(cfg.ray.reward_model_resources or plan.resources_per_worker)
        with_reference = reference_kind(cfg) == "actor"
        server = ray.remote(RewardServer)
        actors += [server.options(name=name, **options).remote(recipe, options["num_gpus"] > 0, with_reference)
                   for name in plan.reward_actors]
        names += [(name, "reward actor", ", with the reference model" if with_reference else "")
                  for name in plan.reward_actors]
    if plan.rollout_actors:
        from rayft.trainers.rollout import RolloutServer  # torch: only runs with rollout actors import it here

        options = actor_options(cfg.ray.rollout_resources or plan.resources_per_worker)
        server = ray.remote(RolloutServer)
        actors += [server.options(name=name, **options).remote(recipe, options["num_gpus"] > 0, cfg.args.seed + i)
                   for i, name in enumerate(plan.rollout_actors)]
        names += [(name, "rollout actor", "") for name in plan.rollout_actors]
    try:
        for (name, kind, extra), where in zip(names, ray.get([actor.where.remote() for actor in actors])):
            logger.info(f"{kind} {name} on node {where['node_id']} (pid {where['pid']}){extra}")
        yield
    finally:
        for actor in actors:
            ray.kill(actor)


def configure_ray_data() -> None:
    """Ray Data as rayft uses it: blocks kept in order (so a seeded run reads the same examples in the same order),
    and no per-operator progress bars, as rayft logs its own data summary."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    requiet()  # Ray Data sets its loggers' levels when it starts


def tokenized_cache(cfg: RecipeConfig, split: str) -> tuple[str | None, bool]:
    """Where split `split`'s tokenised data is cached, and whether that is a folder the user named (strict).

    The automatic cache lives under ray_storage_path; Ray Data reads it from any node, so on a cluster it
    is used only when that path is a URI or data_shared_file_system says it is shared by every node.
    """
    d, r = cfg.data, cfg.ray
    if d.tokenized_path:
        return f"{d.tokenized_path.rstrip('/')}/{split}", True
    if "://" in r.ray_storage_path or r.ray_address is None or d.data_shared_file_system:
        return f"{r.ray_storage_path.rstrip('/')}/.tokenized", False
    return None, False


def _tokenized(prepared: Prepared, rows_of, split: str, keep: bool):
    """The split's tokenised Dataset and its token_stats (None for a streamed training set)."""
    cfg = prepared.cfg
    d = cfg.data
    spec, encoder = TokenizerSpec.of(cfg.model), stage_encoder(cfg.finetuning.stage)
    helper = prepared.helper
    if d.streaming and split == "train":
        rows = rows_of(split)
        dataset = tokenize(rows, spec, EncodingSettings.of(cfg), encoder, d.preprocessing_batch_size,
                           stream_tasks=cfg.ray.max_workers, tasks=d.preprocessing_num_workers)
        logger.info(f"train data: {rows.count()} examples, streamed: tokenised as the workers read them, never "
                    f"materialised or cached; each worker shuffles through a buffer of {d.buffer_size} examples")
        logger.info("first training example:\n" + helper.call(describe_with, dataset.take(1)[0], spec))
        return dataset, None
    cache_dir, strict = tokenized_cache(cfg, split)
    if not strict and prepared.all_small and not keep:
        cache_dir = None  # tokenising a few MB again is faster than hashing, writing and reading a cache
    dataset, reused = tokenize_cached(lambda: rows_of(split), {**prepared.rows_identity(), "split": split}, spec,
                                      EncodingSettings.of(cfg), encoder, d.preprocessing_batch_size, cache_dir, strict,
                                      overwrite=d.overwrite_cache, tasks=d.preprocessing_num_workers,
                                      here=functools.partial(helper.call, encode_tables))
    if reused:
        logger.info(f"{split} data: reusing tokenised data from {cache_dir} (same data, tokenizer and settings)")
    stats = token_stats(dataset)
    counted = f"{stats['examples']} sequences" if reused else f"{rows_of(split).count()} examples"
    packed = f", packed into {stats['examples']} sequences" if d.packing and not reused else ""
    logger.info(f"{split} data: {counted}{packed}, {stats['tokens']} tokens ({stats['trained_tokens']} trained), "
                f"{stats['truncated_tokens']} tokens cut by cutoff_len={d.cutoff_len}")
    if split == "train":
        logger.info("first training example:\n" + helper.call(describe_with, first_row(dataset), spec))
    return dataset, stats


def _short(value) -> str:
    """A recipe value shortened for the one-line summary."""
    text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
