"""`rayft sweep`: a Ray Tune search over recipe keys in which every trial is a whole rayft training run.

The `sweep:` section is parsed and every trial's recipe is validated on the driver before Tune starts;
results (a table, best_config.yaml, a plot) are written to the sweep's output_dir.
"""

import csv
import dataclasses
import difflib
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from rayft.orchestrator.config import (
    ConfigError,
    RecipeConfig,
    describe_type,
    is_prediction,
    mask,
    parse_config,
    type_matches,
)

SAMPLERS = ("grid", "choice", "uniform", "loguniform", "randint")
# Keys the sweep sets for every trial itself: each trial has its own outputs and its own Ray Train run.
SET_PER_TRIAL = ("output_dir", "ray_run_name", "ray_storage_path", "ray_storage_filesystem", "ray_address",
                 "overwrite_output_dir")
TRIALS_FILE = "sweep_trials.json"
RESULTS_FILE = "sweep_results.csv"
BEST_CONFIG_FILE = "best_config.yaml"
TRIAL_DRIVER_MEMORY = 512 * 1024**2  # bytes Ray reserves for each trial's driver process


@dataclass
class SweepSpec:
    """The recipe's `sweep:` section."""

    parameters: dict
    num_samples: int = 1
    metric: Optional[str] = None  # default: eval_loss with evaluation data, else the training loss
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["fifo", "asha"] = "fifo"
    grace_period: Optional[int] = None  # asha: optimizer steps before a trial can be stopped (default: the
    # interval at which the metric is measured)
    reduction_factor: float = 4.0  # asha: Ray Tune's default
    max_concurrent_trials: Optional[int] = None  # default: as many trials as the cluster fits at once
    time_budget_s: Optional[float] = None  # stop every trial when the sweep has run this long
    seed: Optional[int] = None  # for sampling the space; default: the recipe's seed
    notes: list = field(default_factory=list)


@dataclass
class Trial:
    """One point of the space: its name, the values it sets, and its full recipe (plain data)."""

    name: str
    params: dict
    recipe: dict


def parse_sweep(section, seed: int) -> SweepSpec:
    """Checks the `sweep:` section; raises ConfigError naming every problem."""
    if not isinstance(section, dict):
        raise ConfigError([f"sweep: must be a mapping with at least `parameters`, not {section!r}"])
    known = {f.name: f for f in dataclasses.fields(SweepSpec) if f.name != "notes"}
    problems = []
    for key, value in section.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            problems.append(f"sweep.{key}: unknown key" + (f"; did you mean {close[0]!r}?" if close else
                                                            f" (known: {', '.join(known)})"))
        elif not type_matches(value, SweepSpec.__annotations__[key] if key != "parameters" else dict):
            problems.append(f"sweep.{key}: {value!r} is a {type(value).__name__}, expected "
                            f"{describe_type(SweepSpec.__annotations__[key])}")
    if "parameters" not in section:
        problems.append("sweep.parameters: required; map recipe keys to a space, e.g. lora_rank: {grid: [8, 16]}")
    if problems:
        raise ConfigError(problems)
    spec = SweepSpec(**section)
    problems += _space_problems(spec.parameters)
    if spec.num_samples < 1:
        problems.append(f"sweep.num_samples: must be at least 1, got {spec.num_samples}")
    if spec.grace_period is not None and spec.grace_period < 1:
        problems.append(f"sweep.grace_period: must be at least 1 step, got {spec.grace_period}")
    if spec.reduction_factor <= 1:
        problems.append(f"sweep.reduction_factor: must be above 1, got {spec.reduction_factor}")
    if spec.max_concurrent_trials is not None and spec.max_concurrent_trials < 1:
        problems.append(f"sweep.max_concurrent_trials: must be at least 1, got {spec.max_concurrent_trials}")
    if spec.time_budget_s is not None and spec.time_budget_s <= 0:
        problems.append(f"sweep.time_budget_s: must be positive, got {spec.time_budget_s}")
    if problems:
        raise ConfigError(problems)
    if spec.seed is None:
        spec.seed = seed
    return spec


