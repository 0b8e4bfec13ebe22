"""Elastic runs: the recipe's range, the plan's arithmetic and each worker's share of a global batch (unit), ZeRO
checkpoints resumed across sizes, and a LoRA + ZeRO-2 run on a fake two-node cluster (whose STRICT_SPREAD placement
puts its two workers on two nodes) through a spot node's life: SIGTERM, the node gone, the node back (slow).
The same cluster refuses three workers under STRICT_SPREAD, naming both nodes."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from conftest import ROOT

from rayft.orchestrator.plan import make_plan, startable_now
from rayft.recipe.loading import load_recipe
from rayft.recipe.parse import parse_config
from rayft.recipe.plan import Node
from rayft.recipe.problems import ConfigError
from rayft.recipe.values import read_log
from rayft.trainers.resume import zero_world_size
from rayft.trainers.shards import GlobalBatchShare

DEMO = ROOT / "configs" / "demo_sft_lora.yaml"
TWO_NODES = [Node(name * 56, "10.0.0.1", {"CPU": 1.0, "memory": 8e9}) for name in "ab"]


def recipe(*overrides):
    return parse_config(load_recipe(DEMO, ["model_name_or_path=.", *overrides]), base_dir=ROOT)


@pytest.mark.unit
@pytest.mark.parametrize("value", ["[1,2]", "1-2"])
def test_a_range_of_workers_reads_as_list_or_dash_and_plans_the_batch_at_both_ends(value):
    cfg = recipe(f"ray_num_workers={value}", "per_device_train_batch_size=4", "gradient_accumulation_steps=1")
    assert (cfg.ray.min_workers, cfg.ray.max_workers) == (1, 2)
    plan = make_plan(cfg, TWO_NODES, 100)
    assert plan.elastic and (plan.min_workers, plan.num_workers, plan.global_batch_size) == (1, 2, 8)
    assert (plan.accumulation_at(2), plan.accumulation_at(1)) == (1, 2)
    assert plan.steps_per_epoch == 12  # 100 // 8, the same at every size
    summary = plan.summary()
    assert "1 to 2 (elastic)" in summary and "4 per device x 1 workers x 2 accumulation = 8 global" in summary
    assert "4 left out" not in summary and "4 example(s) short of a whole global batch" in summary
    only_one = make_plan(cfg, TWO_NODES[:1], 100)  # the minimum fits one node: the run can start there
    assert only_one.min_workers == 1
    busy = [Node(n.node_id, n.ip, {"CPU": 0.0}) for n in TWO_NODES]
    assert startable_now(plan, TWO_NODES[:1]).endswith("the minimum of 1 can start now")
    assert "fit 0 of 2 workers now; the minimum of 1 waits until enough is free" in startable_now(plan, busy)


@pytest.mark.unit
@pytest.mark.parametrize("overrides, message", [
    (["ray_num_workers=[2,4]", "per_device_train_batch_size=4", "gradient_accumulation_steps=1"],
     "cannot be shared evenly by [3] worker(s)"),
    (["ray_num_workers=3-1"], "neither a number of workers"),
    (["ray_num_workers=[1,2]", "stage=ppo", "reward_model=rm"], "elastic runs of stage ppo are not built"),
    (["ray_num_workers=[1,2]", "streaming=true", "max_steps=5"], "an elastic run of streamed data is not built"),
    (["ray_resize_interval_s=5"], "only read by an elastic run"),
    (["ray_preemption_grace_s=-1"], "must be 0 or more seconds"),
])
def test_an_elastic_range_that_cannot_work_is_refused_before_ray(overrides, message):
    with pytest.raises(ConfigError) as err:
        recipe(*overrides)
    assert message in str(err.value)


class Rows:
    """A Ray Data iterator's iter_batches over ids 0..n-1 in order (the stream's only need of a shard)."""

    def __init__(self, n):
        self.n = n

    def iter_batches(self, batch_size, **kwargs):
        for start in range(0, self.n, batch_size):
            yield {"input_ids": np.arange(start, min(start + batch_size, self.n))[:, None]}


@pytest.mark.unit
def test_every_size_trains_the_same_examples_at_each_step_whatever_the_group():
    def step_sets(world):
        shares = [list(GlobalBatchShare(Rows(70), None, 0, rank, world, global_batch=8, steps_per_epoch=8))
                  for rank in range(world)]
        assert all(len(share) == 8 * 8 // world for share in shares)
        per_rank = 8 // world
        return [sorted(e["input_ids"][0] for share in shares for e in share[s * per_rank:(s + 1) * per_rank])
                for s in range(8)]

    one, two, four = step_sets(1), step_sets(2), step_sets(4)
    assert one == two == four == [list(range(s * 8, s * 8 + 8)) for s in range(8)]  # the 6 left over: never


@pytest.mark.integration
def test_workers_reading_ray_data_in_their_own_processes_agree_on_the_shuffled_order(ray_local):
    """The premise of GlobalBatchShare on real Ray Data: the same seed and buffer give every process one order."""
    import ray.data

    dataset = ray.data.range(70, override_num_blocks=4).map_batches(
        lambda b: {"input_ids": b["id"][:, None]}).materialize()

    @ray.remote
    def steps_of(iterator, rank, world):
        share = GlobalBatchShare(iterator, 16, 7, rank, world, global_batch=8, steps_per_epoch=8)
        return [[e["input_ids"][0] for e in list(share)[s * 8 // world:(s + 1) * 8 // world]] for s in range(8)]

    one = ray.get(steps_of.remote(dataset.iterator(), 0, 1))
    two = ray.get([steps_of.remote(dataset.iterator(), rank, 2) for rank in (0, 1)])
    assert [sorted(a + b) for a, b in zip(*two)] == [sorted(step) for step in one]
    assert sum(one, []) != list(range(64))  # the buffer did shuffle


@pytest.mark.integration
def test_rayft_plan_shows_the_range_and_whether_the_minimum_can_start_now(ray_local, tiny_model, tmp_path, rayft_log):
    from rayft.orchestrator.launch import run_plan

    cfg = parse_config(load_recipe(DEMO, [f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'out'}",
                                          f"ray_storage_path={tmp_path / 'ray'}", "ray_num_workers=[1,2]",
                                          "resources_per_worker={CPU: 1}"]), base_dir=ROOT)
    plan = run_plan(cfg)
    assert (plan.min_workers, plan.num_workers) == (1, 2)
    shown = "\n".join(rayft_log)
    assert "1 to 2 (elastic)" in shown and "at the minimum   8 per device x 1 workers x 2 accumulation" in shown
    # what is free depends on what else this session's Ray instance still runs; the verdicts are unit-tested
    assert re.search(r"elastic: the free resources fit [012] of 2 workers now; the minimum of 1 (can start now|"
                     r"waits until enough is free)", shown)


@pytest.mark.unit
def test_a_zero_checkpoint_tells_how_many_ranks_wrote_it(tmp_path):
    step = tmp_path / "global_step4"
    step.mkdir()
    (tmp_path / "latest").write_text("global_step4")
    for rank in (0, 1):
        (step / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert zero_world_size(str(tmp_path)) == 2
    assert zero_world_size(str(step)) is None  # no DeepSpeed state


@pytest.fixture(scope="module")
def elastic_runs(tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp("elastic")
    ray_tmp = tempfile.mkdtemp(prefix="rfe", dir="/tmp")  # a Ray temp dir of its own (see Known behaviour)
    # A node that leaves is still counted by Ray Train's resource view for a while: the group it then asks for
    # cannot start, and Ray Train retries smaller after the start timeout (60 s by default). A removed fake node
    # also reads as a drain without a deadline to Ray Train's preemption watcher, which then waits 120 s before
    # restarting; a real spot notice carries its deadline. Neither wait is rayft's: both are cut short here.
    # The controller polls its workers every 0.5 s, as rayft's local runs do, so it acts on a resize at once.
    # The start timeout bounds only the wait for the placement group, which is ready at once when the nodes are there.
    # The lone worker held (SIGSTOP) for the grow-back cannot leave its process group: Ray Train waits for it 30 s
    # by default before replacing the group, an idle minute of the suite, cut to 1 s.
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5",
           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
           "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S": "1"}
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "elastic_run.py"), str(out), str(tiny_model)],
                              capture_output=True, text=True, timeout=1200, cwd=ROOT, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "results.jsonl").write_text(proc.stdout)  # with each run's event times, for reading afterwards
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"run"')]
    results = {r["run"]: r for r in lines}
    return out, results


@pytest.mark.slow
def test_a_run_shrinks_when_a_node_leaves_and_grows_when_it_returns(elastic_runs):
    out, results = elastic_runs
    run, max_steps = "lora_z2", 20
    assert results[run]["status"] == "ok", results[run]["error"]
    assert results[run]["only_this_machine"] is False
    records = read_log(out / run / "out")
    resizes = [(r["previous_world_size"], r["world_size"]) for r in records if "previous_world_size" in r]
    assert resizes[0] == (2, 1) and resizes[-1] == (1, 2), records
    # each resize names the checkpoint as stored in the run's storage, not the local converted view
    assert all(str(out / run / "ray") in r["checkpoint"] for r in records if "previous_world_size" in r)
    assert {r["global_batch_size"] for r in records if "global_batch_size" in r} == {8}  # at every size
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == list(range(5, max_steps + 1, 5))  # every logging step once
    # the group of one logs steps that a checkpoint of its own keeps (it saves every 10 steps)
    assert {1, 2} <= {r["world_size"] for r in logged}
    first = logged[0]["loss"]
    assert all(r["loss"] < first for r in logged[1:]), logged  # continues: never back to the initial loss
    state = json.loads((out / run / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == max_steps
    summary = json.loads((out / run / "out" / "all_results.json").read_text())
    assert summary["resizes"] == len(resizes) and summary["world_size"] == 2


@pytest.mark.slow
def test_strict_spread_puts_each_worker_on_its_own_node_and_rank_0_copies_the_outputs(elastic_runs):
    out, _ = elastic_runs
    placement = json.loads((out / "lora_z2" / "out" / "placement.json").read_text())  # the last group's: two
    assert [w["rank"] for w in placement] == [0, 1]
    assert len({w["node_id"] for w in placement}) == 2
    assert len({w["node_ip"] for w in placement}) == 1  # one machine: only the node id tells nodes apart
    # on a cluster rank 0 copies the outputs to the shared storage, under the run's name
    (copy,) = (out / "lora_z2" / "ray").glob("*/output/adapter_model.safetensors")
    assert copy.read_bytes() == (out / "lora_z2" / "out" / "adapter_model.safetensors").read_bytes()


@pytest.mark.slow
def test_an_unsatisfiable_request_is_refused_with_the_clusters_nodes(elastic_runs):
    _, results = elastic_runs
    result = results["unsatisfiable"]
    assert result["status"] == "refused"
    assert "STRICT_SPREAD needs 3 different nodes that each fit a worker, but only 2 do" in result["message"]
    assert result["message"].count("CPU=1") == 2


@pytest.mark.slow
def test_sigterm_to_a_worker_saves_a_checkpoint_at_that_step_and_the_run_goes_on_from_it(elastic_runs):
    out, results = elastic_runs
    step = results["lora_z2"]["sigterm_checkpoint_step"]  # the first checkpoint: before the periodic one at 10
    assert step is not None and 5 <= step < 10
    records = read_log(out / "lora_z2" / "out")
    assert [r["resumed_from_step"] for r in records if "resumed_from_step" in r][0] == step  # first from it
    assert f"SIGTERM: saving a checkpoint at step {step} " in (out / "results.jsonl").read_text()  # workers' console


@pytest.mark.integration  # no Ray, but three process groups of DeepSpeed in turn: about a minute
def test_zero_checkpoints_resume_from_2_workers_on_1_and_from_1_on_2_for_every_stage(tmp_path):
    """DeepSpeed ZeRO 0-3 (no Ray: three process groups of 2, 1 and 2 processes in turn): six steps with
    two resumptions across sizes lose exactly as six steps without, so the optimizer state survives."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "zero_resize.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = json.loads(proc.stdout.strip().splitlines()[-1])
    for stage in ("0", "1", "2", "3"):
        chained, reference = losses[stage]["chained"], losses[stage]["reference"]
        assert len(chained) == len(reference) == 6
        assert chained == pytest.approx(reference, rel=1e-5), stage
        assert reference[5] != pytest.approx(reference[2], rel=1e-3)  # the steps do move the model
    assert (tmp_path / "z2" / "a-universal-1" / "universal").is_dir()  # resumed through the universal form
    assert (tmp_path / "z3" / "b-universal-2" / "universal").is_dir()
    assert not (tmp_path / "z0" / "a-universal-1").exists()  # stage 0 keeps the optimizer whole
