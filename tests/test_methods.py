"""What each fine-tuning type trains, counted against the tiny model's shapes (no Ray needed).

The tiny Qwen2 model: hidden 256, 4 blocks, q/o 256->256 (q with bias), k/v 256->128 (with bias),
gate/up 256->682, down 682->256, two RMSNorms per block, tied embeddings.
"""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rayft.recipe.schema import FinetuningArguments, ModelArguments
from rayft.trainers import model as methods

pytestmark = pytest.mark.unit

# (in_features, out_features, has_bias) of every linear layer in one block
LINEARS = {"q_proj": (256, 256, True), "k_proj": (256, 128, True), "v_proj": (256, 128, True),
           "o_proj": (256, 256, False), "gate_proj": (256, 682, False), "up_proj": (256, 682, False),
           "down_proj": (682, 256, False)}
BLOCKS = 4
BLOCK_PARAMS = sum(i * o + (o if b else 0) for i, o, b in LINEARS.values()) + 2 * 256


def prepared(tiny_model, value_head=False, **finetuning):
    f = FinetuningArguments(**finetuning)
    if f.lora_alpha is None:
        f.lora_alpha = 2 * f.lora_rank
    m = ModelArguments(model_name_or_path=str(tiny_model), disable_gradient_checkpointing=True)
    model = methods.load_model(m, use_gpu=False, pure_bf16=f.pure_bf16, value_head=value_head)
    return methods.FINETUNING[f.finetuning_type](model, f, m)


def trainable(model):
    return methods.trainable_counts(model)[0]


