"""A sweep's specification: the `sweep:` section, the points of its space, each trial's checked recipe, its metric
and how many trials the cluster runs at once. Pure: nothing here touches Ray or the file system's outputs."""

import dataclasses
import difflib
import itertools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from rayft.recipe.config import RecipeConfig
from rayft.recipe.derive import is_elastic, is_prediction
from rayft.recipe.loading import describe_type, type_matches
from rayft.recipe.logs import logger
from rayft.recipe.parse import parse_config
from rayft.recipe.problems import ConfigError, Problem
from rayft.recipe.schema import key_sections
from rayft.recipe.stages import STAGE_SPECS, sweep_metric

SAMPLERS = ("grid", "choice", "uniform", "loguniform", "randint")

# The schedulers that train a population in segments, the worst continuing from the best's checkpoints.
POPULATION_SCHEDULERS = ("pbt", "pb2")

# Under `search: optuna` every trial shares the sweep's tokenised data, its model's shape and one plan of resources:
# keys of these sections (and the stage) change what those are, and are searched with `search: grid`.
SHARED_BY_OPTUNA_TRIALS = ("data", "model", "ray")

# Keys the sweep sets for every trial itself: each trial has its own outputs and its own Ray Train run.
SET_PER_TRIAL = ("output_dir", "ray_run_name", "ray_storage_path", "ray_storage_filesystem", "ray_address",
                 "overwrite_output_dir")

# What `scheduler: pbt` may change in the middle of a run: the optimizer's hyperparameters (re-applied to its
# param groups and schedule after a checkpoint is loaded), the gradient clip, and the preference losses' weights,
# which the loss reads at every step. Anything else shapes the model, the data or the schedule's length.
PERTURBABLE_BY_PBT = ("learning_rate", "weight_decay", "max_grad_norm", "pref_beta", "pref_ftx", "dpo_label_smoothing",
                      "simpo_gamma", "kto_chosen_weight", "kto_rejected_weight")


@dataclass
class SweepSpec:
    """The recipe's `sweep:` section."""

    parameters: dict
    search: Literal["grid", "optuna"] = "grid"  # grid: the grid's product, other keys drawn at random; optuna: TPE
    num_samples: int = 1  # grid: repeats of the grid; optuna: the number of trials; pbt: the population
    metric: Optional[str] = None  # default: eval_loss with evaluation data, else the training loss
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["fifo", "asha", "pbt", "pb2"] = "fifo"  # pb2: pbt whose exploits choose values by a GP bandit
    grace_period: Optional[int] = None  # asha: optimizer steps before a trial can be stopped (default: the
    # interval at which the metric is measured)
    reduction_factor: float = 4.0  # asha: Ray Tune's default
    perturbation_interval: Optional[int] = None  # pbt: optimizer steps between exploits (required)
    quantile_fraction: float = 0.25  # pbt: the share of the population that is exploited, and that it copies
    resample_probability: float = 0.25  # pbt: how often an exploit draws a value afresh instead of moving the donor's
    max_concurrent_trials: Optional[int] = None  # default: as many trials as the cluster fits at once
    time_budget_s: Optional[float] = None  # stop every trial when the sweep has run this long
    seed: Optional[int] = None  # for sampling the space; default: the recipe's seed
    # optuna: how many trials TPE draws at random (the recipe's own point counts) before it models the results;
    # default: half the trials, at most Optuna's 10
    startup_trials: Optional[int] = None
    notes: list = field(default_factory=list)
    # search: optuna with several metrics (`metric: [a, b]`, `mode: [min, max]`): every (metric, mode), the first
    # being `metric` and `mode` above, which ASHA stops by and best_config.yaml is chosen by
    objectives: list = field(default_factory=list)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def draws(self) -> bool:
        """Whether Ray Tune draws the trials' points as it goes (optuna's TPE, pbt's population), rather than
        rayft listing them all first (a grid)."""
        return self.search == "optuna" or self.population_based

    @property
    def population_based(self) -> bool:
        """pbt or pb2: a population trained in segments, the worst continuing from the best's checkpoints."""
        return self.scheduler in POPULATION_SCHEDULERS


