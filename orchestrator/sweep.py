"""`rayft sweep`: the Ray Tune driver of a search over recipe keys in which every trial is a whole rayft run.

The specification and its checks live in sweep_spec.py, the results in sweep_results.py; this file carries
the sweep out: it prepares every trial's data and plan, runs the trials under Tune, and writes the results.
"""

import dataclasses
import json
import time
import uuid
from pathlib import Path

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from rayft.cluster.session import ray_session
from rayft.cluster.storage import filesystem
from rayft.orchestrator.helper import Helper, driver_helper
from rayft.orchestrator.launch import (
    build_deepspeed_op,
    check_cluster,
    launch,
    plan_run,
    planning_gpu_memory,
    prepare,
    tokenize_splits,
)
from rayft.orchestrator.memory import ModelShape
from rayft.orchestrator.plan import make_plan
from rayft.orchestrator.sweep_results import (
    POINT_FILE,
    RESULTS_FILE,
    TRIALS_FILE,
    best_row,
    finished_records,
    format_cell,
    format_table,
    result_rows,
    same_trials,
    trials_record,
    write_best_config,
    write_results,
)
from rayft.orchestrator.sweep_spec import (
    SweepSpec,
    Trial,
    check_sweep,
    concurrency,
    describe,
    report_interval,
    trial_name,
    trial_recipe,
    trials_at_once,
    tune_space,
)
from rayft.recipe.config import RecipeConfig
from rayft.recipe.logs import logger
from rayft.recipe.parse import parse_config
from rayft.recipe.plan import Node, Plan
from rayft.recipe.problems import ConfigError, Problem

TRIAL_DRIVER_MEMORY = 512 * 1024**2  # bytes Ray reserves for each trial's driver process


def run_trial(config: dict, trials: list[dict], metric: str) -> None:
    """One Tune trial of a grid search: a whole training run of the trial's recipe on the data the sweep's driver
    tokenised."""
    trial = trials[config["trial"]]
    cfg = RecipeConfig.from_dict(trial["recipe"])
    if not _reported_again(cfg.args.output_dir, metric):
        launch(cfg, Plan.from_dict(trial["plan"]), trial["datasets"], sweep_metric=metric)


def run_drawn_trial(config: dict, shared: dict, metric: str) -> None:
    """One Tune trial of search: optuna: the point TPE drew (`config`) on the sweep's recipe, checked and planned
    here with the model's shape and the tokenised data the sweep's driver shares with every trial."""
    name = tune.get_context().get_trial_name()
    recipe = trial_recipe(shared["raw"], config, shared["output_dir"], shared["run_name"], name)
    if _reported_again(recipe["output_dir"], metric):
        return
    cfg = parse_config(recipe, base_dir=shared["base_dir"])
    out = Path(cfg.args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / POINT_FILE).write_text(json.dumps(config))  # the values TPE drew, for `rayft sweep --status`
    plan = make_plan(cfg, [Node(**n) for n in shared["nodes"]], shared["train_count"],
                     shape=ModelShape(**shared["shape"]), gpu_memory=shared["gpu_memory"], report_every_log=True,
                     run_id=uuid.uuid4().hex[:8], trials_at_once=shared["trials_at_once"])
    launch(cfg, plan, shared["datasets"], sweep_metric=metric)


def _reported_again(output_dir: str, metric: str) -> bool:
    """Whether the trial completed before the sweep was interrupted; if so its records are reported again."""
    done = finished_records(output_dir, metric)
    for record in done or ():
        tune.report({**record, "total_steps": record.get("total_steps", record["step"])})
    return done is not None


