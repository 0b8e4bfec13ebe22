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

# The most values a recipe may hold once YAML's aliases are expanded: far beyond any recipe, far below what a few
# nested aliases (a "billion laughs" of a few hundred bytes) expand to.
MAX_RECIPE_NODES = 100_000


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (YAML would keep the last silently) and a
    document whose aliases expand beyond MAX_RECIPE_NODES values."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError([Problem(str(key), f"given twice in one mapping (lines {seen[key] + 1} and "
                                                     f"{key_node.start_mark.line + 1}); keep one")])
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_RECIPE_NODES:
            raise ConfigError([Problem("recipe", f"its aliases expand to more than {MAX_RECIPE_NODES:,} values; write "
                                                 "the recipe out without nested aliases")])
        return node


def _expanded_size(node, sizes: dict) -> int:
    """How many values `node` stands for once every alias is expanded (an alias is the same node object again)."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = 1  # a recursive alias counts once while it is being measured
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    else:
        size = 1
    sizes[id(node)] = size
    return size


def load_recipe(path: str | os.PathLike | None, overrides: list[str]) -> dict:
    """Reads the YAML recipe and merges `key=value` overrides over it (command line last)."""
    base = OmegaConf.create({})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([Problem("recipe", f"file {str(path)!r} does not exist")])
        try:
            loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_RecipeLoader)
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
    undecodable = [o for o in overrides if not _is_text(o)]
    if undecodable:
        raise ConfigError([Problem("overrides", f"{o.encode('utf-8', 'replace').decode()!r} holds bytes that are not "
                                                "UTF-8 text; type it again in a UTF-8 terminal") for o in undecodable])
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError([Problem("overrides", f"{o!r} is not of the form key=value") for o in bad])
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_container(merged, resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError([_override_problem(overrides, err)]) from None


def _override_problem(overrides: list[str], err: Exception) -> Problem:
    """The override that does not read as a YAML value, or else the merge's own message."""
    for override in overrides:
        try:
            OmegaConf.from_dotlist([override])
        except (OmegaConfBaseException, yaml.YAMLError) as own:
            key, value = override.split("=", 1)
            return Problem(key, f"{value!r} is not a YAML value ({_one_line(own)}); quote it: {key}='...'")
    return Problem("overrides", f"could not merge them: {_one_line(err)}")


def _is_text(value: str) -> bool:
    """Whether a command-line string is text (a byte that is not UTF-8 reaches Python as a lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
