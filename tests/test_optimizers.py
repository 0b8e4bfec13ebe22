"""The optimizer factory (trainers/optimizers.py) on the tiny model, without Ray: what each of GaLore, APOLLO, BAdam,
Adam-mini and Muon updates, that a few steps lower the loss, that a checkpoint's state resumes the same steps, that
the Trainer builds them (and layer-wise schedules), the recipe rules before Ray and the memory planner's figures."""

import copy
import json
import sys

import pytest
import torch
from conftest import DEMO_RECIPE, ROOT
from test_methods import prepared
from transformers import Seq2SeqTrainingArguments

from rayft.orchestrator.memory import MemorySettings, ModelShape, estimate
from rayft.recipe.loading import load_recipe
from rayft.recipe.parse import parse_config
from rayft.recipe.problems import ConfigError
from rayft.recipe.schema import FinetuningArguments
from rayft.trainers.optimizers import Chained, LayerwiseDummy, build_optimizer, decay_names

pytestmark = pytest.mark.unit

IDS = torch.tensor([[5, 17, 42, 9, 33, 61, 7, 12, 88, 3, 25, 70]])


def args(**kwargs):
    return Seq2SeqTrainingArguments("out", learning_rate=kwargs.pop("learning_rate", 1e-3), weight_decay=0.0,
                                    use_cpu=True, report_to=[], **kwargs)


def steps(model, optimizer, n):
    """n steps on one batch; the losses before each."""
    losses = []
    for _ in range(n):
        loss = model(input_ids=IDS, labels=IDS).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return losses


def built(tiny_model, finetuning_type="full", lr=1e-3, **switches):
    torch.manual_seed(0)
    model = prepared(tiny_model, finetuning_type=finetuning_type)
    f = FinetuningArguments(finetuning_type=finetuning_type, **switches)
    return model, build_optimizer(model, args(learning_rate=lr), f, decay_names(model))


@pytest.mark.parametrize("switches, cls", [
    ({"use_galore": True, "galore_rank": 8, "galore_update_interval": 2}, "galore_torch.adamw.AdamW"),
    ({"use_apollo": True, "apollo_rank": 8, "apollo_update_interval": 2}, "apollo_torch.apollo.AdamW"),
    ({"use_adam_mini": True}, "adam_mini.adam_mini.Adam_mini"),
    ({"use_muon": True}, "rayft.trainers.optimizers.Chained"),
    ({"use_badam": True, "badam_switch_interval": 2, "badam_switch_mode": "ascending", "badam_start_block": 0},
     "badam.block_optim.BlockOptimizer"),
])
def test_each_optimizer_lowers_the_loss_of_a_full_model(tiny_model, switches, cls):
    model, optimizer = built(tiny_model, **switches)
    assert f"{type(optimizer).__module__}.{type(optimizer).__name__}" == cls
    losses = steps(model, optimizer, 6)
    assert losses[-1] < losses[0] - 0.05, losses


def test_galore_projects_the_linear_weights_and_leaves_the_rest_to_adamw(tiny_model):
    model, optimizer = built(tiny_model, use_galore=True, galore_rank=8)
    no_decay, decay, projected = optimizer.param_groups
    assert projected["rank"] == 8 and projected["scale"] == 2.0 and "rank" not in decay
    assert len(projected["params"]) == 4 * 7  # every linear weight of the 4 blocks; the tied head is not one
    assert {p.dim() for p in projected["params"]} == {2}
    steps(model, optimizer, 1)
    state = optimizer.state[projected["params"][4]]  # the first gate_proj, 682 x 256: projected to 682 x 8
    assert state["exp_avg"].shape == (682, 8) and state["projector"].ortho_matrix.shape == (8, 256)


def test_layerwise_galore_steps_each_weight_in_its_backward_hook(tiny_model):
    model, optimizer = built(tiny_model, use_galore=True, galore_layerwise=True)
    assert isinstance(optimizer, LayerwiseDummy)
    before = copy.deepcopy(model.state_dict())
    model(input_ids=IDS, labels=IDS).loss.backward()  # no optimizer.step(): the hooks did it
    moved = [n for n, v in model.state_dict().items() if not torch.equal(v, before[n])]
    assert len(moved) == len(before) and all(p.grad is None for p in model.parameters())


def test_badam_trains_one_block_at_a_time_and_switches(tiny_model):
    model, optimizer = built(tiny_model, use_badam=True, badam_switch_interval=1, badam_switch_mode="ascending",
                             badam_start_block=0)
    for block in (0, 1):
        before = copy.deepcopy(model.state_dict())
        steps(model, optimizer, 1)
        moved = {n.split(".")[2] for n, v in model.state_dict().items() if not torch.equal(v, before[n])}
        assert moved == {str(block)}, moved  # model.layers.<block>....: one block, never the embeddings


