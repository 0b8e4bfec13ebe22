"""`rayft pipeline FILE` (and `rayft plan FILE`): a pipeline's stages trained one after another on one Ray instance,
each from the result of the stage it names. pipeline.json in output_dir records every stage's status, resolved recipe,
result and times; a rerun skips the finished stages and resumes the unfinished one from its checkpoint.

Every stage is checked before Ray starts, as `rayft plan` checks one recipe: its keys, its model and its data (a stage
that starts from another is checked against the first stage's model, whose shape and tokenizer it keeps).
"""

import json
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from rayft.cluster.session import ray_session
from rayft.data.errors import DataError
from rayft.orchestrator.helper import driver_helper
from rayft.orchestrator.launch import plan_prepared, prepare, run_train
from rayft.recipe.config import RecipeConfig
from rayft.recipe.derive import under
from rayft.recipe.loading import load_recipe
from rayft.recipe.logs import logger
from rayft.recipe.parse import parse_config
from rayft.recipe.pipeline import (
    MERGED_FOLDER,
    PIPELINE_FILE,
    PipelineStage,
    StageResult,
    is_pipeline,
    lineage,
    read_pipeline,
    result_of,
    root_keys,
)
from rayft.recipe.problems import ConfigError, Problem
from rayft.recipe.resume import recipe_changes
from rayft.recipe.values import comma_list


@dataclass
class Pipeline:
    """A pipeline file read and checked: its stages, its output_dir and what an earlier run of it recorded."""

    path: str
    output_dir: Path
    stages: list[PipelineStage]
    state: dict  # pipeline.json's content: {"run_name", "stages": {name: record}}

    @property
    def run_name(self) -> str:
        return self.state["run_name"]

    @property
    def by_name(self) -> dict[str, PipelineStage]:
        return {s.name: s for s in self.stages}

    def record(self, name: str) -> dict:
        return self.state["stages"].setdefault(name, {"status": "pending"})

    def save(self) -> None:
        """pipeline.json, replaced whole (a killed driver leaves the last complete one)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        partial = self.output_dir / f".{PIPELINE_FILE}.partial"
        partial.write_text(json.dumps(self.state, indent=1, default=str))
        partial.replace(self.output_dir / PIPELINE_FILE)

    def finished(self, stage: PipelineStage) -> bool:
        """The stage ended earlier and its outputs are still there."""
        record = self.state["stages"].get(stage.name, {})
        return record.get("status") == "finished" and (Path(stage.output_dir) / "all_results.json").is_file() and (
            not stage.merge or (Path(stage.output_dir) / MERGED_FOLDER / "config.json").is_file())


def read(path: str, overrides: list[str], base_dir: str | Path = ".") -> Pipeline:
    """The pipeline file with its overrides (`key=value` for every stage, `<name>.key=value` for one), and its
    earlier run's record when output_dir holds one. Raises ConfigError for the file's structure."""
    raw = load_recipe(path, [])
    if not is_pipeline(raw):
        raise ConfigError([Problem("stages", f"{path} has no stages: list; train a single recipe with `rayft train`")])
    extra = load_recipe(None, overrides)
    output_dir = extra.get("output_dir", raw.get("output_dir"))
    if not isinstance(output_dir, str) or not output_dir:
        raise ConfigError([Problem("output_dir", "required at the top of a pipeline: each stage writes to "
                                                 "output_dir/<name>")])
    output_dir = under(Path(base_dir), output_dir)
    state = {"run_name": None, "stages": {}}
    if (output_dir / PIPELINE_FILE).is_file():
        state = json.loads((output_dir / PIPELINE_FILE).read_text())
    elif output_dir.is_dir() and any(output_dir.iterdir()):
        raise ConfigError([Problem("output_dir", f"{output_dir} holds files but no {PIPELINE_FILE}; a pipeline writes "
                                                 "only into a new folder or its own; choose another output_dir")])
    # the file's ray_run_name, else the one recorded, else a new one: a new pipeline's stages get Ray runs of their
    # own, so checkpoints a deleted output_dir's stages left in storage are never taken for this pipeline's
    state["run_name"] = (extra.get("ray_run_name") or raw.get("ray_run_name") or state["run_name"]
                         or f"pipeline-{output_dir.name}-{uuid.uuid4().hex[:6]}")
    stages = read_pipeline({**raw, "output_dir": str(output_dir)}, {**extra, "output_dir": str(output_dir)},
                           state["run_name"])
    return Pipeline(str(path), output_dir, stages, state)


def stage_config(stage: PipelineStage, start: dict, base_dir: str | Path = ".") -> RecipeConfig:
    """A stage's recipe with the keys it starts from, parsed; its problems named after the stage."""
    return _checked(stage, lambda: parse_config({**stage.keys, **start}, base_dir=base_dir))


