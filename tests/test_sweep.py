"""`rayft sweep`: the search space, the checks before any trial starts, and real sweeps on a local Ray cluster."""

import csv
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from rayft.cluster.storage import latest_checkpoint
from rayft.orchestrator.sweep import run_sweep
from rayft.orchestrator.sweep_results import best_row, progress_rows, stop_reason
from rayft.orchestrator.sweep_spec import SweepSpec, concurrency, expand_points, parse_sweep
from rayft.recipe.loading import load_recipe
from rayft.recipe.plan import Node
from rayft.recipe.problems import ConfigError
from rayft.recipe.values import read_log

SFT_SWEEP = ROOT / "configs" / "sweep_sft_lora.yaml"
DPO_SWEEP = ROOT / "configs" / "sweep_dpo_beta.yaml"
PBT_SWEEP = ROOT / "configs" / "sweep_sft_pbt.yaml"
OPTUNA_SWEEP = ROOT / "configs" / "sweep_sft_optuna.yaml"


def sweep_recipe(path, tmp_path, tiny_model, *overrides) -> dict:
    return load_recipe(path, [f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'sweep'}",
                              f"ray_storage_path={tmp_path / 'ray'}", *overrides])


def results(sweep_dir: Path) -> list[dict]:
    with (sweep_dir / "sweep_results.csv").open() as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- the space and the checks (no Ray)

@pytest.mark.unit
def test_grid_product_repeats_per_sample_and_other_keys_are_sampled_reproducibly():
    spec = parse_sweep({"parameters": {
        "lora_rank": {"grid": [8, 16]}, "learning_rate": {"loguniform": [1e-5, 1e-3]},
        "pref_beta": {"choice": [0.05, 0.1]}, "lora_dropout": {"uniform": [0.0, 0.2]},
        "cutoff_len": {"randint": [64, 128]}}, "num_samples": 3}, seed=7)
    points = expand_points(spec)
    assert len(points) == 6
    assert [p["lora_rank"] for p in points] == [8, 16] * 3
    assert all(1e-5 <= p["learning_rate"] <= 1e-3 and p["pref_beta"] in (0.05, 0.1)
               and 0.0 <= p["lora_dropout"] <= 0.2 and 64 <= p["cutoff_len"] < 128
               and isinstance(p["cutoff_len"], int) for p in points)
    assert len({p["learning_rate"] for p in points}) == 6  # sampled anew for every trial
    again = parse_sweep({"parameters": spec.parameters, "num_samples": 3}, seed=7)
    assert expand_points(again) == points  # same seed, same trials
    assert list(points[0]) == ["lora_rank", "learning_rate", "pref_beta", "lora_dropout", "cutoff_len"]
    # loguniform spreads over the decades: the log of the samples is uniform, not the samples
    many = expand_points(parse_sweep({"parameters": {"learning_rate": {"loguniform": [1e-6, 1e-2]}},
                                      "num_samples": 400}, seed=0))
    below = sum(1 for p in many if p["learning_rate"] < 1e-4) / len(many)
    assert 0.4 < below < 0.6, below