def _space_problems(parameters: dict) -> list[str]:
    from rayft.orchestrator.config import _all_keys

    known = _all_keys()
    problems = []
    if not parameters:
        problems.append("sweep.parameters: empty; name at least one recipe key to search over")
    for key, space in parameters.items():
        where = f"sweep.parameters.{key}"
        if key in SET_PER_TRIAL:
            problems.append(f"{where}: the sweep sets {key} for each trial itself; it cannot be searched")
        elif key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            problems.append(f"{where}: not a recipe key" + (f"; did you mean {close[0]!r}?" if close else ""))
        if not isinstance(space, dict) or len(space) != 1 or next(iter(space)) not in SAMPLERS:
            problems.append(f"{where}: must be one of {{grid: [..]}}, {{choice: [..]}}, {{uniform: [low, high]}}, "
                            f"{{loguniform: [low, high]}}, {{randint: [low, high]}}; got {space!r}")
            continue
        kind, values = next(iter(space.items()))
        if kind in ("grid", "choice"):
            if not isinstance(values, list) or not values:
                problems.append(f"{where}.{kind}: must be a non-empty list of values, got {values!r}")
            continue
        numbers = isinstance(values, list) and len(values) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if not numbers or not values[0] < values[1]:
            problems.append(f"{where}.{kind}: must be [low, high] with low < high, got {values!r}")
        elif kind == "loguniform" and values[0] <= 0:
            problems.append(f"{where}.loguniform: low must be positive, got {values[0]}")
        elif kind == "randint" and not all(isinstance(v, int) for v in values):
            problems.append(f"{where}.randint: low and high must be integers (high excluded), got {values!r}")
    return problems


def expand_points(spec: SweepSpec) -> list[dict]:
    """Every trial's values: the grid's product, repeated num_samples times, other keys sampled (seeded)."""
    rng = random.Random(spec.seed)
    grid_keys = [k for k, space in spec.parameters.items() if "grid" in space]
    combos = list(itertools.product(*(spec.parameters[k]["grid"] for k in grid_keys)))
    points = []
    for _ in range(spec.num_samples):
        for combo in combos:
            grid = dict(zip(grid_keys, combo))
            points.append({k: grid[k] if k in grid else _sample(space, rng) for k, space in spec.parameters.items()})
    return points


def _sample(space: dict, rng: random.Random):
    kind, values = next(iter(space.items()))
    if kind == "choice":
        return rng.choice(values)
    if kind == "uniform":
        return rng.uniform(*values)
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(values[0]), math.log(values[1])))
    return rng.randrange(*values)  # randint: high excluded, as in Ray Tune


def trial_name(index: int) -> str:
    return f"trial_{index:03d}"


