"""The memory planner: per-worker estimates on hand-computed shapes, DeepSpeed's estimators where they
apply, and `deepspeed: auto` choosing (or refusing) against the memory a worker gets."""

from dataclasses import replace

import pytest
from conftest import DEMO_RECIPE, ROOT

from rayft.orchestrator.memory import (
    CPU_RUNTIME_BYTES,
    CUDA_RUNTIME_BYTES,
    GB,
    MemorySettings,
    ModelShape,
    estimate,
    pick_deepspeed,
)
from rayft.orchestrator.plan import make_plan, worker_budget
from rayft.recipe.derive import reference_kind
from rayft.recipe.loading import load_recipe
from rayft.recipe.parse import parse_config
from rayft.recipe.plan import Node
from rayft.recipe.problems import ConfigError
from rayft.trainers.probe import model_shape as probed_shape

pytestmark = pytest.mark.unit

SHAPE = ModelShape(total_params=1_000_000, trainable_params=1_000_000, largest_layer_params=100_000, hidden_size=64,
                   intermediate_size=128, num_layers=2, num_heads=4, vocab_size=100)
CPU = MemorySettings(num_workers=2, zero_stage=0, offload=(), use_gpu=False, mixed_precision=False,
                     per_device_batch_size=1, cutoff_len=8, gradient_checkpointing=True, reference_copy=False,
                     eager_attention=True)
# 8 tokens x (kept per token: 2 layer inputs of 64 + one layer recomputed: 10*64 + 4*128 + 2*4*8 = 1216,
# times 4 bytes; plus fp32 logits, log-probabilities and their gradient: 3 * 100 * 4)
ACTIVATIONS = 8 * ((2 * 64 + 1216) * 4 + 1200)


def cfg(*overrides):
    return parse_config(load_recipe(DEMO_RECIPE, list(overrides)), base_dir=ROOT)


def test_full_fine_tuning_in_fp32_without_zero():
    found = estimate(SHAPE, CPU)
    assert found.parts == {"weights": 4_000_000, "gradients": 4_000_000, "optimizer": 8_000_000,
                           "activations": ACTIVATIONS, "runtime": CPU_RUNTIME_BYTES}
    assert found.device == 16_000_000 + ACTIVATIONS + CPU_RUNTIME_BYTES and found.host == 0


def test_zero_stages_partition_states_over_the_workers():
    # ZeRO 1-3 keep an fp32 copy of the trained parameters as the optimizer's partition: 8 + 4 bytes each
    assert estimate(SHAPE, replace(CPU, zero_stage=1)).parts["optimizer"] == 12_000_000 // 2
    zero2 = estimate(SHAPE, replace(CPU, zero_stage=2)).parts
    assert (zero2["weights"], zero2["gradients"], zero2["optimizer"]) == (4_000_000, 2_000_000, 6_000_000)
    zero3 = estimate(SHAPE, replace(CPU, zero_stage=3)).parts
    # half the weights, plus one layer gathered and one prefetched
    assert zero3["weights"] == 2_000_000 + 2 * 100_000 * 4
    assert zero3["gathered for saving"] == 4_000_000 - ACTIVATIONS


def test_lora_trains_few_parameters_and_a_frozen_reference_costs_a_copy():
    lora = replace(SHAPE, trainable_params=10_000)
    parts = estimate(lora, CPU).parts
    assert (parts["weights"], parts["gradients"], parts["optimizer"]) == (4_000_000, 40_000, 80_000)
    assert estimate(SHAPE, replace(CPU, reference_copy=True)).parts["reference"] == 4_000_000
    assert estimate(SHAPE, replace(CPU, reference_copy=True, zero_stage=3)).parts["reference"] == 2_000_000


def test_activations_without_checkpointing_keep_every_layer():
    parts = estimate(SHAPE, replace(CPU, gradient_checkpointing=False)).parts
    assert parts["activations"] == 8 * (2 * 1216 * 4 + 1200)


def test_mixed_precision_full_fine_tuning_uses_deepspeeds_estimators():
    gpu = replace(CPU, use_gpu=True, mixed_precision=True, num_workers=4)
    # DeepSpeed: 2 bytes of 16-bit weights, and 18 bytes of gradients, master weights and moments per
    # parameter partitioned over the GPUs (ZeRO-2); ZeRO-3 partitions the weights too, plus the largest layer
    zero2 = estimate(SHAPE, replace(gpu, zero_stage=2)).parts
    assert zero2["model states (DeepSpeed's estimate)"] == 2 * 1_000_000 + 18 * 1_000_000 // 4
    zero3 = estimate(SHAPE, replace(gpu, zero_stage=3)).parts
    assert zero3["model states (DeepSpeed's estimate)"] == 4 * 100_000 + 18 * 1_000_000 // 4
    assert zero3["runtime"] == CUDA_RUNTIME_BYTES
    offloaded = estimate(SHAPE, replace(gpu, zero_stage=3, offload=("optimizer", "param"))).parts
    assert offloaded["model states (DeepSpeed's estimate)"] == 4 * 100_000


