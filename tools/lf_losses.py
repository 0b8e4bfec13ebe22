"""Writes golden loss values: TRL's and LLaMA-Factory's own loss functions on fixed log-probabilities.

Run it with the Python of a virtual environment that has llamafactory (and so TRL) installed:
    DISABLE_VERSION_CHECK=1 /path/to/lf-venv/bin/python tools/lf_losses.py
tests/test_losses.py holds rayft's losses to tests/golden/losses.json. Where LLaMA-Factory 0.9.5 computes
something else than the loss it is asked for (hinge and ipo: it calls TRL's dpo_loss without loss_type), the
file records what LLaMA-Factory trains as well, and rayft follows TRL.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import torch

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden" / "losses.json"
INPUTS = {  # four pairs: summed log-probabilities, and the number of labelled tokens of each response
    "chosen": [-12.0, -30.5, -8.25, -40.0], "rejected": [-15.0, -29.0, -20.0, -41.5],
    "ref_chosen": [-13.0, -31.0, -9.0, -39.0], "ref_rejected": [-14.0, -30.0, -18.5, -40.5],
    "chosen_tokens": [6, 15, 4, 20], "rejected_tokens": [7, 14, 10, 21],
    "chosen_scores": [0.5, -1.0, 2.0, 0.1], "rejected_scores": [0.25, -0.5, -1.0, 0.3],
    "kto_policy": [-10.0, -20.0, -5.0, -30.0], "kto_ref": [-11.0, -19.0, -6.0, -29.5],
    "kto_desirable": [True, False, True, False],
    "kto_kl_policy": [-19.0, -11.0, -29.0, -6.0], "kto_kl_ref": [-20.0, -12.0, -30.0, -6.5],
}
BETA, SMOOTHING, GAMMA, FTX = 0.1, 0.1, 0.5, 0.25


def trl_dpo(loss_type: str, beta: float, smoothing: float, chosen, rejected, ref_chosen, ref_rejected) -> list:
    from trl.trainer.dpo_trainer import DPOTrainer, FDivergenceType

    fake = SimpleNamespace(accelerator=SimpleNamespace(device="cpu"), reference_free=False, beta=beta,
                           f_divergence_type=FDivergenceType.REVERSE_KL, f_divergence_params=None,
                           label_smoothing=smoothing, use_weighting=False)
    losses, _, _ = DPOTrainer.dpo_loss(fake, chosen, rejected, ref_chosen, ref_rejected, loss_type=loss_type)
    return losses.tolist()


def main() -> None:
    from llamafactory.train.dpo.trainer import CustomDPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer

    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in INPUTS.items()}
    sides = ("chosen", "rejected", "ref_chosen", "ref_rejected")
    avg = {k: t[k] / t[f"{k.removeprefix('ref_')}_tokens"] for k in sides}
    summed = [t["chosen"], t["rejected"], t["ref_chosen"], t["ref_rejected"]]
    averaged = [avg["chosen"], avg["rejected"], avg["ref_chosen"], avg["ref_rejected"]]
    lf = SimpleNamespace(beta=BETA, simpo_gamma=GAMMA)
    golden = {
        "inputs": INPUTS, "beta": BETA, "label_smoothing": SMOOTHING, "simpo_gamma": GAMMA, "pref_ftx": FTX,
        "sigmoid": trl_dpo("sigmoid", BETA, 0.0, *summed),
        "sigmoid_smoothed": trl_dpo("sigmoid", BETA, SMOOTHING, *summed),
        "hinge": trl_dpo("hinge", BETA, 0.0, *summed),
        "ipo": trl_dpo("ipo", BETA, 0.0, *averaged),  # TRL averages per token for ipo
        "llamafactory_hinge_and_ipo_train": trl_dpo("sigmoid", BETA, 0.0, *summed),
        "orpo": CustomDPOTrainer.odds_ratio_loss(lf, avg["chosen"], avg["rejected"]).tolist(),
        "simpo": CustomDPOTrainer.simpo_loss(lf, avg["chosen"], avg["rejected"]).tolist(),
        "sigmoid_with_ftx": [v - FTX * c for v, c in zip(trl_dpo("sigmoid", BETA, 0.0, *summed),
                                                          avg["chosen"].tolist())],
        "rm": (-torch.nn.functional.logsigmoid(t["chosen_scores"] - t["rejected_scores"])).tolist(),
    }
    desirable = t["kto_desirable"].bool()
    fake = SimpleNamespace(accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x),
                           calculate_KL=True, loss_type="kto", beta=BETA, desirable_weight=1.0,
                           undesirable_weight=1.5)
    losses, _, _, kl = KTOTrainer.kto_loss(
        fake, t["kto_policy"][desirable], t["kto_policy"][~desirable], t["kto_kl_policy"],
        t["kto_ref"][desirable], t["kto_ref"][~desirable], t["kto_kl_ref"])
    golden.update(kto_mean=losses.mean().item(), kto_kl=float(kl), kto_weights=[1.0, 1.5])
    golden.update(token_losses())
    golden.update(bco_losses(t))
    OUT.write_text(json.dumps(golden, indent=1) + "\n")


TOKENS = {  # two pairs (rows 0-1 chosen, 2-3 rejected) of labelled positions over a vocabulary of 24
    "labels": [[-100, -100, 3, 5, 7, 1, 9], [-100, 2, 4, 6, -100, -100, -100],
               [-100, -100, 8, 10, -100, -100, -100], [-100, 11, 12, 13, 14, 15, -100]],
    "seed": 0, "vocab": 24, "ld_alpha": 0.6, "eaft_alpha": 1.5, "asft_alpha": 0.3,
}


def token_logits(seed: int, vocab: int, rows: int, length: int):
    """The fixed logits of TOKENS (policy, then reference), drawn from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, length, vocab, generator=generator, dtype=torch.float64) for _ in range(2)]


def token_losses() -> dict:
    """LLaMA-Factory's LD-DPO log-probabilities, EAFT and ASFT losses on TOKENS."""
    from llamafactory.train.trainer_utils import asft_loss_func, eaft_loss_func, get_batch_logps

    labels = torch.tensor(TOKENS["labels"])
    policy, reference = token_logits(TOKENS["seed"], TOKENS["vocab"], *labels.shape)
    ld, _ = get_batch_logps(policy, labels, ld_alpha=TOKENS["ld_alpha"])
    return {"tokens": TOKENS, "ld_logps": ld.tolist(),
            "eaft": float(eaft_loss_func({"logits": policy}, labels, None, TOKENS["eaft_alpha"])),
            "asft": float(asft_loss_func({"logits": policy}, labels, reference, TOKENS["asft_alpha"]))}


def bco_losses(t: dict) -> dict:
    """LLaMA-Factory's BCO pair loss on the first two pairs and then the last two, its running baseline between."""
    from llamafactory.train.dpo.trainer import CustomDPOTrainer
    from trl.trainer import RunningMoments

    accelerator = SimpleNamespace(device="cpu", num_processes=1, use_distributed=False,
                                  reduce=lambda x, reduction="sum": x)
    fake = SimpleNamespace(beta=BETA, running=RunningMoments(accelerator))
    sides = ("chosen", "rejected", "ref_chosen", "ref_rejected")
    calls = [CustomDPOTrainer.bco_loss(fake, *(t[k][part] for k in sides)).tolist()
             for part in (slice(0, 2), slice(2, 4))]
    return {"bco_calls": calls}


if __name__ == "__main__":
    main()