def trainable_names(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_lora_trains_rank_times_in_plus_out_per_targeted_layer(tiny_model):
    expected = BLOCKS * sum(8 * (i + o) for i, o, _ in LINEARS.values())
    assert trainable(prepared(tiny_model, lora_rank=8)) == expected == 147392


def test_lora_on_named_targets_only(tiny_model):
    model = prepared(tiny_model, lora_rank=4, lora_target="q_proj,v_proj")
    assert trainable(model) == BLOCKS * (4 * (256 + 256) + 4 * (256 + 128))


def test_rslora_keeps_the_count_and_scales_by_alpha_over_sqrt_rank(tiny_model):
    model = prepared(tiny_model, lora_rank=16, lora_alpha=8, use_rslora=True)
    assert trainable(model) == BLOCKS * sum(16 * (i + o) for i, o, _ in LINEARS.values())
    q = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert q.scaling["default"] == pytest.approx(8 / 16 ** 0.5)


def test_dora_adds_one_magnitude_per_output_feature(tiny_model):
    lora = BLOCKS * sum(8 * (i + o) for i, o, _ in LINEARS.values())
    magnitudes = BLOCKS * sum(o for _, o, _ in LINEARS.values())
    assert trainable(prepared(tiny_model, use_dora=True)) == lora + magnitudes


def test_pissa_init_moves_the_principal_components_into_the_adapter(tiny_model):
    base = methods.load_model(ModelArguments(model_name_or_path=str(tiny_model)), use_gpu=False)
    model = prepared(tiny_model, pissa_init=True, pissa_iter=-1, lora_target="q_proj")
    assert trainable(model) == BLOCKS * 8 * (256 + 256)
    ids = torch.arange(1, 20).unsqueeze(0)
    with torch.no_grad():  # residual + adapter reproduce the original weights
        assert torch.allclose(model(ids).logits, base(ids).logits, atol=1e-4)
        q = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
        assert q.lora_B["default"].weight.abs().sum() > 0  # unlike plain LoRA's zero-initialised B


def test_oft_trains_a_skew_symmetric_block_per_block_of_input_features(tiny_model):
    block = 2
    per_block = block * (block - 1) // 2
    expected = BLOCKS * sum(i // block * per_block for i, _, _ in LINEARS.values())
    assert trainable(prepared(tiny_model, finetuning_type="oft", oft_block_size=block)) == expected


@pytest.mark.parametrize("layers, trained", [(2, [2, 3]), (-1, [0]), (10, [0, 1, 2, 3])])
def test_freeze_trains_the_last_or_first_blocks(tiny_model, layers, trained):
    model = prepared(tiny_model, finetuning_type="freeze", freeze_trainable_layers=layers)
    assert trainable(model) == len(trained) * BLOCK_PARAMS
    assert {int(n.split(".")[2]) for n in trainable_names(model)} == set(trained)


def test_freeze_modules_and_extra_modules(tiny_model):
    model = prepared(tiny_model, finetuning_type="freeze", freeze_trainable_layers=1,
                     freeze_trainable_modules="mlp", freeze_extra_modules="norm")
    mlp = sum(i * o for name, (i, o, _) in LINEARS.items() if name.endswith(("gate_proj", "up_proj", "down_proj")))
    assert trainable(model) == mlp + 256
    assert all(".3.mlp." in n or n == "model.norm.weight" for n in trainable_names(model))


def test_freeze_refuses_unknown_module_names(tiny_model):
    with pytest.raises(ValueError, match="freeze_trainable_modules.*choose from"):
        prepared(tiny_model, finetuning_type="freeze", freeze_trainable_modules="attention")
    with pytest.raises(ValueError, match="freeze_extra_modules.*choose from"):
        prepared(tiny_model, finetuning_type="freeze", freeze_extra_modules="vision_tower")


def test_full_trains_everything(tiny_model):
    model = prepared(tiny_model, finetuning_type="full")
    vocab = model.config.vocab_size
    total = BLOCKS * BLOCK_PARAMS + vocab * 256 + 256  # blocks, tied embeddings, final norm
    assert methods.trainable_counts(model) == (total, total)


def test_pure_bf16_loads_bf16_weights(tiny_model):
    model = prepared(tiny_model, finetuning_type="full", pure_bf16=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_value_head_lora_also_trains_the_scalar_head(tiny_model):
    model = prepared(tiny_model, value_head=True)
    lora = BLOCKS * sum(8 * (i + o) for i, o, _ in LINEARS.values())
    assert trainable(model) == lora + 256  # score: Linear(256 -> 1, no bias)
    freeze = prepared(tiny_model, value_head=True, finetuning_type="freeze", freeze_trainable_layers=1)
    assert trainable(freeze) == BLOCK_PARAMS + 256


def test_continuing_and_stacking_adapters(tiny_model, tmp_path):
    first = prepared(tiny_model, lora_rank=4)
    with torch.no_grad():
        for name, param in first.named_parameters():
            if "lora_B" in name:
                param.normal_()
    first.save_pretrained(tmp_path / "first")
    m = ModelArguments(model_name_or_path=str(tiny_model), adapter_name_or_path=str(tmp_path / "first"),
                       disable_gradient_checkpointing=True)
    ids = torch.arange(1, 20).unsqueeze(0)
    with torch.no_grad():
        expected = first(ids).logits

    continued = methods.apply_lora(methods.load_model(m, use_gpu=False), FinetuningArguments(lora_alpha=16), m)
    assert trainable(continued) == BLOCKS * sum(4 * (i + o) for i, o, _ in LINEARS.values())  # rank 4, as saved
    stacked = methods.apply_lora(methods.load_model(m, use_gpu=False),
                                 FinetuningArguments(lora_alpha=16, create_new_adapter=True), m)
    assert trainable(stacked) == BLOCKS * sum(8 * (i + o) for i, o, _ in LINEARS.values())  # a new rank-8 one
    with torch.no_grad():
        assert torch.allclose(continued(ids).logits, expected, atol=1e-5)
        assert torch.allclose(stacked(ids).logits, expected, atol=1e-4)  # merged + a zero-initialised adapter


def test_pissa_convert_gives_a_plain_lora_adapter_for_the_original_base(tiny_model, tmp_path):
    from peft import PeftModel

    model = prepared(tiny_model, pissa_init=True, pissa_iter=-1, lora_target="q_proj,down_proj")
    methods.save_pissa_init(model, tmp_path)
    with torch.no_grad():  # stands in for training
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))
    converted = methods.save_pissa_converted(model, tmp_path)
    base = methods.load_model(ModelArguments(model_name_or_path=str(tiny_model)), use_gpu=False)
    plain = PeftModel.from_pretrained(base, converted).eval()
    ids = torch.arange(1, 20).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-4)
    q = plain.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert q.lora_A["default"].weight.shape[0] == 16  # the converted adapter has twice the rank


def test_loraplus_gives_the_b_matrices_a_larger_learning_rate(tiny_model):
    from transformers import TrainingArguments

    from rayft.trainers.optimizers import build_optimizer

    model = prepared(tiny_model, lora_target="q_proj")
    finetuning = FinetuningArguments(loraplus_lr_ratio=16.0)
    optimizer = build_optimizer(model, TrainingArguments("out", learning_rate=1e-4, weight_decay=0.0), finetuning,
                                set())
    by_rate = sorted((g["lr"], sum(p.numel() for p in g["params"])) for g in optimizer.param_groups)
    assert by_rate == [(pytest.approx(1e-4), BLOCKS * 8 * 256), (pytest.approx(16e-4), BLOCKS * 256 * 8)]  # A, B