def describe(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def make_trials(raw: dict, spec: SweepSpec, output_dir: Path, run_name: str) -> list[Trial]:
    """Each trial's recipe: the base recipe, the point's values, and its own output_dir and run name."""
    base = {k: v for k, v in raw.items() if k != "sweep"}
    trials = []
    for index, params in enumerate(expand_points(spec)):
        name = trial_name(index)
        recipe = {**base, **params, "output_dir": str(output_dir / "trials" / name),
                  "ray_run_name": f"{run_name}-{name}", "overwrite_output_dir": True}
        trials.append(Trial(name, params, recipe))
    return trials


def validate_trials(trials: list[Trial], base_dir: Path) -> list[RecipeConfig]:
    """Parses every trial's recipe; raises one ConfigError naming each bad trial with its values."""
    configs, problems = [], []
    for trial in trials:
        try:
            configs.append(parse_config(trial.recipe, base_dir=base_dir))
        except ConfigError as err:
            problems += [f"{trial.name} ({describe(trial.params)}): {p}" for p in err.problems]
    if problems:
        raise ConfigError(problems + ["the sweep did not start; change the space in the recipe's sweep section"])
    return configs


def default_metric(cfg: RecipeConfig) -> str:
    """PPO's mean reward (maximised); otherwise the evaluation loss where the recipe evaluates, else the loss."""
    if cfg.finetuning.stage == "ppo":
        return "reward"
    return "eval_loss" if (cfg.data.eval_dataset or cfg.data.val_size) else "loss"


def metric_problems(spec: SweepSpec, cfg: RecipeConfig) -> list[str]:
    """Whether the trials will report the metric while they train, as the scheduler needs."""
    t = cfg.training
    evaluates = bool(cfg.data.eval_dataset or cfg.data.val_size)
    problems = []
    if cfg.finetuning.stage == "ppo" and spec.metric == "reward" and spec.mode == "min":
        problems.append("sweep.mode: 'reward' is PPO's mean reward, which a sweep maximises; set mode: max")
    if spec.metric.startswith("eval_") and not evaluates:
        problems.append(f"sweep.metric: {spec.metric!r} is measured on evaluation data, which this recipe has "
                        "none of; set eval_dataset or val_size, or choose a training metric such as 'loss'")
    elif spec.scheduler == "asha" and spec.metric.startswith("eval_") and t.get("eval_strategy", "no") == "no":
        problems.append(f"sweep.scheduler: asha compares trials by {spec.metric!r} during training, but "
                        "eval_strategy is 'no' (evaluation only at the end); set eval_strategy: steps and eval_steps")
    return problems


def report_interval(cfg: RecipeConfig, metric: str, steps_per_epoch: int) -> int:
    """How many optimizer steps apart the metric is measured (ASHA's default grace period)."""
    t = cfg.training
    if metric.startswith("eval_"):
        if t.get("eval_strategy") == "epoch":
            return steps_per_epoch
        return int(t.get("eval_steps") or t.get("logging_steps", 500))
    if t.get("logging_strategy") == "epoch":
        return steps_per_epoch
    return int(t.get("logging_steps", 500))


def fitting_trials(per_trial: dict, nodes) -> int:
    """How many trials, each needing `per_trial` resources in total, the cluster holds at once."""
    fits = [math.floor(sum(n.resources.get(k, 0.0) for n in nodes) / v + 1e-9) for k, v in per_trial.items() if v > 0]
    return min(fits) if fits else 1


def concurrency(spec: SweepSpec, per_trial: dict, nodes) -> int:
    """max_concurrent_trials: the user's, unless the cluster cannot hold that many trials' workers at once."""
    fits = fitting_trials(per_trial, nodes)
    if spec.max_concurrent_trials is None:
        return max(fits, 1)
    if spec.max_concurrent_trials > fits:
        raise ConfigError([
            f"sweep.max_concurrent_trials: {spec.max_concurrent_trials} trials at once need "
            f"{ {k: v * spec.max_concurrent_trials for k, v in per_trial.items()} }, but the cluster holds the "
            f"workers of {fits} trial(s) at once; lower max_concurrent_trials (or leave it unset)"])
    return spec.max_concurrent_trials


# ---------------------------------------------------------------- results (pure: rows in, files out)

def stop_reason(status: str, step: int | None, total: int | None, error: str | None, scheduler: str,
                budget_spent: bool) -> str:
    if status == "ERROR":
        return f"failed: {error}"
    if step is None:
        return "stopped before its first report"
    if total is not None and step >= total:
        return "completed"
    if budget_spent and scheduler == "fifo":
        return f"stopped at step {step}/{total}: time budget spent"
    return f"stopped early at step {step}/{total} by {scheduler}"


def best_row(rows: list[dict], metric: str, mode: str) -> dict | None:
    """The trial whose last reported metric is best (ties: the earlier trial)."""
    scored = [r for r in rows if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda r: r[metric])


def write_results(output_dir: Path, rows: list[dict], histories: dict[str, list[tuple]], metric: str) -> Path:
    """sweep_results.csv and the plot of each trial's metric against steps; returns the CSV's path."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    path = output_dir / RESULTS_FILE
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    plot_histories(output_dir, histories, metric)
    return path


def plot_histories(output_dir: Path, histories: dict[str, list[tuple]], metric: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in sorted(histories.items()):
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", markersize=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial")
    ax.grid(alpha=0.3)
    if histories:
        ax.legend(fontsize=7)
    path = output_dir / f"sweep_{metric.replace('/', '_')}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def format_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_best_config(output_dir: Path, raw: dict, best: dict, params: dict, metric: str, run_name: str) -> Path:
    """A plain recipe (no sweep section) with the best trial's values, that `rayft train` runs as it is."""
    recipe = {k: v for k, v in raw.items() if k != "sweep"}
    recipe.update(params)
    recipe.update(output_dir=str(output_dir / "best"), ray_run_name=f"{run_name}-best")
    path = output_dir / BEST_CONFIG_FILE
    header = (f"# Best trial of sweep {run_name!r}: {best['trial']} ({describe(params)}), "
              f"{metric} = {_cell(best[metric])}.\n# Train it with: rayft train {path}\n")
    masked = mask(recipe)
    if masked != recipe:
        header += "# Secrets are masked (***): pass them again as key=value overrides.\n"
    path.write_text(header + yaml.safe_dump(masked, sort_keys=False, allow_unicode=True))
    return path


# ---------------------------------------------------------------- running it (effects)

def finished_records(output_dir: str, metric: str) -> list[dict] | None:
    """The metric records of a trial whose run completed before the sweep was interrupted, else None."""
    from rayft.trainers.callbacks import read_log

    out = Path(output_dir)
    if not (out / "all_results.json").is_file():
        return None
    records = [r for r in read_log(out) if metric in r]
    return records or None


def run_trial(config: dict, trials: list[dict], metric: str) -> None:
    """One Tune trial: a whole training run of the trial's recipe on the data the sweep's driver tokenised."""
    from rayft.orchestrator.launch import launch

    trial = trials[config["trial"]]
    cfg = RecipeConfig.from_dict(trial["recipe"])
    done = finished_records(cfg.training["output_dir"], metric)
    if done is not None:  # it completed before the sweep was interrupted: report it again, train nothing
        for record in done:
            tune.report({**record, "total_steps": record.get("total_steps", record["step"])})
        return
    launch(cfg, trial["plan"], trial["datasets"], sweep_metric=metric)


@dataclass
class Sweep:
    """A checked sweep: the base recipe's config, the spec with derived values filled in, and the trials."""

    base: RecipeConfig
    spec: SweepSpec
    run_name: str
    output_dir: Path
    trials: list[Trial]
    configs: list[RecipeConfig]


def check_sweep(raw: dict, base_dir: str = ".", log=print) -> Sweep:
    """Everything about a sweep that can be checked without Ray: its section, its metric, every trial's recipe."""
    if "sweep" not in raw:
        raise ConfigError(["sweep: this recipe has no sweep section; add one (see the README) or use `rayft train`"])
    base_cfg = parse_config({k: v for k, v in raw.items() if k != "sweep"}, base_dir=base_dir)
    if is_prediction(base_cfg.training):
        raise ConfigError(["do_train: a sweep trains every trial; this recipe generates (do_train: false with "
                           "predict_with_generate); run it with `rayft train`, or sweep a training recipe"])
    if base_cfg.ray.reward_model_workers:
        raise ConfigError(["reward_model_workers: a sweep does not start a reward actor group per trial (the trials' "
                           "resources would not count it); keep the reward model inside the workers for a sweep"])
    spec = parse_sweep(raw["sweep"], seed=base_cfg.training.get("seed", 42))
    output_dir = Path(base_cfg.training["output_dir"])
    run_name = base_cfg.ray.ray_run_name or f"sweep-{output_dir.name}"
    if not base_cfg.ray.ray_run_name:
        log(f"[rayft] derived: ray_run_name = {run_name} (from output_dir; trials are named {run_name}-trial_NNN)")
    if spec.metric is None:
        spec.metric = default_metric(base_cfg)
        if spec.metric == "reward" and "mode" not in raw["sweep"]:
            spec.mode = "max"
        log(f"[rayft] derived: sweep.metric = {spec.metric} ({spec.mode})")
    problems = metric_problems(spec, base_cfg)
    if problems:
        raise ConfigError(problems)
    trials = make_trials(raw, spec, output_dir, run_name)
    return Sweep(base_cfg, spec, run_name, output_dir, trials, validate_trials(trials, Path(base_dir)))


def run_sweep(raw: dict, base_dir: str = ".", log=print):
    """`rayft sweep`: validates every trial, runs them under Ray Tune, and writes the results.

    Returns the rows of the results table.
    """
    import time

    from rayft.cluster.session import ray_session
    from rayft.orchestrator.launch import plan_on_cluster, plan_on_data, prepare, tokenize_splits
    from rayft.trainers import deepspeed as ds

    sweep = check_sweep(raw, base_dir, log=log)
    base_cfg, spec, run_name, output_dir = sweep.base, sweep.spec, sweep.run_name, sweep.output_dir
    trials, configs = sweep.trials, sweep.configs
    resuming = _check_output_dir(output_dir, trials, run_name)

    with ray_session(base_cfg.ray, log=log) as nodes:
        # Data, modules and resources of every trial are checked before any trial starts, and each distinct
        # data setting is tokenised once here: the trials share the materialised datasets.
        plans, datasets, tokenised = [], [], {}
        for trial, cfg in zip(trials, configs):
            try:
                prepared = prepare(cfg, log=lambda *_: None)
                key = json.dumps([dataclasses.asdict(cfg.data), cfg.finetuning.stage, cfg.model.model_name_or_path,
                                  cfg.training.get("seed", 42)], sort_keys=True, default=str)
                if key not in tokenised:
                    plan_on_cluster(cfg, len(prepared.train_examples))
                    tokenised[key] = tokenize_splits(cfg, prepared, log=log)
                plans.append(plan_on_data(cfg, prepared, tokenised[key]))
                datasets.append(tokenised[key])
            except ConfigError as err:
                raise ConfigError([f"{trial.name} ({describe(trial.params)}): {p}" for p in err.problems]) from None
        per_trial = {k: max(p.num_workers * p.resources_per_worker.get(k, 0) for p in plans)
                     for k in set().union(*(p.resources_per_worker for p in plans))}
        concurrent = concurrency(spec, per_trial, nodes)
        if spec.scheduler == "asha" and spec.grace_period is None:
            spec.grace_period = report_interval(configs[0], spec.metric, plans[0].steps_per_epoch)
            log(f"[rayft] derived: sweep.grace_period = {spec.grace_period} steps (how often {spec.metric} is measured)")
        log(f"[rayft] sweep {run_name!r}: {len(trials)} trials, {concurrent} at a time "
            f"(each needs {per_trial}), metric {spec.metric} ({spec.mode}), scheduler {spec.scheduler}")
        for trial in trials:
            log(f"[rayft]   {trial.name}: {describe(trial.params)}")
        (output_dir / TRIALS_FILE).write_text(json.dumps(_trials_record(run_name, trials), indent=1))
        if any(p.deepspeed is not None and not p.use_gpu for p in plans):
            ds.prebuild_cpu_ops(log=log)  # once here: trials building it at the same time would crash

        started = time.time()
        shipped = [{"recipe": c.to_dict(mask_secrets=False), "plan": p, "datasets": d}
                   for c, p, d in zip(configs, plans, datasets)]
        tuner = _tuner(spec, base_cfg, run_name, shipped, concurrent,
                       max_steps=max(p.total_steps for p in plans), resume=resuming, log=log)
        grid = tuner.fit()
        budget_spent = spec.time_budget_s is not None and time.time() - started >= spec.time_budget_s
        rows, histories = _rows(grid, trials, spec, budget_spent)

    write_results(output_dir, rows, histories, spec.metric)
    log("[rayft] sweep results:\n" + format_table(rows))
    best = best_row(rows, spec.metric, spec.mode)
    if best is None:
        log(f"[rayft] no trial reported {spec.metric}; no best_config.yaml written")
    else:
        params = next(t.params for t in trials if t.name == best["trial"])
        path = write_best_config(output_dir, raw, best, params, spec.metric, run_name)
        log(f"[rayft] best: {best['trial']} ({describe(params)}) with {spec.metric} = {_cell(best[spec.metric])}; "
            f"recipe written to {path}")
    log(f"[rayft] results table: {output_dir / RESULTS_FILE}; trial outputs under {output_dir / 'trials'}")
    return rows


def _trials_record(run_name: str, trials: list[Trial]) -> dict:
    """What sweep_trials.json holds: the sweep's name and every trial's values, to recognise it on a rerun."""
    return {"run_name": run_name, "trials": [{"name": t.name, "params": t.params} for t in trials]}


def _check_output_dir(output_dir: Path, trials: list[Trial], run_name: str) -> bool:
    """Whether this is the resumption of an interrupted sweep; refuses to mix in another sweep's outputs."""
    record = output_dir / TRIALS_FILE
    if record.is_file():
        earlier = json.loads(record.read_text())
        if earlier != _trials_record(run_name, trials):
            raise ConfigError([f"output_dir: {output_dir} holds sweep {earlier.get('run_name')!r} with other trials; "
                               "rerun that sweep unchanged to resume it, or choose another output_dir"])
        return True
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise ConfigError([f"output_dir: {output_dir} exists and is not empty; a sweep writes its trials there, "
                           "choose another output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    return False


def _tuner(spec: SweepSpec, base_cfg: RecipeConfig, run_name: str, recipes: list[dict], concurrent: int,
           max_steps: int, resume: bool, log):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from rayft.cluster.storage import filesystem

    # A trial's own process only drives its TorchTrainer: it reserves memory but no CPU, so the trials'
    # workers can have every CPU and no trial waits for CPUs its own driver holds.
    trainable = tune.with_resources(tune.with_parameters(run_trial, trials=recipes, metric=spec.metric),
                                    {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})
    storage = base_cfg.ray.ray_storage_path
    experiment = f"{storage.rstrip('/')}/{run_name}"
    fs = filesystem(base_cfg.ray.ray_storage_filesystem)
    if resume and tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        log(f"[rayft] resuming sweep {run_name!r} from {experiment}: finished trials are kept, unfinished ones "
            "continue from their last checkpoint")
        return tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False, storage_filesystem=fs)
    scheduler = FIFOScheduler() if spec.scheduler == "fifo" else ASHAScheduler(
        # max_t beyond the last step: a trial that reaches its end finishes (and saves) rather than being stopped
        time_attr="step", max_t=max(max_steps, spec.grace_period) + 1, grace_period=spec.grace_period,
        reduction_factor=spec.reduction_factor)
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(list(range(len(recipes))))},
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, scheduler=scheduler, max_concurrent_trials=concurrent,
            time_budget_s=spec.time_budget_s,
            trial_name_creator=lambda t: trial_name(t.config["trial"]),
            trial_dirname_creator=lambda t: trial_name(t.config["trial"]),
        ),
        run_config=tune.RunConfig(name=run_name, storage_path=storage, storage_filesystem=fs,
                                  callbacks=[_Progress(spec.metric, spec.scheduler)]),
    )