@pytest.mark.unit
@pytest.mark.parametrize("section, message", [
    ({"parameters": {"lora_rnak": {"grid": [8]}}}, "did you mean 'lora_rank'"),
    ({"parameters": {"output_dir": {"grid": ["a", "b"]}}}, "sets output_dir for each trial itself"),
    ({"parameters": {"lora_rank": [8, 16]}}, "must be one of {grid"),
    ({"parameters": {"learning_rate": {"loguniform": [0, 1e-3]}}}, "low must be positive"),
    ({"parameters": {"learning_rate": {"uniform": [1e-3, 1e-5]}}}, "low < high"),
    ({"parameters": {"lora_rank": {"randint": [4, 16.5]}}}, "must be integers"),
    ({"parameters": {"lora_rank": {"grid": []}}}, "non-empty list"),
    ({"parameters": {"lora_rank": {"grid": [8]}}, "schedular": "asha"}, "did you mean 'scheduler'"),
    ({"parameters": {"lora_rank": {"grid": [8]}}, "mode": "lowest"}, "sweep.mode"),
    ({"parameters": {"lora_rank": {"grid": [8]}}, "num_samples": 0}, "num_samples: must be at least 1"),
    ({"parameters": {"learning_rate": {"grid": [1e-3]}}, "search": "optuna"}, "grid is not an optuna space"),
    ({"parameters": {"cutoff_len": {"randint": [64, 128]}}, "search": "optuna"}, "search this key with search: grid"),
    ({"parameters": {"lora_rank": {"choice": [8]}}, "search": "tpe"}, "sweep.search: 'tpe'"),
    ({"num_samples": 2}, "sweep.parameters: required"),
    ({"parameters": {"lora_rank": {"choice": [8, 16]}}, "scheduler": "pbt", "perturbation_interval": 4},
     "lora_rank cannot change there"),
    ({"parameters": {"learning_rate": {"grid": [1e-3]}}, "scheduler": "pbt", "perturbation_interval": 4},
     "grid is not a pbt space"),
    ({"parameters": {"learning_rate": {"loguniform": [1e-5, 1e-3]}}, "scheduler": "pbt"},
     "sweep.perturbation_interval: pbt needs the optimizer steps between exploits"),
    ({"parameters": {"learning_rate": {"loguniform": [1e-5, 1e-3]}}, "scheduler": "pbt", "search": "optuna",
      "perturbation_interval": 4}, "remove search: optuna"),
    ({"parameters": {"learning_rate": {"loguniform": [1e-5, 1e-3]}}, "scheduler": "asha",
      "perturbation_interval": 4}, "sweep.perturbation_interval: only for scheduler: pbt or pb2"),
    ({"parameters": {"learning_rate": {"loguniform": [1e-5, 1e-3]}}, "scheduler": "pb2"},
     "sweep.perturbation_interval: pb2 needs the optimizer steps between exploits"),
    ({"parameters": {"learning_rate": {"choice": [1e-5, 1e-3]}}, "scheduler": "pb2", "perturbation_interval": 4},
     "pb2 models continuous ranges"),
    ({"parameters": {"learning_rate": {"uniform": [1e-5, 1e-3]}}, "scheduler": "pb2", "perturbation_interval": 4,
      "resample_probability": 0.5}, "resample_probability is pbt's"),
    ({"parameters": {"lora_rank": {"uniform": [4, 16]}}, "scheduler": "pb2", "perturbation_interval": 4},
     "pb2 changes values in the middle of a run, and lora_rank cannot change there"),
    ({"parameters": {"lora_rank": {"grid": [8]}}, "metric": ["eval_loss", "eval_accuracy"], "mode": ["min", "max"]},
     "2 metrics need search: optuna"),
    ({"parameters": {"lora_rank": {"choice": [8]}}, "search": "optuna", "metric": ["eval_loss", "eval_accuracy"],
      "mode": "min"}, "2 metrics need a list of 2 modes"),
    ({"parameters": {"lora_rank": {"choice": [8]}}, "search": "optuna", "metric": ["eval_loss", "eval_loss"],
      "mode": ["min", "min"]}, "must name distinct metrics"),
    ({"parameters": {"lora_rank": {"choice": [8]}}, "mode": ["min"]}, "a list of modes goes with a list of metrics"),
    ({"parameters": {"lora_rank": {"grid": [8]}}, "startup_trials": 2}, "startup_trials: only for search: optuna"),
])
def test_a_bad_sweep_section_names_the_key_and_the_fix(section, message):
    with pytest.raises(ConfigError, match=message.replace("{", "\\{").replace("(", "\\(")):
        parse_sweep(section, seed=0)


@pytest.mark.unit
def test_an_invalid_point_stops_the_sweep_before_any_trial_with_its_values(tmp_path, tiny_model):
    raw = sweep_recipe(SFT_SWEEP, tmp_path, tiny_model)
    raw["sweep"]["parameters"] = {"lora_rank": {"grid": [0, 8]}, "learning_rate": {"grid": [1e-3]}}
    with pytest.raises(ConfigError) as err:
        run_sweep(raw, base_dir=ROOT)
    assert "trial_000 (lora_rank=0, learning_rate=0.001): lora_rank: must be a positive integer" in str(err.value)
    assert "trial_001" not in str(err.value)  # the valid point is not reported
    assert "the sweep did not start" in str(err.value)
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "ray").exists()  # nothing reserved or written


@pytest.mark.unit
def test_asha_on_an_eval_metric_needs_evaluation_during_training(tmp_path, tiny_model):
    raw = sweep_recipe(SFT_SWEEP, tmp_path, tiny_model, "eval_strategy='no'", "sweep.scheduler=asha")
    with pytest.raises(ConfigError, match="eval_strategy is 'no'"):
        run_sweep(raw, base_dir=ROOT)
    raw = sweep_recipe(SFT_SWEEP, tmp_path, tiny_model, "eval_strategy='no'", "eval_dataset=null")
    with pytest.raises(ConfigError, match="measured on evaluation data"):
        run_sweep(raw, base_dir=ROOT)


@pytest.mark.unit
def test_an_occupied_output_dir_of_something_else_is_refused_and_left_alone(tmp_path, tiny_model):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "model.safetensors").write_bytes(b"precious")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        run_sweep(sweep_recipe(SFT_SWEEP, tmp_path, tiny_model), base_dir=ROOT)
    assert [p.name for p in (tmp_path / "sweep").iterdir()] == ["model.safetensors"]


@pytest.mark.unit
def test_an_output_dir_holding_another_sweep_is_refused_and_left_alone(tmp_path, tiny_model):
    (tmp_path / "sweep").mkdir()
    record = json.dumps({"run_name": "sweep-sft-lora", "trials": [{"name": "trial_000", "params": {"lora_rank": 2}}]})
    (tmp_path / "sweep" / "sweep_trials.json").write_text(record)
    with pytest.raises(ConfigError, match="holds sweep 'sweep-sft-lora' with other trials"):
        run_sweep(sweep_recipe(SFT_SWEEP, tmp_path, tiny_model), base_dir=ROOT)
    assert (tmp_path / "sweep" / "sweep_trials.json").read_text() == record