def test_module_names_are_checked_on_the_driver_against_an_empty_model(tiny_model, tmp_path):
    from conftest import DEMO_RECIPE, ROOT

    from rayft.recipe.loading import load_recipe
    from rayft.recipe.parse import parse_config
    from rayft.recipe.problems import ConfigError
    from rayft.trainers.probe import probe_model

    def found(*overrides):
        cfg = parse_config(load_recipe(DEMO_RECIPE, [f"model_name_or_path={tiny_model}",
                                                     f"output_dir={tmp_path / 'out'}", *overrides]), base_dir=ROOT)
        try:
            probe_model(cfg)
        except ConfigError as err:
            return err.messages
        return []

    assert found() == [] and found("lora_target=q_proj,v_proj", "additional_target=lm_head") == []
    (problem,) = found("lora_target=q_proj,query_key_value")
    assert problem.startswith("lora_target: query_key_value not found in Qwen2ForCausalLM") and "gate_proj" in problem
    assert found("finetuning_type=oft", "oft_target=qkv")[0].startswith("oft_target: qkv not found")
    assert "freeze_trainable_modules" in found("finetuning_type=freeze", "freeze_trainable_modules=attn")[0]
    assert found("stage=rm", "dataset=demo_dpo", "additional_target=score") == []
    assert found(f"model_name_or_path={tmp_path}")[0].startswith("model_name_or_path: cannot read a model config")
    assert found("profile_modules='*.layers.0.self_attn'") == []
    assert found("profile_modules='*.blocks.0.attn'")[0].startswith(
        "profile_modules: *.blocks.0.attn matches no module")
    assert not (tmp_path / "out").exists()


def test_profile_modules_times_the_matching_modules_forward_and_backward(tiny_model, tmp_path):
    import json
    from types import SimpleNamespace

    from rayft.trainers.callbacks import ModuleTimes

    model = prepared(tiny_model, finetuning_type="lora", lora_target="all")  # PEFT's names: base_model.model.model...
    times = ModuleTimes(["*.layers.0.self_attn", "model.layers.1.mlp"], str(tmp_path), rank=0)
    times.on_train_begin(None, None, None, model=model)
    assert len(times.handles) == 4 * 2
    for step in (1, 2):
        for _ in range(3):  # three micro-batches a step
            model(input_ids=torch.arange(16).view(2, 8), labels=torch.arange(16).view(2, 8)).loss.backward()
        times.on_step_end(None, None, None)
        if step == 2:
            times.on_log(None, SimpleNamespace(global_step=step), None)
    times.on_train_end(None, None, None)
    (record,) = [json.loads(line) for line in (tmp_path / "module_times.jsonl").read_text().splitlines()]
    assert record["step"] == 2 and sorted(record["modules"]) == ["base_model.model.model.layers.0.self_attn",
                                                                 "base_model.model.model.layers.1.mlp"]
    assert all(t["calls"] == 6 and t["forward_ms"] > 0 and t["backward_ms"] > 0 for t in record["modules"].values())
    model(input_ids=torch.arange(8).view(1, 8))  # the hooks are gone after training
    assert times.times == {}


def test_an_explicit_reference_model_merges_its_adapters(tiny_model, tmp_path):
    from conftest import DEMO_RECIPE, ROOT

    from rayft.recipe.loading import load_recipe
    from rayft.recipe.parse import parse_config

    adapter = prepared(tiny_model, lora_rank=4)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if "lora_B" in name:
                param.normal_()
    adapter.save_pretrained(tmp_path / "ref_adapter")
    cfg = parse_config(load_recipe(DEMO_RECIPE, [
        f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'out'}", "stage=dpo", "dataset=demo_dpo",
        f"ref_model={tiny_model}", f"ref_model_adapters={tmp_path / 'ref_adapter'}"]), base_dir=ROOT)
    from rayft.trainers.reference import Reference

    reference = Reference(cfg, use_gpu=False)
    assert reference.model is not None and not any(p.requires_grad for p in reference.model.parameters())
    ids = torch.arange(1, 20).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(reference.model(ids).logits, adapter(ids).logits, atol=1e-4)


