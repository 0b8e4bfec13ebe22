"""Turns a YAML recipe plus `key=value` overrides into a validated, typed `RecipeConfig`.

Every problem is collected into one `ConfigError`; nothing here touches Ray or the file system's outputs.
"""

import difflib
import math
import os
from pathlib import Path

from rayft.recipe.config import RecipeConfig
from rayft.recipe.derive import default_do_train, resolve
from rayft.recipe.loading import describe_type, type_matches
from rayft.recipe.problems import ConfigError, Problem
from rayft.recipe.refused import NOT_BUILT
from rayft.recipe.rules import RESERVED_KEYS, validate
from rayft.recipe.schema import SECTIONS, default_of, key_sections, type_hints


def parse_config(raw: dict, base_dir: str | os.PathLike = ".", for_training: bool = True) -> RecipeConfig:
    """Type-checks, validates and resolves a merged recipe; raises ConfigError with every problem found.

    `for_training=False` (`rayft export`) does not ask for the keys only a training run needs (dataset,
    output_dir).
    """
    problems: list[Problem] = []
    known = key_sections()
    by_section: dict[str, dict] = {name: {} for name in SECTIONS}
    for key, value in raw.items():
        if key in RESERVED_KEYS:
            problems.append(Problem(key, f"{RESERVED_KEYS[key]}"))
            continue
        if key == "sweep":
            problems.append(Problem("sweep", "this recipe describes a sweep; run it with `rayft sweep`, or remove "
                                             "the sweep section to train once"))
            continue
        section = known.get(key)
        if section is None:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(Problem(key, f"unknown key{hint}"))
            continue
        expected = type_hints(SECTIONS[section])[key]
        if not type_matches(value, expected):
            hint = ""
            if isinstance(value, bool) and type_matches("no", expected):
                hint = f" (YAML reads no / off / yes / on as booleans: quote the word, e.g. {key}: \"no\")"
            problems.append(Problem(key, f"{value!r} is {_article(type(value).__name__)}, expected "
                                         f"{describe_type(expected)}{hint}"))
            continue
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(Problem(key, f"{value} is not a finite number; give a number"))
            continue
        by_section[section][key] = value

    for key, feature in NOT_BUILT.items():
        section = known[key]
        if key in by_section[section] and by_section[section][key] != default_of(SECTIONS[section], key):
            problems.append(Problem(key, f"{feature} is not built in rayft yet; remove {key} from the recipe"))
    if problems:
        raise ConfigError(problems)

    predict_only = default_do_train(by_section["training"])
    sections = {name: cls(**by_section[name]) for name, cls in SECTIONS.items() if name != "training"}
    cfg = RecipeConfig(**sections, training=by_section["training"])
    problems = validate(cfg, Path(base_dir), for_training)
    if problems:
        raise ConfigError(problems)
    cfg.notes = resolve(cfg, Path(base_dir)) + ([predict_only] if predict_only else [])
    return cfg


def _article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"
