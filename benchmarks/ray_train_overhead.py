"""What running under Ray Train costs a plain Transformers job, apart from anything rayft does: the same LoRA
fine-tuning of the tiny model, one `Trainer` script, launched on 2 processes by torchrun and then by Ray Train's own
`TorchTrainer` (2 workers, 1 CPU each, a local Ray instance), in turn, `--repeats` times each.

    .venv/bin/python benchmarks/ray_train_overhead.py [--steps 100] [--repeats 2]

Printed per launch: samples/s (the Trainer's own), the training thread's CPU seconds (user + system, from
getrusage) and the share of the run it was busy; then Ray Train / torchrun. rayft's own runs add its data path and
callbacks on top of this (benchmarks/vs_llamafactory.py compares those with LLaMA-Factory).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, TINY, table, write

SCRIPT = r'''
import json, random, resource, sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

def main(model_dir, steps, out):
    random.seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    vocab = model.config.vocab_size
    rows = [[random.randrange(10, vocab - 1) for _ in range(random.randrange(60, 256))] for _ in range(2000)]

    def collate(batch):
        n = max(len(b) for b in batch)
        return {"input_ids": torch.tensor([b + [0] * (n - len(b)) for b in batch]),
                "labels": torch.tensor([b + [-100] * (n - len(b)) for b in batch]),
                "attention_mask": torch.tensor([[1] * len(b) + [0] * (n - len(b)) for b in batch])}

    args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=steps, logging_steps=1,
                             report_to="none", save_strategy="no", use_cpu=True, ddp_find_unused_parameters=False,
                             include_num_input_tokens_seen="non_padding", disable_tqdm=True, seed=42)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    before = resource.getrusage(resource.RUSAGE_THREAD)
    metrics = trainer.train().metrics
    after = resource.getrusage(resource.RUSAGE_THREAD)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if trainer.args.process_index == 0:
        with open(f"{out}/result.json", "w") as f:
            json.dump({"samples/s": metrics["train_samples_per_second"], "thread CPU (s)": cpu,
                       "busy": cpu / metrics["train_runtime"]}, f)

if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
'''


def under_ray_train(script: Path, steps: int, out: str) -> None:
    """The script's main, in each of Ray Train's 2 workers."""
    import runpy

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def train():
        sys.argv = [str(script), str(TINY), str(steps), out]
        runpy.run_path(str(script), run_name="__main__")

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    TorchTrainer(train, scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(storage_path=f"{out}-ray")).fit()
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ray-train", nargs=2, metavar=("STEPS", "OUT"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ray-train-overhead-"))
    script = work / "job.py"
    script.write_text(SCRIPT)
    if options.ray_train:  # the Ray Train launch, in a process of its own
        under_ray_train(script, int(options.ray_train[0]), options.ray_train[1])
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "OMP_"))}
    rows = []
    for repeat in range(options.repeats):
        for launcher in ("torchrun", "Ray Train"):
            out = work / f"{launcher.replace(' ', '-')}-{repeat}"
            out.mkdir()
            if launcher == "torchrun":
                command = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", str(script),
                           str(TINY), str(options.steps), str(out)]
            else:
                command = [sys.executable, __file__, "--ray-train", str(options.steps), str(out)]
            subprocess.run(command, env={**env, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True, cwd=ROOT)
            rows.append({"launcher": launcher, **json.loads((out / "result.json").read_text())})
            print(table(rows[-1:], list(rows[-1])), flush=True)
    mean = {name: sum(r["samples/s"] for r in rows if r["launcher"] == name) / options.repeats
            for name in ("torchrun", "Ray Train")}
    print(table(rows, ["launcher", "samples/s", "thread CPU (s)", "busy"]))
    print(f"Ray Train / torchrun: {mean['Ray Train'] / mean['torchrun']:.3f} samples/s (means of {options.repeats})")
    print(f"results: {write('ray_train_overhead', {'rows': rows, 'steps': options.steps})}")


if __name__ == "__main__":
    main()
