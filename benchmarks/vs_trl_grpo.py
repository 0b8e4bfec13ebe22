"""rayft's grpo stage against TRL's GRPOTrainer on the same job, side by side in one command.

    .venv/bin/python benchmarks/vs_trl_grpo.py [--steps 20]

The job: configs/demo_grpo_lora.yaml's, for both tools: LoRA rank 8 on every linear layer of the tiny Qwen2-style
model, the demo_grpo prompts in the tiny model's ChatML template, 8 completions per prompt of at most 6 tokens
(temperature 1, no top-p / top-k), 32 completions per step (micro-batches of 16, accumulated twice), one update per
step, beta 0.01 (the reference is the base model without the adapter), loss_type dapo, the accuracy and format
rewards weighted 1 and 0.5, learning rate 3e-2, gradient checkpointing on, fp32 on the CPU.

TRL runs in this process on both cores. rayft runs `rayft train` in-process as a user would: once on 1 worker that
samples its own completions (the same work per step as TRL), then on 2 workers (twice the completions per step)
that sample their own, and with the rollout actor, in step and async. Printed per run: optimizer steps per second
and completions per second over the training (its first step included; start-up excluded), and rayft / TRL.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from common import ROOT, TINY, table, write

sys.path.insert(0, str(ROOT))
RECIPE = ROOT / "configs" / "demo_grpo_lora.yaml"


def settings() -> dict:
    """The demo recipe's values the benchmark gives TRL too."""
    import yaml

    return yaml.safe_load(RECIPE.read_text())


def trl_run(steps: int, out: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from rayft.trainers.verifiable import accuracy_reward, format_reward

    s = settings()
    rows = [json.loads(line) for line in (ROOT / "data" / "demo" / "demo_grpo.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["instruction"]}], "answer": r["output"]}
                                 for r in rows])
    accuracy, form = accuracy_reward(s["accuracy_extraction"]), format_reward(s["format_pattern"])

    def text(completions):  # conversational prompts: each completion is a list of one assistant message
        return [c[0]["content"] if isinstance(c, list) else c for c in completions]

    def accuracy_reward_fn(prompts, completions, answer, **kwargs):
        return accuracy(prompts, text(completions), answer)

    def format_reward_fn(prompts, completions, **kwargs):
        return form(prompts, text(completions))

    config = GRPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, report_to=[], save_strategy="no", seed=s["seed"],
        per_device_train_batch_size=s["per_device_train_batch_size"],
        gradient_accumulation_steps=s["gradient_accumulation_steps"], num_generations=s["num_generations"],
        max_completion_length=s["max_new_tokens"], temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"],
        beta=s["beta"], epsilon=0.2, loss_type="dapo", learning_rate=s["learning_rate"],
        lr_scheduler_type="constant", max_steps=steps, logging_steps=1, reward_weights=s["reward_weights"],
        num_iterations=s["ppo_epochs"], gradient_checkpointing=True)
    lora = LoraConfig(r=s["lora_rank"], lora_alpha=2 * s["lora_rank"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=str(TINY), reward_funcs=[accuracy_reward_fn, format_reward_fn], args=config,
                          train_dataset=dataset, peft_config=lora)
    result = trainer.train()
    rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    runtime = result.metrics["train_runtime"]
    return {"tool": "TRL GRPOTrainer", "workers": 1, "steps/s": steps / runtime,
            "completions/s": steps * 32 / runtime, "reward first/last 5": _ends(rewards)}


def rayft_run(name: str, steps: int, out: Path, overrides: list[str]) -> dict:
    from rayft.orchestrator.launch import run_train
    from rayft.recipe.loading import load_recipe
    from rayft.recipe.parse import parse_config
    from rayft.recipe.values import read_log

    cfg = parse_config(load_recipe(RECIPE, [f"model_name_or_path={TINY}", f"output_dir={out}",
                                            f"ray_storage_path={out}-ray", "ray_run_name=null", "plot_loss=false",
                                            f"max_steps={steps}", "save_strategy=\"no\"", *overrides]), base_dir=ROOT)
    run_train(cfg)
    records = [r for r in read_log(out) if "reward" in r]
    runtime = records[-1]["elapsed_seconds"]
    workers = cfg.ray.ray_num_workers
    return {"tool": name, "workers": workers, "steps/s": steps / runtime,
            "completions/s": steps * 32 * workers / runtime,
            "reward first/last 5": _ends([r["reward"] for r in records])}


def _ends(rewards: list[float]) -> str:
    return f"{sum(rewards[:5]) / 5:.3f} / {sum(rewards[-5:]) / 5:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    work = ROOT / ".cache" / "bench-grpo" / time.strftime("%Y%m%d-%H%M%S")
    runs = [trl_run(args.steps, work / "trl")]
    single = ["ray_num_workers=1", "rollout_workers=0", "rollout_resources=null", "resources_per_worker={CPU: 2}"]
    runs.append(rayft_run("rayft grpo, sampling in the worker", args.steps, work / "rayft-1w", single))
    runs.append(rayft_run("rayft grpo, sampling in the workers", args.steps, work / "rayft-2w-local",
                          ["rollout_workers=0", "rollout_resources=null", "resources_per_worker={CPU: 1}"]))
    runs.append(rayft_run("rayft grpo + rollout actor", args.steps, work / "rayft-2w", []))
    runs.append(rayft_run("rayft grpo + rollout actor, async", args.steps, work / "rayft-2w-async",
                          ["async_rollouts=true"]))
    peer = runs[0]
    for run in runs:
        run["vs TRL (steps/s)"] = run["steps/s"] / peer["steps/s"]
        run["vs TRL (completions/s)"] = run["completions/s"] / peer["completions/s"]
    print(table(runs, ["tool", "workers", "steps/s", "completions/s", "vs TRL (steps/s)", "vs TRL (completions/s)",
                       "reward first/last 5"]))
    print(f"written to {write('vs_trl_grpo', {'steps': args.steps, 'runs': runs})}")


if __name__ == "__main__":
    main()
