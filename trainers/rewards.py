"""PPO's reward models, each a callable from answered prompts (texts and token ids) to one score each:
an rm adapter on the policy's base (lora), a whole model (full) in the worker or on a Ray actor of the
reward group, or an HTTP endpoint (api), plus the reference log-probabilities the reward actors also serve.

The api request follows LLaMA-Factory's: POST {"model": "model", "messages": [text, ...]} as JSON, answered
with {"scores": [float, ...]}, one score per text in order; with a timeout, retries with exponential
backoff, and a clear error when the endpoint stays down.
"""

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import ray
import torch
from peft import PeftModel
from safetensors.torch import load_file

from rayft.recipe.config import RecipeConfig
from rayft.recipe.values import VALUE_HEAD_FILE, comma_list
from rayft.trainers.model import load_model, load_reference, load_tokenizer


class RewardAPIError(RuntimeError):
    """The reward endpoint gave no usable answer; the message names it and the last error."""


def api_scores(url: str, texts: list[str], timeout: float = 30.0, retries: int = 3, backoff: float = 1.0,
               sleep=time.sleep) -> list[float]:
    """One score per text from the endpoint at `url`; retried `retries` times after the first try, waiting
    backoff, 2 x backoff, ... seconds between tries. A malformed answer is not retried."""
    body = json.dumps({"model": "model", "messages": texts}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    last_error = None
    for attempt in range(retries + 1):
        if attempt:
            sleep(backoff * 2 ** (attempt - 1))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer = json.loads(response.read())
            break
        except urllib.error.HTTPError as err:
            last_error = f"HTTP {err.code}"
            if err.code < 500:  # the request is wrong; asking again will not help
                raise RewardAPIError(f"reward_model: the reward API at {url} refused the request "
                                     f"({last_error})") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            last_error = str(getattr(err, "reason", err))
    else:
        raise RewardAPIError(f"reward_model: the reward API at {url} did not answer after {retries + 1} tries "
                             f"(timeout {timeout:g} s each; last error: {last_error}); check that it is running")
    scores = answer.get("scores") if isinstance(answer, dict) else None
    numbers = isinstance(scores, list) and all(isinstance(s, (int, float)) for s in scores)
    if not numbers or len(scores) != len(texts):
        raise RewardAPIError(f"reward_model: the reward API at {url} must answer {{\"scores\": [one number per text]}} "
                             f"for {len(texts)} texts; it answered {str(answer)[:200]}")
    return [float(s) for s in scores]


def last_token_positions(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Each row's last token that is not padding (right padding), as Transformers' sequence classifiers
    read it; the scalar head of a reward model is applied there."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(dim=-1)


def right_padded(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, sequences))
    ids = torch.tensor([s + [pad_id] * (longest - len(s)) for s in sequences], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in sequences], device=device)
    return ids, mask


class ApiReward:
    """reward_model_type api: scores texts at an HTTP endpoint."""

    def __init__(self, url: str):
        self.url = url
        self.description = f"the reward API at {url}"

    def __call__(self, texts: list[str], sequences: list[list[int]]) -> torch.Tensor:
        return torch.tensor(api_scores(self.url, texts))


class ModelReward:
    """reward_model_type full: a whole sequence-classification model (with reward_model_adapters merged) and
    its own tokenizer; it reads the texts, so it need not share the policy's vocabulary."""

    def __init__(self, cfg, use_gpu: bool):
        self.model, self.tokenizer = load_reward_model(cfg, use_gpu)
        self.device = "cuda" if use_gpu else "cpu"
        self.description = f"the reward model {cfg.finetuning.reward_model} in this worker"

    @torch.no_grad()
    def __call__(self, texts: list[str], sequences: list[list[int]]) -> torch.Tensor:
        encoded = [self.tokenizer.encode(text, add_special_tokens=False) for text in texts]
        ids, mask = right_padded(encoded, self.tokenizer.pad_token_id, self.device)
        return self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().cpu()