def test_a_separate_reference_or_reward_model_loads_in_8_bits(tiny_model, tmp_path):
    """ref_model_quantization_bit and reward_model_quantization_bit (LLaMA-Factory's keys): the frozen copies load
    through bitsandbytes and score close to their full-precision selves; where there is nothing to quantise, or
    ZeRO-3 would partition it, the recipe is refused."""
    from conftest import DEMO_RECIPE, ROOT
    from transformers import AutoModelForCausalLM

    from rayft.recipe.loading import load_recipe
    from rayft.recipe.parse import parse_config
    from rayft.recipe.problems import ConfigError
    from rayft.trainers.reference import Reference
    from rayft.trainers.rewards import load_reward_model

    def config(*overrides):
        return parse_config(load_recipe(DEMO_RECIPE, [f"model_name_or_path={tiny_model}", "deepspeed=z2",
                                                      f"output_dir={tmp_path / 'out'}", *overrides]), base_dir=ROOT)

    reference = Reference(config("stage=dpo", "dataset=demo_dpo", "finetuning_type=full",
                                 "ref_model_quantization_bit=8"), use_gpu=False)
    # (8 bits here: bitsandbytes' CPU kernel for 4 bits without gradients needs dimensions of whole blocks, and the
    # tiny model's MLP is 682 wide; the training runs' QLoRA path trains the 4-bit base with gradients)
    linears = {type(m).__name__ for m in reference.model.modules() if "Linear" in type(m).__name__}
    assert "Linear8bitLt" in linears
    ids = torch.arange(1, 20).unsqueeze(0)
    with torch.no_grad():
        full = AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits
        assert (reference.model(ids).logits - full).abs().mean() < 0.05 * full.abs().mean()
    reward, _ = load_reward_model(config("stage=ppo", "deepspeed=null", "reward_model_type=full",
                                         f"reward_model={tiny_model}", "reward_model_quantization_bit=4"),
                                  use_gpu=False)
    assert any(type(m).__name__ == "Linear4bit" for m in reward.modules())  # loaded; scored on GPUs or whole blocks
    for overrides, expected in [
            (("stage=dpo", "dataset=demo_dpo", "ref_model_quantization_bit=4"), "ref_model_quantization_bit: there is"),
            (("stage=dpo", "dataset=demo_dpo", "finetuning_type=full", "ref_model_quantization_bit=4", "deepspeed=z3"),
             "ref_model_quantization_bit and deepspeed: ZeRO-3"),
            (("ref_model_quantization_bit=3",), "ref_model_quantization_bit: bitsandbytes loads 4 or 8 bits"),
            (("stage=ppo", "deepspeed=null", f"reward_model={tmp_path}", "reward_model_quantization_bit=4"),
             "reward_model_quantization_bit: quantises a full reward model")]:
        with pytest.raises(ConfigError) as err:
            config(*overrides)
        assert any(m.startswith(expected) for m in err.value.messages), err.value.messages


