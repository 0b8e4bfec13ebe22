"""Pure planning: a validated config plus the cluster's nodes become a `Plan`, or a refusal.

Nothing here talks to Ray; the launcher reads the cluster, calls `make_plan`, then carries the plan out.
"""

import math

from rayft.orchestrator.memory import GB, MemorySettings, ModelShape, estimate, pick_deepspeed
from rayft.recipe import deepspeed as ds
from rayft.recipe.config import RecipeConfig
from rayft.recipe.derive import is_elastic, prompts_per_step, reference_kind
from rayft.recipe.optimizers import optimizer_kind, uses_bitsandbytes
from rayft.recipe.plan import Node, Plan
from rayft.recipe.problems import ConfigError, Problem
from rayft.recipe.stages import ONLINE_STAGES


def worker_resources(cfg: RecipeConfig, nodes: list[Node], trials_at_once: int = 1) -> tuple[dict, str | None]:
    """The bundle each worker gets, and why when rayft chose it (None when `resources_per_worker` is set).

    Unset, a GPU worker gets one GPU and its node's CPUs per GPU (for its data loading); a CPU worker gets the
    most whole CPUs with which all workers (of all `trials_at_once` trials of a sweep, and any reward actors
    that share the workers' bundle) can be placed under the placement strategy: Ray caps a worker's threads at
    its CPUs, so a CPU no worker holds does no training. It is never below one CPU; where even that cannot be
    placed, the placement check says so.
    """
    r = cfg.ray
    if r.resources_per_worker:
        return dict(r.resources_per_worker), None
    gpu_nodes = [n for n in nodes if n.resources.get("GPU", 0) >= 1]
    if gpu_nodes:
        per_gpu = max(1, min(math.floor(n.resources.get("CPU", 0) / n.resources["GPU"]) for n in gpu_nodes))
        return {"GPU": 1, "CPU": per_gpu}, (f"resources_per_worker unset: 1 GPU and {per_gpu} CPU(s) per worker "
                                            "(the GPU nodes' CPUs per GPU, for data loading)")
    workers = r.max_workers * trials_at_once
    strategy = r.placement_strategy if trials_at_once == 1 else "PACK"
    most = max((int(n.resources.get("CPU", 0)) for n in nodes), default=1)
    for cpus in range(most, 0, -1):
        bundle = {"CPU": cpus}
        if not placement_problems(bundle, workers, strategy, nodes) and not actor_group_problems(cfg, bundle, nodes,
                                                                                                   trials_at_once):
            break
    else:
        bundle = {"CPU": 1}
    held = f"{workers} worker(s) of {trials_at_once} trials at once" if trials_at_once > 1 else f"{workers} worker(s)"
    return bundle, (f"resources_per_worker unset: {bundle['CPU']} CPU(s) per worker, the most with which "
                    f"{held} fit the cluster's CPUs; each worker computes on {bundle['CPU']} thread(s)")


def bundles_per_node(bundle: dict, node: Node) -> int:
    """How many copies of `bundle` fit into `node`'s total resources."""
    fits = [
        math.floor(node.resources.get(name, 0.0) / amount + 1e-9)
        for name, amount in bundle.items()
        if amount > 0
    ]
    return min(fits) if fits else 1_000_000


