"""Every preference loss, KTO and the reward model's loss against values worked out by hand from the formulas.

Shared example pair: policy log-probs chosen -1.0, rejected -3.0; reference -2.0 and -2.5; so the DPO margin
Δ = (-1 - -3) - (-2 - -2.5) = 1.5, and with β = 0.1, β·Δ = 0.15.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from rayft.trainers import losses

pytestmark = pytest.mark.unit

BETA = 0.1


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def pair():
    return t(-1.0), t(-3.0), t(-2.0), t(-2.5)


def test_sigmoid_is_minus_log_sigmoid_of_beta_margin():
    loss, chosen, rejected = losses.sigmoid_loss(*pair(), beta=BETA)
    assert loss.item() == pytest.approx(0.620957047789532)  # log(1 + e^-0.15)
    assert chosen.item() == pytest.approx(0.1)  # β·(-1 - -2)
    assert rejected.item() == pytest.approx(-0.05)  # β·(-3 - -2.5)


def test_sigmoid_label_smoothing_mixes_in_the_flipped_preference():
    loss, _, _ = losses.sigmoid_loss(*pair(), beta=BETA, label_smoothing=0.2)
    assert loss.item() == pytest.approx(0.6509570477895321)  # 0.8·log(1+e^-0.15) + 0.2·log(1+e^0.15)


def test_hinge_is_zero_once_the_margin_passes_one_over_beta():
    assert losses.hinge_loss(*pair(), beta=BETA)[0].item() == pytest.approx(0.85)  # 1 - 0.15
    assert losses.hinge_loss(*pair(), beta=1.0)[0].item() == 0.0  # 1 - 1.5 < 0


def test_ipo_regresses_the_margin_to_one_over_two_beta():
    assert losses.ipo_loss(*pair(), beta=BETA)[0].item() == pytest.approx(12.25)  # (1.5 - 5)²


def test_kto_pair_values_each_side_against_the_other_sides_kl():
    # chosen log-ratios [1, 0] -> KL 0.5; rejected log-ratios [-0.5, 1] -> KL 0.25
    loss, _, _ = losses.kto_pair_loss(t(-1.0, -2.0), t(-3.0, -1.0), t(-2.0, -2.0), t(-2.5, -2.0), beta=BETA)
    sig = lambda x: 1 / (1 + math.exp(-x))
    first = (2 - sig(0.1 * (1 - 0.25)) - sig(0.1 * (0.5 + 0.5))) / 2
    assert loss.tolist() == pytest.approx([first, 0.5093735354918604])
    assert first == pytest.approx(0.4781397983212624)


def test_orpo_is_nll_plus_beta_times_log_odds_ratio_loss():
    loss, chosen, rejected = losses.orpo_loss(t(-0.5), t(-1.2), beta=BETA)
    assert loss.item() == pytest.approx(0.5246553113482877)
    assert (chosen.item(), rejected.item()) == pytest.approx((-0.05, -0.12))


def test_simpo_subtracts_the_target_margin_gamma():
    loss, chosen, rejected = losses.simpo_loss(t(-0.5), t(-1.2), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(0.3411538747320879)  # -log σ(2·0.7 - 0.5)
    assert (chosen.item(), rejected.item()) == pytest.approx((-1.0, -2.4))


def test_kto_weights_desirable_and_undesirable_examples_around_the_kl_reference_point():
    # log-ratios [1, -1]; mismatched pairs' log-ratios [0.5, 0.1] -> KL 0.3
    loss, rewards, kl = losses.kto_loss(t(-1.0, -4.0), t(-2.0, -3.0), torch.tensor([True, False]),
                                        t(-3.0, -3.0), t(-3.5, -3.1), beta=BETA, chosen_weight=1.0,
                                        rejected_weight=0.5)
    assert kl.item() == pytest.approx(0.3)
    assert loss.tolist() == pytest.approx([0.48250714233361025, 0.23377284680634064])
    assert rewards.tolist() == pytest.approx([0.1, -0.1])


def test_kto_clamps_a_negative_kl_estimate_to_zero():
    _, _, kl = losses.kto_loss(t(-1.0), t(-2.0), torch.tensor([True]), t(-4.0), t(-3.0), beta=BETA)
    assert kl.item() == 0.0


def test_pairwise_ranking_loss():
    assert losses.pairwise_ranking_loss(t(0.3), t(-0.4)).item() == pytest.approx(0.40318604888545784)


def test_sequence_logps_sums_only_labelled_next_token_log_probs():
    # vocabulary of 2; row 0 labels tokens 1 and 2 (positions 1, 2), row 1 only position 2
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]],
                                     [[0.25, 0.75], [0.6, 0.4], [0.5, 0.5]]], dtype=torch.float64))
    labels = torch.tensor([[-100, 1, 0], [-100, -100, 1]])
    total, count = losses.sequence_logps(logits, labels)
    assert total.tolist() == pytest.approx([math.log(0.5) + math.log(0.9), math.log(0.4)])
    assert count.tolist() == [2, 1]


def test_ld_dpo_weighs_the_longer_responses_excess_tokens_by_alpha():
    # one pair: the chosen response labels positions 1-4 (4 tokens), the rejected one 1-2 (2): the public length is
    # 2, so the chosen response's last two tokens weigh alpha; log-probabilities of ln(1/2) per labelled token
    logits = torch.zeros(2, 6, 2, dtype=torch.float64)  # two equally likely tokens: every log-prob is ln(1/2)
    labels = torch.tensor([[-100, -100, 1, 0, 1, 1], [-100, -100, 0, 1, -100, -100]])
    logps, counts = losses.sequence_logps(logits, labels, ld_alpha=0.5)
    half = math.log(0.5)
    assert logps.tolist() == pytest.approx([2 * half + 0.5 * 2 * half, 2 * half]) and counts.tolist() == [4, 2]
    assert losses.sequence_logps(logits, labels)[0].tolist() == pytest.approx([4 * half, 2 * half])
    assert losses.sequence_logps(logits, labels, ld_alpha=1.0)[0].tolist() == pytest.approx([4 * half, 2 * half])


def test_bco_classifies_each_side_against_the_running_reward_mean():
    loss, chosen, rejected = losses.bco_pair_loss(*pair(), beta=BETA, delta=0.025)  # δ: mean of 0.1 and -0.05
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert loss.item() == pytest.approx(-math.log(sig(0.1 - 0.025)) - math.log(sig(-(-0.05 - 0.025))))
    assert (chosen.item(), rejected.item()) == (pytest.approx(0.1), pytest.approx(-0.05))


def test_the_bco_baseline_is_the_mean_of_every_update_so_far():
    from rayft.trainers.dpo import RunningMean

    baseline = RunningMean()
    assert baseline.update(torch.tensor(0.2)) == pytest.approx(0.2)
    assert baseline.update(torch.tensor(-0.4)) == pytest.approx(-0.1)
    assert baseline.update(torch.tensor(0.5)) == pytest.approx(0.1)


def test_eaft_weighs_each_token_loss_by_its_top20_entropy_over_three():
    # uniform logits over 32 tokens: every token's loss is ln 32, the top-20 entropy ln 20, the weight (ln 20 / 3)^a
    logits = torch.zeros(1, 4, 32, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[-100, 3, 7, 9]])
    for alpha in (1.0, 2.0):
        loss = losses.eaft_loss({"logits": logits}, labels, alpha=alpha)
        assert loss.item() == pytest.approx(math.log(32) * (math.log(20) / 3) ** alpha)
    peaked = logits.detach().clone()
    peaked[0, :, 0] = 10.0  # a confident distribution: low entropy, a small weight
    assert losses.eaft_loss({"logits": peaked}, labels).item() < 0.1 * math.log(32)


def test_asft_is_dft_plus_alpha_times_the_references_kl_from_the_policy():
    policy = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[-100, 0, 1]])
    assert losses.asft_loss(policy, policy, labels, alpha=0.5).item() == pytest.approx(
        losses.dft_loss({"logits": policy}, labels).item())  # the reference equals the policy: no KL
    reference = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    q = 1 / (1 + math.exp(-2.0))  # the reference's first position: (q, 1 - q); the policy's (1/2, 1/2)
    first = q * math.log(q / 0.5) + (1 - q) * math.log((1 - q) / 0.5)
    p = 1 / (1 + math.exp(-1.0))  # second position: the reference uniform, the policy (p, 1 - p)
    second = 0.5 * math.log(0.5 / p) + 0.5 * math.log(0.5 / (1 - p))
    got = losses.asft_loss(policy, reference, labels, alpha=0.5).item()
    assert got == pytest.approx(losses.dft_loss({"logits": policy}, labels).item() + 0.5 * (first + second) / 2)


def test_the_losses_pass_gradients_to_the_policy():
    chosen = t(-1.0).requires_grad_()
    for name, fn in losses.REFERENCE_LOSSES.items():
        loss = fn(chosen, t(-3.0), t(-2.0), t(-2.5), beta=BETA)[0].sum()
        (grad,) = torch.autograd.grad(loss, chosen)
        assert grad.item() < 0, name  # raising the chosen log-prob lowers the loss
    for name, fn in losses.REFERENCE_FREE_LOSSES.items():
        kwargs = {"gamma": 0.5} if name == "simpo" else {}
        loss = fn(chosen, t(-1.2), beta=BETA, **kwargs)[0].sum()
        (grad,) = torch.autograd.grad(loss, chosen)
        assert grad.item() < 0, name


def test_dft_weighs_each_token_loss_by_its_probability():
    # one sequence, vocabulary of 2; position 0 predicts token 1 with p = e^2/(e^0+e^2), position 1 is prompt
    logits = torch.tensor([[[0.0, 2.0], [1.0, 1.0], [0.0, 0.0]]], requires_grad=True)
    labels = torch.tensor([[-100, 1, -100]])
    p = math.exp(2) / (1 + math.exp(2))
    loss = losses.dft_loss({"logits": logits}, labels)
    assert loss.item() == pytest.approx(-math.log(p) * p)
    loss.backward()  # the weight carries no gradient: d/dlogit of -p0*log p is -p0*(1-p) for the right token
    assert logits.grad[0, 0, 1].item() == pytest.approx(-p * (1 - p))


GOLDEN = json.loads((Path(__file__).parent / "golden" / "losses.json").read_text())


def golden_inputs():
    g = {k: torch.tensor(v, dtype=torch.float64) for k, v in GOLDEN["inputs"].items()}
    summed = (g["chosen"], g["rejected"], g["ref_chosen"], g["ref_rejected"])
    tokens = (g["chosen_tokens"], g["rejected_tokens"], g["chosen_tokens"], g["rejected_tokens"])
    return g, summed, tuple(s / n for s, n in zip(summed, tokens))


@pytest.mark.parametrize("name, loss, averaged, extra", [
    ("sigmoid", losses.sigmoid_loss, False, {}),
    ("sigmoid_smoothed", losses.sigmoid_loss, False, {"label_smoothing": GOLDEN["label_smoothing"]}),
    ("hinge", losses.hinge_loss, False, {}),
    ("ipo", losses.ipo_loss, True, {}),
])
def test_reference_losses_match_trl(name, loss, averaged, extra):
    """tests/golden/losses.json: TRL 0.24's dpo_loss (tools/lf_losses.py). IPO takes per-token averages, as TRL
    and rayft's DPO trainer give it (losses.LENGTH_AVERAGED)."""
    _, summed, per_token = golden_inputs()
    got = loss(*(per_token if averaged else summed), beta=GOLDEN["beta"], **extra)[0]
    assert got.tolist() == pytest.approx(GOLDEN[name])
    assert ("ipo" in losses.LENGTH_AVERAGED) and averaged == (name == "ipo")


