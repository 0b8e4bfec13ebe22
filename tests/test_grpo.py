"""Stage grpo: the advantage estimators and the loss against hand-computed values and against TRL's GRPOTrainer, the
verifiable rewards and their errors, the recipe's rules and plan, and runs on a local Ray cluster (2 workers and a
rollout actor, in step and a step ahead) that raise the demo task's reward.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import ROOT, train_recipe

from rayft.data.errors import DataError
from rayft.recipe.loading import load_recipe
from rayft.recipe.parse import parse_config
from rayft.recipe.problems import ConfigError
from rayft.recipe.values import read_log
from rayft.trainers import rl
from rayft.trainers.verifiable import RewardFunctionError, Rewards, extract, same_answer

GRPO_RECIPE = ROOT / "configs" / "demo_grpo_lora.yaml"
# The stated margin: the mean reward of a run's last quarter of steps exceeds that of its first quarter by this
# much. A run is deterministic (every batch is sampled with its own seed, whichever worker's request reaches the
# rollout actor first): two runs of each mode on this machine gave the same rewards step for step, a rise of +0.093
# in step and +0.152 async (2026-12-03). The margin is about half the smaller rise, for another machine's rounding.
REWARD_MARGIN = 0.05


def grpo_config(*overrides):
    return parse_config(load_recipe(GRPO_RECIPE, list(overrides)), base_dir=ROOT)


def grpo_problems(*overrides) -> list[str]:
    try:
        grpo_config(*overrides)
    except ConfigError as err:
        return err.messages
    return []


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# ---- the arithmetic ---------------------------------------------------------------------------------------

@pytest.mark.unit
def test_group_advantages_by_hand():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(4 * 0.5 ** 2 / 3)  # unbiased, as TRL's
    high, low = 0.5 / (std + 1e-4), -0.5 / (std + 1e-4)  # the second group's scores are all equal: no signal
    assert rl.group_advantages(scores, 4, "grpo").tolist() == pytest.approx([high, low, low, high, 0, 0, 0, 0])
    assert rl.group_advantages(scores, 4, "dr_grpo").tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    # RLOO: the score minus the mean of the group's other three: 1 - 1/3, 0 - 2/3
    assert rl.group_advantages(scores, 4, "rloo").tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="reinforce_pp"):
        rl.group_advantages(scores, 4, "reinforce_pp")


@pytest.mark.unit
def test_reinforce_pp_returns_are_kl_penalised_and_whitened_over_the_batch():
    scores = t(1.0, 0.0)
    logprobs, ref = t([-1.0, -1.0], [-2.0, -2.0]), t([-1.5, -1.0], [-2.0, -1.0])
    mask = t([1, 1], [1, 0])
    # per-token rewards: -0.1 x KL (0.5, 0 | 0, masked), the score on the last token; returns sum to the end
    returns = [1.0 - 0.05, 1.0, 0.0]
    mean = sum(returns) / 3
    std = math.sqrt(sum((r - mean) ** 2 for r in returns) / 3)
    got = rl.reinforce_pp_advantages(scores, logprobs, ref, mask, 0.1)
    expected = [(r - mean) / std for r in returns]
    assert got[0].tolist() == pytest.approx(expected[:2], abs=1e-6)
    assert got[1].tolist() == pytest.approx([expected[2], 0.0], abs=1e-6)
    # the normalisation is over every worker's tokens: `total` sums the three moments across them
    twice = rl.reinforce_pp_advantages(scores, logprobs, ref, mask, 0.1, total=lambda v: 2 * v)
    torch.testing.assert_close(twice, got)  # two identical workers: the same moments


@pytest.mark.unit
def test_the_clipped_surrogate_and_each_loss_aggregation_by_hand():
    logprobs = t([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    old = t([0.0, math.log(2.0), -math.log(2.0)], [0.0, 0.0, 0.0])  # ratios 1, 0.5, 2 | 1, 1, 1
    losses, stats = rl.grpo_token_losses(logprobs, old, t(1.0, -1.0), None, 0.0, 0.2, 0.28)
    # A = 1: -min(r, clip(r)) = -1, -0.5, -1.28 (the high clip taken); A = -1: min(-r, -clip(r)) -> 1, 1, 1
    torch.testing.assert_close(losses, t([-1.0, -0.5, -1.28], [1.0, 1.0, 1.0]))
    assert stats["clip_high"].tolist() == [[0, 0, 1], [0, 0, 0]] and stats["clip_low"].sum() == 0
    token_losses, mask = t([1.0, 2.0, 3.0], [4.0, 9.0, 9.0]), t([1, 1, 1], [1, 0, 0])
    assert rl.aggregate(token_losses, mask, "grpo", 3).item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert rl.aggregate(token_losses, mask, "bnpo", 3).item() == pytest.approx(10 / 4)
    assert rl.aggregate(token_losses, mask, "dr_grpo", 3).item() == pytest.approx(10 / (2 * 3))
    assert rl.aggregate(token_losses, mask, "dapo", 3, tokens_in_step=8).item() == pytest.approx(10 / 8)
    with_kl, stats = rl.grpo_token_losses(logprobs, logprobs, t(0.0, 0.0), logprobs - 1.0, 0.5, 0.2, 0.2)
    kl = math.exp(-1.0) + 1.0 - 1.0  # k3 with ref - logp = -1
    torch.testing.assert_close(with_kl, torch.full((2, 3), 0.5 * kl, dtype=torch.float64))
    assert stats["kl"][0, 0].item() == pytest.approx(kl)


@pytest.mark.unit
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_the_loss_equals_trls_grpo_trainer(loss_type, tiny_model, tmp_path, trl_grpo_trainer):
    # TRL's own _compute_loss, handed fixed log-probabilities (its model's are replaced on this instance only)
    torch.manual_seed(0)
    batch, tokens = 4, 5
    logps = -torch.rand(batch, tokens) * 3
    old, ref = logps + 0.3 * torch.randn(batch, tokens), logps + 0.2 * torch.randn(batch, tokens)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]]).float()
    advantages = torch.tensor([1.0, -0.5, 0.7, -1.2])
    trainer = trl_grpo_trainer
    trainer.loss_type = loss_type
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, torch.zeros_like(logps), None)
    inputs = dict(prompt_ids=torch.ones(batch, 2, dtype=torch.long), prompt_mask=torch.ones(batch, 2, dtype=torch.long),
                  completion_ids=torch.ones(batch, tokens, dtype=torch.long), completion_mask=mask.long(),
                  advantages=advantages, old_per_token_logps=old, ref_per_token_logps=ref,
                  num_items_in_batch=mask.sum())
    theirs = trainer._compute_loss(trainer.model, inputs)
    losses, _ = rl.grpo_token_losses(logps, old, advantages, ref, 0.04, 0.2, 0.28)
    ours = rl.aggregate(losses, mask, loss_type, tokens, tokens_in_step=mask.sum().item())
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)


@pytest.fixture(scope="module")
def trl_grpo_trainer(tiny_model, tmp_path_factory):
    """TRL's GRPOTrainer with the settings the loss test compares: beta 0.04, epsilon 0.2, epsilon_high 0.28."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    config = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), use_cpu=True, bf16=False, report_to=[],
                        per_device_train_batch_size=4, num_generations=4, max_completion_length=5, beta=0.04,
                        epsilon=0.2, epsilon_high=0.28)
    trainer = GRPOTrainer(model=str(tiny_model), args=config, train_dataset=Dataset.from_list([{"prompt": "hi"}] * 8),
                          reward_funcs=[lambda completions, **kwargs: [0.0] * len(completions)])
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


