"""The Ray driver: check everything, plan, tokenise with Ray Data, and run the TorchTrainer.

Every check that a user's input can fail runs before a Ray instance is started or resources reserved.
"""

import contextlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from rayft.cluster.session import cluster_nodes, gpu_memory_bytes, local_machine, ray_is_up, ray_session
from rayft.cluster.storage import filesystem, latest_checkpoint
from rayft.data.mixing import mix, parse_probs, split_validation
from rayft.data.pipeline import (
    EncodingSettings,
    describe_example,
    load_datasets,
    load_examples,
    load_tokenizer,
    token_stats,
    tokenize,
    tokenize_cached,
)
from rayft.data.registry import comma_list
from rayft.orchestrator.config import ConfigError, RecipeConfig, reward_model_problems
from rayft.orchestrator.plan import Plan, make_plan
from rayft.trainers import deepspeed as ds
from rayft.trainers.model import model_shape, module_problems


@dataclass
class Prepared:
    """What the driver knows before it touches the cluster."""

    cfg: RecipeConfig
    train_examples: list[dict]
    eval_examples: dict[str, list[dict]]  # split name ("eval", or "eval_<dataset>" per dataset) -> examples


def prepare(cfg: RecipeConfig, log=print) -> Prepared:
    """Everything checked before Ray: output_dir, the datasets, and (for a local run) the resource request.

    Raises ConfigError or DataError; touches no output and starts nothing.
    """
    output_dir = Path(cfg.training["output_dir"])
    resume_from = latest_checkpoint(cfg.ray.ray_storage_path, cfg.ray.ray_run_name, cfg.ray.ray_storage_filesystem)
    if resume_from:
        log(f"[rayft] run {cfg.ray.ray_run_name!r} has a checkpoint in storage: resuming from {resume_from} "
            "(choose another ray_run_name for a fresh run)")
    # a resumed run finds its own earlier outputs there
    refuse_occupied(output_dir, overwrite=bool(resume_from) or cfg.training.get("overwrite_output_dir", False))
    problems = module_problems(cfg) + reward_model_problems(cfg)
    if problems:
        raise ConfigError(problems)
    d, seed = cfg.data, cfg.training.get("seed", 42)
    read = dict(log=log, seed=seed, token=cfg.model.hf_hub_token, stage=cfg.finetuning.stage, template=d.template)
    sources = load_datasets(d.dataset, d.dataset_dir, d.max_samples, **read)
    train = mix(sources, d.mix_strategy, parse_probs(d.interleave_probs, len(sources)), seed)
    if len(sources) > 1:
        log(f"[rayft] {d.mix_strategy} of {[len(s) for s in sources]} examples gives {len(train)}")
    evaluation = {}
    if d.eval_dataset and d.eval_on_each_dataset:
        evaluation = {f"eval_{name}": load_examples(name, d.dataset_dir, d.max_samples, **read)
                      for name in comma_list(d.eval_dataset)}
    elif d.eval_dataset:
        evaluation = {"eval": load_examples(d.eval_dataset, d.dataset_dir, d.max_samples, **read)}
    if d.val_size:
        train, evaluation["eval"] = split_validation(train, d.val_size, seed)
        log(f"[rayft] val_size={d.val_size}: {len(evaluation['eval'])} examples held out for evaluation")
    if cfg.ray.ray_address is None:
        plan_on_cluster(cfg, len(train))  # this machine is the cluster rayft will start: refuse now, not after
    return Prepared(cfg, train, evaluation)