def test_model_options_from_scratch_upcast_norms_and_head_and_print_the_parameters(tiny_model):
    from conftest import DEMO_RECIPE, ROOT, captured_log

    from rayft.recipe.loading import load_recipe
    from rayft.recipe.parse import parse_config

    m = ModelArguments(model_name_or_path=str(tiny_model), disable_gradient_checkpointing=True)
    pretrained = methods.load_model(m, use_gpu=False).state_dict()
    one, two = (methods.load_model(m, use_gpu=False, scratch_seed=7).state_dict() for _ in range(2))
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(one[name], two[name]) and not torch.equal(one[name], pretrained[name])  # seeded, random
    upcast = ModelArguments(model_name_or_path=str(tiny_model), disable_gradient_checkpointing=True,
                            upcast_layernorm=True, upcast_lmhead_output=True)
    model = methods.load_model(upcast, use_gpu=False, dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["model.norm.weight"] == dtypes["model.layers.0.input_layernorm.weight"] == torch.float32
    assert dtypes[name] == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as bf16 mixed-precision training runs it
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.dtype == torch.float32  # the head's output upcast

    cfg = parse_config(load_recipe(DEMO_RECIPE, [f"model_name_or_path={tiny_model}", "print_param_status=true",
                                                 "train_from_scratch=true"]), base_dir=ROOT)
    with captured_log() as lines:
        model = methods.prepare_model(cfg, use_gpu=False)
    shown = [line for line in lines if line.startswith("parameter ")]
    assert len(shown) == len(list(model.named_parameters()))
    assert any(line.endswith("lora_A.default.weight: torch.float32, cpu, trainable") for line in shown)
    assert any(line.endswith("mlp.up_proj.base_layer.weight: torch.float32, cpu, frozen") for line in shown)
    base = model.get_base_model().state_dict()
    assert not torch.equal(base["model.layers.0.mlp.up_proj.base_layer.weight"], pretrained[name])  # from scratch


def test_adapter_folder_reads_each_adapter_from_its_subfolder(tiny_model, tmp_path):
    from conftest import DEMO_RECIPE, ROOT

    from rayft.recipe.loading import load_recipe
    from rayft.recipe.parse import parse_config
    from rayft.recipe.problems import ConfigError

    prepared(tiny_model, lora_target="q_proj").save_pretrained(tmp_path / "run" / "sub")

    def recipe(*overrides):
        return parse_config(load_recipe(DEMO_RECIPE, [f"model_name_or_path={tiny_model}", *overrides]), base_dir=ROOT)

    cfg = recipe(f"adapter_name_or_path={tmp_path / 'run'}", "adapter_folder=sub")
    assert cfg.model.adapter_name_or_path == str(tmp_path / "run" / "sub") and cfg.model.adapter_folder is None
    # a recipe written from the resolved one (training_args.yaml, best_config.yaml) joins nothing when read again
    assert cfg.to_dict(mask_secrets=False)["adapter_folder"] is None
    again = recipe(f"adapter_name_or_path={cfg.model.adapter_name_or_path}")
    assert again.model.adapter_name_or_path == cfg.model.adapter_name_or_path
    base = methods.load_model(cfg.model, use_gpu=False)
    model, continued = methods.load_adapters(base, cfg.model, cfg.finetuning)
    assert continued and any("lora_A" in n and p.requires_grad for n, p in model.named_parameters())
    with pytest.raises(ConfigError, match="adapter_folder: names a folder inside each adapter"):
        recipe("adapter_folder=sub")


def test_moe_aux_loss_coef_adds_the_router_loss_of_a_mixture_of_experts(tiny_model, tmp_path):
    from conftest import DEMO_RECIPE, ROOT
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from rayft.recipe.loading import load_recipe
    from rayft.recipe.parse import parse_config
    from rayft.recipe.problems import ConfigError
    from rayft.trainers.probe import probe_model

    torch.manual_seed(0)
    config = Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    Qwen2MoeForCausalLM(config).save_pretrained(tmp_path / "moe")
    m = ModelArguments(model_name_or_path=str(tmp_path / "moe"), disable_gradient_checkpointing=True,
                       moe_aux_loss_coef=0.5)
    model = methods.load_model(m, use_gpu=False)
    assert model.config.output_router_logits and model.config.router_aux_loss_coef == 0.5
    ids = torch.randint(0, 64, (2, 9))
    out = model(input_ids=ids, labels=ids)
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    assert out.aux_loss > 0 and out.loss.item() == pytest.approx((lm + 0.5 * out.aux_loss).item(), rel=1e-5)
    reference = methods.load_model(m, use_gpu=False, trainable=False)  # frozen models compute no router loss
    assert not reference.config.output_router_logits

    dense = parse_config(load_recipe(DEMO_RECIPE, [f"model_name_or_path={tiny_model}", "moe_aux_loss_coef=0.01"]),
                         base_dir=ROOT)
    with pytest.raises(ConfigError, match="moe_aux_loss_coef: qwen2 is not a mixture of experts"):
        probe_model(dense)


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3"])
def test_rope_scaling_stretches_the_positions_to_cutoff_len_and_keeps_rope_theta(tiny_model, kind):
    m = ModelArguments(model_name_or_path=str(tiny_model), disable_gradient_checkpointing=True, rope_scaling=kind)
    model = methods.load_model(m, use_gpu=False, max_length=2500)  # the tiny model holds 1024 positions
    params = model.config.rope_parameters
    assert (params["rope_type"], params["factor"], params["rope_theta"]) == (kind, 3.0, 10000.0)  # ceil(2500/1024)
    assert model.config.max_position_embeddings == 3072
    assert params.get("original_max_position_embeddings") == (None if kind == "linear" else 1024)
    plain = methods.load_model(ModelArguments(model_name_or_path=str(tiny_model), disable_gradient_checkpointing=True),
                               use_gpu=False)
    scaled, own = model.model.rotary_emb, plain.model.rotary_emb  # what the attention layers rotate by
    assert scaled.rope_type == kind and own.rope_type == "default"
    if kind == "linear":  # positions divided by the factor: every frequency a third
        torch.testing.assert_close(scaled.inv_freq, own.inv_freq / 3)
    with torch.no_grad():  # a sequence beyond the model's own length runs
        assert model((torch.arange(1500) % 500 + 1).unsqueeze(0)).logits.shape == (1, 1500, 596)
    fits = methods.load_model(m, use_gpu=False, max_length=512)
    assert fits.config.rope_parameters["rope_type"] == "default" and fits.config.max_position_embeddings == 1024
    generating = methods.load_model(m, use_gpu=False, trainable=False)  # generation: twice the length
    assert generating.config.rope_parameters["factor"] == 2.0
    # the value head (stage rm) and train_from_scratch build from the same scaled config
    rm = methods.load_model(m, use_gpu=False, value_head=True, max_length=2500)
    assert rm.score.out_features == 1  # one label, as without rope_scaling
    for built in (rm, methods.load_model(m, use_gpu=False, scratch_seed=1, max_length=2500)):
        assert built.config.rope_parameters["factor"] == 3.0 and built.model.rotary_emb.rope_type == kind


def test_llama_pro_expansion_answers_as_the_original_and_trains_only_its_new_blocks(tiny_model, tmp_path):
    """`rayft expand --num-expand 2` on the 4-block model: blocks 2 and 5 are new (copies of 1 and 3 with zero
    output projections), the logits are the original's, and use_llama_pro trains those two blocks only, with freeze
    (one optimizer step changes them and nothing else) or with LoRA (its adapters sit in them alone)."""
    from transformers import AutoModelForCausalLM

    from rayft.orchestrator.cli import main
    from rayft.recipe.loading import load_recipe
    from rayft.recipe.parse import parse_config
    from rayft.recipe.problems import ConfigError
    from rayft.trainers.llama_pro import expansion_order

    assert expansion_order(4, 2) == [(0, False), (1, False), (1, True), (2, False), (3, False), (3, True)]
    assert main(["expand", str(tiny_model), str(tmp_path / "bad"), "--num-expand", "3"]) == 2
    assert not (tmp_path / "bad").exists()
    pro = tmp_path / "pro"
    assert main(["expand", str(tiny_model), str(pro), "--num-expand", "2"]) == 0
    original, expanded = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (tiny_model, pro))
    assert expanded.config.num_hidden_layers == 6
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    with torch.no_grad():
        assert torch.allclose(original(ids).logits, expanded(ids).logits, atol=1e-5)
    new = expanded.model.layers[5]
    assert not new.self_attn.o_proj.weight.any() and not new.mlp.down_proj.weight.any()
    assert torch.equal(new.self_attn.q_proj.weight, original.model.layers[3].self_attn.q_proj.weight)

    model = prepared(pro, finetuning_type="freeze", freeze_trainable_layers=2, use_llama_pro=True)
    assert {int(n.split(".")[2]) for n in trainable_names(model)} == {2, 5}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and {int(n.split(".")[2]) for n in changed} == {2, 5}
    lora = prepared(pro, finetuning_type="lora", lora_target="all", freeze_trainable_layers=2, use_llama_pro=True)
    assert {int(n.split(".")[4]) for n in trainable_names(lora)} == {2, 5}

    # before Ray: a method LLaMA Pro does not train, and a layer count the model's blocks do not divide
    with pytest.raises(ConfigError, match="use_llama_pro and finetuning_type: LLaMA Pro trains its inserted blocks"):
        parse_config({"model_name_or_path": str(pro), "dataset": "demo_sft", "output_dir": str(tmp_path / "o"),
                      "finetuning_type": "full", "use_llama_pro": True})
    from rayft.trainers.probe import probe_model

    cfg = parse_config(load_recipe(None, [f"model_name_or_path={pro}", "dataset=demo_sft", f"output_dir={tmp_path}",
                                          "use_llama_pro=true", "freeze_trainable_layers=4"]))
    with pytest.raises(ConfigError, match="freeze_trainable_layers: use_llama_pro trains .* 4 does not divide"):
        probe_model(cfg)