def test_muon_takes_the_matrices_and_adamw_the_embeddings_and_norms(tiny_model):
    model, optimizer = built(tiny_model, use_muon=True)
    muon, adamw = optimizer.optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 2 and "embed" not in names[id(p)] for p in muon.param_groups[0]["params"])
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= {names[id(p)] for p in adamw.param_groups[0]["params"]}
    assert muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"


@pytest.mark.parametrize("switches", [{"use_muon": True}, {"use_adam_mini": True},
                                      {"use_galore": True, "galore_update_interval": 2}])
def test_a_saved_optimizer_state_resumes_the_same_steps(tiny_model, tmp_path, switches):
    """As a checkpoint resumes: the state_dict saved after 2 steps, loaded into a new optimizer on a copy of the
    weights, gives the same next 2 losses as the run that went on."""
    model, optimizer = built(tiny_model, **switches)
    steps(model, optimizer, 2)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    weights = copy.deepcopy(model.state_dict())
    went_on = steps(model, optimizer, 2)
    again, fresh = built(tiny_model, **switches)
    again.load_state_dict(weights)
    fresh.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=False))
    assert steps(again, fresh, 2) == pytest.approx(went_on, rel=1e-5)


def test_the_trainer_builds_the_factorys_optimizer_and_layerwise_schedules(tiny_model):
    from rayft.trainers.common import ShardTrainer

    torch.manual_seed(0)
    model = prepared(tiny_model, finetuning_type="full")
    f = FinetuningArguments(finetuning_type="full", use_muon=True)
    trainer = ShardTrainer(model=model, args=args(max_steps=4), finetuning=f)
    trainer.create_optimizer_and_scheduler(4)
    assert isinstance(trainer.optimizer, Chained)
    assert trainer.lr_scheduler.optimizer is trainer.optimizer
    trainer.lr_scheduler.step()  # linear decay: the scheduler moves both parts' learning rates
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([1e-3 * 3 / 4] * 2)

    f = FinetuningArguments(finetuning_type="full", use_apollo=True, apollo_layerwise=True)
    trainer = ShardTrainer(model=prepared(tiny_model, finetuning_type="full"), args=args(max_steps=4), finetuning=f)
    trainer.create_optimizer_and_scheduler(4)
    first = next(iter(trainer.optimizer.per_param.values()))
    trainer.model(input_ids=IDS, labels=IDS).loss.backward()  # a step in the hooks, and a scheduler step
    assert first.param_groups[0]["lr"] == pytest.approx(1e-3 * 3 / 4)


def problems(*overrides):
    try:
        parse_config(load_recipe(DEMO_RECIPE, ["model_name_or_path=.", *overrides]), base_dir=ROOT)
    except ConfigError as err:
        return err.messages
    return []


FULL = ("finetuning_type=full", "deepspeed=null")


@pytest.mark.parametrize("overrides, message", [
    (("use_galore=true", "use_muon=true", *FULL), "use_galore and use_muon: choose one optimizer"),
    (("use_badam=true", "loraplus_lr_ratio=16", *FULL), "choose one optimizer"),
    (("use_galore=true", "deepspeed=null"), "use_galore and finetuning_type: GaLore trains whole weight matrices"),
    (("use_adam_mini=true", "deepspeed=null"), "use_adam_mini and finetuning_type: Adam-mini splits whole attention"),
    (("use_apollo=true", "finetuning_type=full"), "use_apollo and deepspeed: DeepSpeed's ZeRO optimizer would "
                                                  "replace APOLLO's"),
    (("use_galore=true", "galore_layerwise=true", *FULL), "galore_layerwise and ray_num_workers: layer-wise GaLore"),
    (("use_apollo=true", "apollo_layerwise=true", "ray_num_workers=1", "gradient_accumulation_steps=2", *FULL),
     "apollo_layerwise and gradient_accumulation_steps"),
    (("use_badam=true", *FULL), "use_badam and ray_num_workers: BAdam across several workers"),
    (("use_galore=true", "optim=sgd", "ray_num_workers=1", *FULL), "GaLore wraps adamw_torch or adamw_torch_fused "
                                                                   "or adafactor, not 'sgd'"),
    (("galore_rank=8",), "galore_rank is only used with use_galore: true"),
    (("use_badam=true", "badam_update_ratio=0.1", "ray_num_workers=1", *FULL), "badam_update_ratio is only used"),
    (("profiler_active_steps=3",), "profiler_active_steps and enable_torch_profiler: profiler_active_steps is only"),
    (("include_effective_tokens_per_second=true", "streaming=true", "max_steps=4"),
     "include_effective_tokens_per_second: counts the tokens of a tokenised training set"),
])
def test_optimizer_settings_that_cannot_work_together_are_refused_before_ray(overrides, message):
    found = problems(*overrides)
    assert any(message in p for p in found), found


