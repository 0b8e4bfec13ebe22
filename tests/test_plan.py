"""The pure planner: placement feasibility under each strategy, device choice and batch arithmetic."""

import pytest
from conftest import DEMO_RECIPE, ROOT

from rayft.orchestrator.plan import bundles_per_node, make_plan, placement_problems, worker_resources
from rayft.recipe import deepspeed as ds
from rayft.recipe.loading import load_recipe
from rayft.recipe.parse import parse_config
from rayft.recipe.plan import Node
from rayft.recipe.problems import ConfigError

pytestmark = pytest.mark.unit

THREE_NODES = [Node("a" * 16, "10.0.0.1", {"CPU": 4.0}), Node("b" * 16, "10.0.0.1", {"CPU": 4.0}),
               Node("c" * 16, "10.0.0.1", {"CPU": 2.0})]


def cfg(*overrides):
    return parse_config(load_recipe(DEMO_RECIPE, list(overrides)), base_dir=ROOT)


def test_bundles_per_node_takes_the_scarcest_resource():
    node = Node("n", "ip", {"CPU": 8.0, "GPU": 2.0})
    assert bundles_per_node({"CPU": 2, "GPU": 1}, node) == 2
    assert bundles_per_node({"CPU": 3}, node) == 2
    assert bundles_per_node({"CPU": 0.5}, node) == 16


@pytest.mark.parametrize("strategy,count,feasible", [
    ("PACK", 5, True), ("PACK", 6, False), ("SPREAD", 5, True),
    ("STRICT_PACK", 2, True), ("STRICT_PACK", 3, False),
    ("STRICT_SPREAD", 3, True), ("STRICT_SPREAD", 4, False),
])
def test_placement_feasibility_per_strategy(strategy, count, feasible):
    found = placement_problems({"CPU": 2}, count, strategy, THREE_NODES)
    assert (found == []) is feasible, found


def test_a_refusal_names_the_clusters_resources():
    (problem,) = map(str, placement_problems({"CPU": 2}, 3, "STRICT_PACK", THREE_NODES))
    assert "STRICT_PACK needs all 3 workers on one node" in problem
    assert "node aaaaaaaaaaaa (10.0.0.1): CPU=4" in problem and "CPU=2" in problem


def test_a_gpu_on_a_cluster_without_gpus_is_refused():
    (problem,) = map(str, placement_problems({"GPU": 1}, 1, "PACK", THREE_NODES))
    assert "no GPUs" in problem


@pytest.mark.parametrize("overrides,nodes,sharing,expected", [
    (["ray_num_workers=1"], [Node("n", "ip", {"CPU": 2.0})], 1, {"CPU": 2}),  # one worker: both cores
    ([], [Node("n", "ip", {"CPU": 2.0})], 1, {"CPU": 1}),
    (["ray_num_workers=1"], [Node("n", "ip", {"CPU": 2.0})], 2, {"CPU": 1}),  # two trials of a sweep at once
    (["ray_num_workers=3"], [Node("n", "ip", {"CPU": 2.0})], 1, {"CPU": 1}),  # cannot fit: the check refuses it
    ([], THREE_NODES, 1, {"CPU": 4}),  # PACK: both on the 4-CPU nodes
    (["ray_num_workers=3", "placement_strategy=STRICT_SPREAD"], THREE_NODES, 1, {"CPU": 2}),  # one per node
    (["ray_num_workers=2", "placement_strategy=STRICT_PACK"], THREE_NODES, 1, {"CPU": 2}),  # both on one node
    ([], [Node("n", "ip", {"CPU": 16.0, "GPU": 4.0})], 1, {"GPU": 1, "CPU": 4}),  # CPUs per GPU for its loaders
    (["resources_per_worker={CPU: 1, memory: 1000}"], [Node("n", "ip", {"CPU": 8.0})], 1, {"CPU": 1, "memory": 1000}),
])
def test_default_worker_resources_use_the_cluster(overrides, nodes, sharing, expected):
    bundle, why = worker_resources(cfg(*overrides), nodes, sharing)
    assert bundle == expected
    assert (why is None) == any(o.startswith("resources_per_worker") for o in overrides)
    if "CPU" in expected and "GPU" not in expected and why:
        assert f"{expected['CPU']} CPU(s) per worker" in why