def refuse_occupied(output_dir: Path, overwrite: bool) -> None:
    """An existing, non-empty output_dir (or a file in its place) is refused unless overwrite_output_dir."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError([f"output_dir: {output_dir} is a file, not a folder"])
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ConfigError([f"output_dir: {output_dir} exists and is not empty; choose another output_dir or "
                           "set overwrite_output_dir: true"])


def plan_on_cluster(cfg: RecipeConfig, num_train_examples: int) -> Plan:
    """Plans against the connected cluster, or this machine when rayft starts its own Ray instance."""
    nodes = cluster_nodes() if cfg.ray.ray_address else local_machine()
    if len(nodes) > 1 and cfg.ray.storage_was_relative:
        raise ConfigError([
            f"ray_storage_path: a relative path means a folder on each node's own disk ({cfg.ray.ray_storage_path} "
            f"here), but this cluster has {len(nodes)} nodes, whose workers must all reach the checkpoints; "
            "use a shared file system path or an s3:// / gs:// URI"])
    gpu_memory = None
    if cfg.training.get("deepspeed") == "auto" and any(n.resources.get("GPU", 0) for n in nodes):
        gpu_memory = gpu_memory_bytes() if cfg.ray.ray_address or ray_is_up() else None
    return make_plan(cfg, nodes, num_train_examples, shape=model_shape(cfg), gpu_memory=gpu_memory)


def show_config(cfg: RecipeConfig, plan: Plan, log=print) -> None:
    log("[rayft] resolved config (secrets masked):")
    log(json.dumps(cfg.to_dict(mask_secrets=True), indent=1, default=str, sort_keys=True))
    for note in cfg.notes:
        log(f"[rayft] derived: {note}")
    log("[rayft] plan:\n" + plan.summary())


def run_plan(cfg: RecipeConfig, log=print) -> Plan:
    """`rayft plan`: validates config and data on the cluster and prints the plan, without training."""
    prepared = prepare(cfg, log=log)
    with ray_session(cfg.ray, log=log):
        plan = plan_on_cluster(cfg, len(prepared.train_examples))
    if cfg.data.packing:
        plan.notes.append("packing: counts are of unpacked examples; `rayft train` re-plans after packing")
    show_config(cfg, plan, log=log)
    return plan


def run_train(cfg: RecipeConfig, log=print):
    """`rayft train`: the whole run. Returns Ray Train's Result; raises on a failed run."""
    prepared = prepare(cfg, log=log)
    with ray_session(cfg.ray, log=log):
        plan_on_cluster(cfg, len(prepared.train_examples))  # the connected cluster can hold the workers
        datasets = tokenize_splits(cfg, prepared, log=log)
        return launch(cfg, plan_on_data(cfg, prepared, datasets), datasets, log=log)


def tokenize_splits(cfg: RecipeConfig, prepared: Prepared, log=print) -> dict:
    """Tokenises every split with Ray Data on the connected cluster: split name -> materialised Dataset."""
    quiet_ray_data()
    datasets = {"train": _tokenized(cfg, prepared.train_examples, "train", log)}
    for split, examples in prepared.eval_examples.items():
        datasets[split] = _tokenized(cfg, examples, split, log)
    return datasets


def plan_on_data(cfg: RecipeConfig, prepared: Prepared, datasets: dict) -> Plan:
    """The plan for the tokenised data: with packing the workers see packed sequences, and steps count those."""
    packed = cfg.data.packing and not cfg.data.streaming  # a stream is not counted: streaming requires max_steps
    return plan_on_cluster(cfg, datasets["train"].count() if packed else len(prepared.train_examples))