@pytest.mark.unit
def test_sweep_status_reads_each_trials_log_until_the_sweep_ends(tmp_path, capsys):
    from rayft.orchestrator.cli import main

    sweep_dir = tmp_path / "sweep"
    assert main(["sweep", "--status", str(sweep_dir)]) == 2
    assert "holds no sweep (no sweep_trials.json)" in capsys.readouterr().err
    trials = [{"name": f"trial_00{i}", "params": {"pref_beta": beta}} for i, beta in enumerate((0.1, 0.2, 0.4))]
    (sweep_dir / "trials" / "trial_000").mkdir(parents=True)
    (sweep_dir / "trials" / "trial_001").mkdir()
    (sweep_dir / "sweep_trials.json").write_text(json.dumps({"run_name": "s", "trials": trials,
                                                             "metric": "eval_loss", "mode": "min"}))
    logs = {"trial_000": [{"step": 4, "total_steps": 8, "loss": 2.0}, {"step": 4, "total_steps": 8, "eval_loss": 1.5},
                          {"step": 8, "total_steps": 8, "eval_loss": 1.7}],
            "trial_001": [{"step": 4, "total_steps": 8, "eval_loss": 1.2}]}
    for name, records in logs.items():
        (sweep_dir / "trials" / name / "trainer_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (sweep_dir / "trials" / "trial_000" / "all_results.json").write_text("{}")
    assert main(["sweep", "--status", str(sweep_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"sweep 's' in {sweep_dir}: not ended (running, or interrupted: rerun its command to resume " \
                       "it); 3 trials, 1 finished; metric eval_loss (min)"
    assert [line.split()[:6] for line in lines[3:]] == [
        ["trial_000", "0.1", "1.7", "1.5", "8", "8"], ["trial_001", "0.2", "1.2", "1.2", "4", "8"],
        ["trial_002", "0.4", "not", "started"]]
    assert lines[3].endswith("completed") and lines[4].endswith("interrupted (a rerun of the sweep continues it)")
    assert lines[5].endswith("not started")
    assert main(["sweep", "configs/sweep_sft_lora.yaml", "--status", str(sweep_dir)]) == 2  # one or the other
    assert "not both" in capsys.readouterr().err

    # search: optuna lists the trials started so far, each with the values TPE drew for it
    (sweep_dir / "sweep_trials.json").write_text(json.dumps({
        "run_name": "s", "trials": [], "metric": "eval_loss", "mode": "min", "search": "optuna",
        "space": {"pref_beta": {"uniform": [0.05, 0.5]}}, "num_samples": 8}))
    (sweep_dir / "trials" / "trial_001" / "sweep_point.json").write_text(json.dumps({"pref_beta": 0.3}))
    record, rows, ended = progress_rows(sweep_dir)
    assert not ended and [(r["trial"], r["pref_beta"], r["state"]) for r in rows] == [
        ("trial_000", None, "completed"),
        ("trial_001", 0.3, "running, or interrupted (a rerun of the sweep continues it)")]


@pytest.mark.unit
def test_several_metrics_are_checked_together_and_rank_by_their_pareto_front(tmp_path, tiny_model):
    from rayft.orchestrator.sweep_results import pareto_front
    from rayft.orchestrator.sweep_spec import check_sweep

    spec = parse_sweep({"parameters": {"lora_rank": {"choice": [8, 16]}}, "search": "optuna",
                        "metric": ["eval_loss", "eval_accuracy"], "mode": ["min", "max"]}, seed=0)
    assert (spec.metric, spec.mode, spec.multi_objective) == ("eval_loss", "min", True)  # ASHA's and best_config's
    assert spec.objectives == [["eval_loss", "min"], ["eval_accuracy", "max"]]
    assert spec.startup_trials == 1  # half of num_samples 1 (at most Optuna's 10): TPE models from the second trial
    rows = [{"eval_loss": 1.0, "eval_accuracy": 0.5}, {"eval_loss": 2.0, "eval_accuracy": 0.7},
            {"eval_loss": 2.0, "eval_accuracy": 0.6}, {"eval_loss": 1.0, "eval_accuracy": 0.5},
            {"eval_loss": None, "eval_accuracy": 0.9}, {"eval_loss": float("nan"), "eval_accuracy": 0.9}]
    # the third is dominated by the second; equal rows are both on the front; a missing value is on none
    assert pareto_front(rows, spec.objectives) == [True, True, False, True, False, False]
    # every metric must be one the trials report, and together: an evaluation metric beside a training one is not
    raw = sweep_recipe(OPTUNA_SWEEP, tmp_path, tiny_model)
    raw["sweep"].update(metric=["eval_loss", "loss"], mode=["min", "min"])
    with pytest.raises(ConfigError, match="measured at different times"):
        check_sweep(raw, base_dir=ROOT)
    raw["sweep"].update(metric=["eval_loss", "eval_accuracy"], mode=["min", "max"])
    assert check_sweep(raw, base_dir=ROOT).spec.objectives == spec.objectives  # the shipped recipe's two metrics


@pytest.mark.unit
def test_optuna_starts_at_the_recipes_values_and_checks_the_bounds_of_its_space(tmp_path, tiny_model):
    from rayft.orchestrator.sweep_spec import check_sweep, probe_points, tune_space

    raw = sweep_recipe(SFT_SWEEP, tmp_path, tiny_model)
    raw["sweep"] = {"search": "optuna", "num_samples": 6, "parameters": {
        "learning_rate": {"loguniform": [1.0e-5, 1.0e-2]}, "lora_rank": {"choice": [4, 8, 16]},
        "lora_dropout": {"uniform": [0.0, 0.2]}, "warmup_steps": {"randint": [0, 4]}}}
    sweep = check_sweep(raw, base_dir=ROOT)
    assert sweep.trials == [] and len(sweep.configs) == 1  # drawn as the sweep goes
    assert sweep.first_point == {"learning_rate": 1.0e-3, "lora_rank": 8, "lora_dropout": 0.0, "warmup_steps": 2}
    assert probe_points(sweep.spec, sweep.first_point) == [sweep.first_point] + [
        {**sweep.first_point, **change} for change in (
            {"learning_rate": 1.0e-5}, {"learning_rate": 1.0e-2}, {"lora_rank": 4}, {"lora_rank": 16},
            {"lora_dropout": 0.2}, {"warmup_steps": 0}, {"warmup_steps": 3})]
    space = tune_space(sweep.spec)
    assert (space["lora_rank"].categories, space["warmup_steps"].upper) == ([4, 8, 16], 4)  # high excluded
    # a recipe value outside its space: no first point, TPE draws them all
    raw["sweep"]["parameters"]["lora_rank"] = {"choice": [2, 4]}
    assert check_sweep(raw, base_dir=ROOT).first_point is None
    # a bound of the space that no trial could train is refused before any trial, with its values
    raw["sweep"]["parameters"]["lora_rank"] = {"randint": [0, 8]}
    with pytest.raises(ConfigError, match=r"point \d+ of the space \(.*lora_rank=0.*\): lora_rank"):
        check_sweep(raw, base_dir=ROOT)


@pytest.mark.unit
def test_concurrency_is_what_the_cluster_holds_and_more_is_refused():
    two_nodes = [Node("a", "1", {"CPU": 4.0}), Node("b", "1", {"CPU": 4.0, "GPU": 2.0})]
    spec = SweepSpec(parameters={})
    assert concurrency(spec, {"CPU": 2.0}, two_nodes) == 4
    assert concurrency(spec, {"CPU": 2.0, "GPU": 1.0}, two_nodes) == 2
    assert concurrency(SweepSpec(parameters={}, max_concurrent_trials=1), {"CPU": 2.0}, two_nodes) == 1
    with pytest.raises(ConfigError, match="holds the workers of 4 trial"):
        concurrency(SweepSpec(parameters={}, max_concurrent_trials=5), {"CPU": 2.0}, two_nodes)


@pytest.mark.unit
def test_stop_reasons_and_the_best_trial():
    assert stop_reason("TERMINATED", 24, 24, None, "asha", False) == "completed"
    assert stop_reason("TERMINATED", 8, 24, None, "asha", False) == "stopped early at step 8/24 by asha"
    assert stop_reason("TERMINATED", 8, 24, None, "fifo", True) == "stopped at step 8/24: time budget spent"
    assert stop_reason("ERROR", None, None, "OSError: bad weights", "fifo", False) == "failed: OSError: bad weights"
    rows = [{"trial": "a", "eval_loss": 2.0}, {"trial": "b", "eval_loss": 1.5}, {"trial": "c", "eval_loss": None},
            {"trial": "d", "eval_loss": math.nan}]
    assert best_row(rows, "eval_loss", "min")["trial"] == "b"
    assert best_row(rows, "eval_loss", "max")["trial"] == "a"
    assert best_row([{"trial": "x", "eval_loss": None}], "eval_loss", "min") is None


@pytest.mark.unit
def test_train_refuses_a_recipe_with_a_sweep_section(tmp_path, tiny_model):
    from rayft.recipe.parse import parse_config

    with pytest.raises(ConfigError, match="run it with `rayft sweep`"):
        parse_config(sweep_recipe(SFT_SWEEP, tmp_path, tiny_model), base_dir=ROOT)


# ---------------------------------------------------------------- real sweeps on a local Ray cluster

def killed_once(command: list[str], ready):
    """Runs a sweep's driver and SIGKILLs it (no clean-up: Ray ends the dead driver's trials and their workers) once
    `ready()` returns something, which is returned; None if the driver ended or 400 s passed first."""
    driver = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, seen = time.time() + 400, None
        while time.time() < deadline and seen is None and driver.poll() is None:
            seen = ready()
            time.sleep(0.5)
        return seen
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()


def finished_trials(sweep_dir: Path) -> dict[str, str]:
    """Trials whose run completed: name -> the text of their trainer_log.jsonl."""
    return {p.parent.name: (p.parent / "trainer_log.jsonl").read_text()
            for p in sorted((sweep_dir / "trials").glob("*/all_results.json"))}


@pytest.mark.slow
def test_an_optuna_sweep_under_asha_survives_its_driver_being_killed_and_its_best_config_is_the_best_trials(
        tmp_path, tiny_model, ray_local):
    # TPE (seeded by the recipe's seed, 42) draws its first point at random: learning_rate 4.75e-6, too small to
    # move the loss. One trial at a time, so the order is fixed: the recipe's own 3e-3 first, to the end; the draw is
    # interrupted (its driver SIGKILLed) once it has a checkpoint and before its first rung (step 8). The rerun must
    # keep the finished trial, continue the draw from its checkpoint, and stop it at the rung: the rungs were put
    # back from the trials' logs (Tune restores no scheduler state, see ResumableASHA).
    address = ray_local._private.worker._global_node.address
    sweep_dir, storage = tmp_path / "sweep", tmp_path / "ray"
    raw = yaml.safe_load(OPTUNA_SWEEP.read_text())
    raw["sweep"].update(parameters={"learning_rate": {"loguniform": [1.0e-7, 3.0e-3]}}, num_samples=2,
                        max_concurrent_trials=1, grace_period=8, startup_trials=2)  # the draw at random
    recipe = tmp_path / "sweep_optuna.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "rayft.orchestrator.cli", "sweep", str(recipe),
               f"model_name_or_path={tiny_model}", f"output_dir={sweep_dir}", f"ray_storage_path={storage}",
               f"ray_address={address}", "max_steps=16", "eval_steps=4", "save_strategy=steps", "save_steps=2",
               "learning_rate=3.0e-3"]

    def checkpointed_after_another_finished():  # a trial with a checkpoint to continue from, once another is done
        done = finished_trials(sweep_dir) if (sweep_dir / "trials").is_dir() else {}
        waiting = [f"trial_{i:03d}" for i in range(2) if f"trial_{i:03d}" not in done and
                   latest_checkpoint(str(storage), f"sweep-sft-optuna-trial_{i:03d}")]
        return waiting[0] if done and waiting else None

    interrupted = killed_once(command, checkpointed_after_another_finished)
    assert interrupted == "trial_001", "no trial finished while another had a checkpoint"
    finished_before = finished_trials(sweep_dir)
    assert list(finished_before) == ["trial_000"]
    # `rayft sweep --status` reads the interrupted sweep from its output_dir: one trial done, the other not
    record, rows, ended = progress_rows(sweep_dir)
    assert not ended and (record["metric"], record["mode"], record["search"]) == ("eval_loss", "min", "optuna")
    assert {r["trial"]: r["state"] for r in rows}["trial_000"] == "completed"
    assert {r["trial"]: r["state"] for r in rows}["trial_001"] != "completed"

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming sweep 'sweep-sft-optuna'" in again.stdout
    assert "asha: trial_000's eval_loss at steps [4, 8, 12, 16" in again.stdout  # (16 twice: the final evaluation)
    rows = results(sweep_dir)
    assert [r["trial"] for r in rows] == ["trial_000", "trial_001"] and all(r["status"] == "TERMINATED" for r in rows)
    finished, stopped = rows
    assert float(finished["learning_rate"]) == 3.0e-3  # the recipe's own values are the first point
    assert float(stopped["learning_rate"]) == pytest.approx(4.7518e-6, rel=1e-3)  # TPE's draw for the same seed
    assert finished["stop_reason"] == "completed" and finished["step"] == "16", finished
    # two metrics (the shipped recipe's): TPE is told both, ASHA stops by the first; the draw learns nothing, so
    # the recipe's own point dominates it on both and is the Pareto front alone
    assert float(finished["eval_accuracy"]) > float(stopped["eval_accuracy"]) > 0
    assert (finished["pareto"], stopped["pareto"]) == ("True", "False")
    assert stopped["stop_reason"].startswith("stopped early"), stopped
    assert finished_trials(sweep_dir)["trial_000"] == finished_before["trial_000"]  # it did not train again
    # What the stopped trial really trained, from its own log: continued from its checkpoint, then stopped at the
    # rung (it may run a few steps past the decision before Tune's kill reaches it, but not to the end), with the
    # value TPE drew (warm-up and cosine below it)
    out = sweep_dir / "trials" / "trial_001"
    log = read_log(out)
    assert any("resumed_from_step" in r for r in log)
    assert 8 <= max(r["step"] for r in log) < 16 and float(stopped["eval_loss"]) > float(finished["eval_loss"])
    assert 0 < max(r["learning_rate"] for r in log if "learning_rate" in r) <= float(stopped["learning_rate"])
    assert json.loads((out / "sweep_point.json").read_text()) == {"learning_rate": float(stopped["learning_rate"])}
    for plot in ("sweep_eval_loss.png", "sweep_parameters.png", "sweep_pareto.png"):
        assert (sweep_dir / plot).stat().st_size > 10_000, plot
    status = subprocess.run([sys.executable, "-m", "rayft.orchestrator.cli", "sweep", "--status", str(sweep_dir)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("sweep 'sweep-sft-optuna' in ") and ": ended; 2 trials" in status.stdout
    assert [line.split()[0] for line in status.stdout.splitlines()[3:]] == ["trial_000", "trial_001"]

    best = yaml.safe_load((sweep_dir / "best_config.yaml").read_text())
    assert "sweep" not in best and best["learning_rate"] == 3.0e-3
    # best_config.yaml resolves to the best trial's own config, but for where its outputs go, so `rayft train`
    # runs the best trial again (the resolved config, not a training run, is compared: the suite's budget)
    from rayft.recipe.parse import parse_config

    resolved = parse_config(load_recipe(sweep_dir / "best_config.yaml", []), base_dir=ROOT).to_dict()
    trial = yaml.safe_load((sweep_dir / "trials" / "trial_000" / "training_args.yaml").read_text())
    per_run = {"output_dir", "ray_run_name", "ray_storage_path", "overwrite_output_dir", "_plan"}
    differing = {k for k in set(resolved) | set(trial) if k not in per_run and resolved.get(k) != trial.get(k)}
    assert differing == set(), differing


@pytest.mark.slow
def test_an_optuna_sweep_runs_four_trials_two_at_a_time_from_the_recipes_point(tmp_path, tiny_model, ray_local):
    # The shipped optuna recipe as it is (two metrics, learning rate x rank, 4 trials, 2 at a time), cut to 4 steps
    # a trial without ASHA: TPE's first ten points are seeded draws, so every trial's values are known in advance
    raw = sweep_recipe(OPTUNA_SWEEP, tmp_path, tiny_model, "max_steps=4", "logging_steps=2", "eval_strategy='no'",
                       "sweep.scheduler=fifo")
    rows = run_sweep(raw, base_dir=ROOT)
    assert [r["trial"] for r in rows] == [f"trial_00{i}" for i in range(4)]
    assert all(r["stop_reason"] == "completed" and r["eval_loss"] > 0 and r["eval_accuracy"] >= 0 for r in rows), rows
    points = [(r["learning_rate"], r["lora_rank"]) for r in rows]
    assert points[0] == (1.0e-3, 8) and len(set(points)) == 4  # the recipe's own values first, then TPE's draws
    assert all(1e-5 <= lr <= 1e-2 and rank in (4, 8, 16) for lr, rank in points)
    assert sum(r["pareto"] for r in rows) >= 1
    spans = []  # each trial's training, from its first to its last log record
    for row in rows:
        out = tmp_path / "sweep" / "trials" / row["trial"]
        assert json.loads((out / "sweep_point.json").read_text()) == {"learning_rate": row["learning_rate"],
                                                                       "lora_rank": row["lora_rank"]}
        # each trial trains with one worker thread: the two at a time share the CPUs
        assert [w["threads"] for w in json.loads((out / "placement.json").read_text())] == [1]
        stamps = [r["timestamp"] for r in read_log(out) if "timestamp" in r]
        spans.append((min(stamps), max(stamps)))
    running = lambda t: sum(start <= t <= end for start, end in spans)  # noqa: E731
    assert max(running(start) for start, _ in spans) == 2  # two at a time, never more


@pytest.mark.integration
def test_dpo_sweep_records_a_failing_trial_and_goes_on(tmp_path, tiny_model, ray_local, rayft_log):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated: found only when a worker loads the weights
    raw = sweep_recipe(DPO_SWEEP, tmp_path, tiny_model)
    raw["sweep"]["parameters"] = {"model_name_or_path": {"grid": [str(tiny_model), str(broken)]},
                                  "pref_beta": {"grid": [0.2]}}
    rows = run_sweep(raw, base_dir=ROOT)
    metric = "eval_logps/margins"  # the shipped sweep's: the policy's log-prob margin, not scaled by beta
    assert [(r["model_name_or_path"] == str(tiny_model), r["pref_beta"]) for r in rows] == [(True, 0.2), (False, 0.2)]
    good, bad = rows[:1], rows[1:]
    assert all(r["stop_reason"] == "completed" and r["status"] == "TERMINATED" for r in good), good
    for row in good:  # each trial is a whole run with its own outputs and its own beta
        out = tmp_path / "sweep" / "trials" / row["trial"]
        assert yaml.safe_load((out / "training_args.yaml").read_text())["pref_beta"] == row["pref_beta"]
        last = [r for r in read_log(out) if metric in r][-1]
        assert last[metric] == pytest.approx(row[metric])
        assert row[metric] == pytest.approx(last["eval_logps/chosen"] - last["eval_logps/rejected"], abs=1e-4)
        # resources_per_worker unset: the two trials run at once and share the 2 CPUs, one worker thread each
        assert [w["threads"] for w in json.loads((out / "placement.json").read_text())] == [1]
    assert all(r["status"] == "ERROR" and r["stop_reason"].startswith("failed: ") and r[metric] is None
               for r in bad), bad
    with (tmp_path / "sweep" / "sweep_results.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["TERMINATED", "ERROR"]
    best = max(good, key=lambda r: r[metric])  # the first of equals wins, as in best_row
    recipe = yaml.safe_load((tmp_path / "sweep" / "best_config.yaml").read_text())
    assert (recipe["pref_beta"], recipe["model_name_or_path"]) == (best["pref_beta"], str(tiny_model))
    assert any(line.startswith("sweep results:") and "trial_001" in line for line in rayft_log)


@pytest.mark.slow
def test_pbt_continues_the_poor_trial_from_the_better_ones_checkpoint_and_survives_its_driver_being_killed(
        tmp_path, tiny_model, ray_local):
    # A population of two: the recipe's learning rate 3e-3 and a seeded draw (2.9e-4) that learns far slower. At
    # step 4 the draw ranks last and must continue from trial_000's step-4 checkpoint with 3e-3 x 0.8 or x 1.2
    # (resample_probability 0). The driver is killed once that exploit is under way; the rerun finishes the sweep.
    # Each trial trains under DeepSpeed ZeRO-2: the exploit loads the donor's DeepSpeed checkpoint, whose engine
    # brings the donor's learning rate back with it; the trial's own must be put back over it.
    address = ray_local._private.worker._global_node.address
    sweep_dir, storage = tmp_path / "sweep", tmp_path / "ray"
    command = [sys.executable, "-m", "rayft.orchestrator.cli", "sweep", str(PBT_SWEEP),
               f"model_name_or_path={tiny_model}", f"output_dir={sweep_dir}", f"ray_storage_path={storage}",
               f"ray_address={address}", "max_steps=8", "eval_steps=4", "logging_steps=2", "learning_rate=3.0e-3",
               "sweep.parameters={learning_rate: {loguniform: [1.0e-7, 3.0e-3]}}", "sweep.num_samples=2",
               "sweep.perturbation_interval=4", "sweep.resample_probability=0.0", "deepspeed=z2"]
    poor = sweep_dir / "trials" / "trial_001"
    exploited = killed_once(command, lambda: any("exploited" in r for r in read_log(poor)) or None)
    assert exploited, "no exploit before the driver ended"

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming sweep 'sweep-sft-pbt'" in again.stdout
    rows = {r["trial"]: r for r in results(sweep_dir)}
    assert sorted(rows) == ["trial_000", "trial_001"]
    assert all(r["stop_reason"] == "completed" and r["step"] == "8" for r in rows.values()), [
        (r["step"], r["stop_reason"]) for r in rows.values()]
    assert (rows["trial_000"]["exploited"], rows["trial_001"]["exploited"]) == ("", "trial_000@step4")
    perturbed = float(rows["trial_001"]["learning_rate"])
    assert min(abs(perturbed / 3e-3 - f) for f in (0.8, 1.2)) < 1e-9, perturbed

    donor, log = read_log(sweep_dir / "trials" / "trial_000"), read_log(poor)
    # every logging step once in each trial's log, whatever the kill cut short
    for records in (donor, log):
        assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8]
    assert [r["exploited"] for r in log if "exploited" in r] == ["trial_000@step4"]
    marker = next(i for i, r in enumerate(log) if "exploited" in r)
    own = next(r["loss"] for r in log[:marker] if r["step"] == 4 and "loss" in r)
    first = next(r for r in log[marker:] if "loss" in r)
    donors = next(r for r in donor if r["step"] == first["step"] and "loss" in r)
    assert first["step"] == 6  # continued from the donor's step 4, not from its own start
    assert abs(first["loss"] - donors["loss"]) < 0.05 < own - first["loss"], (own, first, donors)
    assert (sweep_dir / "sweep_lineage.png").stat().st_size > 10_000  # the exploit drawn from the donor's value
    # its perturbed learning rate, at the schedule's position it continued from
    assert first["learning_rate"] == pytest.approx(donors["learning_rate"] * perturbed / 3e-3, rel=1e-6)
    status = subprocess.run([sys.executable, "-m", "rayft.orchestrator.cli", "sweep", "--status", str(sweep_dir)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "trial_000@step4" in status.stdout, status.stdout + status.stderr


@pytest.mark.slow
def test_pb2_chooses_an_exploits_learning_rate_within_its_bounds_and_continues_from_the_donor(
        tmp_path, tiny_model, ray_local):
    # pbt's sweep with PB2's exploit: a population of two, ranked at step 4; the worse continues from the better's
    # step-4 checkpoint with a learning rate PB2's Gaussian-process bandit chose inside [1e-7, 3e-3]
    raw = sweep_recipe(PBT_SWEEP, tmp_path, tiny_model, "max_steps=8", "eval_steps=4", "logging_steps=2",
                       "learning_rate=3.0e-3", "weight_decay=0.0")
    raw["sweep"] = {"parameters": {"learning_rate": {"uniform": [1.0e-7, 3.0e-3]}}, "num_samples": 2,
                    "max_concurrent_trials": 2, "scheduler": "pb2", "perturbation_interval": 4}
    rows = {r["trial"]: r for r in run_sweep(raw, base_dir=ROOT)}
    assert all(r["stop_reason"] == "completed" and r["step"] == 8 for r in rows.values()), rows
    (poor,) = [name for name, r in rows.items() if r["exploited"]]
    (donor,) = set(rows) - {poor}
    assert rows[poor]["exploited"] == f"{donor}@step4"
    chosen = rows[poor]["learning_rate"]
    assert 1.0e-7 <= chosen <= 3.0e-3
    log, donor_log = read_log(tmp_path / "sweep" / "trials" / poor), read_log(tmp_path / "sweep" / "trials" / donor)
    marker = next(i for i, r in enumerate(log) if "exploited" in r)
    first = next(r for r in log[marker:] if "loss" in r)
    donors = next(r for r in donor_log if r["step"] == first["step"] and "loss" in r)
    donor_rate = float(yaml.safe_load((tmp_path / "sweep" / "trials" / donor / "training_args.yaml").read_text())[
        "learning_rate"])
    assert first["step"] == 6 and abs(first["loss"] - donors["loss"]) < 0.1, (first, donors)
    assert first["learning_rate"] == pytest.approx(donors["learning_rate"] * chosen / donor_rate, rel=1e-6)
    assert (tmp_path / "sweep" / "sweep_lineage.png").stat().st_size > 10_000


@pytest.mark.unit
def test_a_pbt_trial_starts_from_its_last_segment_unless_an_exploit_at_or_after_it_says_otherwise(tmp_path):
    from rayft.orchestrator.sweep import EXPLOIT_FILE, SEGMENT_FILE, mark_segment_start, segment_start

    assert segment_start(tmp_path) == (None, None)  # a fresh trial
    own = {"trial": "trial_001", "step": 4, "uri": "/ray/a/checkpoint_1", "fs": None}
    (tmp_path / SEGMENT_FILE).write_text(json.dumps(own))
    assert segment_start(tmp_path) == (own, None)
    # exploited at the step it reached: the donor's checkpoint and the new values, also after its driver died
    exploit = {"trial": "trial_000", "step": 4, "uri": "/ray/b/checkpoint_1", "fs": None,
               "config": {"learning_rate": 2.4e-3}}
    (tmp_path / EXPLOIT_FILE).write_text(json.dumps(exploit))
    assert segment_start(tmp_path) == (exploit, exploit)
    # once it has trained past the exploit, its own segments lead
    (tmp_path / SEGMENT_FILE).write_text(json.dumps({**own, "step": 8}))
    assert segment_start(tmp_path) == ({**own, "step": 8}, None)
    # the log keeps what precedes the start, drops a cut-short segment's records and records the exploit once
    records = [{"step": 2, "loss": 6.5}, {"step": 4, "loss": 6.1}, {"step": 4, "exploited": "trial_000@step4"},
               {"step": 4, "resumed_from_step": 4}, {"step": 6, "loss": 5.5}]
    (tmp_path / "trainer_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    mark_segment_start(tmp_path, 4, "trial_000@step4")
    assert [{k: v for k, v in r.items() if k != "timestamp"} for r in read_log(tmp_path)] == records[:3]


@pytest.mark.unit
def test_asha_puts_back_what_the_trials_logged_before_the_sweep_was_resumed(tmp_path):
    # Tune restores no scheduler state: the ASHA of a resumed sweep starts empty, and every trial Tune adds (the
    # finished ones too) brings back the metric values its own log holds
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from rayft.orchestrator.sweep import ResumableASHA

    class Trial:  # what the scheduler reads of Tune's Trial: its id and its name (trial_name_creator's)
        def __init__(self, name):
            self.trial_id, self.name = name + "_id", name

        def __str__(self):
            return self.name

    done = tmp_path / "trials" / "trial_000"  # finished before the driver died: eval_loss 5.0 at step 4, then 4.0
    done.mkdir(parents=True)
    records = [{"step": 2, "loss": 6.0}, {"step": 4, "eval_loss": 5.0}, {"step": 8, "eval_loss": 4.0}]
    (done / "trainer_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    settings = dict(time_attr="step", max_t=13, grace_period=4, reduction_factor=2, metric="eval_loss", mode="min")
    poor = {"step": 4, "eval_loss": 6.0}  # the trial that goes on after the resume, worse at the first rung
    plain, resumable = ASHAScheduler(**settings), ResumableASHA(tmp_path / "trials", **settings)
    for scheduler in (plain, resumable):
        for trial in (Trial("trial_000"), Trial("trial_001")):
            scheduler.on_trial_add(None, trial)
    assert plain.on_trial_result(None, Trial("trial_001"), poor) == TrialScheduler.CONTINUE  # Tune's own forgets
    assert resumable.on_trial_result(None, Trial("trial_001"), poor) == TrialScheduler.STOP
    better = Trial("trial_002")  # a trial better than the rung's median goes on
    resumable.on_trial_add(None, better)
    assert resumable.on_trial_result(None, better, {"step": 4, "eval_loss": 4.5}) == TrialScheduler.CONTINUE
    # a trial whose own records reached the rung below the others' (the first driver died before its decision
    # reached the trial) stops at its first report after the resume, whatever that report holds
    for name, finished in (("trial_003", False), ("trial_004", True)):
        folder = tmp_path / "trials" / name
        folder.mkdir()
        (folder / "trainer_log.jsonl").write_text(json.dumps({"step": 4, "eval_loss": 7.0}) + "\n")
        if finished:  # a trial that ended before the driver died is reported again, never stopped
            (folder / "all_results.json").write_text("{}")
        resumable.on_trial_add(None, Trial(name))
    assert resumable.on_trial_result(None, Trial("trial_003"), {"step": 6, "loss": 5.0}) == TrialScheduler.STOP
    assert resumable.on_trial_result(None, Trial("trial_004"), {"step": 4, "eval_loss": 7.0}) == TrialScheduler.CONTINUE