def _checked(stage: PipelineStage, check):
    """`check()`, its ConfigError or DataError named after the stage."""
    try:
        return check()
    except ConfigError as err:
        raise ConfigError([Problem(f"{stage.name}.{p.key}" if p.key else stage.name, p.message)
                           for p in err.problems]) from None
    except DataError as err:
        raise DataError(f"stage {stage.name}: {err}") from None


def decide(pipeline: Pipeline, base_dir: str | Path = ".") -> list[PipelineStage]:
    """The stages this run trains, in order; the finished ones before them are skipped. A finished stage whose recipe
    changed, or that started from a stage which trains again, is refused: its result no longer follows its recipe."""
    by_name, to_run, problems = pipeline.by_name, [], []
    for stage in pipeline.stages:
        redone = [s.name for s in lineage(stage, by_name)[:-1] if s in to_run]
        if not pipeline.finished(stage):
            to_run.append(stage)
        elif redone:
            problems.append(Problem(stage.name, f"finished from an earlier result of {redone[-1]}, which trains again; "
                                                f"remove {stage.output_dir} to train it again too"))
        else:
            record = pipeline.state["stages"][stage.name]
            now = stage_config(stage, record.get("started_from", {}), base_dir).to_dict(mask_secrets=True)
            changes = recipe_changes(record.get("recipe", {}), now)
            if changes:
                problems.append(Problem(stage.name, f"finished with another recipe ({'; '.join(changes)}); remove "
                                                    f"{stage.output_dir} to train it with this one"))
    if problems:
        raise ConfigError(problems)
    return to_run


def checked_configs(pipeline: Pipeline, stages: list[PipelineStage], base_dir: str | Path = ".") -> list[RecipeConfig]:
    """Every stage's recipe parsed, every problem of every stage at once (a stage that starts from another is parsed
    with the first stage's model, as its `from` result does not exist yet)."""
    by_name, configs, problems = pipeline.by_name, [], []
    for stage in stages:
        try:
            configs.append(stage_config(stage, root_keys(stage, by_name) if stage.source else {}, base_dir))
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems)
    return configs


def check(pipeline: Pipeline, stages: list[PipelineStage], helper, base_dir: str | Path = "."):
    """Every stage's recipe, model and data checked before Ray; returns each stage's Prepared."""
    configs = checked_configs(pipeline, stages, base_dir)
    return [_checked(stage, lambda cfg=cfg: prepare(cfg, helper, trains=False)) for stage, cfg in zip(stages, configs)]


def run_plan_pipeline(path: str, overrides: list[str]) -> None:
    """`rayft plan FILE` of a pipeline: every stage checked and planned, none trained."""
    pipeline = read(path, overrides)
    with driver_helper("rayft plan") as helper:
        prepared = check(pipeline, pipeline.stages, helper)
    for stage, ready in zip(pipeline.stages, prepared):
        logger.info(f"stage {stage.name} ({ready.cfg.finetuning.stage}, {ready.cfg.finetuning.finetuning_type}"
                    + (f", from {stage.source}" if stage.source else "") + ")")
        plan_prepared(ready)


def run_pipeline(path: str, overrides: list[str], base_dir: str | Path = ".") -> Pipeline:
    """`rayft pipeline FILE`: checks every stage still to train, then trains them in order on one Ray instance."""
    pipeline = read(path, overrides, base_dir)
    to_run = decide(pipeline, base_dir)
    for stage in pipeline.stages:
        if stage not in to_run:
            logger.info(f"stage {stage.name}: finished earlier ({stage.output_dir}); skipped")
    if not to_run:
        logger.info(f"pipeline {pipeline.run_name}: every stage has finished")
        return pipeline
    results = {name: StageResult(r["result"]["model"], tuple(r["result"]["adapters"]))
               for name, r in pipeline.state["stages"].items() if r.get("status") == "finished"}
    # one helper process for the whole pipeline: it checks every stage, then each stage's data and merge
    with driver_helper("rayft pipeline") as helper:
        prepared = check(pipeline, to_run, helper, base_dir)
        with ray_session(prepared[0].cfg.ray):
            for stage in to_run:
                start = results[stage.source].keys() if stage.source else {}
                cfg = stage_config(stage, start, base_dir)
                results[stage.name] = train_stage(pipeline, stage, cfg, start, helper)
    logger.info(f"pipeline {pipeline.run_name}: every stage has finished; records in "
                f"{pipeline.output_dir / PIPELINE_FILE}")
    return pipeline