def run_sweep(raw: dict, base_dir: str = ".", helper: Helper | None = None):
    """`rayft sweep`: validates every trial, runs them under Ray Tune, and writes the results (`helper`: the
    command's own helper process, already started; default: one started here).

    Returns the rows of the results table.
    """
    sweep = check_sweep(raw, base_dir)
    base_cfg, spec, run_name, output_dir = sweep.base, sweep.spec, sweep.run_name, sweep.output_dir
    trials, configs = sweep.trials, sweep.configs
    resuming = _check_output_dir(output_dir, trials_record(run_name, trials, spec))

    with helper or driver_helper("rayft sweep") as helper, ray_session(base_cfg.ray) as nodes:
        # Data, modules and resources of every trial are checked before any trial starts, and each distinct
        # data setting is tokenised once here: the trials share the materialised datasets.
        plans, datasets, tokenised, shapes = [], [], {}, []
        count = len(trials) or spec.num_samples  # optuna: its trials are drawn as it goes
        sharing = trials_at_once(spec, configs, nodes, count)
        for trial, cfg in zip(trials or [Trial("every trial", {}, {})], configs):  # optuna: the shared base
            try:
                # (optuna's shared base recipe writes to no folder of its own: the sweep's is checked above)
                prepared = prepare(cfg, helper, trains=bool(trials))
                check_cluster(cfg, nodes)
                key = json.dumps([dataclasses.asdict(cfg.data), cfg.finetuning.stage, cfg.model.model_name_or_path,
                                  cfg.args.seed], sort_keys=True, default=str)
                if key not in tokenised:
                    tokenised[key] = tokenize_splits(prepared)
                plans.append(plan_run(prepared, nodes, tokenised[key].train_count, report_every_log=True,
                                      trials_at_once=sharing))
                datasets.append(tokenised[key].datasets)
                shapes.append(prepared.shape)
            except ConfigError as err:
                raise ConfigError([Problem(f"{trial.name} ({describe(trial.params)}): {p.key}", p.message)
                                   for p in err.problems]) from None
        per_trial = {k: max(p.num_workers * p.resources_per_worker.get(k, 0) for p in plans)
                     for k in set().union(*(p.resources_per_worker for p in plans))}
        concurrent = concurrency(spec, per_trial, nodes)
        if spec.scheduler == "asha" and spec.grace_period is None:
            spec.grace_period = report_interval(configs[0], spec.metric, plans[0].steps_per_epoch)
            logger.info(Problem("derived", f"sweep.grace_period = {spec.grace_period} steps (how often {spec.metric} "
                                           "is measured)"))
        logger.info(f"sweep {run_name!r}: {count} trials ({spec.search}), {concurrent} at a time "
            f"(each needs {per_trial}), metric {spec.metric} ({spec.mode}), scheduler {spec.scheduler}")
        for trial in trials:
            logger.info(f"  {trial.name}: {describe(trial.params)}")
        (output_dir / TRIALS_FILE).write_text(json.dumps(trials_record(run_name, trials, spec), indent=1))
        helper.close()  # the sweep's driver holds no torch while its trials train
        if any(p.deepspeed is not None and not p.use_gpu for p in plans):
            build_deepspeed_op()  # once here: trials building it at the same time would crash

        started = time.time()
        if spec.search == "optuna":
            (shape,), (base_plan,) = shapes, plans
            shared = {"raw": raw, "base_dir": str(Path(base_dir).resolve()), "output_dir": str(output_dir),
                      "run_name": run_name, "nodes": [dataclasses.asdict(n) for n in nodes],
                      "shape": dataclasses.asdict(shape), "train_count": base_plan.num_train_examples,
                      "gpu_memory": planning_gpu_memory(base_cfg, nodes),
                      "trials_at_once": sharing, "datasets": datasets[0]}
            trainable = tune.with_parameters(run_drawn_trial, shared=shared, metric=spec.metric)
        else:
            shipped = [{"recipe": c.to_dict(mask_secrets=False), "plan": p.to_dict(), "datasets": d}
                       for c, p, d in zip(configs, plans, datasets)]
            trainable = tune.with_parameters(run_trial, trials=shipped, metric=spec.metric)
        tuner = _tuner(spec, base_cfg, run_name, trainable, len(trials), concurrent, sweep.first_point,
                       max_steps=max(p.total_steps for p in plans), resume=resuming)
        grid = tuner.fit()
        budget_spent = spec.time_budget_s is not None and time.time() - started >= spec.time_budget_s
        if spec.search == "optuna":  # its trials are known now: each result's folder is named after its trial
            trials = sorted((Trial(Path(r.path).name, {k: r.config.get(k) for k in spec.parameters}, {})
                             for r in grid), key=lambda t: t.name)
            rows, histories = result_rows(grid, trials, spec, budget_spent, name_of=lambda r: Path(r.path).name)
        else:
            rows, histories = result_rows(grid, trials, spec, budget_spent)

    write_results(output_dir, rows, histories, spec.metric)
    logger.info("sweep results:\n" + format_table(rows))
    best = best_row(rows, spec.metric, spec.mode)
    if best is None:
        logger.info(f"no trial reported {spec.metric}; no best_config.yaml written")
    else:
        params = next(t.params for t in trials if t.name == best["trial"])
        path = write_best_config(output_dir, raw, best, params, spec.metric, run_name)
        logger.info(Problem("best", f"{best['trial']} ({describe(params)}) with {spec.metric} = "
                                    f"{format_cell(best[spec.metric])}; recipe written to {path}"))
    logger.info(f"results table: {output_dir / RESULTS_FILE}; trial outputs under {output_dir / 'trials'}")
    return rows