def test_llamafactory_trains_sigmoid_when_asked_for_hinge_or_ipo_and_rayft_does_not():
    _, summed, per_token = golden_inputs()
    lf = pytest.approx(GOLDEN["llamafactory_hinge_and_ipo_train"])
    assert losses.hinge_loss(*summed, beta=GOLDEN["beta"])[0].tolist() != lf
    assert losses.ipo_loss(*per_token, beta=GOLDEN["beta"])[0].tolist() != lf


@pytest.mark.parametrize("name", ["orpo", "simpo"])
def test_reference_free_losses_match_llamafactory(name):
    _, _, (chosen, rejected, _, _) = golden_inputs()
    extra = {"gamma": GOLDEN["simpo_gamma"]} if name == "simpo" else {}
    got = losses.REFERENCE_FREE_LOSSES[name](chosen, rejected, beta=GOLDEN["beta"], **extra)[0]
    assert got.tolist() == pytest.approx(GOLDEN[name])


def test_pref_ftx_and_the_reward_models_loss_match_llamafactory():
    g, summed, (chosen_avg, _, _, _) = golden_inputs()
    with_ftx = losses.sigmoid_loss(*summed, beta=GOLDEN["beta"])[0] - GOLDEN["pref_ftx"] * chosen_avg
    assert with_ftx.tolist() == pytest.approx(GOLDEN["sigmoid_with_ftx"])
    ranking = losses.pairwise_ranking_loss(g["chosen_scores"], g["rejected_scores"])
    assert ranking.tolist() == pytest.approx(GOLDEN["rm"])


