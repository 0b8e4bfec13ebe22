"""Stage ppo: its recipe rules and planning, the reward and reference paths agreeing with each other, and
PPO runs on a local Ray cluster (2 workers) that raise the reward of the reward model `stage: rm` trained.

PPO's arithmetic (GAE, clipped losses, KL control) and the api reward client are tested in test_rl.py.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, train_recipe

from rayft.recipe.loading import load_recipe
from rayft.recipe.parse import parse_config
from rayft.recipe.problems import ConfigError
from rayft.recipe.rules import reward_model_problems
from rayft.recipe.values import read_log

PPO_RECIPE = ROOT / "configs" / "demo_ppo_lora.yaml"
# The stated margin: the mean reward of a run's last four steps exceeds that of its first four by this much.
# (Measured on this machine: +0.84 and +0.44 for seeds 42 and 7 with the demo recipe's 16 steps; the tests train
# 12, which the constant learning rate makes the same first 12 steps: +0.54 and +0.72 for the two runs below.)
REWARD_MARGIN = 0.3
STEPS = 12  # each run's, of the demo recipe's 16: the suite's budget
ACTOR_STEPS = 4  # the run whose reward model is an actor group of its own


def ppo_problems(*overrides) -> list[str]:
    try:
        parse_config(load_recipe(PPO_RECIPE, list(overrides)), base_dir=ROOT)
    except ConfigError as err:
        return err.messages
    return []


@pytest.mark.unit
def test_a_ppo_recipe_reads_generation_settings_and_refuses_what_ppo_cannot_use():
    cfg = parse_config(load_recipe(PPO_RECIPE, []), base_dir=ROOT)
    assert cfg.finetuning.use_ref_model and cfg.generating.temperature == 0.2
    assert ppo_problems("reward_model=null")[0].startswith("reward_model: stage ppo needs a reward model")
    assert "http:// or https://" in ppo_problems("reward_model_type=api")[0]
    assert ppo_problems("reward_model_type=api", "reward_model=http://127.0.0.1:1/score") == []
    (problem,) = ppo_problems("finetuning_type=full")
    assert problem.startswith("reward_model_type and finetuning_type: a lora reward model is an adapter")
    assert ppo_problems("reward_model_workers=1")[0].startswith("reward_model_workers: a separate group")
    assert ppo_problems("reward_model_resources={CPU: 1}")[0].startswith("reward_model_resources: only read")
    # (default_system is a data key, as in LLaMA-Factory: PPO's prompts read it like every stage's)
    found = ppo_problems("deepspeed=z2", "eval_dataset=demo_sft_eval", "num_beams=2", "ppo_epochs=0",
                         "skip_special_tokens=false", "default_system=hi")
    assert [p.split(":")[0] for p in found] == ["ppo_epochs", "deepspeed", "eval_dataset", "num_beams",
                                                 "skip_special_tokens"]
    assert ppo_problems("reward_model_adapters=x")[0].startswith("reward_model_adapters and stage and "
                                                                 "reward_model_type")
    # PPO keys in another stage, and the actor group outside PPO
    assert parse_problems("ppo_epochs=2")[0].startswith("ppo_epochs and stage: ppo_epochs is only used with stage: ppo")
    assert parse_problems("reward_model_workers=1") == ["reward_model_workers: only read by stage ppo (reward "
                                                        "model actors); remove reward_model_workers"]


def parse_problems(*overrides) -> list[str]:
    try:
        parse_config(load_recipe(ROOT / "configs" / "demo_sft_lora.yaml", list(overrides)), base_dir=ROOT)
    except ConfigError as err:
        return err.messages
    return []


@pytest.mark.unit
def test_the_reward_model_folders_are_checked_before_ray(tmp_path):
    cfg = parse_config(load_recipe(PPO_RECIPE, [f"reward_model={tmp_path}"]), base_dir=ROOT)
    (problem,) = map(str, reward_model_problems(cfg))
    assert problem.startswith(f"reward_model: {tmp_path} holds no reward adapter")
    cfg = parse_config(load_recipe(PPO_RECIPE, [f"reward_model={tmp_path}", "reward_model_type=full",
                                                "finetuning_type=full", f"reward_model_adapters={tmp_path}"]),
                       base_dir=ROOT)
    assert [p.key for p in reward_model_problems(cfg)] == ["reward_model", "reward_model_adapters"]


@pytest.mark.unit
def test_a_ppo_step_counts_its_rollout_batch_and_the_reward_actors_must_fit():
    from rayft.orchestrator.plan import make_plan
    from rayft.recipe.plan import Node

    node = [Node("n1", "10.0.0.1", {"CPU": 4.0})]
    cfg = parse_config(load_recipe(PPO_RECIPE, ["max_steps=-1", "num_train_epochs=1", "ppo_buffer_size=2",
                                                "per_device_train_batch_size=4"]), base_dir=ROOT)
    plan = make_plan(cfg, node, 128)  # 64 prompts per worker, 4 x 2 per step
    assert plan.steps_per_epoch == 8 and plan.total_steps == 8
    assert any(n.startswith("ppo: each step answers 8 prompts per worker") for n in plan.notes)
    full = ["reward_model_type=full", "reward_model_workers=2", "reward_model_resources={CPU: 2}"]
    cfg = parse_config(load_recipe(PPO_RECIPE, full), base_dir=ROOT)
    with pytest.raises(ConfigError, match="2 reward actor"):
        make_plan(cfg, node, 128)  # 2 workers x 1 CPU + 2 actors x 2 CPUs > 4
    cfg = parse_config(load_recipe(PPO_RECIPE, full[:2] + ["reward_model_resources={CPU: 1}"]), base_dir=ROOT)
    assert make_plan(cfg, node, 128).num_workers == 2


@pytest.mark.unit
def test_a_ppo_sweep_maximises_the_reward_and_keeps_the_reward_model_in_the_workers(tmp_path):
    from rayft.orchestrator.sweep_spec import check_sweep

    def sweep(*overrides):
        raw = load_recipe(PPO_RECIPE, [f"output_dir={tmp_path / 'sweep'}",
                                       "sweep.parameters.learning_rate.grid=[1e-3,2e-3]",
                                       "reward_model=http://127.0.0.1:1", "reward_model_type=api", *overrides])
        return check_sweep(raw, base_dir=ROOT)

    checked = sweep()
    assert (checked.spec.metric, checked.spec.mode, len(checked.configs)) == ("reward", "max", 2)
    with pytest.raises(ConfigError, match="sweep.mode: 'reward' is PPO's mean reward"):
        sweep("sweep.metric=reward", "sweep.mode=min")
    with pytest.raises(ConfigError, match="reward_model_workers: a sweep does not start"):
        sweep("reward_model_type=full", "reward_model_workers=1")


def write_rm_adapter(tiny_model: Path, folder: Path) -> Path:
    """A reward adapter as `stage: rm` saves one (LoRA + score head, value_head.safetensors), untrained but
    not zero, so that scores differ between texts."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from rayft.trainers.rm import save_value_head

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    model.save_pretrained(folder)
    save_value_head(str(folder))
    return folder


