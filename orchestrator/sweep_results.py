"""A sweep's results: each trial's row (last and best metric, steps, status, why it stopped), the table, the CSV,
the plot of every trial's metric, and best_config.yaml, a recipe `rayft train` runs unchanged."""

import csv
import json
import math
from pathlib import Path

import yaml

from rayft.orchestrator.sweep_spec import POPULATION_SCHEDULERS, SweepSpec, Trial, describe, trial_name
from rayft.recipe.values import mask, read_log

TRIALS_FILE = "sweep_trials.json"

RESULTS_FILE = "sweep_results.csv"

BEST_CONFIG_FILE = "best_config.yaml"

POINT_FILE = "sweep_point.json"  # in a drawn trial's output_dir (optuna, pbt): its values, as it last started


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


def pareto_front(rows: list[dict], objectives: list) -> list[bool]:
    """For each row, whether no other row with every objective measured is at least as good on each and better on
    one ((metric, mode) pairs; a row missing a value is on no front)."""
    signed = [[(1 if mode == "min" else -1) * row[m] for m, mode in objectives]
              if all(isinstance(row.get(m), (int, float)) and math.isfinite(row[m]) for m, _ in objectives) else None
              for row in rows]
    dominated = lambda a, b: all(y <= x for x, y in zip(a, b)) and any(y < x for x, y in zip(a, b))  # noqa: E731
    return [a is not None and not any(b is not None and dominated(a, b) for b in signed) for a in signed]


def write_results(output_dir: Path, rows: list[dict], histories: dict[str, list[tuple]], spec: SweepSpec) -> Path:
    """sweep_results.csv and the plots (each trial's metric against steps, the searched values against the metric,
    a pbt population's lineage, several metrics' Pareto front); returns the CSV's path."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    path = output_dir / RESULTS_FILE
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    plot_histories(output_dir, histories, spec.metric)
    plot_parameters(output_dir, rows, spec)
    if spec.population_based:
        plot_lineage(output_dir, [r["trial"] for r in rows], spec.metric)
    if spec.multi_objective:
        plot_pareto(output_dir, rows, spec.objectives[:2])
    return path


def _pyplot():
    import matplotlib  # the backend must be chosen before pyplot loads, and only the sweep's end plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_histories(output_dir: Path, histories: dict[str, list[tuple]], metric: str) -> Path:
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
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
    return _save(fig, output_dir / f"sweep_{metric.replace('/', '_')}.png")


def plot_parameters(output_dir: Path, rows: list[dict], spec: SweepSpec) -> Path:
    """sweep_parameters.png: each searched key's value against the trial's last metric, one panel per key; trials
    that did not complete are hollow."""
    keys = list(spec.parameters)
    fig, axes = _pyplot().subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        scored = [r for r in rows if isinstance(r.get(spec.metric), (int, float)) and r.get(key) is not None]
        numeric = all(isinstance(r[key], (int, float)) and not isinstance(r[key], bool) for r in scored)
        place = (lambda v: v) if numeric else {v: i for i, v in enumerate(dict.fromkeys(str(r[key]) for r in scored))}
        for r in scored:
            done = r.get("stop_reason") == "completed"
            x = r[key] if numeric else place[str(r[key])]
            ax.scatter([x], [r[spec.metric]], s=36, facecolors="C0" if done else "none", edgecolors="C0")
            ax.annotate(r["trial"].removeprefix("trial_"), (x, r[spec.metric]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        if numeric and "loguniform" in spec.parameters[key]:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(list(place.values()), list(place))
        ax.set_xlabel(key)
        ax.set_ylabel(spec.metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"searched values against {spec.metric} (hollow: stopped before the end)")
    return _save(fig, output_dir / "sweep_parameters.png")


def plot_lineage(output_dir: Path, names: list[str], metric: str) -> Path:
    """sweep_lineage.png: a pbt population's metric per trial from the trials' own logs; each exploit is a dashed
    line from the donor's value at the step it was copied to where the trial went on."""
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    logs = {name: read_log(output_dir / "trials" / name) for name in names}
    for i, (name, log) in enumerate(logs.items()):
        segments = [[]]  # the trial's own stretches: an exploit starts a new one, from another trial's weights
        for r in log:
            if "exploited" in r:
                segments.append([])
            elif metric in r and "step" in r:
                segments[-1].append((r["step"], r[metric]))
        for k, points in enumerate(p for p in segments if p):
            ax.plot(*zip(*points), marker="o", markersize=3, color=f"C{i}", label=None if k else name)
        for marker, record in enumerate(log):
            if "exploited" not in record:
                continue
            donor, step = record["exploited"].split("@step")
            copied = [r[metric] for r in logs.get(donor, []) if r.get("step") == int(step) and metric in r]
            after = [(r["step"], r[metric]) for r in log[marker:] if metric in r]
            if copied and after:
                ax.plot([int(step), after[0][0]], [copied[-1], after[0][1]], linestyle="--", color=f"C{i}")
                ax.annotate(f"from {donor}", (int(step), copied[-1]), fontsize=7, xytext=(3, -10),
                            textcoords="offset points")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"pbt lineage: {metric} per trial, exploits dashed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, output_dir / "sweep_lineage.png")