def _check_output_dir(output_dir: Path, now: dict) -> bool:
    """Whether this is the resumption of an interrupted sweep (`now`: this sweep's sweep_trials.json record);
    refuses to mix in another sweep's outputs."""
    record = output_dir / TRIALS_FILE
    if record.is_file():
        earlier = json.loads(record.read_text())
        if not same_trials(earlier, now):
            raise ConfigError([Problem("output_dir", f"{output_dir} holds sweep {earlier.get('run_name')!r} with "
                                                     "other trials; rerun that sweep unchanged to resume it, or "
                                                     "choose another output_dir")])
        return True
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise ConfigError([Problem("output_dir", f"{output_dir} exists and is not empty; a sweep writes its trials "
                                                 "there, choose another output_dir")])
    output_dir.mkdir(parents=True, exist_ok=True)
    return False


def _tuner(spec: SweepSpec, base_cfg: RecipeConfig, run_name: str, trainable, grid_points: int, concurrent: int,
           first_point: dict | None, max_steps: int, resume: bool):
    # A trial's own process only drives its TorchTrainer: it reserves memory but no CPU, so the trials'
    # workers can have every CPU and no trial waits for CPUs its own driver holds.
    trainable = tune.with_resources(trainable, {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})
    storage = base_cfg.ray.ray_storage_path
    experiment = f"{storage.rstrip('/')}/{run_name}"
    fs = filesystem(base_cfg.ray.ray_storage_filesystem)
    if resume and tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        logger.info(f"resuming sweep {run_name!r} from {experiment}: finished trials are kept, unfinished ones "
            "continue from their last checkpoint" + (", and TPE goes on from the points it has seen"
                                                     if spec.search == "optuna" else ""))
        return tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False, storage_filesystem=fs)
    # max_t beyond the last step: a trial that reaches its end finishes (and saves) rather than being stopped. A
    # point TPE draws may change the number of steps (a batch size, say): there, no step count is the last.
    last = max(max_steps, spec.grace_period or 0) + 1 if spec.search == "grid" else 2**31
    scheduler = FIFOScheduler() if spec.scheduler == "fifo" else ASHAScheduler(
        time_attr="step", max_t=last, grace_period=spec.grace_period, reduction_factor=spec.reduction_factor)
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # Optuna (and SQLAlchemy) only for the sweeps that use it

        search = {"search_alg": OptunaSearch(points_to_evaluate=[first_point] if first_point else None,
                                             seed=spec.seed),
                  "num_samples": spec.num_samples}
        space = tune_space(spec)
        # Tune numbers the trials it creates from 1 in the experiment tag, and restores that count on a resume
        index = lambda t: int(t.experiment_tag.split("_", 1)[0]) - 1  # noqa: E731
    else:
        search, space = {}, {"trial": tune.grid_search(list(range(grid_points)))}
        index = lambda t: t.config["trial"]  # noqa: E731
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, scheduler=scheduler, max_concurrent_trials=concurrent,
            time_budget_s=spec.time_budget_s, **search,
            trial_name_creator=lambda t: trial_name(index(t)),
            trial_dirname_creator=lambda t: trial_name(index(t)),
        ),
        run_config=tune.RunConfig(name=run_name, storage_path=storage, storage_filesystem=fs,
                                  callbacks=[_Progress(spec.metric, spec.scheduler)]),
    )


class _Progress(tune.Callback):
    """One line per trial event on the sweep's driver, so progress is visible while trials run; and the
    placement group of a stopped trial is released."""

    def __init__(self, metric: str, scheduler: str):
        self.metric, self.scheduler = metric, scheduler

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        shown = f"{value:.4g}" if isinstance(value, float) else value
        logger.info(Problem("sweep", f"{_name(trial)} step {result.get('step')}/{result.get('total_steps')} "
                                     f"{self.metric}={shown}"))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        if last.get("step") is not None and last.get("step") < last.get("total_steps", 0):
            logger.info(Problem("sweep", f"{_name(trial)} stopped at step {last['step']}/{last['total_steps']} by "
                                         f"{self.scheduler}"))
        else:
            logger.info(Problem("sweep", f"{_name(trial)} finished"))
        release_placement_group(last)

    def on_trial_error(self, iteration, trials, trial, **info):
        logger.info(Problem("sweep", f"{_name(trial)} failed; the sweep goes on with the other trials"))
        release_placement_group(trial.last_result)


def release_placement_group(last_result: dict | None) -> None:
    """Removes the placement group of a trial's Train run if it outlived the run.

    A trial the scheduler (or the time budget) stops is killed with its Train controller; the worker group's
    placement group belongs to the sweep's job, not to the controller, and would hold its CPUs until the
    sweep ends. (Ray Train's own cleaner for this needs the dashboard's state API.)
    """
    group_id = (last_result or {}).get("placement_group")
    if not group_id:
        return
    group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id)))
    if placement_group_table(group).get("state") in ("CREATED", "PENDING", "RESCHEDULING"):
        remove_placement_group(group)


def _name(trial) -> str:
    return str(trial)  # the name trial_name_creator gave it
