"""`rayft pipeline`: stages chained by `from`, checked before Ray, recorded in pipeline.json, resumed after a killed
driver without training a finished stage again."""

import json
import signal
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT
from test_fault_tolerance import wait_for_checkpoint

from rayft.recipe.pipeline import StageResult, read_pipeline, result_of
from rayft.recipe.problems import ConfigError
from rayft.recipe.values import read_log

SHARED = {"model_name_or_path": "m", "output_dir": "/out", "dataset": "demo_sft"}


def stages_of(*stages, **shared):
    return read_pipeline({**SHARED, **shared, "stages": list(stages)}, {}, "run")


def problems_of(*stages, overrides=None, **shared):
    with pytest.raises(ConfigError) as err:
        read_pipeline({**SHARED, **shared, "stages": list(stages)}, overrides or {}, "run")
    return [str(p) for p in err.value.problems]


@pytest.mark.unit
def test_each_stage_gets_the_shared_keys_its_own_folder_and_run_and_the_overrides_meant_for_it():
    sft, dpo = read_pipeline({**SHARED, "learning_rate": 1e-4, "stages": [
        {"name": "sft", "stage": "sft"}, {"name": "dpo", "from": "sft", "stage": "dpo", "learning_rate": 5e-6}]},
        {"dpo": {"pref_beta": 0.2}, "cutoff_len": 64}, "run")
    assert sft.keys == {**SHARED, "learning_rate": 1e-4, "cutoff_len": 64, "stage": "sft", "output_dir": "/out/sft",
                        "ray_run_name": "run-sft", "overwrite_output_dir": True}
    assert dpo.source == "sft" and not dpo.merge
    assert dpo.keys["learning_rate"] == 5e-6 and dpo.keys["pref_beta"] == 0.2 and "pref_beta" not in sft.keys
    assert stages_of({"name": "a", "stage": "sft"}, ray_run_name="mine")[0].keys["ray_run_name"] == "mine-a"


@pytest.mark.unit
def test_a_lora_result_is_merged_under_a_new_adapter_and_a_merged_or_whole_model_is_loaded_as_it_is():
    lora, merged, full = stages_of({"name": "a", "stage": "sft"}, {"name": "b", "stage": "sft", "merge": True},
                                   {"name": "c", "stage": "sft", "finetuning_type": "full"})
    first = result_of(lora, {"model_name_or_path": "m"})
    assert first == StageResult("m", ("/out/a",))
    assert first.keys() == {"model_name_or_path": "m", "adapter_name_or_path": "/out/a", "create_new_adapter": True}
    assert result_of(lora, first.keys()) == StageResult("m", ("/out/a", "/out/a"))  # the adapters stack in order
    assert result_of(merged, first.keys()).keys() == {"model_name_or_path": "/out/b/merged"}
    assert result_of(full, {"model_name_or_path": "m"}).keys() == {"model_name_or_path": "/out/c"}


@pytest.mark.unit
def test_a_pipeline_file_is_refused_with_every_problem_named_after_its_stage():
    found = problems_of(
        {"name": "sft", "stage": "sft", "from": "dpo", "output_dir": "/x"},
        {"name": "sft", "stage": "dpo"},
        {"name": "rm", "stage": "rm"},
        {"name": "ppo", "stage": "ppo", "from": "rm", "model_name_or_path": "other"},
        {"name": "full", "stage": "dpo", "finetuning_type": "full", "from": "ppo", "merge": True},
        {"name": "self", "stage": "sft", "from": "self"},
        {"name": "dataset", "stage": "sft"},
        overwrite_output_dir=True)
    assert found == [
        "overwrite_output_dir: a pipeline writes only into its own output_dir (a rerun goes on where it stopped); "
        "remove it",
        "sft.output_dir: set by the pipeline (output_dir/<name>); remove it",
        "sft.from: 'dpo' is no stage (stages: sft, sft, rm, ppo, full, self, dataset); a stage starts from one listed "
        "above it",
        "stages[1].name: 'sft' names two stages; give each stage its own name",
        "ppo.model_name_or_path: from: rm sets it; remove one of them",
        "self.from: 'self' is itself; a stage starts from one listed above it",
        "stages[6].name: 'dataset' is a recipe key; name the stage otherwise",
        "ppo.from: stage rm trains a reward model, not a model to go on from; start from the stage before it",
        "full.merge: a freeze or full stage saves a whole model already; remove merge",
        "full.from: ppo's result is an adapter and this stage trains the whole model; set merge: true on stage ppo",
    ]
    assert problems_of({"name": "a", "stage": "sft", "sweep": {"parameters": {}}})[0].startswith(
        "sweep: a sweep inside a pipeline is not built")
    assert problems_of({"name": "a", "stage": "sft"}, overrides={"stages": []}) == [
        "stages: cannot be overridden on the command line; edit the pipeline file"]


