"""Packing benchmark: non-pad tokens per second of training steps with and without (neat) packing.

    .venv/bin/python benchmarks/packing.py [--steps 20] [--dataset alpaca_en_demo]

Trains the tiny local model in one process on the same examples under three settings, side by side in
one run so that the ratios hold on a noisy machine; prints a table and writes benchmarks/results/packing.json.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from rayft.data.collator import SupervisedCollator
from rayft.data.packing import pack_batch
from rayft.data.pipeline import EncodingSettings, encode_batch, load_examples
from rayft.data.tokenizer import TokenizerSpec

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "llamafactory"


def encoded_rows(model_dir: Path, dataset: str, cutoff_len: int, count: int) -> dict:
    shared = (SHARED / "dataset_info.json").is_file() and dataset != "demo_sft"
    dataset_dir = SHARED if shared else ROOT / "data" / "demo"
    if dataset_dir == ROOT / "data" / "demo":
        dataset = "demo_sft"
    examples = load_examples(dataset, str(dataset_dir), count)
    print(f"dataset {dataset} from {dataset_dir}: {len(examples)} examples")
    return encode_batch({"system": [e["system"] for e in examples], "messages": [e["messages"] for e in examples]},
                        TokenizerSpec(str(model_dir)), EncodingSettings("qwen", cutoff_len))


def rows_for(batch: dict, mode: str, cutoff_len: int) -> list[dict]:
    if mode == "unpacked":
        return [{"input_ids": i, "labels": lab} for i, lab in zip(batch["input_ids"], batch["labels"])]
    packed = pack_batch(batch, cutoff_len, neat=mode == "neat_packing")
    return [{"input_ids": i, "labels": lab, "position_ids": p}
            for i, lab, p in zip(packed["input_ids"], packed["labels"], packed["position_ids"])]


def measure(model_dir: Path, rows: list[dict], tokens_per_batch: int, steps: int) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    collate = SupervisedCollator(pad_token_id=0)
    batches, current, length = [], [], 0
    for row in rows:  # batches of about the same number of real tokens in every mode
        current.append(row)
        length += len(row["input_ids"])
        if length >= tokens_per_batch:
            batches.append(current)
            current, length = [], 0
    real = padded = 0
    start = time.perf_counter()
    for step in range(steps):
        examples = batches[step % len(batches)]
        batch = collate(examples)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        real += sum(len(e["input_ids"]) for e in examples)
        padded += batch["input_ids"].numel()
    seconds = time.perf_counter() - start
    return {"steps": steps, "seconds": round(seconds, 3), "real_tokens_per_second": round(real / seconds, 1),
            "non_pad_share": round(real / padded, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dataset", default="alpaca_en_demo")
    parser.add_argument("--cutoff-len", type=int, default=512)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--model", type=Path, default=ROOT / ".cache" / "models" / "tiny-qwen2")
    args = parser.parse_args()

    batch = encoded_rows(args.model, args.dataset, args.cutoff_len, args.examples)
    results = {}
    for mode in ("unpacked", "packing", "neat_packing"):
        results[mode] = measure(args.model, rows_for(batch, mode, args.cutoff_len), 4 * args.cutoff_len, args.steps)
    base = results["unpacked"]["real_tokens_per_second"]
    print(f"\n{'mode':14s} {'non-pad share':>14s} {'real tokens/s':>14s} {'vs unpacked':>12s}")
    for mode, r in results.items():
        print(f"{mode:14s} {r['non_pad_share']:14.3f} {r['real_tokens_per_second']:14.1f} "
              f"{r['real_tokens_per_second'] / base:11.2f}x")
    out = ROOT / "benchmarks" / "results" / "packing.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