@pytest.mark.unit
def test_lora_full_and_actor_rewards_and_references_agree(tiny_model, tmp_path):
    """The same reward adapter scores alike as a second adapter on the policy (lora), merged into a whole model
    (full) and on a reward actor; the reference agrees in the worker and on the actor."""
    from rayft.trainers.model import load_tokenizer, prepare_model
    from rayft.trainers.ppo import AdapterOff, FrozenCopy, PolicyWithValueHead
    from rayft.trainers.rewards import AdapterReward, ModelReward, RewardServer, response_logprobs

    adapter = write_rm_adapter(tiny_model, tmp_path / "rm")
    cfg = parse_config(load_recipe(PPO_RECIPE, [f"model_name_or_path={tiny_model}", f"reward_model={adapter}"]),
                       base_dir=ROOT)
    tokenizer = load_tokenizer(cfg.model)
    texts = ["<|im_start|>user\nWhat is one plus four?<|im_end|>\n"
             "<|im_start|>assistant\nOne plus four is five.<|im_end|>",
             "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nred",
             "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\nI do not know.<|im_end|>"]
    sequences = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    policy = prepare_model(cfg, use_gpu=False)
    as_adapter = AdapterReward(policy, str(adapter), tokenizer.pad_token_id, "cpu")(texts, sequences)
    assert all(p.requires_grad for n, p in policy.named_parameters() if ".default." in n)  # policy trainable again
    assert not any(p.requires_grad for n, p in policy.named_parameters() if ".reward." in n)

    full = parse_config(load_recipe(PPO_RECIPE, [f"model_name_or_path={tiny_model}", "reward_model_type=full",
                                                 f"reward_model={tiny_model}", f"reward_model_adapters={adapter}",
                                                 "finetuning_type=full"]), base_dir=ROOT)
    as_model = ModelReward(full, use_gpu=False)(texts, sequences)
    server = RewardServer(full.to_dict(mask_secrets=False), use_gpu=False, with_reference=True)
    on_actor = torch.tensor(server.score(texts))
    assert torch.allclose(as_adapter, as_model, atol=1e-4) and torch.allclose(as_model, on_actor, atol=1e-5)
    assert as_model.std() > 1e-3  # the texts score differently

    # A rollout's layout: left-padded prompts, then right-padded responses; log-probabilities of the responses.
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 0], [3, 4, 5, 6, 9, 10, 11]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])
    in_worker = FrozenCopy(full, use_gpu=False, device="cpu")(ids, mask, 4, 0.5)
    assert torch.allclose(in_worker, torch.as_tensor(server.reference_logprobs(ids.numpy(), mask.numpy(), 4, 0.5)))
    model = PolicyWithValueHead(policy).eval()
    with torch.no_grad():
        logits, values = model(ids, mask)
        by_hand = torch.log_softmax(logits[1, 3].float() / 0.5, -1)[9]  # the token after the prompt's last
        assert response_logprobs(logits, ids, 4, 0.5)[1, 0] == pytest.approx(by_hand.item(), abs=1e-6)
        assert values.shape == ids.shape
        # the base model without the adapter: a fresh LoRA adapter starts as the identity
        assert torch.allclose(AdapterOff(policy)(ids, mask, 4, 1.0), response_logprobs(logits, ids, 4, 1.0), atol=1e-5)