def placement_problems(bundle: dict, count: int, strategy: str, nodes: list[Node]) -> list[str]:
    """Why `count` copies of `bundle` can never be placed on `nodes` under `strategy` (empty if they can)."""
    if not nodes:
        return ["the cluster has no alive nodes"]
    per_node = [bundles_per_node(bundle, n) for n in nodes]
    totals = {name: sum(n.resources.get(name, 0.0) for n in nodes) for name in bundle}
    if bundle.get("GPU", 0) > 0 and totals.get("GPU", 0) == 0:
        reason = "a GPU is requested per worker but the cluster has no GPUs"
    elif strategy == "STRICT_PACK" and max(per_node) < count:
        reason = f"STRICT_PACK needs all {count} workers on one node, but at most {max(per_node)} fit on any node"
    elif strategy == "STRICT_SPREAD" and sum(1 for k in per_node if k >= 1) < count:
        fitting = sum(1 for k in per_node if k >= 1)
        reason = f"STRICT_SPREAD needs {count} different nodes that each fit a worker, but only {fitting} do"
    elif sum(per_node) < count:
        reason = f"{count} workers need {_scaled(bundle, count)} but at most {sum(per_node)} fit"
    else:
        return []
    described = "; ".join(f"node {n.node_id[:12]} ({n.ip}): {_short(n.resources)}" for n in nodes)
    return [Problem("resources", f"{reason}. The cluster has {described}. Lower ray_num_workers or "
                                 "resources_per_worker, or choose another placement_strategy")]


def actor_groups(cfg: RecipeConfig, worker_bundle: dict) -> list[tuple[str, int, dict]]:
    """The groups of Ray actors a run starts beside its workers, as (resources key, count, bundle each): the reward
    model's (stage ppo, reward_model_workers) and the rollout generators (stage grpo, rollout_workers)."""
    r = cfg.ray
    groups = [("reward_model_resources", r.reward_model_workers, r.reward_model_resources),
              ("rollout_resources", r.rollout_workers, r.rollout_resources)]
    return [(key, count, dict(bundle or worker_bundle)) for key, count, bundle in groups if count > 0]


def actor_group_problems(cfg: RecipeConfig, worker_bundle: dict, nodes: list[Node],
                          trials_at_once: int = 1) -> list[str]:
    """Why the actor groups (reward model actors, rollout actors) cannot run beside the training workers."""
    r = cfg.ray
    groups = actor_groups(cfg, worker_bundle)
    if not groups:
        return []
    names = set(worker_bundle).union(*(bundle for _, _, bundle in groups))
    needed = {k: (worker_bundle.get(k, 0) * r.max_workers + sum(b.get(k, 0) * n for _, n, b in groups))
              * trials_at_once for k in names}
    totals = {k: sum(n.resources.get(k, 0.0) for n in nodes) for k in needed}
    short = {k: v for k, v in needed.items() if v > totals[k] + 1e-9}
    unplaceable = [key for key, count, bundle in groups if sum(bundles_per_node(bundle, n) for n in nodes) < count]
    if short or unplaceable:
        key = unplaceable[0] if unplaceable else groups[-1][0]
        described = ", ".join(f"{count} {key.split('_')[0]} actor(s) of {bundle}" for key, count, bundle in groups)
        counts = " / ".join(k.replace("resources", "workers") for k, _, _ in groups)
        return [Problem(key, f"{described} beside {r.max_workers} worker(s) of {worker_bundle} need {needed}, "
                             f"but the cluster has { {k: totals[k] for k in needed} }; lower {counts}, "
                             f"{' / '.join(k for k, _, _ in groups)} or resources_per_worker")]
    return []


def check_placement(cfg: RecipeConfig, nodes: list[Node], trials_at_once: int = 1) -> tuple[dict, str | None]:
    """The bundle each worker gets and why (see `worker_resources`); raises ConfigError when the workers (and
    reward actors) can never be placed."""
    r = cfg.ray
    bundle, why = worker_resources(cfg, nodes, trials_at_once)
    problems = placement_problems(bundle, r.min_workers, r.placement_strategy, nodes)
    problems += actor_group_problems(cfg, bundle, nodes)
    if problems:
        raise ConfigError(problems)
    return bundle, why


def startable_now(plan: Plan, free: list[Node]) -> str:
    """Whether an elastic run's minimum group fits in the resources the cluster has free now, in one line."""
    fits = sum(bundles_per_node(plan.resources_per_worker, n) for n in free)
    verdict = "can start now" if fits >= plan.min_workers else "waits until enough is free"
    return (f"elastic: the free resources fit {min(fits, plan.num_workers)} of {plan.num_workers} workers now; the "
            f"minimum of {plan.min_workers} {verdict}")


