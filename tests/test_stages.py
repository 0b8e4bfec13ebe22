"""The stage x method matrix on a real local Ray cluster: rm, dpo (every pref_loss), kto; freeze and full.

Preference runs evaluate on their own training pairs: pairwise accuracy there must rise well above the
0.5 of chance. Every run uses rayft's own demo data and the tiny local model.
"""

import json

import pytest
import torch
from conftest import ROOT, train_recipe

from rayft.recipe.values import read_log

CONFIGS = ROOT / "configs"
BASE_PARAMS = None  # filled from the tiny model's own count


def results(out):
    return json.loads((out / "all_results.json").read_text())


def base_parameters(tiny_model) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())


def lora_parameters(rank: int = 8) -> int:
    # q 256->256, k/v 256->128, o 256->256, gate/up 256->682, down 682->256; 4 blocks (see test_methods)
    return 4 * rank * (512 + 384 + 384 + 512 + 938 + 938 + 938)


@pytest.mark.slow
def test_reward_model_ranks_chosen_above_rejected(reward_run, tiny_model):
    out, log = reward_run
    assert results(out)["eval_accuracy"] >= 0.8  # on the training pairs; chance is 0.5
    assert log[-1]["loss"] < 0.5 * log[0]["loss"], [r["loss"] for r in log]

    # The value head is saved beside the adapter, and the adapter + head score a pair the right way round.
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    head = load_file(out / "value_head.safetensors")
    assert head["v_head.summary.weight"].shape == (1, 256)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    model = PeftModel.from_pretrained(model, out).eval()
    assert torch.equal(model.base_model.model.score.modules_to_save["default"].weight, head["v_head.summary.weight"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    pair = json.loads((ROOT / "data" / "demo" / "demo_dpo.json").read_text())[0]
    scores = []
    for response in (pair["chosen"], pair["rejected"]):
        chat = [{"role": "user", "content": pair["instruction"]}, {"role": "assistant", "content": response}]
        ids = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            scores.append(model(input_ids=ids).logits.item())
    assert scores[0] > scores[1]


@pytest.mark.slow
def test_dpo_with_lora_holds_one_copy_of_the_base_weights(tmp_path, tiny_model, ray_local, rayft_log):
    # one worker without DeepSpeed, in the driver's process: dpo on two workers is the ZeRO-3 run below
    lines = rayft_log
    # LD-DPO's weighting on the way (ld_alpha: the longer response's excess counts 0.8); bco trains in the pipeline
    out, log = train_recipe(CONFIGS / "demo_dpo_lora.yaml", tmp_path, tiny_model, "eval_dataset=demo_dpo",
                            "max_samples=96", "num_train_epochs=3", "ray_num_workers=1", "deepspeed=null",
                            "ld_alpha=0.8")
    found = results(out)
    assert found["eval_rewards/accuracies"] >= 0.8
    assert found["held_parameters"] == base_parameters(tiny_model) + lora_parameters()  # no reference copy
    assert log[-1]["loss"] < log[0]["loss"] - 0.1, [r["loss"] for r in log]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(log[-1])
    assert (out / "adapter_model.safetensors").is_file()
    assert any("[chosen]" in line and "[rejected]" in line for line in lines)  # the example shown before training
    # plot_loss draws the preference statistics too, and the final evaluation lands in the log beside them
    assert {"training_loss.png", "training_rewards_accuracies.png", "training_rewards_margins.png"} <= {
        p.name for p in out.glob("*.png")}
    assert any("eval_rewards/accuracies" in r for r in read_log(out))


@pytest.mark.slow
# sigmoid trains in test_dpo_with_lora_holds_one_copy...; hinge and kto_pair share ipo's path to the reference
# (summed instead of averaged log-probabilities, as sigmoid's run shows) and orpo simpo's length-normalised one;
# every formula is held to TRL's and LLaMA-Factory's values in test_losses.py
@pytest.mark.parametrize("loss, extra", [
    ("ipo", ("pref_beta=0.5",)), ("simpo", ("pref_beta=2.0", "simpo_gamma=0.5", "shift_attn=true")),
])
def test_every_preference_loss_learns_the_pairs(tmp_path, tiny_model, ray_local, loss, extra):
    out, log = train_recipe(CONFIGS / "demo_dpo_lora.yaml", tmp_path, tiny_model, f"pref_loss={loss}", *extra,
                            "eval_dataset=demo_dpo", "max_samples=64", "num_train_epochs=3", "ray_num_workers=1",
                            "deepspeed=null")  # one worker, no DeepSpeed: in the driver's process (local mode)
    found = results(out)
    assert found["eval_rewards/accuracies"] >= 0.8, found
    assert log[-1]["loss"] < log[0]["loss"], [r["loss"] for r in log]
    reference_free = loss in ("orpo", "simpo")
    assert found["held_parameters"] == base_parameters(tiny_model) + lora_parameters()
    if not reference_free:  # the implicit rewards start at zero: policy and reference are equal at step 0
        assert log[0]["rewards/margins"] == pytest.approx(0, abs=0.05)


@pytest.mark.slow
def test_kto_prefers_desirable_answers(tmp_path, tiny_model, ray_local):
    out, log = train_recipe(CONFIGS / "demo_kto_lora.yaml", tmp_path, tiny_model, "num_train_epochs=3",
                            "learning_rate=1e-3", "ray_num_workers=1", "deepspeed=null")  # (two workers: dpo, ZeRO-3)
    # resources_per_worker unset: the one worker holds both CPUs of the test's Ray instance and computes on both
    assert [w["threads"] for w in json.loads((out / "placement.json").read_text())] == [2]
    assert log[-1]["loss"] < log[0]["loss"] - 0.05, [r["loss"] for r in log]
    late = log[len(log) // 2:]
    assert all(r["rewards/chosen"] > r["rewards/rejected"] for r in late), late
    assert all(r["kl"] >= 0 for r in log)


@pytest.mark.slow
def test_dpo_with_full_fine_tuning_uses_a_frozen_reference_copy_under_zero3(tmp_path, tiny_model, ray_local):
    # (freeze shares this path: reference_kind is "copy" for both; test_sft_with_freeze trains freeze)
    # ZeRO-3 from LLaMA-Factory's JSON config, "auto" values and all
    ds3 = CONFIGS / "llamafactory" / "examples" / "deepspeed" / "ds_z3_config.json"
    out, log = train_recipe(CONFIGS / "demo_dpo_lora.yaml", tmp_path, tiny_model, "finetuning_type=full",
                            f"deepspeed={ds3}", "eval_dataset=demo_dpo", "max_samples=64",
                            "num_train_epochs=3", "learning_rate=2e-4")
    found = results(out)
    assert found["eval_rewards/accuracies"] >= 0.8, found
    assert found["held_parameters"] == 2 * base_parameters(tiny_model)  # policy + frozen reference
    assert log[-1]["loss"] < log[0]["loss"], [r["loss"] for r in log]
    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(out)  # a whole model, saved gathered under ZeRO-3 too
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    changed = {n.split(".")[2] for (n, p), q in zip(tuned.named_parameters(), base.parameters())
               if n.startswith("model.layers.") and not torch.equal(p, q)}
    assert changed == {"0", "1", "2", "3"}


@pytest.mark.slow
def test_sft_with_freeze_galore_and_the_profilers_on_two_workers(tmp_path, tiny_model, ray_local):
    # (full fine-tuning trains in the dpo run above, under ZeRO-3, with its whole model saved and checked). GaLore
    # here is the optimizer factory in real workers: non-layer-wise under DDP, which LLaMA-Factory does not offer
    out, log = train_recipe(CONFIGS / "demo_sft_lora.yaml", tmp_path, tiny_model, "finetuning_type=freeze",
                            "num_train_epochs=1", "deepspeed=null", "freeze_trainable_layers=2",
                            "freeze_extra_modules=norm", "use_galore=true", "galore_rank=8", "galore_scale=1.0",
                            "save_strategy=steps", "save_steps=16", "enable_torch_profiler=true",
                            "include_effective_tokens_per_second=true",
                            "profile_modules='*.layers.3.self_attn,*.layers.2.mlp'")
    assert log[-1]["loss"] < log[0]["loss"] - 0.3, [r["loss"] for r in log]
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    state = torch.load(out / "checkpoint-16" / "optimizer.pt", weights_only=False)["state"]
    projected = [s["exp_avg"].shape for s in state.values() if "projector" in s]
    assert len(projected) == 2 * 7 and (682, 8) in projected  # the last 2 blocks' linear weights, at rank 8
    results = json.loads((out / "all_results.json").read_text())  # the demo's 7930 tokens an epoch, per device
    assert results["effective_tokens_per_sec"] == pytest.approx(7930 * results["epoch"] / results["train_runtime"] / 2,
                                                                rel=0.01)
    for rank in (0, 1):  # the profiler's default schedule records step 3 of each worker
        (trace,) = (out / "profiler" / f"rank_{rank}").glob("*.pt.trace.json")
        assert '"traceEvents"' in trace.read_text()[:4000]
    # profile_modules: rank 0's forward and backward times of the two modules at every logging step (the trained
    # blocks, so their backward runs; with gradient checkpointing each forward runs twice)
    timed = [json.loads(line) for line in (out / "module_times.jsonl").read_text().splitlines()]
    assert [r["step"] for r in timed] == [r["step"] for r in log] + [16]  # 16: the steps after the last log
    assert all(sorted(r["modules"]) == ["model.layers.2.mlp", "model.layers.3.self_attn"] for r in timed)
    assert all(t["forward_ms"] > 0 and t["backward_ms"] > 0 for r in timed for t in r["modules"].values())


@pytest.mark.slow
def test_a_new_stage_is_one_spec_and_one_entry(tmp_path, tiny_model, ray_local, monkeypatch):
    """A toy stage added here, as a contributor would add one: a spec (its data, encoder, own keys and facts) and an
    entry function. The rules, the data check, the planner and the worker find it from those two alone."""
    from rayft.recipe.parse import parse_config
    from rayft.recipe.problems import ConfigError
    from rayft.recipe.stages import STAGE_SPECS, StageSpec
    from rayft.trainers.sft import run_sft
    from rayft.trainers.stages import ENTRIES

    ran = []

    def run_toy(cfg, plan):
        ran.append(cfg.finetuning.stage)
        return run_sft(cfg, plan)

    monkeypatch.setitem(STAGE_SPECS, "toy", StageSpec("supervised", "supervised", "loss", "the model or adapter",
                                                      keys=("pref_ftx", "use_asft_loss"), language_modelling=True,
                                                      reference=lambda f: f.use_asft_loss))
    monkeypatch.setitem(ENTRIES, "toy", run_toy)
    with pytest.raises(ConfigError) as err:  # a key the toy's spec claims is now refused by sft with the toy named
        parse_config({"stage": "sft", "pref_ftx": 0.5, "model_name_or_path": str(tiny_model), "dataset": "demo_sft",
                      "output_dir": str(tmp_path / "x")}, base_dir=ROOT)
    assert "pref_ftx is only used with stage: dpo or kto or toy" in str(err.value)
    # The same short run also adds a special token (the worker grows the embeddings, LoRA trains them whole) and
    # trains with ASFT's loss, whose reference model the toy's spec asks for: the policy with its adapter off
    out, log = train_recipe(CONFIGS / "demo_sft_lora.yaml", tmp_path, tiny_model, "stage=toy", "pref_ftx=0.5",
                            "packing=true", "max_steps=3", "logging_steps=1", "ray_num_workers=1", "deepspeed=null",
                            "add_special_tokens=<|toy|>", "use_asft_loss=true")
    assert ran == ["toy"] and len(log) == 3  # the toy's entry trained, in the driver's process (one worker)
    # DFT's probability-weighted loss of a random model over ~600 tokens, not its cross-entropy of about ln 600
    assert log[0]["loss"] < 0.5, log[0]
    assert "- toy" in (out / "README.md").read_text().splitlines()
    from safetensors import safe_open
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("<|toy|>") == len(tokenizer) - 1
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as saved:
        embeddings = [k for k in saved.keys() if "embed_tokens" in k]
        assert embeddings and saved.get_tensor(embeddings[0]).shape[0] == -(-len(tokenizer) // 64) * 64
