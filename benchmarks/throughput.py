"""Orchestration overhead and model FLOPs utilisation: rayft with one Ray worker against a plain Transformers
`Trainer` in one process, same model, data, batch and steps, measured side by side in one run.

    .venv/bin/python benchmarks/throughput.py [--hidden 512 --layers 6 --steps 30]

Both train the same random model (full fine-tuning, no DeepSpeed, gradient checkpointing off) on the same
tokenised demo examples. Printed per side: seconds from the start of the run to the end of the first
optimizer step, non-pad tokens per second over steps 2..N, and MFU: 6 x parameters x tokens per second
(plus attention) against the device's peak. On CPUs both train in fp32 and the peak is the fp32 matmul rate
this machine measures first. Where CUDA is present both train in bf16 on one GPU, and the peak is the GPU's
dense bf16 peak from its data sheet (known devices, see GPU_BF16_PEAK) or else its measured bf16 matmul rate;
use a model large enough to keep a GPU busy, e.g. `--hidden 2048 --layers 16 --batch 8 --cutoff-len 1024`.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, rayft_run, sized_model, table, write

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' data sheets, by device-name fragment.
GPU_BF16_PEAK = {"H200": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100": 756e12, "A100": 312e12,
                 "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12, "V100": 125e12}


def matmul_peak(seconds: float = 3.0, size: int = 2048, device: str = "cpu", dtype=torch.float32) -> float:
    """FLOP/s of square matmuls on `device` (this process's threads on a CPU): the practical peak."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    sync()
    return 2 * size**3 * count / (time.perf_counter() - start)


def device_peak() -> tuple[float, str]:
    """The peak MFU is measured against, and what it is."""
    if not torch.cuda.is_available():
        return matmul_peak(), f"fp32 matmul peak measured on {torch.get_num_threads()} CPU threads"
    name = torch.cuda.get_device_name(0)
    for fragment, peak in GPU_BF16_PEAK.items():
        if fragment in name:
            return peak, f"{name}: bf16 data-sheet peak"
    return matmul_peak(size=8192, device="cuda", dtype=torch.bfloat16), f"{name}: measured bf16 matmul peak"


def plain_trainer(model_dir: Path, steps: int, batch: int, cutoff_len: int, out_dir: Path) -> dict:
    """The baseline: Hugging Face's Trainer in this process on the same tokenised examples."""
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from rayft.data.collator import SupervisedCollator
    from rayft.data.pipeline import EncodingSettings, encode_batch, load_examples
    from rayft.data.tokenizer import TokenizerSpec

    start = time.time()
    examples = load_examples("demo_sft", str(ROOT / "data" / "demo"), None)
    encoded = encode_batch({"system": [e["system"] for e in examples], "messages": [e["messages"] for e in examples]},
                           TokenizerSpec(str(model_dir)), EncodingSettings("chatml", cutoff_len))
    rows = [{"input_ids": i.tolist(), "labels": lab.tolist()}
            for i, lab in zip(encoded["input_ids"], encoded["labels"])]
    gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    records = []

    class Timestamps(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            records.append({"step": state.global_step, "timestamp": time.time(), **(logs or {})})

    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none",
                             use_cpu=not gpu, bf16=gpu,
                             seed=42, disable_tqdm=True, include_num_input_tokens_seen="non_padding",
                             remove_unused_columns=False, lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=SupervisedCollator(0),
                      callbacks=[Timestamps()])
    trainer.train()
    return {"started": start, "log": records}


def figures(started: float, log: list[dict], flops_per_token: float, peak: float) -> dict:
    steps = [r for r in log if "loss" in r and "num_input_tokens_seen" in r]
    first, last = steps[0], steps[-1]
    tokens_per_second = (last["num_input_tokens_seen"] - first["num_input_tokens_seen"]) / (
        last["timestamp"] - first["timestamp"])
    return {"first step after (s)": round(first["timestamp"] - started, 2),
            "tokens/s": round(tokens_per_second, 1),
            "MFU": round(tokens_per_second * flops_per_token / peak, 4),
            "final loss": round(last["loss"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cutoff-len", type=int, default=256)
    args = parser.parse_args()

    model_dir = sized_model(f"bench-h{args.hidden}-l{args.layers}", args.hidden, args.layers)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_config(config).parameters())
    # forward and backward: 6 FLOPs per parameter per token, plus attention scores and values (12 x layers x
    # hidden x sequence length per token, at the cutoff as an upper bound)
    flops_per_token = 6 * params + 12 * config.num_hidden_layers * config.hidden_size * args.cutoff_len
    peak, what = device_peak()
    print(f"model: {params / 1e6:.1f} M parameters; peak for MFU: {peak / 1e9:.1f} GFLOP/s ({what})")
    device = ["bf16=true"] if torch.cuda.is_available() else ["resources_per_worker.CPU=2"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plain = plain_trainer(model_dir, args.steps, args.batch, args.cutoff_len, Path(tmp) / "plain")
        rows.append({"run": "plain Trainer", **figures(plain["started"], plain["log"], flops_per_token, peak)})
        run = rayft_run([f"model_name_or_path={model_dir}", "finetuning_type=full", "deepspeed=null",
                         "ray_num_workers=1", *device, f"max_steps={args.steps}",
                         f"per_device_train_batch_size={args.batch}",
                         f"cutoff_len={args.cutoff_len}", "logging_steps=1", "learning_rate=1e-4",
                         "lr_scheduler_type=constant", "warmup_steps=0", "disable_gradient_checkpointing=true",
                         "include_num_input_tokens_seen=non_padding"], Path(tmp) / "rayft")
        rows.append({"run": "rayft, 1 worker", **figures(run["started"], run["log"], flops_per_token, peak)})
    plain_row, rayft_row = rows
    rayft_row["tokens/s vs plain"] = round(rayft_row["tokens/s"] / plain_row["tokens/s"], 3)
    later = rayft_row["first step after (s)"] - plain_row["first step after (s)"]
    rayft_row["first step later by (s)"] = round(later, 2)
    print()
    print(table(rows, ["run", "first step after (s)", "tokens/s", "MFU", "final loss", "tokens/s vs plain",
                       "first step later by (s)"]))
    written = write("throughput", {"args": vars(args), "params": params, "peak_flops": peak, "peak": what,
                                   "rows": rows})
    print(f"\nwritten to {written}")


if __name__ == "__main__":
    main()