@pytest.mark.parametrize("overrides", [
    ("use_galore=true", *FULL), ("use_apollo=true", "apollo_layerwise=true", "ray_num_workers=1",
                                 "gradient_accumulation_steps=1", *FULL),
    ("use_badam=true", "badam_mode=ratio", "ray_num_workers=1", *FULL), ("use_adam_mini=true", *FULL),
    ("use_muon=true", *FULL), ("use_muon=true", "deepspeed=null"),  # Muon beside LoRA: the adapters' matrices
])
def test_the_optimizers_llamafactory_recipes_use_are_accepted(overrides):
    assert problems(*overrides) == []


def test_the_workers_get_bitsandbytes_for_its_optimizers_and_only_then():
    """Workers of a run that needs no bitsandbytes start without it (2.5 s of imports); an `optim` from it (a QLoRA
    recipe's paged_adamw_8bit, also on an unquantised base) must keep it, and keeps the run out of the driver's own
    process, which has none. The list rayft keeps is Transformers' own, on the installed version."""
    from transformers.trainer_optimizer import _APOLLO_OPTIMIZERS, _BITSANDBYTES_OPTIMIZERS, _GALORE_OPTIMIZERS

    from rayft.orchestrator.plan import trains_in_process
    from rayft.recipe.optimizers import BITSANDBYTES_OPTIMS, uses_bitsandbytes

    assert BITSANDBYTES_OPTIMS == {name.value for name in _BITSANDBYTES_OPTIMIZERS}

    def config(*overrides):
        return parse_config(load_recipe(DEMO_RECIPE, ["model_name_or_path=.", "ray_num_workers=1", "deepspeed=null",
                                                      *overrides]), base_dir=ROOT)

    assert all(uses_bitsandbytes(config(f"optim={name}")) for name in BITSANDBYTES_OPTIMS)
    # Transformers' GaLore and APOLLO optims, whose packages import bitsandbytes, go by their prefixes
    assert all(name.value.startswith(("galore_", "apollo_")) for name in _GALORE_OPTIMIZERS + _APOLLO_OPTIMIZERS)
    plain = config()
    assert not uses_bitsandbytes(plain) and trains_in_process(plain, 1, False, None, False)
    assert not trains_in_process(config("optim=paged_adamw_8bit"), 1, False, None, False)


def test_the_memory_planner_counts_each_optimizers_state():
    shape = ModelShape(total_params=7_000_000_000, trainable_params=7_000_000_000, largest_layer_params=500_000_000,
                       hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, vocab_size=32000)

    def state(kind, **settings):
        s = MemorySettings(num_workers=1, zero_stage=None, offload=(), use_gpu=True, mixed_precision=False,
                           per_device_batch_size=1, cutoff_len=512, gradient_checkpointing=True,
                           reference_copy=False, optimizer=kind, finetuning=FinetuningArguments(**settings))
        return estimate(shape, s).parts["optimizer"] / 1e9

    adamw = state("default")
    assert adamw == pytest.approx(56.0)  # two fp32 moments of 7 B
    assert state("muon") == pytest.approx(adamw / 2, rel=0.15)  # one moment for the matrices (most of the model)
    assert state("adam_mini") == pytest.approx(adamw / 2)
    assert state("badam", badam_mode="layer") == pytest.approx(adamw / 32)
    assert state("galore", galore_rank=128) < adamw / 4  # the LLaMA-Factory example's rank on a 7 B model
    assert state("apollo", apollo_rank=1) < state("galore", galore_rank=128)


def test_a_pbt_segment_puts_its_own_learning_rate_and_weight_decay_back_after_loading_anothers_state():
    # ray-project/ray#36660: loading a checkpoint's optimizer and schedule brings back the donor's values; a pbt
    # segment keeps the loaded moments and the schedule's position, with its own (perturbed) base values.
    from transformers import get_cosine_schedule_with_warmup

    from rayft.trainers.common import reapply_hyperparameters

    def built(lr, decay):
        weights = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
        optimizer = torch.optim.AdamW([{"params": weights[:1], "weight_decay": decay},
                                       {"params": weights[1:], "weight_decay": 0.0}], lr=lr)
        return weights, optimizer, get_cosine_schedule_with_warmup(optimizer, 2, 10)

    weights, donor, donor_schedule = built(3e-3, 0.01)
    for _ in range(5):
        sum(w.sum() for w in weights).backward()
        donor.step()
        donor_schedule.step()
    _, optimizer, schedule = built(2.4e-3, 0.05)
    wanted = [(g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups]
    optimizer.load_state_dict(donor.state_dict())
    schedule.load_state_dict(donor_schedule.state_dict())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(donor.param_groups[0]["lr"])  # the donor's, as loaded
    reapply_hyperparameters(optimizer, schedule, wanted)
    factor = donor.param_groups[0]["lr"] / 3e-3
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2.4e-3 * factor] * 2)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert torch.equal(optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg"],
                       donor.state[weights[0]]["exp_avg"])  # the moments are the donor's
    schedule.step()  # and the schedule goes on from the donor's position, at the new base
    donor_schedule.step()
    assert schedule.get_last_lr()[0] == pytest.approx(donor_schedule.get_last_lr()[0] * 2.4e-3 / 3e-3)