def test_auto_picks_the_lowest_stage_that_fits_and_says_why():
    zero0, zero1 = (estimate(SHAPE, replace(CPU, zero_stage=s)).device for s in (0, 1))
    name, tried = pick_deepspeed(SHAPE, CPU, budget=zero0 - 1)
    assert zero1 < zero0 and name == "z1" and len(tried) == 2
    assert tried[0].startswith("z0: ") and " exceeds " in tried[0] and " fits " in tried[1]
    assert pick_deepspeed(SHAPE, CPU, budget=10 * GB)[0] == "z0"
    assert pick_deepspeed(SHAPE, CPU, budget=1)[0] is None
    # on GPUs ZeRO-3 saves memory where ZeRO-2 does not fit; then offloading where nothing else does
    gpu = replace(CPU, use_gpu=True, num_workers=8)
    zero2, zero3 = (estimate(SHAPE, replace(gpu, zero_stage=s)).device for s in (2, 3))
    assert pick_deepspeed(SHAPE, gpu, budget=(zero2 + zero3) // 2)[0] == "z3"
    offload = estimate(SHAPE, replace(gpu, zero_stage=3, offload=("optimizer", "param"))).device
    assert pick_deepspeed(SHAPE, gpu, budget=offload)[0] == "z3_offload"


def test_each_worker_gets_its_share_of_its_nodes_memory():
    nodes = [Node("a", "ip", {"CPU": 4.0, "memory": 8.0 * GB}), Node("b", "ip", {"CPU": 2.0, "memory": 6.0 * GB})]
    assert worker_budget({"CPU": 1}, 4, nodes, use_gpu=False, gpu_memory=None) == 2 * GB  # 4 on a, 2 on b
    assert worker_budget({"CPU": 1, "memory": GB}, 4, nodes, use_gpu=False, gpu_memory=None) == GB
    assert worker_budget({"GPU": 1}, 4, nodes, use_gpu=True, gpu_memory=80 * GB) == 80 * GB


def test_the_plan_carries_the_estimate_and_auto_refuses_what_fits_nowhere():
    c = cfg("finetuning_type=full", "deepspeed=auto")
    shape = model_shape(c)
    assert shape.trainable_params == shape.total_params > 3_000_000
    plan = make_plan(c, [Node("n", "ip", {"CPU": 2.0, "memory": 8.0 * GB})], 256, shape=shape)
    assert plan.zero_stage == 0 and plan.memory_per_worker["budget"] == 4 * GB
    assert "memory per worker" in plan.summary() and "auto chose z0" in " ".join(plan.notes)
    with pytest.raises(ConfigError, match=r"auto found no DeepSpeed setup that fits 0.50 GB per worker.*z3: "):
        make_plan(c, [Node("n", "ip", {"CPU": 2.0, "memory": 1.0 * GB})], 256, shape=shape)
    lora = cfg()
    assert model_shape(lora).trainable_params < shape.total_params // 10


def test_the_memory_plan_counts_the_reference_copy_that_ref_model_loads_for_lora():
    dpo, node = ROOT / "configs" / "demo_dpo_lora.yaml", [Node("n", "ip", {"CPU": 2.0, "memory": 8.0 * GB})]

    def reference(*overrides):
        c = parse_config(load_recipe(dpo, list(overrides)), base_dir=ROOT)
        plan = make_plan(c, node, 64, shape=model_shape(c))
        return reference_kind(c), plan.memory_per_worker.get("reference", 0), model_shape(c).total_params

    kind, held, _ = reference()
    assert (kind, held) == ("adapter_off", 0)  # the policy without its adapter: no second copy
    kind, held, params = reference(f"ref_model={ROOT / '.cache' / 'models' / 'tiny-qwen2'}")
    assert kind == "copy" and held == params * 4  # a frozen fp32 copy in every worker
    kind, held, params = reference("ref_model_adapters=x", "deepspeed=z3")
    assert kind == "copy" and held == params * 4 // 2  # ZeRO-3 partitions it over the 2 workers
    assert reference("pref_loss=orpo")[:2] == ("none", 0)


def model_shape(c) -> ModelShape:
    """The planner's shape of a recipe's model, as the driver's helper process measures it."""
    return ModelShape(**probed_shape(c))