# ---- rewards ----------------------------------------------------------------------------------------------

def shouted(prompts, completions, **columns):
    """A user's reward function (imported by name in the tests below): the share of upper-case letters."""
    return [sum(c.isupper() for c in text) / max(len(text), 1) for text in completions]


def fails_on_seven(prompts, completions, answer, **columns):
    return [1.0 / (a != "seven") for a in answer]


@pytest.mark.unit
def test_the_built_in_rewards_read_the_answer_as_configured():
    assert extract("so 12 + 1,230 = 1,242.", "last_number") == "1242"
    assert same_answer(extract("it is 3.0", "last_number"), "3", "last_number")
    assert extract("x \\boxed{7} then \\boxed{42}", "boxed") == "42"
    assert extract("Four plus two is Six.", "last_word") == "six"
    assert not same_answer(extract("no number", "last_number"), "3", "last_number")
    cfg = grpo_config(f"reward_funcs=[accuracy, format, length, {__name__}:shouted]", "reward_weights=[1, 0.5, 1, 2]")
    rewards = Rewards.of(cfg)
    completions = ["Two plus two is four.", "FIVE", "cat"]
    total, table = rewards.score(["p"] * 3, completions, {"answer": ["four", "four", "six"],
                                                          "completion_ids": [[1] * 6, [1], [1, 2, 3]]})
    assert table[:, 0].tolist() == [1.0, 0.0, 0.0]  # accuracy: last word
    assert table[:, 1].tolist() == [1.0, 1.0, 0.0]  # format: a number word anywhere, any case
    assert table[:, 2].tolist() == pytest.approx([-1.0, -1 / 6, -0.5])  # length: tokens / max_new_tokens (6)
    assert table[:, 3].tolist() == pytest.approx([1 / 21, 1.0, 0.0])
    assert total.tolist() == pytest.approx((table @ torch.tensor([1.0, 0.5, 1.0, 2.0])).tolist())


