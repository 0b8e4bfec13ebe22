"""Pure planning: a validated config plus the cluster's nodes become a `Plan`, or a refusal.

Nothing here talks to Ray; the launcher reads the cluster, calls `make_plan`, then carries the plan out.
"""

import math
from dataclasses import asdict, dataclass, field

from rayft.orchestrator.config import ConfigError, RecipeConfig
from rayft.orchestrator.memory import GB, MemorySettings, ModelShape, estimate, pick_deepspeed
from rayft.trainers import deepspeed as ds


@dataclass(frozen=True)
class Node:
    """One alive node of the cluster and the resources it has in total."""

    node_id: str
    ip: str
    resources: dict


@dataclass
class Plan:
    num_workers: int
    resources_per_worker: dict
    placement_strategy: str
    use_gpu: bool
    backend: str
    deepspeed: dict | None
    zero_stage: int | None
    offload: list[str]
    num_train_examples: int
    examples_per_worker: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    steps_per_epoch: int
    total_steps: int
    notes: list[str] = field(default_factory=list)
    memory_per_worker: dict | None = None  # the memory planner's estimate: part -> bytes, with "budget"
    report_every_log: bool = False  # a sweep's trial reports each logged record, for its scheduler
    reward_actors: list[str] = field(default_factory=list)  # names of the reward model's actors (stage ppo)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        stage = "off" if self.zero_stage is None else f"ZeRO-{self.zero_stage}"
        offload = f" (offload: {', '.join(self.offload)})" if self.offload else ""
        lines = [
            f"workers            {self.num_workers} x {self.resources_per_worker}, strategy {self.placement_strategy}",
            f"device             {'cuda' if self.use_gpu else 'cpu'}, process group {self.backend}",
            f"deepspeed          {stage}{offload}",
            f"examples           {self.num_train_examples} ({self.examples_per_worker} per worker)",
            f"batch size         {self.per_device_batch_size} per device x {self.num_workers} workers x "
            f"{self.gradient_accumulation_steps} accumulation = {self.global_batch_size} global",
            f"optimizer steps    {self.steps_per_epoch} per epoch, {self.total_steps} in total",
        ]
        if self.memory_per_worker:
            parts = {k: v for k, v in self.memory_per_worker.items() if k != "budget" and v}
            budget = self.memory_per_worker.get("budget")
            lines.append(f"memory per worker  {sum(parts.values()) / GB:.2f} GB estimated"
                         + (f" of {budget / GB:.2f} GB" if budget else "") + ": "
                         + ", ".join(f"{k} {v / GB:.2f}" for k, v in parts.items()))
        return "\n".join(lines + [f"note               {n}" for n in self.notes])


def worker_resources(requested: dict | None, cluster_has_gpu: bool) -> dict:
    """rayft's default: one GPU per worker where the cluster has GPUs, one CPU per worker otherwise."""
    if requested:
        return dict(requested)
    return {"GPU": 1} if cluster_has_gpu else {"CPU": 1}


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
    return [f"resources: {reason}. The cluster has {described}. Lower ray_num_workers or "
            f"resources_per_worker, or choose another placement_strategy"]


def reward_actor_problems(cfg: RecipeConfig, worker_bundle: dict, nodes: list[Node]) -> list[str]:
    """Why the reward model's actors (reward_model_workers) cannot run beside the training workers."""
    r = cfg.ray
    if not r.reward_model_workers:
        return []
    actor = dict(r.reward_model_resources or worker_bundle)
    needed = {k: actor.get(k, 0) * r.reward_model_workers + worker_bundle.get(k, 0) * r.ray_num_workers
              for k in set(actor) | set(worker_bundle)}
    totals = {k: sum(n.resources.get(k, 0.0) for n in nodes) for k in needed}
    short = {k: v for k, v in needed.items() if v > totals[k] + 1e-9}
    if sum(bundles_per_node(actor, n) for n in nodes) < r.reward_model_workers or short:
        return [f"reward_model_resources: {r.reward_model_workers} reward actor(s) of {actor} beside "
                f"{r.ray_num_workers} worker(s) of {worker_bundle} need {needed}, but the cluster has "
                f"{ {k: totals[k] for k in needed} }; lower reward_model_workers, reward_model_resources or "
                "resources_per_worker"]
    return []