def test_a_sweep_shares_the_cluster_between_the_trials_at_once():
    from rayft.orchestrator.sweep_spec import SweepSpec, trials_at_once

    two_cpus = [Node("n", "ip", {"CPU": 2.0})]
    one_worker = [cfg("ray_num_workers=1")] * 3
    assert trials_at_once(SweepSpec(parameters={}), one_worker, two_cpus, 3) == 2
    assert trials_at_once(SweepSpec(parameters={}, max_concurrent_trials=1), one_worker, two_cpus, 3) == 1
    assert trials_at_once(SweepSpec(parameters={}), [cfg()] * 3, two_cpus, 3) == 1
    assert trials_at_once(SweepSpec(parameters={}), one_worker, [Node("n", "ip", {"CPU": 8.0, "GPU": 2.0})], 3) == 2
    # search: optuna plans its trials from the one base recipe: the count is num_samples
    assert trials_at_once(SweepSpec(parameters={}, search="optuna", num_samples=4), one_worker[:1], two_cpus, 4) == 2
    assert trials_at_once(SweepSpec(parameters={}), one_worker, two_cpus, 1) == 1


def test_plan_for_the_demo_recipe():
    plan = make_plan(cfg(), [Node("n", "ip", {"CPU": 2.0})], num_train_examples=256)
    assert plan.resources_per_worker == {"CPU": 1} and not plan.use_gpu and plan.backend == "gloo"
    assert any(n.startswith("resources_per_worker unset: 1 CPU(s) per worker") for n in plan.notes), plan.notes
    assert plan.zero_stage == 2 and plan.offload == ()
    assert plan.examples_per_worker == 128
    assert plan.global_batch_size == 16
    assert plan.steps_per_epoch == 16 and plan.total_steps == 48


def test_plan_batch_arithmetic_with_accumulation_and_max_steps():
    c = cfg("gradient_accumulation_steps=4", "per_device_train_batch_size=3", "max_steps=7")
    plan = make_plan(c, [Node("n", "ip", {"CPU": 2.0})], num_train_examples=101)
    assert plan.examples_per_worker == 50
    assert plan.steps_per_epoch == 4  # 17 batches // 4
    assert plan.global_batch_size == 24 and plan.total_steps == 7
    assert any("1 example(s) left out" in n for n in plan.notes)


def test_plan_on_a_gpu_cluster_uses_nccl():
    plan = make_plan(cfg("deepspeed=z3_offload"), [Node("n", "ip", {"CPU": 16.0, "GPU": 4.0})], 64)
    assert plan.use_gpu and plan.backend == "nccl" and plan.resources_per_worker == {"GPU": 1, "CPU": 4}
    assert plan.zero_stage == 3 and plan.offload == ("optimizer", "param")


def test_plan_refuses_more_workers_than_fit():
    with pytest.raises(ConfigError) as info:
        make_plan(cfg("ray_num_workers=3"), [Node("n", "ip", {"CPU": 2.0})], 64)
    assert "3 workers need {'CPU': 3}" in str(info.value)


def test_plan_refuses_fewer_examples_than_workers():
    with pytest.raises(ConfigError, match="cannot feed 2 workers"):
        make_plan(cfg(), [Node("n", "ip", {"CPU": 2.0})], 1)


@pytest.mark.parametrize("name,stage,offload", [("z0", 0, []), ("z1", 1, []), ("z2", 2, []), ("z3", 3, []),
                                                ("z2_offload", 2, ["optimizer"]),
                                                ("z3_offload", 3, ["optimizer", "param"])])
def test_deepspeed_shorthands(name, stage, offload):
    config = ds.shorthand_config(name)
    assert ds.zero_stage(config) == stage and ds.offload_targets(config) == offload
    assert config["train_micro_batch_size_per_gpu"] == "auto"