@pytest.mark.integration
def test_planning_the_shipped_pipeline_checks_and_plans_every_stage_before_any_training(rayft_log, tiny_model,
                                                                                          tmp_path):
    from rayft.orchestrator.pipeline import run_plan_pipeline

    run_plan_pipeline(str(ROOT / "configs" / "pipeline_demo.yaml"),
                      [f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'out'}"])
    text = "\n".join(rayft_log)
    assert [line for line in rayft_log if line.startswith("stage ")] == [
        "stage pt (pt, lora)", "stage sft (sft, lora, from pt)", "stage dpo (dpo, lora, from sft)"]
    assert text.count("optimizer steps") == 3 and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_killed_pipeline_driver_resumes_dpo_from_its_checkpoint_without_training_sft_again(
        tmp_path, tiny_model, ray_local):
    """sft -> dpo (from: sft) on 2 workers; the driver is killed once dpo has a checkpoint. The rerun skips sft,
    resumes dpo (reporting the learning_rate it changed) and ends with dpo's reference model equal to sft's."""
    out, storage = tmp_path / "out", tmp_path / "ray"
    pipeline = {
        "model_name_or_path": str(tiny_model), "dataset_dir": str(ROOT / "data" / "demo"), "template": "chatml",
        "cutoff_len": 128, "output_dir": str(out), "ray_storage_path": str(storage), "ray_run_name": "chain",
        "ray_address": ray_local._private.worker._global_node.address, "ray_num_workers": 2, "deepspeed": "z2",
        "per_device_train_batch_size": 4, "logging_steps": 1, "save_strategy": "steps",
        "stages": [
            {"name": "sft", "stage": "sft", "dataset": "demo_sft", "max_steps": 4, "save_steps": 4,
             "learning_rate": 2e-3},
            {"name": "dpo", "from": "sft", "stage": "dpo", "dataset": "demo_dpo", "max_steps": 6, "save_steps": 2,
             "learning_rate": 5e-4, "pref_beta": 1.0, "pref_bco_weight": 0.5},  # BCO's baseline across 2 ranks
        ]}
    recipe = tmp_path / "pipeline.yaml"
    recipe.write_text(yaml.safe_dump(pipeline))
    command = [sys.executable, "-m", "rayft.orchestrator.cli", "pipeline", str(recipe)]
    log = tmp_path / "first.log"
    with log.open("w") as sink:
        driver = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for_checkpoint(str(storage), "chain-dpo", driver, log, timeout=400)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    first = log.read_text()
    assert "stage sft: finished in" in first and "stage dpo: dpo with lora from sft's result" in first
    record = json.loads((out / "pipeline.json").read_text())
    assert record["stages"]["dpo"]["status"] == "running" and record["stages"]["sft"]["status"] == "finished"
    sft_files = {p.name: p.stat().st_mtime_ns for p in (out / "sft").iterdir()}

    again = subprocess.run([*command, "dpo.learning_rate=4e-4"], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"stage sft: finished earlier ({out / 'sft'}); skipped" in again.stdout
    assert "stage sft: sft with" not in again.stdout  # sft trains once
    assert {p.name: p.stat().st_mtime_ns for p in (out / "sft").iterdir()} == sft_files
    assert "run 'chain-dpo' has a checkpoint in storage: resuming from" in again.stdout
    assert "learning_rate: 0.0005 -> 0.0004 (the run goes on with the new values)" in again.stdout
    records = read_log(out / "dpo")
    resumed = [r["resumed_from_step"] for r in records if "resumed_from_step" in r]
    assert len(resumed) == 1 and resumed[0] >= 2, records
    assert json.loads((out / "dpo" / "trainer_state.json").read_text())["global_step"] == 6
    # dpo started from sft's adapter merged into the weights under a new adapter, so its reference model (the
    # adapter-disabled policy) is the sft model: policy and reference agree at the first step
    first_step = next(r for r in records if r.get("step") == 1 and "rewards/margins" in r)
    assert abs(first_step["rewards/margins"]) < 1e-3, first_step
    state = json.loads((out / "pipeline.json").read_text())["stages"]
    assert [state[n]["status"] for n in ("sft", "dpo")] == ["finished", "finished"]
    assert state["dpo"]["started_from"] == {"model_name_or_path": str(tiny_model),
                                            "adapter_name_or_path": str(out / "sft"), "create_new_adapter": True}
    assert state["dpo"]["result"] == {"model": str(tiny_model), "adapters": [str(out / "sft"), str(out / "dpo")]}
    assert state["dpo"]["recipe"]["learning_rate"] == 4e-4 and state["dpo"]["seconds"] > 0
    card = (out / "dpo" / "README.md").read_text()
    assert "## Lineage" in card and "2. `dpo`: stage `dpo`, `lora`, on `demo_dpo`, from `sft`" in card
    assert f"adapter_name_or_path: {out / 'sft'},{out / 'dpo'}" in card

    # a finished stage whose recipe changed is refused before anything starts, and its outputs are left alone
    changed = subprocess.run([*command, "dpo.learning_rate=4e-4", "sft.learning_rate=1e-3"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2
    assert changed.stderr.strip() == (f"rayft: sft: finished with another recipe (learning_rate: 0.002 -> 0.001); "
                                      f"remove {out / 'sft'} to train it with this one")
    assert {p.name: p.stat().st_mtime_ns for p in (out / "sft").iterdir()} == sft_files