def load_reward_model(cfg, use_gpu: bool):
    """The reward model at reward_model as its sequence-classification form, with reward_model_adapters
    merged into it, and its tokenizer: a `stage: rm` run's full model, or a base model plus an rm adapter
    (whose `score` head the adapter carries)."""



    f = cfg.finetuning
    model_args = replace(cfg.model, model_name_or_path=f.reward_model)
    model = load_model(model_args, use_gpu, value_head=True, trainable=False, max_length=cfg.data.cutoff_len,
                       frozen_bits=f.reward_model_quantization_bit)
    for adapter in comma_list(f.reward_model_adapters):
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tokenizer = load_tokenizer(model_args)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.requires_grad_(False)
    return model.to("cuda" if use_gpu else "cpu").eval(), tokenizer


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at each row's first real token (prompts are left-padded), as generation uses."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def response_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, prompt_length: int,
                      temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of the response tokens (after `prompt_length`) under `logits` / temperature."""
    return token_logprobs(logits[:, prompt_length - 1:-1], input_ids[:, prompt_length:], temperature)


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """The logits that predict the response tokens (positions prompt_length - 1 to the second-last): the output
    head runs on those positions only (`logits_to_keep`), not on the prompt's."""
    kept = input_ids.shape[1] - prompt_length + 1
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                 logits_to_keep=kept).logits[:, :-1]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of `tokens` under `logits` / temperature (aligned: logits[:, i] predicts tokens[:, i])."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def model_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                   temperature: float) -> torch.Tensor:
    """The log-probabilities `model` (a reference) gives the responses of a batch of answered prompts."""
    logits = response_logits(model, input_ids, attention_mask, prompt_length)
    return token_logprobs(logits, input_ids[:, prompt_length:], temperature)


class AdapterReward:
    """reward_model_type lora: the rm adapter as a second adapter ("reward") on the policy's own PeftModel and
    the value head the rm run saved; one base model serves policy, reference and reward. It reads the token
    sequences directly (the adapter was trained on the same base and tokenizer)."""

    def __init__(self, policy, adapter_dir: str, pad_id: int, device):


        policy.load_adapter(adapter_dir, adapter_name="reward", is_trainable=False)
        policy.set_adapter("default")

        head = load_file(str(Path(adapter_dir) / VALUE_HEAD_FILE))
        self.weight = head["v_head.summary.weight"].to(device)
        self.bias = head["v_head.summary.bias"].to(device)
        self.policy, self.pad_id, self.device = policy, pad_id, device
        self.description = f"the rm adapter {adapter_dir} on the policy's base"

    @torch.no_grad()
    def __call__(self, texts: list[str], sequences: list[list[int]]) -> torch.Tensor:
        ids, mask = right_padded(sequences, self.pad_id, self.device)
        body = self.policy.get_base_model().base_model  # the transformer without its LM head
        self.policy.set_adapter("reward", inference_mode=True)
        try:
            hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            self.policy.set_adapter("default")  # trainable again
        last = hidden[torch.arange(len(ids)), last_token_positions(ids, self.pad_id)]
        return (last.float() @ self.weight.T + self.bias)[:, 0].cpu()


class RewardServer:
    """A Ray actor of the reward model group (reward_model_workers): scores texts with a whole reward model
    and, for freeze or full PPO, gives the reference model's log-probabilities of answered prompts."""

    def __init__(self, recipe: dict, use_gpu: bool, with_reference: bool):

        cfg = RecipeConfig.from_dict(recipe)
        self.device = "cuda" if use_gpu else "cpu"
        self.reward = ModelReward(cfg, use_gpu)
        self.reference = load_reference(cfg, use_gpu).to(self.device) if with_reference else None
        self.calls = 0

    def where(self) -> dict:


        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "calls": self.calls}

    def score(self, texts: list[str]) -> list[float]:
        self.calls += 1
        return self.reward(texts, []).tolist()

    def reference_logprobs(self, input_ids, attention_mask, prompt_length: int, temperature: float):
        ids = torch.as_tensor(input_ids, device=self.device)
        mask = torch.as_tensor(attention_mask, device=self.device)
        return model_logprobs(self.reference, ids, mask, prompt_length, temperature).cpu().numpy()


class ActorReward:
    """A training worker's client of the reward actors: it sends a batch of texts (or of answered prompts, for
    the reference) to its actor (worker rank modulo the group's size) and waits for the answer."""

    def __init__(self, actor_names: list[str], rank: int):

        self.actors = [ray.get_actor(name) for name in actor_names]
        self.actor = self.actors[rank % len(self.actors)]
        index = rank % len(self.actors)
        self.description = f"reward actor {index} of {len(self.actors)} ({actor_names[index]})"

    def __call__(self, texts: list[str], sequences: list[list[int]]) -> torch.Tensor:

        return torch.tensor(ray.get(self.actor.score.remote(texts)))

    def reference(self, input_ids, attention_mask, prompt_length: int, temperature: float) -> torch.Tensor:

        answer = self.actor.reference_logprobs.remote(input_ids.cpu().numpy(), attention_mask.cpu().numpy(),
                                                      prompt_length, temperature)
        return torch.as_tensor(ray.get(answer))

    def where(self) -> list[dict]:

        return ray.get([actor.where.remote() for actor in self.actors])


class ActorReference:
    """The reference model of a freeze or full policy, on the worker's reward actor."""

    def __init__(self, client: ActorReward):
        self.client = client
        self.description = f"the reference model on {client.description}"

    def __call__(self, input_ids, attention_mask, prompt_length: int, temperature: float) -> torch.Tensor:
        return self.client.reference(input_ids, attention_mask, prompt_length, temperature)