GOLDEN = json.loads((ROOT / "tests" / "golden" / "optimizers.json").read_text())


def factory_steps(tiny_model, case: str):
    """rayft's factory over the tiny model (full fine-tuning), stepped twice as the golden file was: (the model's
    parameters before, the change of each, the model)."""
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "tools"))  # the golden file's own stepping, shared
    from lf_optimizers import step_twice, summary

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    training = Seq2SeqTrainingArguments("out", learning_rate=GOLDEN["learning_rate"], use_cpu=True, report_to=[],
                                        weight_decay=GOLDEN["weight_decay"], optim="adamw_torch")
    optimizer = build_optimizer(model, training, FinetuningArguments(finetuning_type="full", **GOLDEN["cases"][case]),
                                decay_names(model))
    step_twice(model, optimizer)
    return before, summary(model, before), model


def close(a, b) -> bool:
    return torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["galore", "apollo", "badam", "adam_mini"])
def test_two_steps_equal_llamafactorys_own_optimizer(tiny_model, case):
    """Two steps of fixed gradients through rayft's factory against LLaMA-Factory 0.9.5's create_custom_optimizer
    with the same keys (tools/lf_optimizers.py, run in a LLaMA-Factory environment): every parameter's change. One
    difference on purpose: LLaMA-Factory's GaLore and APOLLO decay RMSNorm weights (its rule knows only nn.LayerNorm),
    rayft keeps the Trainer's rule (no decay on norms or biases) for every optimizer; there, LLaMA-Factory's change
    is rayft's plus the decay term, -lr * wd * p at each step."""
    before, ours, _ = factory_steps(tiny_model, case)
    theirs = GOLDEN["steps"][case]
    assert list(ours) == list(theirs)
    far = {name for name in ours if not close(ours[name], theirs[name])}
    norms = {name for name in ours if "norm" in name}
    assert far == (norms if case in ("galore", "apollo") else set()), far
    decay = GOLDEN["learning_rate"] * GOLDEN["weight_decay"]
    for name in far:  # the sums: two steps of decay on weights that moved by about 1e-3
        assert theirs[name][0] - ours[name][0] == pytest.approx(-decay * 2 * before[name].sum().item(), rel=1e-3)


def test_muon_equals_torchs_own_muon_and_adamw_and_llamafactorys_up_to_its_bf16_iteration(tiny_model):
    """rayft's Muon is torch's own (Newton-Schulz in fp32, the update scaled to AdamW's RMS) over the matrices and
    torch's AdamW over embeddings, head, norms and biases: equal to the two built directly. LLaMA-Factory bundles a
    Muon that iterates in bf16 and puts AdamW's epsilon before the bias correction; its change of every parameter
    points the same way as rayft's (cosine above 0.99 over its first entries) and is within 1% in size."""
    _, ours, model = factory_steps(tiny_model, "muon")
    sys.path.insert(0, str(ROOT / "tools"))
    from lf_optimizers import step_twice, summary
    from transformers import AutoModelForCausalLM

    direct = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in direct.named_parameters()}
    matrices = [p for n, p in direct.named_parameters() if p.dim() == 2 and "embed" not in n and "lm_head" not in n]
    rest = [p for p in direct.parameters() if all(p is not m for m in matrices)]
    lr, wd = GOLDEN["learning_rate"], GOLDEN["weight_decay"]
    step_twice(direct, Chained([torch.optim.Muon(matrices, lr=lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw"),
                                torch.optim.AdamW(rest, lr=lr, weight_decay=wd)]))
    assert all(close(ours[n], v) for n, v in summary(direct, before).items())
    for name, (_total, size, *first) in GOLDEN["steps"]["muon"].items():
        assert ours[name][1] == pytest.approx(size, rel=0.01), name
        assert torch.nn.functional.cosine_similarity(torch.tensor(ours[name][2:]), torch.tensor(first), dim=0) > 0.99
