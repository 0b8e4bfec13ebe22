"""Where grpo's completions are sampled: in the training worker itself, or on a group of Ray actors that hold a
copy of the policy (rollout_workers) and get its new weights through the object store after every step.

Both return, for a batch of prompts, `num_generations` completions of each (consecutive) and, where they are
needed, the log-probabilities the sampling policy gave them: the importance ratio's denominator, which keeps the
clipped surrogate right when the actors sample a step ahead (async_rollouts).

Every batch is sampled with a seed of its own (the run's seed, the step it is learnt at and the worker's rank): an
actor that serves several workers gives each the same completions whatever order their requests arrive in, so a run
samples the same completions every time, with or without rollout actors.
"""

import os
from dataclasses import dataclass

import ray
import torch

from rayft.recipe.config import RecipeConfig
from rayft.trainers.generate import cut_at_stop, generation_kwargs, left_padded, stop_token_ids
from rayft.trainers.model import load_tokenizer, prepare_model
from rayft.trainers.rewards import model_logprobs, right_padded


@dataclass
class Sampled:
    """The completions of one batch of prompts, `num_generations` per prompt in prompt order."""

    completions: list[list[int]]
    logprobs: list[list[float]] | None  # the sampling policy's, per completion token (None: not measured)
    version: int  # the optimizer steps the sampling policy had taken


class Sampler:
    """Samples groups of completions with a causal LM (the policy, or an actor's copy of it)."""

    def __init__(self, model, tokenizer, cfg: RecipeConfig, device):
        g = cfg.generating
        self.model, self.device, self.pad = model, device, tokenizer.pad_token_id
        self.stops = stop_token_ids(tokenizer, cfg)
        self.kwargs = generation_kwargs(g, self.stops, self.pad)
        self.temperature = g.temperature  # the log-probabilities are those of logits / temperature
        self.num_generations = cfg.finetuning.num_generations

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], with_logprobs: bool, seed: int
               ) -> tuple[list[list[int]], list[list[float]] | None]:
        with torch.random.fork_rng(devices=[self.device] if str(self.device).startswith("cuda") else []):
            torch.manual_seed(seed)  # this batch's own stream; the process's (training's) stream is left as it was
            return self._sample(prompts, with_logprobs)

    def _sample(self, prompts: list[list[int]], with_logprobs: bool):
        repeated = [p for p in prompts for _ in range(self.num_generations)]
        prompt_ids, prompt_mask = left_padded(repeated, self.pad, self.device)
        longest = prompt_ids.shape[1]
        training = self.model.training
        self.model.eval()
        try:
            generated = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True,
                                            **self.kwargs)
            completions = [cut_at_stop(row.tolist(), self.stops) for row in generated[:, longest:]]
            logprobs = None
            if with_logprobs:
                ids, mask = right_padded(completions, self.pad, self.device)
                measured = model_logprobs(self.model, torch.cat([prompt_ids, ids], 1),
                                          torch.cat([prompt_mask, mask], 1), longest, self.temperature)
                logprobs = [row[:len(c)].tolist() for row, c in zip(measured.float().cpu(), completions)]
        finally:
            self.model.train(training)
        return completions, logprobs


class LocalRollouts:
    """Every worker samples its own completions with the policy it trains (no rollout actors)."""

    description = "in each worker"

    def __init__(self, sampler: Sampler):
        # no log-probabilities: the step measures them with the policy itself when it needs them (ppo_epochs > 1)
        self.sampler, self.prompts, self.seed, self.version = sampler, None, 0, 0

    def publish(self, weights_of, version: int) -> None:
        self.version = version  # the policy itself samples: nothing to send

    def submit(self, prompts: list[list[int]], seed: int) -> None:
        self.prompts, self.seed = prompts, seed

    def collect(self) -> Sampled:
        completions, _ = self.sampler.sample(self.prompts, with_logprobs=False, seed=self.seed)
        return Sampled(completions, None, self.version)


class RolloutServer:
    """A Ray actor of the rollout group: a copy of the policy that samples completions, and loads the trained
    weights (the trainable parameters only: a LoRA adapter's when the policy is LoRA) when it is sent them."""

    def __init__(self, recipe: dict, use_gpu: bool, seed: int):
        cfg = RecipeConfig.from_dict(recipe)
        self.device = "cuda" if use_gpu else "cpu"
        torch.manual_seed(seed)
        model = prepare_model(cfg, use_gpu).to(self.device)
        self.trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        model.requires_grad_(False)
        self.sampler = Sampler(model, load_tokenizer(cfg.model), cfg, self.device)
        self.version, self.calls = -1, 0

    def where(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "calls": self.calls,
                "version": self.version}

    def load_weights(self, weights: dict, version: int) -> int:
        missing = self.trainable - set(weights)
        if missing:
            raise RuntimeError(f"the rollout actor's policy has trainable weights the trainer did not send "
                               f"({sorted(missing)[:3]} ...)")
        self.sampler.model.load_state_dict(weights, strict=False)
        self.version = version
        return version

    def generate(self, prompts: list[list[int]], seed: int) -> Sampled:
        self.calls += 1
        completions, logprobs = self.sampler.sample(prompts, with_logprobs=True, seed=seed)
        return Sampled(completions, logprobs, self.version)


class ActorRollouts:
    """A training worker's client of the rollout actors: rank 0 sends every actor the new weights (one object in
    the object store, read by all), and each worker asks its actor (rank modulo the group's size) for samples."""

    def __init__(self, actor_names: list[str], rank: int):
        self.actors = [ray.get_actor(name) for name in actor_names]
        self.rank, self.actor, self.pending = rank, self.actors[rank % len(self.actors)], None
        self.published = -1
        self.description = f"on rollout actor {rank % len(self.actors)} of {len(self.actors)}"

    def publish(self, weights_of, version: int) -> None:
        """Sends the weights after `version` optimizer steps to every actor (once per version); every worker then
        waits for all, so that no worker asks for samples before its actor holds them."""
        if version == self.published:
            return
        if self.rank == 0:
            weights = ray.put(weights_of())
            ray.get([actor.load_weights.remote(weights, version) for actor in self.actors])
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        self.published = version

    def submit(self, prompts: list[list[int]], seed: int) -> None:
        self.pending = self.actor.generate.remote(prompts, seed)

    def collect(self) -> Sampled:
        sampled, self.pending = ray.get(self.pending), None
        return sampled

    def where(self) -> list[dict]:
        return ray.get([actor.where.remote() for actor in self.actors])


def sample_seed(run_seed: int, step: int, rank: int) -> int:
    """The seed of the batch a worker of rank `rank` learns at optimizer step `step` (0-based)."""
    return (run_seed * 1_000_003 + step) * 1_009 + rank
