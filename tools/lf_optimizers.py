"""Writes golden optimizer steps: LLaMA-Factory 0.9.5's own `create_custom_optimizer` on the tiny model.

Run it with the Python of a virtual environment that has llamafactory and the optimizer packages (galore-torch,
apollo-torch, badam, adam-mini) installed, from a folder without a `ray` directory in it:
    DISABLE_VERSION_CHECK=1 /path/to/lf-venv/bin/python tools/lf_optimizers.py .cache/models/tiny-qwen2
Every parameter of the tiny model is trained (full fine-tuning) and given the same fixed gradient (`fixed_gradient`)
for each of two steps, so that the optimizers alone are compared, not two versions of Transformers' forward pass.
tests/test_optimizers.py steps rayft's factory the same way and holds it to tests/golden/optimizers.json.
"""

import json
import sys
import tempfile
import zlib
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden" / "optimizers.json"
LEARNING_RATE, WEIGHT_DECAY, STEPS = 1e-3, 0.01, 2
# (name, LLaMA-Factory's FinetuningArguments) of each optimizer, at small ranks for the tiny model
CASES = {
    "galore": {"use_galore": True, "galore_rank": 8, "galore_update_interval": 1, "galore_scale": 0.5},
    "apollo": {"use_apollo": True, "apollo_rank": 8, "apollo_update_interval": 1, "apollo_scale": 4.0},
    "badam": {"use_badam": True, "badam_mode": "layer", "badam_switch_interval": 1, "badam_switch_mode": "ascending"},
    "adam_mini": {"use_adam_mini": True},
    "muon": {"use_muon": True},
}


def fixed_gradient(name: str, param: torch.Tensor) -> torch.Tensor:
    """The same gradient for a parameter in every environment: drawn from a generator seeded by its name."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(param.shape, generator=generator, dtype=torch.float32) * 0.01


def summary(model, before: dict) -> dict:
    """What a test compares: each parameter's change, as its sum, its sum of magnitudes and its first entries."""
    found = {}
    for name, param in model.named_parameters():
        delta = (param.detach() - before[name]).flatten().double()
        found[name] = [delta.sum().item(), delta.abs().sum().item(), *delta[:4].tolist()]
    return found


def step_twice(model, optimizer) -> None:
    for _ in range(STEPS):
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.grad = fixed_gradient(name, param)
        optimizer.step()
        optimizer.zero_grad()


def main(model_dir: str) -> None:
    from llamafactory.hparams import FinetuningArguments
    from llamafactory.train.trainer_utils import create_custom_optimizer
    from transformers import AutoModelForCausalLM, Seq2SeqTrainingArguments

    golden = {}
    for case, keys in CASES.items():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = Seq2SeqTrainingArguments(output_dir=tempfile.mkdtemp(), learning_rate=LEARNING_RATE,
                                        weight_decay=WEIGHT_DECAY, optim="adamw_torch", report_to=[], use_cpu=True)
        finetuning = FinetuningArguments(stage="sft", finetuning_type="full", **keys)
        optimizer = create_custom_optimizer(model, args, finetuning)
        step_twice(model, optimizer)
        golden[case] = summary(model, before)
        print(case, sum(abs(v[1]) for v in golden[case].values()))
    OUT.write_text(json.dumps({"llamafactory": "0.9.5", "learning_rate": LEARNING_RATE, "weight_decay": WEIGHT_DECAY,
                               "cases": CASES, "steps": golden}, indent=0) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