def test_kto_matches_trl_with_weights_and_its_kl_estimate():
    g, _, _ = golden_inputs()
    desirable, undesirable = GOLDEN["kto_weights"]
    per_example, _, kl = losses.kto_loss(g["kto_policy"], g["kto_ref"], g["kto_desirable"], g["kto_kl_policy"],
                                         g["kto_kl_ref"], beta=GOLDEN["beta"], chosen_weight=desirable,
                                         rejected_weight=undesirable)
    assert kl.item() == pytest.approx(GOLDEN["kto_kl"]) and per_example.mean().item() == pytest.approx(
        GOLDEN["kto_mean"])


def test_preference_losses_are_averaged_over_gradient_accumulation(tiny_model, tmp_path):
    """With 4 micro-batches a step each one's loss counts a quarter, as for sft (the Trainer does not divide a
    custom loss by the accumulation steps for a model that takes loss kwargs, as Qwen2 does)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayft.data.collator import PairwiseCollator
    from rayft.recipe.schema import FinetuningArguments
    from rayft.trainers.dpo import DPOTrainer
    from rayft.trainers.training_args import transformers_arguments

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    args = transformers_arguments(dict(output_dir=str(tmp_path), use_cpu=True, gradient_accumulation_steps=4,
                                       report_to=[], per_device_train_batch_size=1))
    pair = {"chosen_input_ids": [5, 6, 7, 8], "chosen_labels": [-100, -100, 7, 8],
            "rejected_input_ids": [5, 6, 9, 10], "rejected_labels": [-100, -100, 9, 10]}
    trainer = DPOTrainer(model=model, args=args, train_dataset=[pair], data_collator=PairwiseCollator(
        tokenizer.pad_token_id), finetuning=FinetuningArguments(stage="dpo", pref_loss="simpo"))
    batch = PairwiseCollator(tokenizer.pad_token_id)([pair])
    trainer.current_gradient_accumulation_steps = 4  # set by the training loop
    mean_loss = trainer.compute_loss(model, dict(batch)).item()
    stepped = trainer.training_step(model, dict(batch), num_items_in_batch=torch.tensor(4)).item()
    assert stepped == pytest.approx(mean_loss / 4, rel=1e-4)


def golden_tokens():
    """tools/lf_losses.py's fixed logits (policy, reference) and labels: two pairs over a vocabulary of 24."""
    spec = GOLDEN["tokens"]
    labels = torch.tensor(spec["labels"])
    generator = torch.Generator().manual_seed(spec["seed"])
    policy, reference = (torch.randn(*labels.shape, spec["vocab"], generator=generator, dtype=torch.float64)
                         for _ in range(2))
    return spec, labels, policy, reference