def make_plan(cfg: RecipeConfig, nodes: list[Node], num_train_examples: int, shape: ModelShape | None = None,
              gpu_memory: int | None = None, report_every_log: bool = False, run_id: str = "",
              trials_at_once: int = 1, train_tokens: int = 0) -> Plan:
    """Decides workers, devices, DeepSpeed and batch arithmetic; raises ConfigError if it cannot fit.

    With the model's `shape` the plan carries the memory planner's estimate per worker, and `deepspeed:
    auto` is decided against the memory each worker gets (`gpu_memory` per GPU, or its share of its node's).
    `report_every_log` is set for a sweep's trial (its scheduler sees every logged record); `run_id` makes the
    names of the reward model's actors unique; `trials_at_once` is how many trials of a sweep share the cluster.
    """
    r, t = cfg.ray, cfg.args
    bundle, why = check_placement(cfg, nodes, trials_at_once)
    problems = []
    workers, elastic = r.max_workers, is_elastic(r)
    per_device = t.per_device_train_batch_size
    accumulation = t.gradient_accumulation_steps
    global_batch = per_device * accumulation * workers
    examples_per_worker = num_train_examples // workers
    if num_train_examples and examples_per_worker == 0:
        problems.append(Problem("dataset", f"{num_train_examples} examples cannot feed {workers} workers; "
                                           "lower ray_num_workers or add data"))
    if elastic and num_train_examples < global_batch:
        problems.append(Problem("dataset", f"{num_train_examples} examples cannot fill one global batch of "
                                           f"{global_batch}; add data or lower the batch"))
    if problems:
        raise ConfigError(problems)

    use_gpu = bundle.get("GPU", 0) > 0
    if elastic:  # every size reads the same global order, a global batch per step: the epoch's length is global
        steps_per_epoch = num_train_examples // global_batch
        examples_per_worker = steps_per_epoch * global_batch // workers
    elif cfg.finetuning.stage == "grpo":  # a step answers prompts_per_step prompts, each num_generations times
        steps_per_epoch = max(math.ceil(examples_per_worker / prompts_per_step(cfg)), 1)
    else:  # a PPO step answers ppo_buffer_size batches of prompts, then learns from them
        rollouts = cfg.finetuning.ppo_buffer_size if cfg.finetuning.stage == "ppo" else 1
        steps_per_epoch = max(math.ceil(examples_per_worker / (per_device * rollouts)) // accumulation, 1)
    max_steps = t.max_steps
    total = max_steps if max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)
    notes = [why] if why else []
    memory = None
    if shape is not None or t.deepspeed == "auto":
        budget = worker_budget(bundle, workers, nodes, use_gpu, gpu_memory)
        deepspeed, memory = plan_memory(cfg, shape, budget,
                                        use_gpu, per_device, notes)
    else:
        deepspeed = ds.materialize(t.deepspeed)
    f = cfg.finetuning
    if f.stage == "grpo":
        where = (f"on {r.rollout_workers} rollout actor(s)" + (", a step ahead (async_rollouts)" if f.async_rollouts
                                                               else "")) if r.rollout_workers else "in the worker"
        notes.append(f"grpo: each step samples {f.num_generations} completions for each of {prompts_per_step(cfg)} "
                     f"prompts per worker ({where}), then makes {f.ppo_epochs} optimizer update(s) of "
                     f"{accumulation} micro-batch(es) of {per_device} on them")
    if f.stage == "ppo":
        notes.append(f"ppo: each step answers {prompts_per_step(cfg)} prompts per worker, then makes "
                     f"{f.ppo_epochs} epoch(s) x {f.ppo_buffer_size} optimizer update(s) on them")
        if f.reward_model_type == "full" and not r.reward_model_workers and memory is not None:
            notes.append("memory: the estimate leaves out the full reward model each worker also holds (about the "
                         "weights of one more model); reward_model_workers moves it to actors of its own")
    if elastic:
        notes.extend(elastic_notes(r.min_workers, workers, per_device, global_batch, r.ray_resize_interval_s,
                                   num_train_examples - steps_per_epoch * global_batch))
    elif num_train_examples % workers:
        dropped = num_train_examples % workers
        notes.append(f"{dropped} example(s) left out so that every worker gets {examples_per_worker} (equal shards)")
    in_process = trains_in_process(cfg, workers, elastic, deepspeed, report_every_log)
    if in_process:
        notes.append("one worker on this machine, no DeepSpeed, no checkpoints, no restarts: it trains in the driver's "
                     "own process (Ray Train's local mode), without a worker group to start")
    if not use_gpu:
        notes.append("CPU workers: use_cpu=True and the gloo process group")
        if t.bf16 or t.fp16:
            notes.append(f"precision: {'bf16' if t.bf16 else 'fp16'} is for GPUs; these CPU workers train in fp32")
        if cfg.finetuning.pure_bf16:
            notes.append("precision: pure_bf16 keeps bf16 weights on these CPU workers, which compute in bf16 far "
                         "slower than in fp32")
    return Plan(
        report_every_log=report_every_log,
        progress_board=None if report_every_log else f"rayft-progress-{run_id}",
        reward_actors=tuple(f"rayft-reward-{run_id}-{i}" for i in range(r.reward_model_workers)),
        rollout_actors=tuple(f"rayft-rollout-{run_id}-{i}" for i in range(r.rollout_workers)),
        num_workers=workers,
        min_workers=r.min_workers if elastic else None,
        resources_per_worker=bundle,
        placement_strategy=r.placement_strategy,
        use_gpu=use_gpu,
        backend="nccl" if use_gpu else "gloo",
        deepspeed=deepspeed,
        zero_stage=ds.zero_stage(deepspeed),
        offload=tuple(ds.offload_targets(deepspeed)),
        num_train_examples=num_train_examples,
        examples_per_worker=examples_per_worker,
        per_device_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        global_batch_size=global_batch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        notes=tuple(notes),
        memory_per_worker=memory,
        in_process=in_process,
        train_tokens=train_tokens,
    )