def _rows(grid, trials: list[Trial], spec: SweepSpec, budget_spent: bool) -> tuple[list[dict], dict]:
    rows, histories = [], {}
    by_index = {result.config["trial"]: result for result in grid}
    for index, trial in enumerate(trials):
        result = by_index.get(index)
        metrics = dict(result.metrics or {}) if result is not None else {}
        error = str(result.error).strip().splitlines()[-1][:300] if result is not None and result.error else None
        status = "ERROR" if error else ("TERMINATED" if result is not None else "NOT STARTED")
        frame = result.metrics_dataframe if result is not None else None
        history = []
        if frame is not None and spec.metric in frame and "step" in frame:
            history = [(int(s), float(v)) for s, v in zip(frame["step"], frame[spec.metric]) if v == v]
        histories[trial.name] = history
        step = metrics.get("step")
        rows.append({
            "trial": trial.name, **trial.params,
            spec.metric: metrics.get(spec.metric),
            f"best_{spec.metric}": (min if spec.mode == "min" else max)(v for _, v in history) if history else None,
            "step": step, "total_steps": metrics.get("total_steps"),
            "status": status,
            "stop_reason": stop_reason(status, step, metrics.get("total_steps"), error, spec.scheduler, budget_spent),
        })
    return rows, histories


class MetricReport(TuneReportCallback):
    """Hands a trial's Ray Train reports that carry the sweep's metric on to Tune's scheduler.

    Checkpoint reports are left out: they repeat the last metrics at the save step, and Ray Train keeps the
    checkpoint itself. Reports without the metric (e.g. training-loss records when the metric is eval_loss)
    would fail Tune's check that every result carries the metric.
    """

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if checkpoint is None and self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