def make_plan(cfg: RecipeConfig, nodes: list[Node], num_train_examples: int, shape: ModelShape | None = None,
              gpu_memory: int | None = None) -> Plan:
    """Decides workers, devices, DeepSpeed and batch arithmetic; raises ConfigError if it cannot fit.

    With the model's `shape` the plan carries the memory planner's estimate per worker, and `deepspeed:
    auto` is decided against the memory each worker gets (`gpu_memory` per GPU, or its share of its node's).
    """
    r, t = cfg.ray, cfg.training
    has_gpu = any(n.resources.get("GPU", 0) > 0 for n in nodes)
    bundle = worker_resources(r.resources_per_worker, has_gpu)
    problems = placement_problems(bundle, r.ray_num_workers, r.placement_strategy, nodes)
    problems += reward_actor_problems(cfg, bundle, nodes)
    examples_per_worker = num_train_examples // r.ray_num_workers
    if num_train_examples and examples_per_worker == 0:
        problems.append(f"dataset: {num_train_examples} examples cannot feed {r.ray_num_workers} workers; "
                        "lower ray_num_workers or add data")
    if problems:
        raise ConfigError(problems)

    use_gpu = bundle.get("GPU", 0) > 0
    per_device = t.get("per_device_train_batch_size", 8)
    accumulation = t.get("gradient_accumulation_steps", 1)
    # a PPO step generates for ppo_buffer_size x per_device x accumulation prompts, then learns from them
    rollouts = cfg.finetuning.ppo_buffer_size if cfg.finetuning.stage == "ppo" else 1
    batches = math.ceil(examples_per_worker / (per_device * rollouts))
    steps_per_epoch = max(batches // accumulation, 1)
    max_steps = t.get("max_steps", -1)
    total = max_steps if max_steps > 0 else math.ceil(t.get("num_train_epochs", 3.0) * steps_per_epoch)
    notes = []
    memory = None
    if shape is not None or t.get("deepspeed") == "auto":
        deepspeed, memory = plan_memory(cfg, shape, worker_budget(bundle, r.ray_num_workers, nodes, use_gpu, gpu_memory),
                                        use_gpu, per_device, notes)
    else:
        deepspeed = ds.materialize(t.get("deepspeed"))
    if cfg.finetuning.stage == "ppo":
        f = cfg.finetuning
        notes.append(f"ppo: each step answers {per_device * accumulation * rollouts} prompts per worker, then makes "
                     f"{f.ppo_epochs} epoch(s) x {rollouts} optimizer update(s) on them")
        if f.reward_model_type == "full" and not r.reward_model_workers and memory is not None:
            notes.append("memory: the estimate leaves out the full reward model each worker also holds (about the "
                         "weights of one more model); reward_model_workers moves it to actors of its own")
    if num_train_examples % r.ray_num_workers:
        dropped = num_train_examples % r.ray_num_workers
        notes.append(f"{dropped} example(s) left out so that every worker gets {examples_per_worker} (equal shards)")
    if not use_gpu:
        notes.append("CPU workers: use_cpu=True and the gloo process group")
        idle = sum(n.resources.get("CPU", 0) for n in nodes) - bundle.get("CPU", 0) * r.ray_num_workers
        if r.resources_per_worker is None and idle >= 1:
            # Ray caps a worker's threads (OMP_NUM_THREADS) at its CPUs: a CPU no worker holds does no training
            notes.append(f"{idle:g} CPU(s) of the cluster are held by no worker, and each worker computes on its "
                         "own CPUs only; set resources_per_worker.CPU (e.g. the node's CPUs / workers per node)")
    return Plan(
        num_workers=r.ray_num_workers,
        resources_per_worker=bundle,
        placement_strategy=r.placement_strategy,
        use_gpu=use_gpu,
        backend="nccl" if use_gpu else "gloo",
        deepspeed=deepspeed,
        zero_stage=ds.zero_stage(deepspeed),
        offload=ds.offload_targets(deepspeed),
        num_train_examples=num_train_examples,
        examples_per_worker=examples_per_worker,
        per_device_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        global_batch_size=per_device * accumulation * r.ray_num_workers,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        notes=notes,
        memory_per_worker=memory,
    )


def plan_memory(cfg: RecipeConfig, shape: ModelShape | None, budget: int | None, use_gpu: bool, per_device: int,
                notes: list[str]) -> tuple[dict | None, dict]:
    """The DeepSpeed config (`auto` decided against `budget` bytes per worker) and the memory estimate by part;
    what was decided and why is appended to `notes`."""
    if shape is None:
        raise ConfigError(["deepspeed: auto needs the model's shape; the planner could not read the model"])
    spec = cfg.training.get("deepspeed")
    if spec == "auto":
        if budget is None:
            raise ConfigError(["deepspeed: auto needs the memory a worker gets: set resources_per_worker.memory "
                               "(bytes) or choose a deepspeed shorthand (z0 ... z3_offload)"])
        spec, tried = pick_deepspeed(shape, memory_settings(cfg, use_gpu, per_device), budget)
        if spec is None:
            raise ConfigError([f"deepspeed: auto found no DeepSpeed setup that fits {budget / GB:.2f} GB per worker; "
                               "add workers, lower per_device_train_batch_size or cutoff_len, or use LoRA. Estimates "
                               "per worker: " + "; ".join(tried)])
        notes.append(f"deepspeed: auto chose {spec}, the first that fits ({'; '.join(tried)})")
    chosen = ds.materialize(spec)
    found = estimate(shape, memory_settings(cfg, use_gpu, per_device, ds.zero_stage(chosen),
                                            tuple(ds.offload_targets(chosen))))
    if budget is not None and found.device > budget:
        notes.append(f"memory: the estimate ({found.device / GB:.2f} GB) exceeds what a worker gets "
                     f"({budget / GB:.2f} GB); consider deepspeed: auto")
    return chosen, {**found.parts, **{f"host: {k}": v for k, v in found.host_parts.items()}, "budget": budget}


def memory_settings(cfg: RecipeConfig, use_gpu: bool, per_device: int, zero_stage: int | None = None,
                    offload: tuple[str, ...] = ()) -> MemorySettings:
    """The settings of a recipe that change a worker's memory."""
    f, m, t = cfg.finetuning, cfg.model, cfg.training
    return MemorySettings(
        num_workers=cfg.ray.ray_num_workers, zero_stage=zero_stage, offload=offload, use_gpu=use_gpu,
        mixed_precision=use_gpu and bool(t.get("bf16") or t.get("fp16")) and not f.pure_bf16,
        per_device_batch_size=per_device, cutoff_len=cfg.data.cutoff_len,
        gradient_checkpointing=not m.disable_gradient_checkpointing,
        reference_copy=bool(f.use_ref_model) and f.finetuning_type in ("freeze", "full"),
        eager_attention=m.flash_attn == "disabled" or not use_gpu)


def worker_budget(bundle: dict, num_workers: int, nodes: list[Node], use_gpu: bool, gpu_memory: int | None) -> int | None:
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
