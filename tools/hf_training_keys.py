"""Records Transformers' Seq2SeqTrainingArguments as rayft's own data: every key's name, type, default and help.

Run it with rayft's own Python after upgrading Transformers:
    .venv/bin/python tools/hf_training_keys.py
It writes recipe/training_keys.json, from which recipe/schema.py builds the training section without importing
Transformers (and with it torch). tests/test_config.py regenerates the record from the installed Transformers and
holds the committed file, and the schema built from it, equal to it key by key.
"""

import dataclasses
import enum
import json
import pathlib
import sys
import types
import typing

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "recipe" / "training_keys.json"
PLAIN = {bool: "bool", int: "int", float: "float", str: "str", dict: "dict", list: "list", type(None): "None"}


def type_text(tp) -> str | None:
    """The annotation as rayft's schema writes it, in words YAML values can match: builtins, Literal, Union, Any.

    An enum (alone or beside `str`, which Transformers converts to it) becomes the Literal of its values, a Path a
    str, containers lose their element types; classes a recipe cannot spell (GenerationConfig, ParallelismConfig)
    leave the union, and None is returned when nothing is left."""
    if tp is typing.Any:
        return "Any"
    if tp in PLAIN:
        return PLAIN[tp]
    if tp is pathlib.Path:
        return "str"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "Literal[" + ", ".join(repr(m.value) for m in tp) + "]"
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "Literal[" + ", ".join(repr(a) for a in typing.get_args(tp)) + "]"
    if origin in (dict, list, tuple):
        return PLAIN.get(origin, "list")
    if origin in (typing.Union, types.UnionType):
        args = list(typing.get_args(tp))
        if str in args and any(isinstance(a, type) and issubclass(a, enum.Enum) for a in args):
            args.remove(str)  # Transformers turns the string into the enum: only its values pass
        parts = list(dict.fromkeys(t for t in (type_text(a) for a in args) if t is not None))
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else "Union[" + ", ".join(parts) + "]"
    return None


def plain_default(value):
    """A JSON value for a default (an enum by its value)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [plain_default(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain_default(v) for k, v in value.items()}
    return value


def snapshot() -> dict:
    """Every init field of the installed Seq2SeqTrainingArguments, in declaration order."""
    import transformers
    from transformers import Seq2SeqTrainingArguments

    hints = typing.get_type_hints(Seq2SeqTrainingArguments)
    keys = []
    for f in dataclasses.fields(Seq2SeqTrainingArguments):
        if not f.init or f.name.startswith("_"):
            continue
        factory = f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING
        default = f.default_factory() if factory else (None if f.default is dataclasses.MISSING else f.default)
        record = {"name": f.name, "type": type_text(hints[f.name]) or "None", "default": plain_default(default),
                  "help": " ".join(str(f.metadata.get("help", "")).split())}
        if factory:
            record["factory"] = True
        keys.append(record)
    return {"transformers": transformers.__version__, "keys": keys}


def main() -> None:
    OUT.write_text(json.dumps(snapshot(), indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