def mean(values):
    return sum(values) / len(values)


def ppo_run(tmp_path, tiny_model, *overrides) -> tuple[Path, list[dict]]:
    out, _ = train_recipe(PPO_RECIPE, tmp_path, tiny_model, *overrides)
    return out, [r for r in read_log(out) if "reward" in r]


def assert_reward_rises(records: list[dict]) -> None:
    rewards = [r["reward"] for r in records]
    print("rewards per step:", [round(r, 2) for r in rewards])
    assert len(rewards) == STEPS
    assert mean(rewards[-4:]) >= mean(rewards[:4]) + REWARD_MARGIN, rewards


@pytest.mark.slow
def test_ppo_with_a_lora_reward_model_raises_the_reward_saves_and_resumes(tmp_path, tiny_model, reward_run,
                                                                          rayft_log):
    rm_dir, _ = reward_run
    out, records = ppo_run(tmp_path, tiny_model, f"reward_model={rm_dir}", "ray_run_name=ppo-lora",
                           f"max_steps={STEPS}", "save_steps=6")
    assert_reward_rises(records)
    for key in ("reward", "kl", "policy_loss", "value_loss", "response_length", "kl_coef", "loss"):
        assert all(key in r for r in records), key
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert (out / "training_reward.png").is_file() and (out / "training_kl.png").is_file()
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_steps"] == STEPS and results["train_reward"] == records[-1]["reward"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]

    # The policy adapter loads with PEFT (the reward adapter is not saved with it); the value head beside it.
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    assert not (out / "reward").exists()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    assert any(n.endswith("lora_B.default.weight") and p.abs().sum() > 0 for n, p in policy.named_parameters())
    assert load_file(out / "value_head.safetensors")["v_head.summary.weight"].shape == (1, 256)

    # The same run name and storage again with more steps: PPO resumes from its checkpoint at step 12, and the
    # driver says in one line that the recipe it resumes with differs from the checkpoint's in max_steps
    assert yaml.safe_load((out / "checkpoint-12" / "training_args.yaml").read_text())["max_steps"] == STEPS
    out, records = ppo_run(tmp_path, tiny_model, f"reward_model={rm_dir}", "ray_run_name=ppo-lora",
                           f"max_steps={STEPS + 2}", "save_steps=6")
    changed = [line for line in rayft_log if "in keys that change training" in line]
    assert len(changed) == 1 and changed[0].endswith(f"max_steps: {STEPS} -> {STEPS + 2} (the run goes on with the "
                                                     "new values)"), changed
    log = read_log(out)
    assert any(r["step"] == STEPS and r.get("resumed_from_step") == STEPS and r["world_size"] == 2 for r in log)
    assert [r["step"] for r in records] == list(range(1, STEPS + 3))
    assert records[STEPS]["kl_coef"] == pytest.approx(records[STEPS - 1]["kl_coef"], rel=0.05)  # not 0.2 again


