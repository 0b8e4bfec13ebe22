"""Small helpers over recipe values that every layer uses, Ray Data's task workers included (no heavy imports)."""

import fnmatch
import json
from pathlib import Path
from typing import Any

SECRET_KEYS = {"hf_hub_token", "ms_hub_token", "om_hub_token", "swanlab_api_key", "hub_token",
               "swanlab_lark_webhook_url", "swanlab_lark_secret"}  # a webhook's URL carries its token
MASK = "***"
# The reward model's value head beside its weights (LLaMA-Factory's layout): stage rm writes it, PPO and export read it.
VALUE_HEAD_FILE = "value_head.safetensors"
GB = 1024**3
# Transformers' default `seed` (a test holds it equal to TrainingArguments'), for the data functions that Ray
# Data's tasks import without the schema
DEFAULT_SEED = 42


def comma_list(value: str | None) -> list[str]:
    """The items of a comma-separated recipe value (dataset, eval_dataset, lora_target, ...), trimmed."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def module_matches(name: str, patterns: list[str]) -> bool:
    """Whether a module's name matches a profile_modules pattern, also under PEFT's `base_model.model.` prefix."""
    return bool(name) and any(fnmatch.fnmatch(n, p) for p in patterns
                              for n in (name, name.removeprefix("base_model.model.")))


def is_secret(key: str) -> bool:
    """Secret by name: the known token keys and anything ending in token or api_key (any case)."""
    key = key.lower()
    return key in SECRET_KEYS or key.endswith("token") or key.endswith("api_key")


def mask(value: Any, key: str = "") -> Any:
    """Returns a copy of `value` with every secret-named entry (at any depth) replaced by `***`."""
    if isinstance(value, dict):
        return {k: mask(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v, key) for v in value]
    if key and is_secret(key) and value is not None:
        return MASK
    return value

# tool formats rayft writes (data/tools.py builds them; a test keeps the two lists equal)
TOOL_FORMAT_NAMES = ("default", "qwen", "glm4", "llama3", "mistral")


def read_log(output_dir: str) -> list[dict]:
    """The records of a run's output_dir/trainer_log.jsonl (one per logging step), oldest first."""
    path = Path(output_dir) / "trainer_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