def trains_in_process(cfg: RecipeConfig, workers: int, elastic: bool, deepspeed: dict | None,
                      sweep_trial: bool) -> bool:
    """Whether the run's one worker is the driver's own process (Ray Train's local mode), which saves starting Ray
    Train's controller and worker processes (about 12 s here). Only where local mode changes nothing the run asks
    for: one worker on a local instance, not elastic, no DeepSpeed (it needs a process group), no checkpoint (local
    mode keeps none in storage), no restart, nothing from bitsandbytes (the driver has none), no sweep trial, and
    not the online stages (their actor groups expect a worker group)."""
    r, t = cfg.ray, cfg.args
    return (workers == 1 and not elastic and r.ray_address is None and deepspeed is None and t.save_strategy == "no"
            and r.ray_max_failures == 0 and not uses_bitsandbytes(cfg) and not sweep_trial
            and cfg.finetuning.stage not in ONLINE_STAGES)


def elastic_notes(low: int, high: int, per_device: int, global_batch: int, interval: float, left_out: int) -> list[str]:
    """What an elastic run does at each size of its range, for the plan's notes."""
    sizes = ", ".join(f"{n} worker(s) x {global_batch // (per_device * n)}" for n in range(low, high + 1))
    return [f"elastic: {low} to {high} workers; gradient accumulation by size keeps the global batch at "
            f"{global_batch}: {sizes}",
            f"elastic: a lost node shrinks the group (a restart from the latest checkpoint, counted by "
            f"ray_max_failures); Ray Train checks every {interval:g} s whether it can grow back",
            f"elastic: every worker reads the same shuffled order of the epoch and trains its share of each global "
            f"batch, so a resize neither repeats nor skips an example; {left_out} example(s) short of a whole global "
            "batch are left out of each epoch"]