def plot_pareto(output_dir: Path, rows: list[dict], objectives: list) -> Path:
    """sweep_pareto.png: the trials on the first two metrics, the Pareto front joined."""
    (x_metric, _), (y_metric, _) = objectives
    fig, ax = _pyplot().subplots(figsize=(6, 4.5))
    for r in rows:
        if isinstance(r.get(x_metric), (int, float)) and isinstance(r.get(y_metric), (int, float)):
            ax.scatter([r[x_metric]], [r[y_metric]], s=40, color="C3" if r.get("pareto") else "C7")
            ax.annotate(r["trial"].removeprefix("trial_"), (r[x_metric], r[y_metric]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    front = sorted((r[x_metric], r[y_metric]) for r in rows if r.get("pareto"))
    if len(front) > 1:
        ax.plot(*zip(*front), color="C3", linewidth=1)
    ax.set_xlabel(f"{x_metric} ({objectives[0][1]})")
    ax.set_ylabel(f"{y_metric} ({objectives[1][1]})")
    ax.set_title("trials and their Pareto front (red)")
    ax.grid(alpha=0.3)
    return _save(fig, output_dir / "sweep_pareto.png")


def format_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[format_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def format_cell(value) -> str:
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
              f"{metric} = {format_cell(best[metric])}.\n# Train it with: rayft train {path}\n")
    masked = mask(recipe)
    if masked != recipe:
        header += "# Secrets are masked (***): pass them again as key=value overrides.\n"
    path.write_text(header + yaml.safe_dump(masked, sort_keys=False, allow_unicode=True))
    return path


def finished_records(output_dir: str, metric: str) -> list[dict] | None:
    """The metric records of a trial whose run completed before the sweep was interrupted, else None."""

    out = Path(output_dir)
    if not (out / "all_results.json").is_file():
        return None
    records = [r for r in read_log(out) if metric in r]
    return records or None


def result_rows(grid, trials: list[Trial], spec: SweepSpec, budget_spent: bool,
                name_of=lambda result: trial_name(result.config["trial"])) -> tuple[list[dict], dict]:
    """Each trial's row and its metric's history, from Tune's results (`name_of`: a result's trial name)."""
    rows, histories = [], {}
    by_name = {name_of(result): result for result in grid}
    for trial in trials:
        result = by_name.get(trial.name)
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
            **{metric: metrics.get(metric) for metric, _ in spec.objectives[1:]},
            f"best_{spec.metric}": (min if spec.mode == "min" else max)(v for _, v in history) if history else None,
            "step": step, "total_steps": metrics.get("total_steps"),
            "status": status,
            "stop_reason": stop_reason(status, step, metrics.get("total_steps"), error, spec.scheduler, budget_spent),
        })
    if spec.multi_objective:
        for row, front in zip(rows, pareto_front(rows, spec.objectives)):
            row["pareto"] = front
    return rows, histories


