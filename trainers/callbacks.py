"""Trainer callbacks: the `trainer_log.jsonl` record and progress lines (rank 0), and Ray reporting."""

import json
import sys
import time
from pathlib import Path

from transformers import TrainerCallback


def say(message: str) -> None:
    """Prints one line from a worker exactly once.

    Ray Train patches `print` to go to its logger and, when sys.stdout is wrapped, to stdout as well;
    writing to the process's real stdout takes exactly one of those paths.
    """
    print(message, file=sys.__stdout__, flush=True)


class LogCallback(TrainerCallback):
    """Appends one JSON line per logging step to output_dir/trainer_log.jsonl and prints progress."""

    def __init__(self, output_dir: str):
        self.path = Path(output_dir) / "trainer_log.jsonl"
        self.start = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")  # a fresh log per run; resume rewrites it from the restored step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "total_steps": state.max_steps, **logs,
                  "epoch": logs.get("epoch", state.epoch), "elapsed_seconds": round(time.time() - self.start, 3)}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in logs.items() if k != "epoch")
        say(f"[rayft] step {state.global_step}/{state.max_steps} epoch {state.epoch or 0:.2f} {shown}")


def read_log(output_dir: str) -> list[dict]:
    path = Path(output_dir) / "trainer_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