def test_ld_dpo_eaft_and_asft_match_llamafactory():
    spec, labels, policy, reference = golden_tokens()
    assert losses.sequence_logps(policy, labels, spec["ld_alpha"])[0].tolist() == pytest.approx(GOLDEN["ld_logps"])
    assert losses.eaft_loss({"logits": policy}, labels, alpha=spec["eaft_alpha"]).item() == pytest.approx(
        GOLDEN["eaft"], rel=1e-6)
    assert losses.asft_loss(policy, reference, labels, spec["asft_alpha"]).item() == pytest.approx(
        GOLDEN["asft"], rel=1e-6)


def test_bco_with_its_running_baseline_matches_llamafactory_over_two_steps():
    from rayft.trainers.dpo import RunningMean

    _, summed, _ = golden_inputs()
    baseline = RunningMean()
    for step, part in enumerate((slice(0, 2), slice(2, 4))):
        sides = [side[part] for side in summed]
        chosen, rejected = losses.sigmoid_loss(*sides, beta=GOLDEN["beta"])[1:]
        delta = baseline.update(torch.cat((chosen, rejected)).mean())
        got = losses.bco_pair_loss(*sides, beta=GOLDEN["beta"], delta=delta)[0]
        assert got.tolist() == pytest.approx(GOLDEN["bco_calls"][step])