def plan_memory(cfg: RecipeConfig, shape: ModelShape | None, budget: int | None, use_gpu: bool, per_device: int,
                notes: list[str]) -> tuple[dict | None, dict]:
    """The DeepSpeed config (`auto` decided against `budget` bytes per worker) and the memory estimate by part;
    what was decided and why is appended to `notes`."""
    if shape is None:
        raise ConfigError([Problem("deepspeed", "auto needs the model's shape; the planner could not read the model")])
    spec = cfg.args.deepspeed
    if spec == "auto":
        if budget is None:
            raise ConfigError([Problem("deepspeed", "auto needs the memory a worker gets: set "
                                                    "resources_per_worker.memory (bytes) or choose a deepspeed "
                                                    "shorthand (z0 ... z3_offload)")])
        spec, tried = pick_deepspeed(shape, memory_settings(cfg, use_gpu, per_device), budget)
        if spec is None:
            estimates = "; ".join(tried)
            raise ConfigError([Problem("deepspeed", f"auto found no DeepSpeed setup that fits {budget / GB:.2f} GB per "
                                                    "worker; add workers, lower per_device_train_batch_size or "
                                                    f"cutoff_len, or use LoRA. Estimates per worker: {estimates}")])
        notes.append(f"deepspeed: auto chose {spec}, the first that fits ({'; '.join(tried)})")
    chosen = ds.materialize(spec)
    found = estimate(shape, memory_settings(cfg, use_gpu, per_device, ds.zero_stage(chosen),
                                            tuple(ds.offload_targets(chosen))))
    if budget is not None and found.device > budget:
        notes.append(f"memory: the estimate ({found.device / GB:.2f} GB) exceeds what a worker gets "
                     f"({budget / GB:.2f} GB); consider deepspeed: auto")
    host = {f"host: {k}": v for k, v in found.host_parts.items()}
    return chosen, {**found.parts, **host, "budget": budget}


def memory_settings(cfg: RecipeConfig, use_gpu: bool, per_device: int, zero_stage: int | None = None,
                    offload: tuple[str, ...] = ()) -> MemorySettings:
    """The settings of a recipe that change a worker's memory."""
    f, m, t = cfg.finetuning, cfg.model, cfg.args
    return MemorySettings(
        num_workers=cfg.ray.min_workers, zero_stage=zero_stage, offload=offload, use_gpu=use_gpu,
        mixed_precision=use_gpu and bool(t.bf16 or t.fp16) and not f.pure_bf16,
        per_device_batch_size=per_device, cutoff_len=cfg.data.cutoff_len,
        gradient_checkpointing=not m.disable_gradient_checkpointing,
        reference_copy=reference_kind(cfg) == "copy",
        eager_attention=m.flash_attn == "disabled" or not use_gpu, quantization_bit=m.quantization_bit,
        optimizer=optimizer_kind(f), finetuning=f)


def worker_budget(bundle: dict, num_workers: int, nodes: list[Node], use_gpu: bool,
                  gpu_memory: int | None) -> int | None:
    """The memory one worker may use: its GPU's, or its `memory` resource, or an equal share of the memory of
    the node that would hold the most workers (None when unknown)."""
    if use_gpu:
        return gpu_memory
    if bundle.get("memory"):
        return int(bundle["memory"])
    shares = [n.resources["memory"] / min(num_workers, bundles_per_node(bundle, n))
              for n in nodes if n.resources.get("memory") and bundles_per_node(bundle, n) > 0]
    return int(min(shares)) if shares else None


def _scaled(bundle: dict, count: int) -> dict:
    return {k: v * count for k, v in bundle.items()}


def _short(resources: dict) -> str:
    keep = {k: v for k, v in resources.items() if k in ("CPU", "GPU") or k.startswith("accelerator")}
    return ", ".join(f"{k}={v:g}" for k, v in sorted(keep.items())) or "no CPU/GPU"
