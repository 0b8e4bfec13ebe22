"""The plan's types: a cluster node as the planner sees it, and the frozen `Plan` of one run.

`orchestrator/plan.py` decides a Plan; the workers receive it as plain data and rebuild it as the same type.
"""

from dataclasses import asdict, dataclass

from rayft.recipe.values import GB


@dataclass(frozen=True)
class Node:
    """One alive node of the cluster and the resources it has in total."""

    node_id: str
    ip: str
    resources: dict


@dataclass(frozen=True)
class Plan:
    """What the driver decided for one run. Built once, never changed; workers rebuild it with `from_dict`."""

    num_workers: int  # the most, for an elastic run
    resources_per_worker: dict
    placement_strategy: str
    use_gpu: bool
    backend: str
    deepspeed: dict | None
    zero_stage: int | None
    offload: tuple[str, ...]
    num_train_examples: int
    examples_per_worker: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    steps_per_epoch: int
    total_steps: int
    notes: tuple[str, ...] = ()
    memory_per_worker: dict | None = None  # the memory planner's estimate: part -> bytes, with "budget"
    report_every_log: bool = False  # a sweep's trial reports each logged record, for its scheduler
    reward_actors: tuple[str, ...] = ()  # names of the reward model's actors (stage ppo, reward_model_workers)
    rollout_actors: tuple[str, ...] = ()  # names of the rollout generators (stage grpo, rollout_workers)
    progress_board: str | None = None  # name of the driver's progress actor that rank 0 posts its records to
    min_workers: int | None = None  # an elastic run's fewest workers (None: always num_workers)
    in_process: bool = False  # Ray Train's local mode: the one worker is the driver's own process
    train_tokens: int = 0  # tokens of one epoch of training data, when include_effective_tokens_per_second asks
    # A segment of a pbt trial: it starts from this Ray Train checkpoint (another run's; its optimizer's
    # hyperparameters come from the recipe, not the checkpoint) and stops with a checkpoint after step stop_at
    start_from: dict | None = None  # {"uri": ..., "filesystem": ...}: the checkpoint on the run's storage
    stop_at: int | None = None  # None: the run trains to its end

    @property
    def elastic(self) -> bool:
        """The group's size moves between min_workers and num_workers."""
        return self.min_workers is not None and self.min_workers < self.num_workers

    def accumulation_at(self, workers: int) -> int:
        """Gradient accumulation steps that keep the global batch with `workers` workers (the plan's own at
        num_workers; the recipe's checks made every size of an elastic range divide it)."""
        return self.global_batch_size // (self.per_device_batch_size * workers)

    def to_dict(self) -> dict:
        """Plain data for the trip to the workers (and training_args.yaml)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        """The same Plan again, from `to_dict`'s output."""
        return cls(**{**data, "notes": tuple(data["notes"]), "offload": tuple(data["offload"]),
                      "reward_actors": tuple(data["reward_actors"]), "rollout_actors": tuple(data["rollout_actors"])})

    def summary(self) -> str:
        stage = "off" if self.zero_stage is None else f"ZeRO-{self.zero_stage}"
        offload = f" (offload: {', '.join(self.offload)})" if self.offload else ""
        workers = f"{self.min_workers} to {self.num_workers} (elastic)" if self.elastic else str(self.num_workers)
        lines = [
            f"workers            {workers} x {self.resources_per_worker}, " + (
                "in the driver's own process (Ray Train's local mode)" if self.in_process
                else f"strategy {self.placement_strategy}"),
            f"device             {'cuda' if self.use_gpu else 'cpu'}, process group {self.backend}",
            f"deepspeed          {stage}{offload}",
            f"examples           {self.num_train_examples} ({self.examples_per_worker} per worker)",
            f"batch size         {self.per_device_batch_size} per device x {self.num_workers} workers x "
            f"{self.gradient_accumulation_steps} accumulation = {self.global_batch_size} global",
            *([f"  at the minimum   {self.per_device_batch_size} per device x {self.min_workers} workers x "
               f"{self.accumulation_at(self.min_workers)} accumulation = {self.global_batch_size} global"]
              if self.elastic else []),
            f"optimizer steps    {self.steps_per_epoch} per epoch, {self.total_steps} in total",
        ]
        if self.memory_per_worker:
            parts = {k: v for k, v in self.memory_per_worker.items() if k != "budget" and v}
            budget = self.memory_per_worker.get("budget")
            lines.append(f"memory per worker  {sum(parts.values()) / GB:.2f} GB estimated"
                         + (f" of {budget / GB:.2f} GB" if budget else "") + ": "
                         + ", ".join(f"{k} {v / GB:.2f}" for k, v in parts.items()))
        return "\n".join(lines + [f"note               {n}" for n in self.notes])