def test_new_tokens_encode_as_one_id_grow_the_embeddings_train_and_survive_export(tiny_model, tmp_path):
    """add_special_tokens and add_tokens as LLaMA-Factory's keys: one id each (pieces with split_special_tokens), the
    embeddings grown to a multiple of 64 with the new rows at the old rows' mean plus noise (or a description's
    mean), LoRA training the embeddings whole, and `rayft export` of the adapter keeping the tokens and rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayft.data.tokenizer import TokenizerSpec, load_tokenizer
    from rayft.orchestrator.export import run_export
    from rayft.recipe.loading import load_recipe
    from rayft.recipe.parse import parse_config
    from rayft.recipe.problems import ConfigError

    def config(*overrides):
        return parse_config(load_recipe(None, [f"model_name_or_path={tiny_model}", "dataset=demo_sft",
                                               f"output_dir={tmp_path / 'run'}", *overrides]))

    cfg = config("add_special_tokens=<|svg|>,<|/svg|>", "add_tokens=rayftword")
    assert cfg.model.resize_vocab and "resize_vocab = True (tokens are added to the vocabulary)" in cfg.notes
    tokenizer = load_tokenizer(TokenizerSpec.of(cfg.model))
    old = len(AutoTokenizer.from_pretrained(tiny_model))
    ids = tokenizer.encode("<|svg|>rayftword<|/svg|>", add_special_tokens=False)
    assert ids == [old + 1, old, old + 2]  # plain tokens are added first, as LLaMA-Factory adds them
    assert tokenizer.decode(ids) == "<|svg|>rayftword<|/svg|>"
    older = config("new_special_tokens=<|svg|>,<|/svg|>")  # the seed's name of add_special_tokens
    assert older.model.add_special_tokens == "<|svg|>,<|/svg|>" and older.model.resize_vocab
    assert "add_special_tokens = new_special_tokens (its older name)" in older.notes
    split = load_tokenizer(TokenizerSpec.of(config("add_special_tokens=<|svg|>", "split_special_tokens=true").model))
    assert len(split.encode("<|svg|>", add_special_tokens=False)) > 1

    model = methods.FINETUNING["lora"](methods.load_model(cfg.model, use_gpu=False), cfg.finetuning, cfg.model)
    rows = model.get_input_embeddings().weight
    assert rows.shape[0] == -(-(old + 3) // 64) * 64  # grown to a multiple of 64
    base = AutoModelForCausalLM.from_pretrained(tiny_model).get_input_embeddings().weight
    assert torch.equal(rows[:old], base) and (rows[old:].mean(0) - base.mean(0)).abs().mean() < 0.02
    svg = old + 1
    before = rows[svg].detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.tensor([ids * 3])
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    assert not torch.equal(model.get_input_embeddings().weight[svg], before)  # the new token's row learns
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    merged = model.merge_and_unload().eval()
    exported = run_export(parse_config(load_recipe(None, [
        f"model_name_or_path={tiny_model}", f"adapter_name_or_path={adapter}", f"export_dir={tmp_path / 'export'}"]),
        for_training=False))  # the export recipe names no tokens: the adapter's saved tokenizer brings them
    again = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert again.get_input_embeddings().weight.shape == rows.shape
    assert AutoTokenizer.from_pretrained(exported).encode("<|svg|>", add_special_tokens=False) == [svg]
    with torch.no_grad():
        assert torch.allclose(again(batch).logits, merged(batch).logits, atol=1e-4)

    described = config("new_special_tokens_config={'<|svg|>': 'rayftword'}", "init_special_tokens=desc_init")
    grown = methods.load_model(described.model, use_gpu=False).get_input_embeddings().weight
    word = load_tokenizer(TokenizerSpec.of(described.model)).encode("rayftword", add_special_tokens=False)
    assert torch.allclose(grown[old], base[word].mean(0))  # the description's (old-vocabulary) tokens' mean
    for bad, expected in [(("init_special_tokens=desc_init",), "init_special_tokens: desc_init starts each token"),
                          (("add_special_tokens=<|a|>", "deepspeed=z3"), "resize_vocab and deepspeed: growing"),
                          (("add_special_tokens=<|a|>", "new_special_tokens_config={'<|b|>': 'x'}"),
                           "add_special_tokens and new_special_tokens_config: both name"),
                          (("add_special_tokens=<|a|>", "new_special_tokens=<|b|>"),
                           "new_special_tokens and add_special_tokens: new_special_tokens is the older name")]:
        with pytest.raises(ConfigError) as err:
            config(*bad)
        assert any(m.startswith(expected) for m in err.value.messages), err.value.messages


def test_shift_attn_attends_within_groups_and_shifted_groups_without_seeing_later_tokens(tiny_model):
    """S²-Attn against a dense reference: each half of the heads is plain attention under a mask that keeps a query
    to its own group (of a quarter of the sequence), the second half's groups starting half a group later and the
    last one wrapping around; a later token never changes an earlier output. Evaluation attends whole."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from rayft.trainers.shift_attn import shifted_sparse_attention

    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 14, 8  # 14 is padded to 16: groups of 4
    query = torch.randn(batch, heads, length, dim)
    key, value = torch.randn(batch, kv_heads, length, dim), torch.randn(batch, kv_heads, length, dim)
    padding = torch.ones(batch, length, dtype=torch.bool)
    padding[1, 11:] = False  # the second row is 11 tokens long
    allowed = torch.ones(length, length, dtype=torch.bool).tril() & padding[:, None, None, :]
    module = SimpleNamespace(training=True, num_key_value_groups=heads // kv_heads, is_causal=True)

    out, _ = shifted_sparse_attention(module, query, key, value, allowed)
    group, shift = 4, 2
    pos = torch.arange(length)
    expected = []
    for h in range(heads):
        index = pos if h < heads // 2 else (pos - shift) % 16
        same = (index[:, None] // group) == (index[None, :] // group)
        mask = (allowed & same) | torch.eye(length, dtype=torch.bool)
        kv = h // (heads // kv_heads)
        expected.append(F.scaled_dot_product_attention(query[:, h:h + 1], key[:, kv:kv + 1], value[:, kv:kv + 1],
                                                       attn_mask=mask))
    expected = torch.cat(expected, dim=1).transpose(1, 2)
    valid = padding[:, :, None, None].expand_as(out)
    assert torch.allclose(out[valid], expected[valid], atol=1e-5)
    changed = key.clone()
    changed[:, :, -1] += 1.0
    later, _ = shifted_sparse_attention(module, query, changed, value, allowed)
    assert torch.allclose(later[:, :-1], out[:, :-1], atol=1e-6) and not torch.allclose(later[0, -1], out[0, -1])
    module.training = False  # evaluation: the whole causal sequence, as SDPA
    whole, _ = shifted_sparse_attention(module, query, key, value, allowed)
    assert torch.allclose(whole, F.scaled_dot_product_attention(
        query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), attn_mask=allowed).transpose(1, 2),
        atol=1e-5)

    m = ModelArguments(model_name_or_path=str(tiny_model), shift_attn=True, disable_gradient_checkpointing=True)
    model = methods.load_model(m, use_gpu=False)
    assert model.config._attn_implementation == "rayft_shift_attn"
    ids = torch.randint(0, 500, (2, 24))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.eval()
    plain = methods.load_model(replace(m, shift_attn=False), use_gpu=False).eval()
    assert torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)
    assert not torch.allclose(loss, plain(input_ids=ids, labels=ids).loss)  # in training, the groups differ
    frozen = methods.load_model(m, use_gpu=False, trainable=False)  # a reference copy attends whole
    assert frozen.config._attn_implementation != "rayft_shift_attn"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_a_tiny_qwen2_vl_is_written_locally_and_learns_from_an_image(tmp_path, family):
    """`rayft tiny-model --family qwen2_vl` (or qwen2_5_vl): Qwen2-VL's special tokens, a vision tower and its image
    processor, all loaded back through from_pretrained; an image's merged patches (its <|image_pad|> tokens) reach
    the tower."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    import rayft.data
    from rayft.trainers.tiny_model import write_tiny_model

    demo = sorted((Path(rayft.data.__file__).parent / "demo").glob("demo_*.json"))
    folder = write_tiny_model(tmp_path / "tiny-qwen2-vl", demo, family=family)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    tokenizer, processor = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    assert model.config.model_type == family and type(processor).__name__ == "Qwen2VLImageProcessorPil"
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.image_token_id == pad and len(tokenizer.encode("<|vision_start|><|image_pad|>")) == 2
    image = processor([Image.new("RGB", (100, 60), (120, 30, 200))], return_tensors="pt")
    # 60x100 -> 56x112 pixels: 4x8 patches of 14; Qwen3-VL's 16 px patches: 64x96 pixels, 4x6 patches
    grid = [1, 4, 6] if family == "qwen3_vl" else [1, 4, 8]
    assert image["image_grid_thw"].tolist() == [grid]
    tokens = grid[1] * grid[2] // 2 ** 2  # one token per 2x2 merged patches
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(["<|vision_start|>"] + ["<|image_pad|>"] * tokens +
                                                       ["<|vision_end|>"]) + tokenizer.encode("a purple picture")])
    loss = model(input_ids=ids, pixel_values=image["pixel_values"], image_grid_thw=image["image_grid_thw"],
                 mm_token_type_ids=(ids == pad).long(), labels=ids).loss
    loss.backward()
    assert 0 < loss.item() < 20 and model.model.visual.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