@pytest.mark.unit
def test_a_reward_function_that_fails_is_named_with_the_prompt():
    rewards = Rewards.of(grpo_config(f"reward_funcs=[accuracy, {__name__}:fails_on_seven]", "reward_weights=null",
                                     "format_pattern=null"))
    prompts, columns = ["What is one plus one?", "What is three plus four?"], {"answer": ["two", "seven"],
                                                                             "completion_ids": [[1], [1]]}
    with pytest.raises(RewardFunctionError, match=r"reward function 'test_grpo:fails_on_seven' raised "
                                                  r"ZeroDivisionError.*'What is three plus four\?'") as raised:
        rewards.score(prompts, ["two", "seven"], columns)
    assert isinstance(raised.value, DataError)  # so the driver shows it as one line (see the run below)
    rewards.functions["wrong"] = lambda prompts, completions, **columns: [1.0]
    rewards.functions.pop(f"{__name__}:fails_on_seven")
    with pytest.raises(RewardFunctionError, match=r"'wrong' must return one number per completion \(2\)"):
        rewards.score(prompts, ["two", "seven"], columns)
    rewards.functions["wrong"] = lambda prompts, completions, **columns: [1.0, float("nan")]
    with pytest.raises(RewardFunctionError, match="'wrong' returned nan for completion 1.*three plus four"):
        rewards.score(prompts, ["two", "seven"], columns)


@pytest.mark.unit
def test_a_rows_other_columns_reach_the_reward_functions(tmp_path, tiny_model):
    from rayft.data.pipeline import EncodingSettings, columns_of, encode_grpo_batch, load_examples
    from rayft.data.tokenizer import TokenizerSpec
    from rayft.trainers.grpo import reward_columns

    rows = [{"instruction": "What is two plus two?", "output": "Two plus two is four.", "answer": "4",
             "difficulty": 1, "tags": ["sum"]},
            {"instruction": "Name a colour.", "output": "Red.", "difficulty": 2}]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.jsonl"}}))
    examples = load_examples("mine", str(tmp_path), None, stage="grpo")
    assert [e["columns"] for e in examples] == [{"answer": "4", "difficulty": 1, "tags": ["sum"]}, {"difficulty": 2}]
    assert "columns" not in load_examples("mine", str(tmp_path), None, stage="sft")[0]  # other stages: as before
    cfg = grpo_config(f"model_name_or_path={tiny_model}")
    encoded = encode_grpo_batch(columns_of(examples), TokenizerSpec.of(cfg.model), EncodingSettings.of(cfg))
    shard_rows = [{"input_ids": list(ids), "answer": a, "columns": c}
                  for ids, a, c in zip(encoded["input_ids"], encoded["answer"], encoded["columns"])]
    given = reward_columns(shard_rows, 2, [[1]] * 4, [[2], [3], [4], [5]])
    # a dataset column named answer wins over the response; a row without a column gets None
    assert given["answer"] == ["4", "4", "Red.", "Red."]
    assert given["difficulty"] == [1, 1, 2, 2] and given["tags"] == [["sum"], ["sum"], None, None]
    assert given["sequences"] == [[1, 2], [1, 3], [1, 4], [1, 5]]