@pytest.mark.slow
def test_ppo_with_the_reward_model_in_its_own_actor_group(tmp_path, tiny_model, reward_run):
    # A full reward model (base + the rm run's adapter merged); the same model inside the workers scores alike
    # (test_lora_full_and_actor_rewards_and_references_agree), so one run trains with it, in its actor group. The
    # reward's rise is the lora run's to show (the same loop, scored alike): this one is about where the scores
    # come from, and four steps show that (the suite's budget)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rm_dir, _ = reward_run
    out, records = ppo_run(tmp_path, tiny_model, "reward_model_type=full", f"reward_model={tiny_model}",
                           f"reward_model_adapters={rm_dir}", "reward_model_workers=1",
                           "reward_model_resources={CPU: 1}", "resources_per_worker={CPU: 0.5}",
                           "report_to=tensorboard", f"max_steps={ACTOR_STEPS}", "use_muon=true")
    # (with Muon from the optimizer factory: the online loop's optimizer on two workers beyond AdamW)
    assert [r["step"] for r in records] == list(range(1, ACTOR_STEPS + 1))
    assert all(math.isfinite(r["reward"]) for r in records) and records[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    (run_dir,) = (out / "runs").iterdir()  # the tracker sees every logged step, as trainer_log.jsonl does
    events = EventAccumulator(str(run_dir))
    events.Reload()
    logged = events.Scalars("train/reward")
    assert [e.step for e in logged] == [r["step"] for r in records]
    assert [e.value for e in logged] == pytest.approx([r["reward"] for r in records], rel=1e-5)
    (actor,) = json.loads((out / "reward_actors.json").read_text())
    assert actor["calls"] == 2 * ACTOR_STEPS  # every step of both workers was scored there
    workers = {w["node_id"] for w in json.loads((out / "placement.json").read_text())}
    assert actor["node_id"] in workers  # one machine here; on a cluster reward_model_resources may pick a node
    (state,) = (out / f"checkpoint-{ACTOR_STEPS}").glob("*_state.pt")  # Muon's momenta and AdamW's moments
    optimizers = torch.load(state, weights_only=False)["optimizer"]["optimizers"]
    assert len(optimizers) == 2 and all("momentum_buffer" in s for s in optimizers[0]["state"].values())
