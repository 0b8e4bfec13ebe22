"""A pipeline of stages (`rayft pipeline FILE`): shared keys at the top, then `stages:`, each one stage's keys with a
`name` and optionally `from: <earlier stage>` (start from its result) and `merge: true` (merge the stage's adapters
into the weights once it has trained). Pure: the file's mapping becomes each stage's recipe, and a finished stage's
result becomes the keys of the stages that start from it.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from rayft.recipe.problems import ConfigError, Problem
from rayft.recipe.schema import FinetuningArguments, default_of, key_sections
from rayft.recipe.stages import STAGE_SPECS
from rayft.recipe.values import comma_list

PIPELINE_FILE = "pipeline.json"
MERGED_FOLDER = "merged"  # inside a `merge: true` stage's output_dir: its adapters merged into the weights
STAGE_ONLY = ("name", "from", "merge")
SET_BY_PIPELINE = ("output_dir", "ray_run_name", "overwrite_output_dir")
SET_BY_FROM = ("model_name_or_path", "adapter_name_or_path")
ADAPTER_METHODS = ("lora", "oft")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class PipelineStage:
    """One stage of a pipeline: its own recipe (shared keys, its keys, the overrides; output_dir and ray_run_name set),
    the stage it starts from, and whether its adapters are merged once it has trained."""

    name: str
    keys: dict
    source: str | None = None
    merge: bool = False

    @property
    def method(self) -> str:
        """Its finetuning_type (the schema's default when neither it nor the shared keys set one)."""
        return self.keys.get("finetuning_type", default_of(FinetuningArguments, "finetuning_type"))

    @property
    def adapter_method(self) -> bool:
        return self.method in ADAPTER_METHODS

    @property
    def output_dir(self) -> str:
        return self.keys["output_dir"]


@dataclass(frozen=True)
class StageResult:
    """What a finished stage leaves to the stages that start from it: the weights to load and the adapters on top."""

    model: str
    adapters: tuple[str, ...] = ()

    def keys(self) -> dict:
        """A starting stage's keys: the model, and the adapters merged into it with a new adapter trained on top (so
        that the adapter-disabled policy, a LoRA run's reference model, is this result)."""
        if not self.adapters:
            return {"model_name_or_path": self.model}
        return {"model_name_or_path": self.model, "adapter_name_or_path": ",".join(self.adapters),
                "create_new_adapter": True}


def is_pipeline(raw: dict) -> bool:
    """A recipe file with `stages:` is a pipeline."""
    return "stages" in raw


def read_pipeline(raw: dict, overrides: dict, run_name: str) -> list[PipelineStage]:
    """Every stage's recipe from the file's mapping `raw` and the command line's `overrides` (already read as a
    mapping: `key=value` for every stage, `<name>.key=value` for one). Each stage writes to output_dir/<name> and
    keeps its checkpoints under the Ray run `<ray_run_name>-<name>` (`run_name` when the file sets no ray_run_name).
    Raises ConfigError with every problem in the file's structure (the stages' own keys are checked by parse_config)."""
    problems: list[Problem] = []
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise ConfigError([Problem("stages", "a non-empty list of mappings, each with a name and the stage's keys")])
    names = [s.get("name") for s in stages]
    per_stage = {k: v for k, v in overrides.items() if k in names and isinstance(v, dict)}
    shared = {**{k: v for k, v in raw.items() if k != "stages"},
              **{k: v for k, v in overrides.items() if k not in per_stage}}
    if "stages" in overrides:
        problems.append(Problem("stages", "cannot be overridden on the command line; edit the pipeline file"))
    if not shared.get("output_dir"):
        problems.append(Problem("output_dir", "required at the top of a pipeline: each stage writes to "
                                              "output_dir/<name>"))
    if "overwrite_output_dir" in shared:
        problems.append(Problem("overwrite_output_dir", "a pipeline writes only into its own output_dir (a rerun goes "
                                                        "on where it stopped); remove it"))
    run_name = shared.pop("ray_run_name", None) or run_name
    if "sweep" in shared or any("sweep" in s for s in stages):
        problems.append(Problem("sweep", "a sweep inside a pipeline is not built; sweep the stage's own recipe with "
                                         "`rayft sweep`, then give the pipeline its best_config.yaml's keys"))
    known, result = key_sections(), []
    for i, stage in enumerate(stages):
        name = stage.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            problems.append(Problem(f"stages[{i}].name", f"{name!r} is not a plain name (letters, digits, _ and -); "
                                                         "every stage needs one"))
            continue
        if name in known or name == "stages":
            problems.append(Problem(f"stages[{i}].name", f"{name!r} is a recipe key; name the stage otherwise"))
            continue
        if names.index(name) != i:
            problems.append(Problem(f"stages[{i}].name", f"{name!r} names two stages; give each stage its own name"))
            continue
        own = {**{k: v for k, v in stage.items() if k not in STAGE_ONLY}, **per_stage.get(name, {})}
        problems += [Problem(f"{name}.{key}", "set by the pipeline (output_dir/<name>); remove it")
                     for key in SET_BY_PIPELINE if key in own]
        source, merge = stage.get("from"), stage.get("merge", False)
        if not isinstance(merge, bool):
            problems.append(Problem(f"{name}.merge", f"{merge!r} is not true or false"))
        if source is not None:
            if source not in names[:i]:
                where = ("itself" if source == name else "a later stage" if source in names
                         else f"no stage (stages: {', '.join(map(str, names))})")
                problems.append(Problem(f"{name}.from", f"{source!r} is {where}; a stage starts from one listed above "
                                                        "it"))
            problems += [Problem(f"{name}.{key}", f"from: {source} sets it; remove one of them")
                         for key in SET_BY_FROM if key in own]
        keys = {**shared, **own, "output_dir": str(Path(str(shared.get("output_dir"))) / name),
                "ray_run_name": f"{run_name}-{name}", "overwrite_output_dir": True}
        result.append(PipelineStage(name, keys, source, bool(merge)))
    problems += _chain_problems(result)
    if problems:
        raise ConfigError(problems)
    return result


def _chain_problems(stages: list[PipelineStage]) -> list[Problem]:
    """What `from` and `merge` cannot join: a result that is not a policy, adapters under a whole-model method, a
    merge of a stage without adapters."""
    by_name, problems = {s.name: s for s in stages}, []
    for stage in stages:
        if stage.merge and not stage.adapter_method:
            problems.append(Problem(f"{stage.name}.merge", "a freeze or full stage saves a whole model already; "
                                                           "remove merge"))
        source = by_name.get(stage.source)
        if source is None:
            continue
        kind = STAGE_SPECS.get(source.keys.get("stage"))
        if kind is not None and kind.result != "policy":
            problems.append(Problem(f"{stage.name}.from", f"stage {source.name} trains a {kind.result}, not a model "
                                                          "to go on from; start from the stage before it"))
        elif source.adapter_method and not source.merge and not stage.adapter_method:
            problems.append(Problem(f"{stage.name}.from", f"{source.name}'s result is an adapter and this stage trains "
                                                          f"the whole model; set merge: true on stage {source.name}"))
    return problems


def result_of(stage: PipelineStage, started_with: dict) -> StageResult:
    """What a trained stage leaves, from the keys it started with (its own, and those its `from` gave it)."""
    if stage.merge:
        return StageResult(str(Path(stage.output_dir) / MERGED_FOLDER))
    if not stage.adapter_method:
        return StageResult(stage.output_dir)
    adapters = comma_list(started_with.get("adapter_name_or_path"))
    return StageResult(str(started_with["model_name_or_path"]), (*adapters, stage.output_dir))


def root_keys(stage: PipelineStage, by_name: dict[str, PipelineStage]) -> dict:
    """The model keys to check a stage with before its `from` stages have trained: the first stage's model (the
    stages between keep its shape and tokenizer)."""
    return {"model_name_or_path": lineage(stage, by_name)[0].keys.get("model_name_or_path")}


def lineage(stage: PipelineStage, by_name: dict[str, PipelineStage]) -> list[PipelineStage]:
    """The stages whose results this one starts from, first to last, itself included."""
    chain = [stage]
    while chain[-1].source is not None:
        chain.append(by_name[chain[-1].source])
    return chain[::-1]