@pytest.mark.unit
def test_a_reward_model_can_be_one_of_the_rewards():
    calls = []

    def reward_model(texts, sequences):  # PPO's reward model kinds take texts and token ids, return a tensor
        calls.append((texts, sequences))
        return torch.tensor([float(len(t)) for t in texts])

    cfg = grpo_config("reward_funcs=[reward_model, length]", "reward_weights=[0.5, 1]", "format_pattern=null",
                      "accuracy_extraction=last_number", "reward_model=http://127.0.0.1:1", "reward_model_type=api")
    total, table = Rewards.of(cfg, reward_model).score(["ab", "c"], ["xyz", "w"], {
        "answer": ["", ""], "completion_ids": [[7, 8, 9], [7]], "sequences": [[1, 7, 8, 9], [2, 7]]})
    assert calls == [(["abxyz", "cw"], [[1, 7, 8, 9], [2, 7]])]  # prompt + completion
    assert table.tolist() == [[5.0, -0.5], [2.0, pytest.approx(-1 / 6)]]
    assert total.tolist() == pytest.approx([2.0, 1 - 1 / 6])


# ---- the recipe -------------------------------------------------------------------------------------------

@pytest.mark.unit
def test_a_grpo_recipe_is_checked_before_ray():
    assert grpo_problems() == []
    cfg = grpo_config()
    assert "grpo: loss_type dapo (derived from advantage_estimator), clip range 0.2 / 0.2" in cfg.notes
    assert grpo_config("advantage_estimator=dr_grpo").notes[1].startswith("grpo: loss_type dr_grpo")
    assert grpo_problems("num_generations=12") == [
        "num_generations: 32 completions per worker and step (per_device_train_batch_size x "
        "gradient_accumulation_steps) are not whole groups of 12; make them a multiple"]
    problems = grpo_problems("reward_funcs=[accuracy, nothing]", "rollout_workers=0", "rollout_resources=null",
                             "async_rollouts=true", "do_sample=false", "format_pattern=null")
    assert problems == [
        "reward_funcs: 'nothing' is neither a built-in reward (accuracy, format, length, reward_model) nor "
        "package.module:function",
        "async_rollouts: overlaps generation on the rollout actors with learning; set rollout_workers (1 or more) "
        "or remove async_rollouts",
        "do_sample: grpo compares sampled completions of one prompt; greedy decoding makes them all alike. Remove "
        "do_sample: false",
    ]
    assert grpo_problems("infer_backend=vllm") == [
        "infer_backend: vLLM inference is not built in rayft yet; remove infer_backend from the recipe"]
    assert grpo_problems("reward_funcs=format", "reward_weights=null", "format_pattern=null",
                         "accuracy_extraction=last_number") == [
        "format_pattern: the format reward needs the regular expression a completion must match, e.g. "
        r"'^The answer is \d+'"]
    assert grpo_problems("reward_weights=[1]") == [
        "reward_weights: 1 weight(s) for 2 reward(s); give one per reward_funcs entry, in the same order"]
    assert grpo_problems("deepspeed=z2") == [
        "deepspeed: DeepSpeed ZeRO for GRPO (the GRPO loop trains with DDP) is not built in rayft yet; remove "
        "deepspeed"]
    # keys of other settings are refused rather than ignored
    assert grpo_problems("ppo_target=3.0") == ["ppo_target and stage: ppo_target is only used with stage: ppo, but "
                                               "here stage: 'grpo'; remove ppo_target or change stage"]
    sft = ROOT / "configs" / "demo_sft_lora.yaml"
    with pytest.raises(ConfigError) as refused:
        parse_config(load_recipe(sft, ["num_generations=4", "rollout_workers=1"]), base_dir=ROOT)
    assert any(m.startswith("num_generations and stage: ") for m in refused.value.messages)
    assert "rollout_workers: only read by stage grpo (the rollout actors); remove rollout_workers" in \
        refused.value.messages


