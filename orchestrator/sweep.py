"""`rayft sweep`: the Ray Tune driver of a search over recipe keys in which every trial is a whole rayft run.

The specification and its checks live in sweep_spec.py, the results in sweep_results.py; this file carries
the sweep out: it prepares every trial's data and plan, runs the trials under Tune, and writes the results.
"""

import dataclasses
import json
import tempfile
import time
import uuid
from pathlib import Path

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from rayft.cluster.session import ray_session
from rayft.cluster.storage import filesystem, latest_checkpoint
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
from rayft.orchestrator.population import EXPLOIT_FILE, SEGMENT_FILE, SegmentedPBT
from rayft.orchestrator.sweep_results import (
    POINT_FILE,
    RESULTS_FILE,
    TRIALS_FILE,
    best_row,
    exploit_history,
    finished_records,
    format_cell,
    format_table,
    result_rows,
    same_trials,
    searched_values,
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
from rayft.recipe.values import read_log

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
    recipe = _drawn_recipe(config, shared)
    if not _reported_again(recipe["output_dir"], metric):
        launch(*_drawn_plan(recipe, config, shared), shared["datasets"], sweep_metric=metric)


def run_pbt_trial(config: dict, shared: dict, metric: str, interval: int) -> None:
    """One member of a pbt population: its run in segments of `interval` steps, each a Ray Train run of its own that
    starts from the last one's checkpoint and ends with one. After each segment the measured metric is reported to
    Tune with a pointer to that checkpoint: pbt may then continue this trial from another member's checkpoint with
    perturbed values (an exploit), which restarts this function; where it starts is read from the trial's own
    records (segment_start)."""
    recipe = _drawn_recipe(config, shared)
    if _reported_again(recipe["output_dir"], metric):
        return
    start, exploit = segment_start(Path(recipe["output_dir"]))
    if exploit:  # the values pbt chose at the exploit, as the trial trains them even if Tune's record missed them
        config = {**config, **exploit["config"]}
        recipe = _drawn_recipe(config, shared)
    cfg, plan = _drawn_plan(recipe, config, shared)
    plan = dataclasses.replace(plan, report_every_log=False)  # Tune hears only the segments' ends, with checkpoints
    out, name, total = Path(cfg.args.output_dir), Path(cfg.args.output_dir).name, plan.total_steps
    if start is not None:
        exploited = f"{start['trial']}@step{start['step']}" if start["trial"] != name else None
        if exploited:
            logger.info(Problem("pbt", f"{name} continues from {exploited} with {describe(config)}"))
        mark_segment_start(out, start["step"], exploited)
    step = start["step"] if start else 0
    while step < total:
        end = min(step + interval, total)
        segment_run = f"{cfg.ray.ray_run_name}-from{step}-{uuid.uuid4().hex[:6]}"
        segment_cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, ray_run_name=segment_run))
        segment = dataclasses.replace(plan, start_from=start and {"uri": start["uri"], "filesystem": start["fs"]},
                                      stop_at=end if end < total else None)
        launch(segment_cfg, segment, shared["datasets"], sweep_metric=metric)
        start = {"trial": name, "step": end, "fs": cfg.ray.ray_storage_filesystem,
                 "uri": latest_checkpoint(cfg.ray.ray_storage_path, segment_run, cfg.ray.ray_storage_filesystem)}
        if start["uri"]:
            (out / SEGMENT_FILE).write_text(json.dumps(start))
        measured = {k: v for r in read_log(out) if r.get("step", 0) <= end and metric in r
                    for k, v in r.items() if isinstance(v, (int, float))}
        # Tune's checkpoint is the segment's pointer: pbt exploits only trials that have one
        with tempfile.TemporaryDirectory() as pointer:
            Path(pointer, SEGMENT_FILE).write_text(json.dumps(start))
            tune.report({**measured, "step": end, "total_steps": total},
                        checkpoint=tune.Checkpoint.from_directory(pointer) if start["uri"] else None)
        step = end