def launch(cfg: RecipeConfig, plan: Plan, datasets: dict, log=print, sweep_metric: str | None = None):
    """Runs the TorchTrainer for a planned run on tokenised datasets; returns Ray Train's Result.

    `sweep_metric` is set when the run is a trial of `rayft sweep`: every logged record is then reported,
    and those carrying the metric reach Ray Tune's scheduler. (The sweep's driver has built DeepSpeed's op.)
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rayft.trainers.worker import train_loop_per_worker

    show_config(cfg, plan, log=log)
    callbacks = []
    if sweep_metric is not None:
        from rayft.orchestrator.sweep import MetricReport

        plan.report_every_log = True
        callbacks.append(MetricReport(sweep_metric))
    elif plan.deepspeed is not None and not plan.use_gpu:
        ds.prebuild_cpu_ops(log=log)

    t = cfg.training
    with reward_actors(cfg, plan, log=log) as names:
        plan.reward_actors = names
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"recipe": cfg.to_dict(mask_secrets=False), "plan": plan.to_dict()},
            torch_config=TorchConfig(backend=plan.backend),
            scaling_config=ScalingConfig(
                num_workers=plan.num_workers,
                use_gpu=plan.use_gpu,
                resources_per_worker=plan.resources_per_worker,
                placement_strategy=plan.placement_strategy,
            ),
            run_config=RunConfig(
                name=cfg.ray.ray_run_name,
                storage_path=cfg.ray.ray_storage_path,
                storage_filesystem=filesystem(cfg.ray.ray_storage_filesystem),
                checkpoint_config=CheckpointConfig(num_to_keep=t.get("save_total_limit")),
                failure_config=FailureConfig(max_failures=cfg.ray.ray_max_failures),
                callbacks=callbacks,
            ),
            datasets=datasets,
        )
        return trainer.fit()


@contextlib.contextmanager
def reward_actors(cfg: RecipeConfig, plan: Plan, log=print):
    """Starts the reward model's own group of Ray actors (reward_model_workers) for the run, waits until each
    has loaded its model, yields their names, and stops them when the run ends. Yields [] without a group."""
    count = cfg.ray.reward_model_workers
    if not count:
        yield []
        return
    import ray

    from rayft.trainers.rewards import RewardServer

    bundle = dict(cfg.ray.reward_model_resources or plan.resources_per_worker)
    options = {"num_cpus": bundle.pop("CPU", 0), "num_gpus": bundle.pop("GPU", 0)}
    if "memory" in bundle:
        options["memory"] = bundle.pop("memory")
    if bundle:
        options["resources"] = bundle
    with_reference = cfg.finetuning.finetuning_type in ("freeze", "full")
    names = [f"rayft-reward-{uuid.uuid4().hex[:8]}-{i}" for i in range(count)]
    server = ray.remote(RewardServer)
    actors = [server.options(name=name, **options).remote(cfg.to_dict(mask_secrets=False), options["num_gpus"] > 0,
                                                          with_reference) for name in names]
    try:
        for name, where in zip(names, ray.get([actor.where.remote() for actor in actors])):
            log(f"[rayft] reward actor {name} on node {where['node_id']} (pid {where['pid']})"
                + (", with the reference model" if with_reference else ""))
        yield names
    finally:
        for actor in actors:
            ray.kill(actor)


def quiet_ray_data() -> None:
    """rayft logs its own data summary; Ray Data's per-operator progress bars only add noise to the log."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False


def tokenized_cache(cfg: RecipeConfig, split: str) -> tuple[Path | None, bool]:
    """Where split `split`'s tokenised data is cached, and whether that is a folder the user named (strict).

    The automatic cache lives under ray_storage_path; Ray Data reads it from any node, so on a cluster it
    is used only when data_shared_file_system says that path is shared by every node.
    """
    d, r = cfg.data, cfg.ray
    if d.tokenized_path:
        return Path(d.tokenized_path) / split, True
    if "://" not in r.ray_storage_path and (r.ray_address is None or d.data_shared_file_system):
        return Path(r.ray_storage_path) / ".tokenized", False
    return None, False


def _tokenized(cfg: RecipeConfig, examples: list[dict], split: str, log):
    d = cfg.data
    settings = EncodingSettings(template=d.template, cutoff_len=d.cutoff_len, train_on_prompt=d.train_on_prompt,
                                mask_history=d.mask_history, packing=d.packing, neat_packing=d.neat_packing,
                                stage=cfg.finetuning.stage)
    if d.streaming and split == "train":
        dataset = tokenize(examples, cfg.model.model_name_or_path, settings, d.preprocessing_batch_size,
                           stream_tasks=cfg.ray.ray_num_workers)
        log(f"[rayft] train data: {len(examples)} examples, streamed: tokenised as the workers read them, never "
            f"materialised or cached; each worker shuffles through a buffer of {d.buffer_size} examples")
        log("[rayft] first training example:\n" + describe_example(dataset.take(1)[0],
                                                                     load_tokenizer(cfg.model.model_name_or_path)))
        return dataset
    cache_dir, strict = tokenized_cache(cfg, split)
    dataset, reused = tokenize_cached(examples, cfg.model.model_name_or_path, settings, d.preprocessing_batch_size,
                                      cache_dir, strict, overwrite=d.overwrite_cache)
    if reused:
        log(f"[rayft] {split} data: reusing tokenised data from {cache_dir} (same data, tokenizer and settings)")
    stats = token_stats(dataset)
    packed = f" packed into {stats['examples']} sequences," if d.packing else ""
    log(f"[rayft] {split} data: {len(examples)} examples,{packed} {stats['tokens']} tokens "
        f"({stats['trained_tokens']} trained), {stats['truncated_tokens']} tokens cut by cutoff_len={d.cutoff_len}")
    if split == "train":
        log("[rayft] first training example:\n" + describe_example(dataset.take(1)[0],
                                                                     load_tokenizer(cfg.model.model_name_or_path)))
    return dataset