def trials_record(run_name: str, trials: list[Trial], spec: SweepSpec | None = None) -> dict:
    """What sweep_trials.json holds: the sweep's name and every trial's values, to recognise it on a rerun, and its
    metric, which `rayft sweep --status` reads."""
    record = {"run_name": run_name, "trials": [{"name": t.name, "params": t.params} for t in trials]}
    if spec is not None:
        record.update(metric=spec.metric, mode=spec.mode)
        if spec.multi_objective:
            record.update(objectives=spec.objectives)
        if spec.draws:  # its trials are drawn as it goes: the space and their number name it
            record.update(search=spec.search, space=spec.parameters, num_samples=spec.num_samples)
            if spec.population_based:
                record.update(scheduler=spec.scheduler, perturbation_interval=spec.perturbation_interval)
    return record


def searched_values(trial_dir: Path, space: dict) -> dict:
    """A trial's values of the searched keys, as its trial recorded them when it started."""
    point = trial_dir / POINT_FILE
    values = json.loads(point.read_text()) if point.is_file() else {}
    return {key: values.get(key) for key in space}


def exploit_history(trial_dir: Path) -> str:
    """A pbt trial's exploits, oldest first, as its log records them: `trial_001@step8` when it continued from
    trial_001's checkpoint at step 8; empty when it never did."""
    return " ".join(r["exploited"] for r in read_log(trial_dir) if "exploited" in r)


def _cell_value(text: str):
    """A CSV cell as the value it was written from: None, an int, a float, or the text."""
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def same_trials(earlier: dict, now: dict) -> bool:
    """Whether two sweep_trials.json records name the same sweep (its metric may be read differently)."""
    return all(earlier.get(k) == now.get(k) for k in ("run_name", "trials", "search", "space", "num_samples",
                                                      "scheduler", "perturbation_interval"))


def progress_rows(output_dir: Path) -> tuple[dict, list[dict], bool]:
    """A sweep's state from its output_dir alone, while it runs, after it was interrupted, or after it ended:
    (its sweep_trials.json record, one row per trial, whether it has ended). An ended sweep's rows are its
    sweep_results.csv; otherwise each trial's row comes from its own trainer_log.jsonl."""
    record = json.loads((output_dir / TRIALS_FILE).read_text())
    results = output_dir / RESULTS_FILE
    if results.is_file():
        with results.open() as f:
            return record, [{k: _cell_value(v) for k, v in row.items()} for row in csv.DictReader(f)], True
    metric, mode = record.get("metric", "loss"), record.get("mode", "min")
    rows = []
    trials = record["trials"]
    if "space" in record:  # optuna, pbt: the trials started so far, with the values drawn for each
        trials = [{"name": out.name, "params": searched_values(out, record["space"])}
                  for out in sorted((output_dir / "trials").glob("trial_*")) if out.is_dir()]
    for trial in trials:
        out = output_dir / "trials" / trial["name"]
        log = read_log(out)
        measured = [r[metric] for r in log if metric in r]
        last = log[-1] if log else {}
        if (out / "all_results.json").is_file():
            state = "completed"
        elif log:
            state = "running, or interrupted (a rerun of the sweep continues it)"
        else:
            state = "not started"
        others = {m: next((r[m] for r in reversed(log) if m in r), None) for m, _ in record.get("objectives", [])[1:]}
        rows.append({"trial": trial["name"], **trial["params"], metric: measured[-1] if measured else None, **others,
                     f"best_{metric}": (min if mode == "min" else max)(measured) if measured else None,
                     "step": last.get("step"), "total_steps": last.get("total_steps"), "state": state})
        if record.get("scheduler") in POPULATION_SCHEDULERS:
            rows[-1]["exploited"] = exploit_history(out)
    return record, rows, False