class _Progress(tune.Callback):
    """One line per trial event on the sweep's driver, so progress is visible while trials run; and the
    placement group of a stopped trial is released."""

    def __init__(self, metric: str, scheduler: str):
        self.metric, self.scheduler = metric, scheduler

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"[rayft] sweep: {_name(trial)} step {result.get('step')}/{result.get('total_steps')} "
              f"{self.metric}={shown}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        if last.get("step") is not None and last.get("step") < last.get("total_steps", 0):
            print(f"[rayft] sweep: {_name(trial)} stopped at step {last['step']}/{last['total_steps']} "
                  f"by {self.scheduler}", flush=True)
        else:
            print(f"[rayft] sweep: {_name(trial)} finished", flush=True)
        release_placement_group(last)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[rayft] sweep: {_name(trial)} failed; the sweep goes on with the other trials", flush=True)
        release_placement_group(trial.last_result)


def release_placement_group(last_result: dict | None) -> None:
    """Removes the placement group of a trial's Train run if it outlived the run.

    A trial the scheduler (or the time budget) stops is killed with its Train controller; the worker group's
    placement group belongs to the sweep's job, not to the controller, and would hold its CPUs until the
    sweep ends. (Ray Train's own cleaner for this needs the dashboard's state API.)
    """
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    group_id = (last_result or {}).get("placement_group")
    if not group_id:
        return
    group = PlacementGroup(PlacementGroupID(bytes.fromhex(group_id)))
    if placement_group_table(group).get("state") in ("CREATED", "PENDING", "RESCHEDULING"):
        remove_placement_group(group)


def _name(trial) -> str:
    return trial_name(trial.config["trial"])