@pytest.mark.unit
def test_a_grpo_step_counts_its_groups_and_the_rollout_actors_must_fit():
    from rayft.orchestrator.plan import make_plan
    from rayft.recipe.plan import Node

    node = [Node("n1", "10.0.0.1", {"CPU": 2.0})]
    plan = make_plan(grpo_config("max_steps=-1", "num_train_epochs=1"), node, 256)
    # 128 prompts per worker, 4 per step (16 x 2 completions in groups of 8)
    assert plan.steps_per_epoch == 32 and plan.total_steps == 32 and len(plan.rollout_actors) == 1
    assert any(n.startswith("grpo: each step samples 8 completions for each of 4 prompts per worker (on 1 rollout "
                            "actor(s))") for n in plan.notes)
    with pytest.raises(ConfigError, match=r"rollout_resources: 1 rollout actor\(s\) of \{'CPU': 2\}"):
        make_plan(grpo_config("rollout_resources={CPU: 2}"), node, 256)  # 2 x 0.5 + 2 > 2 CPUs


@pytest.mark.unit
def test_a_grpo_sweep_maximises_the_reward_and_lets_the_workers_sample(tmp_path):
    from rayft.orchestrator.sweep_spec import check_sweep

    def sweep(*overrides):
        raw = load_recipe(GRPO_RECIPE, [f"output_dir={tmp_path / 'sweep'}", "sweep.parameters.beta.grid=[0.0,0.04]",
                                        "sweep.parameters.num_generations.grid=[4,8]", "rollout_workers=0",
                                        "rollout_resources=null", *overrides])
        return check_sweep(raw, base_dir=ROOT)

    checked = sweep()
    assert (checked.spec.metric, checked.spec.mode, len(checked.configs)) == ("reward", "max", 4)
    assert sorted((c.finetuning.beta, c.finetuning.num_generations) for c in checked.configs) == [
        (0.0, 4), (0.0, 8), (0.04, 4), (0.04, 8)]
    with pytest.raises(ConfigError, match="sweep.mode: 'reward' is GRPO's mean reward"):
        sweep("sweep.metric=reward", "sweep.mode=min")
    with pytest.raises(ConfigError, match="rollout_workers: a sweep does not start a rollout actor group"):
        sweep("rollout_workers=1")


@pytest.mark.unit
def test_a_reward_function_the_driver_cannot_import_is_refused_before_ray(tmp_path):
    from rayft.orchestrator.launch import prepare

    cfg = grpo_config(f"output_dir={tmp_path / 'out'}", "reward_funcs=[accuracy, no_such_package.rewards:score, "
                      "json:no_such_function]", "reward_weights=null", "format_pattern=null")
    with pytest.raises(ConfigError) as refused:
        prepare(cfg)
    assert refused.value.messages == [
        "reward_funcs: cannot import 'no_such_package.rewards' for 'no_such_package.rewards:score' (No module named "
        "'no_such_package'); install it or bring it with the job's runtime_env (working_dir or py_modules)",
        "reward_funcs: 'json' has no function 'no_such_function' ('json:no_such_function')"]
    assert not (tmp_path / "out").exists()


# ---- runs -------------------------------------------------------------------------------------------------

def assert_reward_rises(records: list[dict]) -> None:
    quarter = len(records) // 4
    first = sum(r["reward"] for r in records[:quarter]) / quarter
    last = sum(r["reward"] for r in records[-quarter:]) / quarter
    assert last > first + REWARD_MARGIN, (first, last)


