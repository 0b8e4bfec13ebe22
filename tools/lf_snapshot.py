"""Records LLaMA-Factory 0.9.5's argument keys and chat templates as data files rayft reads and tests against.

Run it with the Python of a virtual environment that has llamafactory installed (never rayft's .venv):
    DISABLE_VERSION_CHECK=1 /path/to/lf-venv/bin/python tools/lf_snapshot.py keys templates
It writes recipe/lf_keys.json (every key: its section, type and default) and data/template_specs.json (every
registered template's slots, stop words, thought tags, EOS handling, tool format and class).
"""

import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _plain(value):
    """A JSON-safe copy of a default value (enums by value, other objects by repr)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "value"):
        return _plain(value.value)
    return repr(value)


def snapshot_keys() -> dict:
    from llamafactory import __version__
    from llamafactory.hparams import (
        DataArguments,
        FinetuningArguments,
        GeneratingArguments,
        ModelArguments,
        TrainingArguments,
    )

    sections = {"model": ModelArguments, "data": DataArguments, "training": TrainingArguments,
                "finetuning": FinetuningArguments, "generating": GeneratingArguments}
    keys = {}
    for section, cls in sections.items():
        for field in dataclasses.fields(cls):
            if not field.init or field.name.startswith("_"):
                continue
            if field.default is not dataclasses.MISSING:
                default = _plain(field.default)
            elif field.default_factory is not dataclasses.MISSING:
                default = _plain(field.default_factory())
            else:
                default = None
            keys.setdefault(field.name, {"section": section, "type": str(field.type).replace("typing.", ""),
                                         "default": default})
    return {"llamafactory": __version__, "keys": dict(sorted(keys.items()))}


def _slots(formatter) -> list:
    out = []
    for slot in formatter.slots:
        if isinstance(slot, str):
            out.append(slot)
        elif isinstance(slot, dict):
            out.append({"token": slot["token"]})
        else:  # a set naming the tokenizer's bos or eos token
            out.append({"special": sorted(slot)[0]})
    return out


def _plugin(plugin) -> dict | None:
    """A template's multimodal plugin: its registered name and the tokens it writes (None for text templates)."""
    from llamafactory.data.mm_plugin import PLUGINS

    if type(plugin).__name__ == "BasePlugin":
        return None
    name = next(n for n, cls in PLUGINS.items() if cls is type(plugin))
    tokens = ("image_token", "video_token", "audio_token", "vision_bos_token", "vision_eos_token")
    return {"plugin": name, **{t: getattr(plugin, t, None) for t in tokens}}


def snapshot_templates() -> dict:
    from llamafactory import __version__
    from llamafactory.data.template import TEMPLATES

    specs = {}
    for name, t in sorted(TEMPLATES.items()):
        specs[name] = {
            "kind": {"Template": "plain", "Llama2Template": "llama2", "ReasoningTemplate": "reasoning",
                     "Glm47ReasoningTemplate": "reasoning_close_only"}[type(t).__name__],
            "prefix": _slots(t.format_prefix),
            "system": _slots(t.format_system),
            "user": _slots(t.format_user),
            "assistant": _slots(t.format_assistant),
            "observation": _slots(t.format_observation),
            "function": _slots(t.format_function),
            "function_tools": t.format_function.tool_format,
            "tools": t.format_tools.tool_format,
            "default_system": t.default_system,
            "stop_words": list(t.stop_words),
            "thought_words": list(t.thought_words),
            "tool_call_words": list(t.tool_call_words),
            "efficient_eos": t.efficient_eos,
            "replace_eos": t.replace_eos,
            "enable_thinking": t.enable_thinking,
            "multimodal": type(t.mm_plugin).__name__ != "BasePlugin",
            "mm_plugin": _plugin(t.mm_plugin),
        }
    return {"llamafactory": __version__, "templates": specs}


if __name__ == "__main__":
    what = sys.argv[1:] or ["keys", "templates"]
    if "keys" in what:
        (ROOT / "recipe" / "lf_keys.json").write_text(json.dumps(snapshot_keys(), indent=1, ensure_ascii=False) + "\n")
    if "templates" in what:
        (ROOT / "data" / "template_specs.json").write_text(
            json.dumps(snapshot_templates(), indent=1, ensure_ascii=False) + "\n")
