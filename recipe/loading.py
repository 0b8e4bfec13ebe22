"""Reading a recipe: YAML plus `key=value` overrides merged with OmegaConf, and the small type system that
checks each value against the schema's annotation."""

import enum
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rayft.recipe.problems import ConfigError, Problem


def load_recipe(path: str | os.PathLike | None, overrides: list[str]) -> dict:
    """Reads the YAML recipe and merges `key=value` overrides over it (command line last)."""
    base = OmegaConf.create({})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([Problem("recipe", f"file {str(path)!r} does not exist")])
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError([Problem("recipe", f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it "
                                                 "as UTF-8 YAML")]) from None
        except yaml.YAMLError as err:
            raise ConfigError([Problem("recipe", f"{path} is not valid YAML: {_one_line(err)}")]) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError([Problem("recipe", f"{path} must be a mapping of key: value pairs, not a "
                                                 f"{type(loaded).__name__}")])
        base = OmegaConf.create(loaded)
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError([Problem("overrides", f"{o!r} is not of the form key=value") for o in bad])
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError([Problem("overrides", f"could not merge them: {_one_line(err)}")]) from None


def type_matches(value: Any, tp: Any) -> bool:
    """True when `value` (as parsed from YAML) is acceptable for the annotation `tp`."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(type_matches(value, arg) for arg in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (dict, typing.Dict) or tp is dict:
        return isinstance(value, dict)
    if origin in (list, typing.List, tuple) or tp in (list, tuple):
        return isinstance(value, (list, tuple))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, tp) or value in {member.value for member in tp}
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def describe_type(tp: Any) -> str:
    """A readable name for an annotation, e.g. 'an integer or null' or 'one of sft, dpo'."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe_type(a) for a in typing.get_args(tp)))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    names = {type(None): "null", bool: "a boolean (true/false)", int: "an integer", float: "a number",
             str: "a string", dict: "a mapping", list: "a list"}
    return names.get(origin or tp, getattr(tp, "__name__", str(tp)))


def _one_line(err: Exception) -> str:
    """A library's multi-line error message folded onto one line."""
    return " ".join(str(err).split())