def segment_start(output_dir: Path) -> tuple[dict | None, dict | None]:
    """Where a pbt trial (re)starts: (the pointer it continues from or None, the exploit record when it is one)."""
    own, exploit = (json.loads((output_dir / f).read_text()) if (output_dir / f).is_file() else None
                    for f in (SEGMENT_FILE, EXPLOIT_FILE))
    if exploit is not None and (own is None or exploit["step"] >= own["step"]):
        return exploit, exploit
    return own, None


def mark_segment_start(output_dir: Path, step: int, exploited: str | None) -> None:
    """Trims a pbt trial's log to what precedes its new start (a segment cut short by a driver that died trains
    again, and an exploit whose decision was lost with the driver is not recorded), and records an exploit."""
    log = [r for r in read_log(output_dir) if r.get("step", 0) < step
           or (r.get("step") == step and "exploited" not in r and "resumed_from_step" not in r)]
    if exploited:
        log.append({"step": step, "exploited": exploited, "timestamp": round(time.time(), 3)})
    (output_dir / "trainer_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))


def _drawn_recipe(config: dict, shared: dict) -> dict:
    name = tune.get_context().get_trial_name()
    return trial_recipe(shared["raw"], config, shared["output_dir"], shared["run_name"], name)


def _drawn_plan(recipe: dict, config: dict, shared: dict) -> tuple[RecipeConfig, Plan]:
    """A drawn trial's config and plan, with the model's shape and data size the sweep's driver shares."""
    cfg = parse_config(recipe, base_dir=shared["base_dir"])
    out = Path(cfg.args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / POINT_FILE).write_text(json.dumps(config))  # the values drawn, for `rayft sweep --status`
    plan = make_plan(cfg, [Node(**n) for n in shared["nodes"]], shared["train_count"],
                     shape=ModelShape(**shared["shape"]), gpu_memory=shared["gpu_memory"],
                     report_every_log=True, run_id=uuid.uuid4().hex[:8],
                     trials_at_once=shared["trials_at_once"])
    return cfg, plan


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
                check_cluster(cfg, nodes, prepared.sources)
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
        if spec.population_based and spec.perturbation_interval >= plans[0].total_steps:
            raise ConfigError([Problem("sweep.perturbation_interval", f"{spec.perturbation_interval} steps, but each "
                                       f"trial trains {plans[0].total_steps}: {spec.scheduler} would never exploit; "
                                       "make it shorter than the run")])
        if spec.scheduler == "asha" and spec.grace_period is None:
            spec.grace_period = report_interval(configs[0], spec.metric, plans[0].steps_per_epoch)
            logger.info(Problem("derived", f"sweep.grace_period = {spec.grace_period} steps (how often {spec.metric} "
                                           "is measured)"))
        drawn = f"{spec.scheduler}'s population" if spec.population_based else spec.search
        logger.info(f"sweep {run_name!r}: {count} trials ({drawn}), {concurrent} at a time "
            f"(each needs {per_trial}), {_objectives_text(spec)}, scheduler {spec.scheduler}")
        for trial in trials:
            logger.info(f"  {trial.name}: {describe(trial.params)}")
        (output_dir / TRIALS_FILE).write_text(json.dumps(trials_record(run_name, trials, spec), indent=1))
        helper.close()  # the sweep's driver holds no torch while its trials train
        if any(p.deepspeed is not None and not p.use_gpu for p in plans):
            build_deepspeed_op()  # once here: trials building it at the same time would crash

        started = time.time()
        if spec.draws:
            (shape,), (base_plan,) = shapes, plans
            shared = {"raw": raw, "base_dir": str(Path(base_dir).resolve()), "output_dir": str(output_dir),
                      "run_name": run_name, "nodes": [dataclasses.asdict(n) for n in nodes],
                      "shape": dataclasses.asdict(shape), "train_count": base_plan.num_train_examples,
                      "gpu_memory": planning_gpu_memory(base_cfg, nodes),
                      "trials_at_once": sharing, "datasets": datasets[0]}
            trainable = tune.with_parameters(run_drawn_trial, shared=shared, metric=spec.metric) \
                if not spec.population_based else tune.with_parameters(run_pbt_trial, shared=shared, metric=spec.metric,
                                                                     interval=spec.perturbation_interval)
        else:
            shipped = [{"recipe": c.to_dict(mask_secrets=False), "plan": p.to_dict(), "datasets": d}
                       for c, p, d in zip(configs, plans, datasets)]
            trainable = tune.with_parameters(run_trial, trials=shipped, metric=spec.metric)
        tuner = _tuner(spec, base_cfg, run_name, trainable, len(trials), concurrent, sweep.first_point,
                       max_steps=max(p.total_steps for p in plans), resume=resuming)
        grid = tuner.fit()
        budget_spent = spec.time_budget_s is not None and time.time() - started >= spec.time_budget_s
        if spec.draws:  # its trials are known now: each result's folder is named after its trial
            # (under pbt, each trial's values are its last: those it trained with last, after any exploit)
            values = (lambda r: searched_values(output_dir / "trials" / Path(r.path).name, spec.parameters)) \
                if spec.population_based else (lambda r: {k: r.config.get(k) for k in spec.parameters})
            trials = sorted((Trial(Path(r.path).name, values(r), {}) for r in grid), key=lambda t: t.name)
            rows, histories = result_rows(grid, trials, spec, budget_spent, name_of=lambda r: Path(r.path).name)
            if spec.population_based:
                for row in rows:
                    row["exploited"] = exploit_history(output_dir / "trials" / row["trial"])
        else:
            rows, histories = result_rows(grid, trials, spec, budget_spent)

    write_results(output_dir, rows, histories, spec)
    logger.info("sweep results:\n" + format_table(rows))
    best = best_row(rows, spec.metric, spec.mode)
    if spec.multi_objective:
        front = [r["trial"] for r in rows if r["pareto"]]
        logger.info(Problem("pareto", f"{', '.join(front) or 'no trial'} on the Pareto front of "
                                      f"{_objectives_text(spec)}; best_config.yaml is its best on {spec.metric}"))
    if best is None:
        logger.info(f"no trial reported {spec.metric}; no best_config.yaml written")
    else:
        params = next(t.params for t in trials if t.name == best["trial"])
        path = write_best_config(output_dir, raw, best, params, spec.metric, run_name)
        logger.info(Problem("best", f"{best['trial']} ({describe(params)}) with {spec.metric} = "
                                    f"{format_cell(best[spec.metric])}; recipe written to {path}"))
    logger.info(f"results table: {output_dir / RESULTS_FILE}; trial outputs under {output_dir / 'trials'}")
    return rows


def _objectives_text(spec: SweepSpec) -> str:
    return ("metrics " + ", ".join(f"{m} ({mode})" for m, mode in spec.objectives) if spec.multi_objective
            else f"metric {spec.metric} ({spec.mode})")


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
    if spec.scheduler == "pbt":
        scheduler = SegmentedPBT(Path(base_cfg.args.output_dir) / "trials", time_attr="step",
                                 perturbation_interval=spec.perturbation_interval,
                                 hyperparam_mutations=tune_space(spec), quantile_fraction=spec.quantile_fraction,
                                 resample_probability=spec.resample_probability, synch=True, log_config=False)
    elif spec.scheduler == "pb2":
        from rayft.orchestrator.sweep_pb2 import SegmentedPB2  # scikit-learn (0.6 s) only for the sweeps that use it

        scheduler = SegmentedPB2(Path(base_cfg.args.output_dir) / "trials", time_attr="step",
                                    perturbation_interval=spec.perturbation_interval,
                                    hyperparam_bounds={k: list(next(iter(v.values())))
                                                       for k, v in spec.parameters.items()},
                                    quantile_fraction=spec.quantile_fraction, synch=True, log_config=False)
    else:
        # (several metrics: Tune's own metric stays unset, TPE gets them all and ASHA stops by the first)
        by_first = {"metric": spec.metric, "mode": spec.mode} if spec.multi_objective else {}
        scheduler = FIFOScheduler() if spec.scheduler == "fifo" else ResumableASHA(
            Path(base_cfg.args.output_dir) / "trials", time_attr="step", max_t=last, grace_period=spec.grace_period,
            reduction_factor=spec.reduction_factor, **by_first)
    if spec.draws:
        first = [first_point] if first_point else None
        if spec.search == "optuna":
            from optuna.samplers import TPESampler  # Optuna (and SQLAlchemy) only for the sweeps that use it
            from ray.tune.search.optuna import OptunaSearch

            objectives = {"metric": [m for m, _ in spec.objectives], "mode": [m for _, m in spec.objectives]} \
                if spec.multi_objective else {}
            sampler = TPESampler(seed=spec.seed, n_startup_trials=spec.startup_trials)
            drawer = OptunaSearch(points_to_evaluate=first, sampler=sampler, **objectives)
        else:  # pbt's population: the recipe's point, then draws at random (seeded)
            drawer = BasicVariantGenerator(points_to_evaluate=first, random_state=spec.seed)
        search = {"search_alg": drawer, "num_samples": spec.num_samples}
        space = tune_space(spec)
        # Tune numbers the trials it creates in the experiment tag (optuna from 1, its random draws from 0), and
        # restores that count on a resume
        offset = 1 if spec.search == "optuna" else 0
        index = lambda t: int(t.experiment_tag.split("_", 1)[0]) - offset  # noqa: E731
    else:
        search, space = {}, {"trial": tune.grid_search(list(range(grid_points)))}
        index = lambda t: t.config["trial"]  # noqa: E731
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=None if spec.multi_objective else spec.metric, mode=None if spec.multi_objective else spec.mode,
            scheduler=scheduler, max_concurrent_trials=concurrent,
            time_budget_s=spec.time_budget_s, **search,
            trial_name_creator=lambda t: trial_name(index(t)),
            trial_dirname_creator=lambda t: trial_name(index(t)),
        ),
        run_config=tune.RunConfig(name=run_name, storage_path=storage, storage_filesystem=fs,
                                  callbacks=[_Progress(spec.metric, spec.scheduler)]),
    )


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs survive the sweep's resumption. Ray Tune saves no scheduler state with its experiment: a
    resumed sweep's ASHA would start with empty rungs, compare a trial that goes on only with what is reported after
    the resume, and let it run to the end where the first driver would have stopped it. Every trial Tune adds (the
    restored ones too) has the values of the metric it already logged put back into its bracket's rungs; a trial
    that those values stop (the first driver died before its decision reached the trial) stops at its first report."""

    def __init__(self, trials_dir: Path, **kwargs):
        super().__init__(**kwargs)
        self.trials_dir = trials_dir
        self.stopped_before_resume: set[str] = set()

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        bracket, trial_dir = self._trial_info[trial.trial_id], self.trials_dir / _name(trial)
        finished = (trial_dir / "all_results.json").is_file()  # its end reported again, never stopped
        steps = []
        for record in read_log(trial_dir):  # a new trial has none
            if record.get(self._metric) is not None and record.get(self._time_attr) is not None:
                decision = bracket.on_result(trial, record[self._time_attr], self._metric_op * record[self._metric])
                if decision == TrialScheduler.STOP and not finished:
                    self.stopped_before_resume.add(trial.trial_id)
                steps.append(record[self._time_attr])
        if steps:
            logger.info(Problem("sweep", f"asha: {_name(trial)}'s {self._metric} at steps {steps} put back (a resumed "
                                         "sweep's scheduler starts empty)"))

    def on_trial_result(self, tune_controller, trial, result):
        if trial.trial_id in self.stopped_before_resume:
            return TrialScheduler.STOP
        return super().on_trial_result(tune_controller, trial, result)


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