@dataclass
class Trial:
    """One point of the space: its name, the values it sets, and its full recipe (plain data)."""

    name: str
    params: dict
    recipe: dict


def parse_sweep(section, seed: int) -> SweepSpec:
    """Checks the `sweep:` section; raises ConfigError naming every problem."""
    if not isinstance(section, dict):
        raise ConfigError([Problem("sweep", f"must be a mapping with at least `parameters`, not {section!r}")])
    known = {f.name: f for f in dataclasses.fields(SweepSpec) if f.name not in ("notes", "objectives")}
    section, objectives, problems = _objectives(section)
    for key, value in section.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            problems.append(f"sweep.{key}: unknown key" + (f"; did you mean {close[0]!r}?" if close else
                                                            f" (known: {', '.join(known)})"))
        elif not type_matches(value, SweepSpec.__annotations__[key] if key != "parameters" else dict):
            problems.append(f"sweep.{key}: {value!r} is a {type(value).__name__}, expected "
                            f"{describe_type(SweepSpec.__annotations__[key])}")
    if "parameters" not in section:
        problems.append(Problem("sweep.parameters", "required; map recipe keys to a space, e.g. lora_rank: "
                                                    "{grid: [8, 16]}"))
    if problems:
        raise ConfigError(problems)
    spec = SweepSpec(**section, objectives=objectives)
    if spec.multi_objective and spec.search != "optuna":
        problems.append(Problem("sweep.metric", f"{len(objectives)} metrics need search: optuna (TPE searches their "
                                                "Pareto front); a grid or pbt ranks its trials by one: give one"))
    problems += _space_problems(spec.parameters)
    if spec.search == "optuna":
        problems += _optuna_problems(spec.parameters)
    problems += _pbt_problems(spec, section)
    if spec.num_samples < 1:
        problems.append(Problem("sweep.num_samples", f"must be at least 1, got {spec.num_samples}"))
    if spec.grace_period is not None and spec.grace_period < 1:
        problems.append(Problem("sweep.grace_period", f"must be at least 1 step, got {spec.grace_period}"))
    if spec.reduction_factor <= 1:
        problems.append(Problem("sweep.reduction_factor", f"must be above 1, got {spec.reduction_factor}"))
    if spec.max_concurrent_trials is not None and spec.max_concurrent_trials < 1:
        problems.append(Problem("sweep.max_concurrent_trials", f"must be at least 1, got {spec.max_concurrent_trials}"))
    if spec.startup_trials is not None and spec.search != "optuna":
        problems.append(Problem("sweep.startup_trials", f"only for search: optuna (this sweep's is {spec.search})"))
    elif spec.startup_trials is not None and spec.startup_trials < 1:
        problems.append(Problem("sweep.startup_trials", f"must be at least 1, got {spec.startup_trials}"))
    if spec.time_budget_s is not None and spec.time_budget_s <= 0:
        problems.append(Problem("sweep.time_budget_s", f"must be positive, got {spec.time_budget_s}"))
    if problems:
        raise ConfigError(problems)
    if spec.seed is None:
        spec.seed = seed
    if spec.search == "optuna" and spec.startup_trials is None:
        # Optuna's TPE draws its first 10 points at random; a sweep of fewer trials would never use its model
        spec.startup_trials = min(10, max(1, spec.num_samples // 2))
    return spec


def _objectives(section: dict) -> tuple[dict, list, list]:
    """A list of metrics (with a list of modes, one each) taken out of the section: (the section with the first of
    each, every (metric, mode), problems)."""
    metric, mode = section.get("metric"), section.get("mode", "min")
    if not isinstance(metric, list):
        if isinstance(mode, list):
            return section, [], [Problem("sweep.mode", "a list of modes goes with a list of metrics, one each; give "
                                                       "one mode (min or max) for one metric")]
        return section, [], []
    modes = mode if isinstance(mode, list) else None
    if not metric or not all(isinstance(m, str) for m in metric) or len(set(metric)) != len(metric):
        return section, [], [Problem("sweep.metric", f"a list of metrics must name distinct metrics, got {metric!r}")]
    if modes is None or len(modes) != len(metric) or not all(m in ("min", "max") for m in modes):
        return section, [], [Problem("sweep.mode", f"{len(metric)} metrics need a list of {len(metric)} modes (min "
                                                   f"or max, in the metrics' order), got {mode!r}")]
    return {**section, "metric": metric[0], "mode": modes[0]}, [list(p) for p in zip(metric, modes)], []


def _space_problems(parameters: dict) -> list[str]:
    known = key_sections()
    problems = []
    if not parameters:
        problems.append(Problem("sweep.parameters", "empty; name at least one recipe key to search over"))
    for key, space in parameters.items():
        where = f"sweep.parameters.{key}"
        if key in SET_PER_TRIAL:
            problems.append(Problem(where, f"the sweep sets {key} for each trial itself; it cannot be searched"))
        elif key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            problems.append(Problem(where, "not a recipe key" + (f"; did you mean {close[0]!r}?" if close else "")))
        if not isinstance(space, dict) or len(space) != 1 or next(iter(space)) not in SAMPLERS:
            problems.append(Problem(where, "must be one of {grid: [..]}, {choice: [..]}, {uniform: [low, "
                                           "high]}, {loguniform: [low, high]}, {randint: [low, high]}; got "
                                           f"{space!r}"))
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


def _optuna_problems(parameters: dict) -> list[str]:
    sections = key_sections()
    problems = []
    for key, space in parameters.items():
        where = f"sweep.parameters.{key}"
        if isinstance(space, dict) and "grid" in space:
            problems.append(Problem(where, "grid is not an optuna space (TPE draws each trial's point); give "
                                           "{choice: [..]} or a range, or use search: grid"))
        if sections.get(key) in SHARED_BY_OPTUNA_TRIALS or key == "stage":
            problems.append(Problem(where, "under search: optuna the trials share the sweep's tokenised data, model "
                                           "and resources; search this key with search: grid"))
    return problems


def _pbt_problems(spec: SweepSpec, section: dict) -> list[str]:
    settings = [k for k in ("perturbation_interval", "quantile_fraction", "resample_probability") if k in section]
    if not spec.population_based:
        return [Problem(f"sweep.{k}", f"only for scheduler: pbt or pb2 (this sweep's is {spec.scheduler})")
                for k in settings]
    problems = []
    name = spec.scheduler
    if spec.search == "optuna":
        problems.append(Problem("sweep.search", f"{name} draws its population at random and then changes the values "
                                                "itself; remove search: optuna (or use scheduler: asha with it)"))
    if name == "pb2":
        if "resample_probability" in section:
            problems.append(Problem("sweep.resample_probability", "pb2 chooses each exploit's values with its "
                                                                  "Gaussian-process bandit; resample_probability is "
                                                                  "pbt's"))
        for key, space in spec.parameters.items():
            if isinstance(space, dict) and next(iter(space), None) not in ("uniform", "loguniform"):
                problems.append(Problem(f"sweep.parameters.{key}", "pb2 models continuous ranges: give {uniform: "
                                                                   "[low, high]} or {loguniform: [low, high]}"))
    for key, space in spec.parameters.items():
        where = f"sweep.parameters.{key}"
        if key not in PERTURBABLE_BY_PBT:
            problems.append(Problem(where, f"{name} changes values in the middle of a run, and {key} cannot change "
                                           f"there; {name} perturbs {', '.join(PERTURBABLE_BY_PBT)} (search {key} "
                                           "with a grid, or optuna)"))
        elif isinstance(space, dict) and "grid" in space and name == "pbt":
            problems.append(Problem(where, "grid is not a pbt space (pbt draws the population and perturbs it); give "
                                           "{choice: [..]} or a range"))
    if spec.perturbation_interval is None or spec.perturbation_interval < 1:
        problems.append(Problem("sweep.perturbation_interval", f"{name} needs the optimizer steps between exploits, "
                                                               f"at least 1; got {spec.perturbation_interval}"))
    if not 0 < spec.quantile_fraction <= 0.5:
        problems.append(Problem("sweep.quantile_fraction", f"must be in (0, 0.5], got {spec.quantile_fraction}"))
    if not 0 <= spec.resample_probability <= 1:
        problems.append(Problem("sweep.resample_probability", f"must be in [0, 1], got {spec.resample_probability}"))
    return problems


def tune_space(spec: SweepSpec) -> dict:
    """The search space in Ray Tune's terms (for optuna, and pbt's population and perturbations; randint's high is
    excluded, as in rayft's own)."""
    from ray import tune

    kinds = {"choice": tune.choice, "uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
    space = {}
    for key, sampler in spec.parameters.items():
        kind, values = next(iter(sampler.items()))
        space[key] = kinds[kind](values) if kind == "choice" else kinds[kind](*values)
    return space


def in_space(value, sampler: dict) -> bool:
    kind, values = next(iter(sampler.items()))
    if kind == "choice":
        return value in values
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if kind == "randint":
        return isinstance(value, int) and values[0] <= value < values[1]
    return values[0] <= value <= values[1]


def recipe_point(spec: SweepSpec, cfg: RecipeConfig) -> tuple[dict | None, list[str]]:
    """Optuna's first point: the recipe's own values of the searched keys, when every one lies in its space;
    else None and the keys whose value lies outside."""
    values = cfg.to_dict(mask_secrets=False)
    point = {key: values.get(key) for key in spec.parameters}
    outside = [key for key, sampler in spec.parameters.items() if not in_space(point[key], sampler)]
    return (None if outside else point), outside


def probe_points(spec: SweepSpec, first: dict | None) -> list[dict]:
    """Points that bound an optuna space, checked on the driver before any trial: every choice, and each range's
    ends (randint's last value), each with the other keys at the first point's values or their own lowest."""
    def ends(sampler: dict) -> list:
        kind, values = next(iter(sampler.items()))
        if kind == "choice":
            return list(values)
        return [values[0], values[1] - 1] if kind == "randint" else list(values)

    base = first or {key: ends(sampler)[0] for key, sampler in spec.parameters.items()}
    points = [dict(base)]
    for key, sampler in spec.parameters.items():
        points += [{**base, key: value} for value in ends(sampler) if value != base[key]]
    return points


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


def trial_recipe(raw: dict, params: dict, output_dir: Path, run_name: str, name: str) -> dict:
    """A trial's recipe: the base recipe, the point's values, and its own output_dir and run name."""
    base = {k: v for k, v in raw.items() if k != "sweep"}
    return {**base, **params, "output_dir": str(Path(output_dir) / "trials" / name),
            "ray_run_name": f"{run_name}-{name}", "overwrite_output_dir": True}


def make_trials(raw: dict, spec: SweepSpec, output_dir: Path, run_name: str) -> list[Trial]:
    """Every trial of a grid search, with its recipe."""
    return [Trial(trial_name(index), params, trial_recipe(raw, params, output_dir, run_name, trial_name(index)))
            for index, params in enumerate(expand_points(spec))]


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


def metric_problems(spec: SweepSpec, cfg: RecipeConfig) -> list[str]:
    """Whether the trials will report the metric while they train, as the scheduler needs."""
    t = cfg.args
    evaluates = bool(cfg.data.eval_dataset or cfg.data.val_size)
    problems = []
    if STAGE_SPECS[cfg.finetuning.stage].metric == "reward" and spec.metric == "reward" and spec.mode == "min":
        stage = cfg.finetuning.stage.upper()
        problems.append(Problem("sweep.mode", f"'reward' is {stage}'s mean reward, which a sweep maximises; set "
                                              "mode: max"))
    for metric, _ in spec.objectives or [(spec.metric, spec.mode)]:
        if metric.startswith("eval_") and not evaluates:
            problems.append(Problem("sweep.metric", f"{metric!r} is measured on evaluation data, which this recipe "
                                                    "has none of; set eval_dataset or val_size, or choose a training "
                                                    "metric such as 'loss'"))
    if spec.scheduler == "asha" and spec.metric.startswith("eval_") and evaluates and t.eval_strategy == "no":
        problems.append(Problem("sweep.scheduler", f"asha compares trials by {spec.metric!r} during training, but "
                                                   "eval_strategy is 'no' (evaluation only at the end); set "
                                                   "eval_strategy: steps and eval_steps"))
    if len({m.startswith("eval_") for m, _ in spec.objectives}) > 1:
        problems.append(Problem("sweep.metric", "the metrics are measured at different times (evaluation and "
                                                "training records); TPE needs each trial's values of all of them "
                                                "together: give evaluation metrics only, or training ones only"))
    return problems


def report_interval(cfg: RecipeConfig, metric: str, steps_per_epoch: int) -> int:
    """How many optimizer steps apart the metric is measured (ASHA's default grace period)."""
    t = cfg.args
    if metric.startswith("eval_"):
        if t.eval_strategy == "epoch":
            return steps_per_epoch
        return int(t.eval_steps or t.logging_steps)
    if t.logging_strategy == "epoch":
        return steps_per_epoch
    return int(t.logging_steps)


def fitting_trials(per_trial: dict, nodes) -> int:
    """How many trials, each needing `per_trial` resources in total, the cluster holds at once."""
    fits = [math.floor(sum(n.resources.get(k, 0.0) for n in nodes) / v + 1e-9) for k, v in per_trial.items() if v > 0]
    return min(fits) if fits else 1


def trials_at_once(spec: SweepSpec, configs: list[RecipeConfig], nodes, count: int) -> int:
    """How many of the `count` trials share the cluster, for sizing the workers when resources_per_worker is unset:
    max_concurrent_trials, or as many trials as the cluster holds at one GPU (or else one CPU) per worker,
    never more than there are trials."""
    if spec.max_concurrent_trials:
        return spec.max_concurrent_trials
    workers = max(c.ray.max_workers for c in configs)
    gpus = sum(n.resources.get("GPU", 0) for n in nodes)
    units = gpus if gpus else sum(n.resources.get("CPU", 0) for n in nodes)
    return max(1, min(count, int(units // workers)))


def concurrency(spec: SweepSpec, per_trial: dict, nodes) -> int:
    """max_concurrent_trials: the user's, unless the cluster cannot hold that many trials' workers at once."""
    fits = fitting_trials(per_trial, nodes)
    if spec.max_concurrent_trials is None:
        return max(fits, 1)
    if spec.max_concurrent_trials > fits:
        needed = {k: v * spec.max_concurrent_trials for k, v in per_trial.items()}
        raise ConfigError([
            Problem("sweep.max_concurrent_trials", f"{spec.max_concurrent_trials} trials at once need {needed}, "
                                                   f"but the cluster holds the workers of {fits} trial(s) at once; "
                                                   "lower max_concurrent_trials (or leave it unset)")])
    return spec.max_concurrent_trials


def pbt_recipe_problems(spec: SweepSpec, cfg: RecipeConfig) -> list[str]:
    """What a recipe must allow for pbt to continue one trial from another's checkpoint with new values."""
    problems = []
    stage = cfg.finetuning.stage
    if STAGE_SPECS[stage].online:
        problems.append(Problem("sweep.scheduler", f"{spec.scheduler} is not built for stage {stage} (its step loop "
                                                   "is its own, not the Trainer's that pbt stops and continues); use "
                                                   "asha or fifo"))
    if "learning_rate" in spec.parameters and cfg.args.lr_scheduler_type == "reduce_lr_on_plateau":
        problems.append(Problem("lr_scheduler_type", "pbt re-applies a perturbed learning_rate to a schedule that is "
                                                     "a function of the step; reduce_lr_on_plateau is not one. Choose "
                                                     "another schedule, or do not perturb learning_rate"))
    if cfg.finetuning.use_badam or cfg.finetuning.galore_layerwise or cfg.finetuning.apollo_layerwise:
        problems.append(Problem("sweep.scheduler", "pbt re-applies hyperparameters to one optimizer's param groups; "
                                                   "BAdam and layer-wise GaLore/APOLLO keep one optimizer per block "
                                                   "or parameter. Use another optimizer for a pbt sweep"))
    return problems


@dataclass
class Sweep:
    """A checked sweep: the base recipe's config, the spec with derived values filled in, and the trials."""

    base: RecipeConfig
    spec: SweepSpec
    run_name: str
    output_dir: Path
    trials: list[Trial]  # optuna and pbt draw their trials as they go: none here
    configs: list[RecipeConfig]  # each trial's; optuna and pbt: the base recipe's, which every trial shares
    first_point: dict | None = None  # optuna and pbt: the recipe's own values, evaluated first


def check_sweep(raw: dict, base_dir: str = ".") -> Sweep:
    """Everything about a sweep that can be checked without Ray: its section, its metric, every trial's recipe."""
    if "sweep" not in raw:
        raise ConfigError([Problem("sweep", "this recipe has no sweep section; add one (see the README) or use "
                                            "`rayft train`")])
    base_cfg = parse_config({k: v for k, v in raw.items() if k != "sweep"}, base_dir=base_dir)
    if is_prediction(base_cfg):
        raise ConfigError([Problem("do_train", "a sweep trains every trial; this recipe generates (do_train: false "
                                               "with predict_with_generate); run it with `rayft train`, or sweep a "
                                               "training recipe")])
    if base_cfg.ray.reward_model_workers:
        raise ConfigError([Problem("reward_model_workers", "a sweep does not start a reward actor group per trial "
                                                           "(the trials' resources would not count it); keep the "
                                                           "reward model inside the workers for a sweep")])
    if is_elastic(base_cfg.ray):
        raise ConfigError([Problem("ray_num_workers", "a sweep's trials are not elastic (Ray Tune reserves each "
                                                      "trial's resources up front); give a number of workers")])
    if base_cfg.ray.rollout_workers:
        raise ConfigError([Problem("rollout_workers", "a sweep does not start a rollout actor group per trial (the "
                                                      "trials' resources would not count it); let the workers sample "
                                                      "for a sweep (remove rollout_workers)")])
    spec = parse_sweep(raw["sweep"], seed=base_cfg.args.seed)
    output_dir = Path(base_cfg.args.output_dir)
    run_name = base_cfg.ray.ray_run_name or f"sweep-{output_dir.name}"
    if not base_cfg.ray.ray_run_name:
        logger.info(Problem("derived", f"ray_run_name = {run_name} (from output_dir; trials are named "
                                       f"{run_name}-trial_NNN)"))
    if spec.metric is None:
        spec.metric = sweep_metric(base_cfg)
        if spec.metric == "reward" and "mode" not in raw["sweep"]:
            spec.mode = "max"
        logger.info(Problem("derived", f"sweep.metric = {spec.metric} ({spec.mode})"))
    if spec.search == "optuna" and "startup_trials" not in raw["sweep"]:
        logger.info(Problem("derived", f"sweep.startup_trials = {spec.startup_trials} (TPE draws that many points "
                                       "at random, the recipe's own counted, before it models the results; Optuna's "
                                       "default of 10 would leave a smaller sweep random)"))
    problems = metric_problems(spec, base_cfg)
    if problems:
        raise ConfigError(problems)
    if spec.population_based:
        problems = pbt_recipe_problems(spec, base_cfg)
        if problems:
            raise ConfigError(problems)
    if spec.draws:
        first, outside = recipe_point(spec, base_cfg)
        drawer = "TPE" if spec.search == "optuna" else "Ray Tune"
        logger.info(Problem("derived", f"sweep: the first point is the recipe's own ({describe(first)})" if first else
                            f"sweep: the recipe's {', '.join(outside)} lie(s) outside the space, so {drawer} draws "
                            "the first point too"))
        # the bounds of the space are checked here; a point TPE draws between them fails as its own trial
        probes = [Trial(f"point {i + 1} of the space", params, trial_recipe(raw, params, output_dir, run_name, "probe"))
                  for i, params in enumerate(probe_points(spec, first))]
        validate_trials(probes, Path(base_dir))
        return Sweep(base_cfg, spec, run_name, output_dir, [], [base_cfg], first)
    trials = make_trials(raw, spec, output_dir, run_name)
    return Sweep(base_cfg, spec, run_name, output_dir, trials, validate_trials(trials, Path(base_dir)))