def train_stage(pipeline: Pipeline, stage: PipelineStage, cfg: RecipeConfig, start: dict, helper) -> StageResult:
    """Trains one stage (resuming from its checkpoint when it has one), merges it when asked, and records it;
    `helper` is the pipeline's helper process."""
    record = pipeline.record(stage.name)
    began = time.time()
    record.update(status="running", stage=cfg.finetuning.stage, finetuning_type=cfg.finetuning.finetuning_type,
                  started_from=start, recipe=cfg.to_dict(mask_secrets=True), output_dir=stage.output_dir,
                  started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    record.pop("error", None)
    pipeline.save()
    origin = f" from {stage.source}'s result ({_describe(start)})" if stage.source else ""
    logger.info(f"stage {stage.name}: {cfg.finetuning.stage} with {cfg.finetuning.finetuning_type}{origin}")
    try:
        run_train(cfg, helper, keep_helper=True)
        result = result_of(stage, start or {"model_name_or_path": cfg.model.model_name_or_path,
                                            "adapter_name_or_path": cfg.model.adapter_name_or_path})
        if stage.merge:
            merge(stage, cfg, helper)
    except BaseException as err:
        record.update(status="failed", error=" ".join(str(err).split())[:500])
        pipeline.save()
        raise
    write_lineage(pipeline, stage, cfg)
    ended = time.time()
    record.update(status="finished", result={"model": result.model, "adapters": list(result.adapters)},
                  ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"), seconds=round(ended - began, 1))
    pipeline.save()
    logger.info(f"stage {stage.name}: finished in {ended - began:.0f} s; result {_describe(result.keys())}")
    return result


def merge(stage: PipelineStage, cfg: RecipeConfig, helper) -> None:
    """A `merge: true` stage's adapters (those it started from, then its own) merged into the weights, saved in
    output_dir/<name>/merged by `rayft export` in the pipeline's helper process."""
    merged = Path(stage.output_dir) / MERGED_FOLDER
    if merged.exists():  # a merge the previous driver did not finish: the pipeline's own folder
        shutil.rmtree(merged)
    adapters = [*comma_list(cfg.model.adapter_name_or_path), stage.output_dir]
    keys = {**stage.keys, "model_name_or_path": cfg.model.model_name_or_path,
            "adapter_name_or_path": ",".join(adapters), "export_dir": str(merged)}
    export_cfg = parse_config(keys, for_training=False)
    logger.info(f"stage {stage.name}: merging {len(adapters)} adapter(s) into {cfg.model.model_name_or_path}")
    helper.call("rayft.orchestrator.export:export_recipe", export_cfg.to_dict(mask_secrets=False))


def write_lineage(pipeline: Pipeline, stage: PipelineStage, cfg: RecipeConfig) -> None:
    """The model card's lineage: the stages this result comes from, and how to load it."""
    card = Path(stage.output_dir) / "README.md"
    if not card.is_file():
        return
    lines = ["", "## Lineage", "", f"Trained by the rayft pipeline `{pipeline.run_name}` ({pipeline.path}; its record "
             f"is `{pipeline.output_dir / PIPELINE_FILE}`), stage after stage:", ""]
    for i, step in enumerate(lineage(stage, pipeline.by_name), 1):
        keys = step.keys
        origin = f"from `{step.source}`" if step.source else f"from `{keys.get('model_name_or_path')}`"
        lines.append(f"{i}. `{step.name}`: stage `{keys.get('stage')}`, `{step.method}`, on "
                     f"`{keys.get('dataset')}`, {origin}" + (", then merged" if step.merge else ""))
    if cfg.model.adapter_name_or_path and cfg.finetuning.finetuning_type in ("lora", "oft"):
        lines += ["", f"This adapter was trained on `{cfg.model.model_name_or_path}` with the adapters "
                      f"`{cfg.model.adapter_name_or_path}` merged into it, in that order. Load it the same way: "
                      f"`adapter_name_or_path: {cfg.model.adapter_name_or_path},{stage.output_dir}`."]
    with card.open("a") as f:
        f.write("\n".join(lines) + "\n")


def _describe(keys: dict) -> str:
    adapters = keys.get("adapter_name_or_path")
    return keys["model_name_or_path"] + (f" with adapters {adapters}" if adapters else "")