def grpo_run(tmp_path, tiny_model, *overrides):
    out, _ = train_recipe(GRPO_RECIPE, tmp_path, tiny_model, *overrides)
    return out, [r for r in read_log(out) if "reward" in r]


@pytest.mark.slow
def test_grpo_with_a_rollout_actor_raises_the_reward_and_samples_async_one_step_behind(tmp_path, tiny_model, ray_local):
    # In step: 30 steps, every batch sampled with the weights it is learnt from; the reward must rise.
    out, records = grpo_run(tmp_path / "in_step", tiny_model, "async_rollouts=false")
    assert [r["step"] for r in records] == list(range(1, 31))  # every step logged once
    assert {"rewards/accuracy", "rewards/accuracy_std", "rewards/format_std", "kl", "entropy"} <= set(records[0])
    assert_reward_rises(records)
    assert [r["rollout_lag"] for r in records] == [0.0] * 30
    (actor,) = json.loads((out / "rollout_actors.json").read_text())
    assert actor["calls"] == 2 * 30 and actor["version"] == 29  # both workers' batches; the last after 29 updates
    logged = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [5, 10, 15, 20, 25, 30]
    assert len(logged[0]["completions"]) == 8 and set(logged[0]["completions"][0]["rewards"]) == {"accuracy", "format"}
    for step in (15, 30):
        assert (out / f"checkpoint-{step}" / "grpo_state.pt").is_file()
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_reward.png").is_file()

    # A rerun of the same run name resumes from its last checkpoint and trains on.
    again, resumed = grpo_run(tmp_path / "in_step", tiny_model, "async_rollouts=false", "max_steps=32")
    assert [r["step"] for r in resumed] == list(range(1, 33))
    assert resumed[:30] == records  # the first 30 as they were, not trained again
    (actor,) = json.loads((again / "rollout_actors.json").read_text())
    assert actor["calls"] == 2 * 2 and actor["version"] == 31
    assert (again / "checkpoint-32" / "grpo_state.pt").is_file()

    # Async: each batch is sampled while the previous one is learnt, with the weights one update behind. Its
    # first batch is sampled from the initial weights like the in-step run's, so that step's rewards are the same
    # (each batch has its own seed); every later one is sampled a version behind. Six steps show that; learning
    # with the lag is the same loss on older samples (the in-step run above shows the reward rising).
    out, lagged = grpo_run(tmp_path / "async", tiny_model, "async_rollouts=true", "max_steps=6", "save_steps=3")
    assert [r["step"] for r in lagged] == list(range(1, 7))
    assert [r["rollout_lag"] for r in lagged] == [0.0] + [1.0] * 5
    assert lagged[0]["reward"] == records[0]["reward"] and lagged[0]["kl"] == records[0]["kl"]
    assert lagged[1]["reward"] != records[1]["reward"]  # sampled from other weights than the in-step run's
    (actor,) = json.loads((out / "rollout_actors.json").read_text())
    assert actor["calls"] == 2 * 6 and actor["version"] == 4  # the last batch sampled before the 5th update
    assert [json.loads(line)["step"] for line in (out / "completions.jsonl").read_text().splitlines()] == [5]
    assert (out / "checkpoint-6" / "grpo_state.pt").is_file()


@pytest.mark.slow
def test_a_reward_function_that_raises_fails_the_run_with_its_name(tmp_path, tiny_model, ray_local):
    with pytest.raises(DataError) as failed:
        train_recipe(GRPO_RECIPE, tmp_path, tiny_model, "reward_funcs=[accuracy, json:loads]", "reward_weights=null",
                     "format_pattern=null",
                     "ray_num_workers=1", "rollout_workers=0", "rollout_resources=null", "resources_per_worker=null",
                     "max_steps=1")
    message = str(failed.value)
    assert message.startswith("reward function 'json:loads' raised TypeError") and "\n" not in message
    assert "(on the prompt '<|im_start|>user\\nWhat is" in message
    assert not (Path(tmp_path) / "out" / "adapter_model.safetensors").exists()
