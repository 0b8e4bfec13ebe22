"""GRPO's rewards: the built-in verifiable ones (accuracy against the answer column, a format regex, a length
penalty), a user's `package.module:function`, and a reward model, combined with reward_weights.

A reward function takes the prompts, the completions and the dataset's columns as keyword arguments (`answer`:
each example's response column; `completion_ids`: the completions' token ids) and returns one float per
completion, as TRL's reward functions do. One that raises or answers with the wrong shape stops the run with an
error naming it and the prompt it failed on.
"""

import importlib
import math
import re
from collections.abc import Callable

import torch

from rayft.data.errors import DataError
from rayft.recipe.derive import reward_names, reward_weights
from rayft.recipe.problems import Problem
from rayft.recipe.rules import BUILT_REWARDS

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
WORD = re.compile(r"[^\W_]+")


class RewardFunctionError(DataError):
    """A reward function raised or answered with the wrong shape; the message names it and the prompt."""


def extract(text: str, how: str) -> str | None:
    """What of `text` the accuracy reward compares (None when there is nothing to compare):
    last_number (commas dropped), boxed (the last \\boxed{...}), last_word (lower case), exact (trimmed)."""
    if how == "last_number":
        found = NUMBER.findall(text)
        return found[-1].replace(",", "") if found else None
    if how == "boxed":
        found = BOXED.findall(text)
        return found[-1].strip() if found else None
    if how == "last_word":
        found = WORD.findall(text)
        return found[-1].lower() if found else None
    return text.strip()


def same_answer(found: str | None, answer: str, how: str) -> bool:
    """Whether an extracted value equals the answer column's, read the same way (numbers compared as numbers)."""
    if found is None:
        return False
    expected = extract(answer, how) if how != "exact" else answer.strip()
    if expected is None:
        return False
    if how == "last_number":
        return math.isclose(float(found), float(expected), rel_tol=0, abs_tol=1e-9)
    return found == expected


def accuracy_reward(how: str) -> Callable:
    """1 for a completion whose extracted answer equals the example's `answer`, else 0."""

    def accuracy(prompts, completions, answer, **columns):
        return [float(same_answer(extract(text, how), expected, how)) for text, expected in zip(completions, answer)]

    return accuracy


def format_reward(pattern: str) -> Callable:
    """1 for a completion that matches the regular expression from its start (re.match, dot matches newline)."""
    compiled = re.compile(pattern, re.DOTALL)

    def format(prompts, completions, **columns):
        return [float(compiled.match(text) is not None) for text in completions]

    return format


def length_reward(max_new_tokens: int) -> Callable:
    """-(completion tokens / max_new_tokens): 0 for an empty answer, -1 for one cut at the limit."""

    def length(prompts, completions, completion_ids, **columns):
        return [-len(ids) / max(max_new_tokens, 1) for ids in completion_ids]

    return length


def load_function(spec: str) -> Callable:
    """The callable `package.module:function` names; a clear error when it cannot be imported or called."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardFunctionError(f"reward_funcs: cannot import {module_name!r} for {spec!r} ({err}); install it or "
                                  "bring it with the job's runtime_env (working_dir or py_modules)") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise RewardFunctionError(f"reward_funcs: {module_name!r} has no function {attribute!r} ({spec!r})")
    return function


def reward_function_problems(cfg) -> list[Problem]:
    """The recipe's `package.module:function` rewards that cannot be imported here (the driver), before Ray starts."""
    if cfg.finetuning.stage != "grpo":
        return []
    problems = []
    for name in reward_names(cfg.finetuning):
        if name not in BUILT_REWARDS:
            try:
                load_function(name)
            except RewardFunctionError as err:
                problems.append(Problem("reward_funcs", str(err).removeprefix("reward_funcs: ")))
    return problems


def reward_functions(cfg, reward_model=None) -> dict[str, Callable]:
    """Every reward the recipe names, by name, in order. `reward_model` (a callable from texts and token ids to
    scores, PPO's kinds) is used for the name reward_model."""
    f, g = cfg.finetuning, cfg.generating
    functions = {}
    for name in reward_names(f):
        if name == "accuracy":
            functions[name] = accuracy_reward(f.accuracy_extraction)
        elif name == "format":
            functions[name] = format_reward(f.format_pattern)
        elif name == "length":
            functions[name] = length_reward(g.max_new_tokens)
        elif name == "reward_model":
            functions[name] = model_reward(reward_model)
        else:
            functions[name] = load_function(name)
    return functions


def model_reward(model) -> Callable:
    """A reward model (PPO's lora / full / api kinds) as a reward function: it scores prompt plus completion."""

    def reward_model(prompts, completions, sequences, **columns):
        texts = [p + c for p, c in zip(prompts, completions)]
        return model(texts, sequences).tolist()

    return reward_model


class Rewards:
    """The recipe's reward functions and weights: scores a batch of completions, checking each answer."""

    def __init__(self, functions: dict[str, Callable], weights: list[float]):
        self.functions, self.weights = functions, weights

    @classmethod
    def of(cls, cfg, reward_model=None) -> "Rewards":
        return cls(reward_functions(cfg, reward_model), reward_weights(cfg.finetuning))

    def score(self, prompts: list[str], completions: list[str], columns: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted total per completion, [completions, functions] each function's rewards)."""
        per_function = [self._call(name, function, prompts, completions, columns)
                        for name, function in self.functions.items()]
        table = torch.tensor(per_function, dtype=torch.float32).T
        return table @ torch.tensor(self.weights, dtype=torch.float32), table

    @staticmethod
    def _call(name: str, function: Callable, prompts: list[str], completions: list[str], columns: dict) -> list[float]:
        try:
            values = function(prompts=prompts, completions=completions, **columns)
        except Exception as err:  # the user's code: name it and the prompt
            prompt = _failing_prompt(function, prompts, completions, columns) or prompts[0]
            raise RewardFunctionError(f"reward function {name!r} raised {type(err).__name__}: {err} (on the prompt "
                                      f"{prompt[-200:]!r})") from None
        if hasattr(values, "tolist"):  # numpy or torch
            values = values.tolist()
        elif isinstance(values, tuple):
            values = list(values)
        if not isinstance(values, list) or len(values) != len(completions):
            raise RewardFunctionError(f"reward function {name!r} must return one number per completion "
                                      f"({len(completions)}), returned {str(values)[:120]} (on the prompt "
                                      f"{prompts[0][-200:]!r})")
        bad = [i for i, v in enumerate(values) if isinstance(v, bool) or not isinstance(v, (int, float))
               or not math.isfinite(v)]
        if bad:
            raise RewardFunctionError(f"reward function {name!r} returned {values[bad[0]]!r} for completion "
                                      f"{bad[0]}; rewards must be finite numbers (on the prompt "
                                      f"{prompts[bad[0]][-200:]!r})")
        return [float(v) for v in values]


def _failing_prompt(function: Callable, prompts, completions, columns) -> str | None:
    """The first prompt whose completion alone makes `function` raise, to name it in the error."""
    for i, prompt in enumerate(prompts):
        try:
            function(prompts=[prompt], completions=[completions[i]], **{k: [v[i]] for k, v in columns.items()})
        except Exception:
            return prompt
    return None
