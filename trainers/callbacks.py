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
        if not state.is_world_process_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if state.global_step == 0:
            self.path.write_text("")  # a fresh run, a fresh log
            return
        # Resumed from a checkpoint: keep what was logged up to it, drop what came after it (those steps
        # are trained again), and record the resumption.
        kept = [r for r in read_log(self.path.parent) if r.get("step", 0) <= state.global_step]
        kept.append({"step": state.global_step, "resumed_from_step": state.global_step})
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        say(f"[rayft] resumed at step {state.global_step}/{state.max_steps}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "total_steps": state.max_steps, **logs,
                  "epoch": logs.get("epoch", state.epoch), "elapsed_seconds": round(time.time() - self.start, 3),
                  "timestamp": round(time.time(), 3)}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in logs.items() if k != "epoch")
        say(f"[rayft] step {state.global_step}/{state.max_steps} epoch {state.epoch or 0:.2f} {shown}")


class ReportEveryLog(TrainerCallback):
    """Reports every logged record to Ray Train, so that a sweep's scheduler sees each measurement.

    Every rank logs the same records (the Trainer averages losses over ranks before logging), and every
    rank must call ray.train.report the same number of times. The record names the run's placement group:
    a trial the scheduler stops is killed with its Train controller, whose placement group outlives it,
    and the sweep's driver removes it by this id.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        import ray.train
        import ray.util

        if logs:
            group = ray.util.get_current_placement_group()
            ray.train.report({**logs, "step": state.global_step, "total_steps": state.max_steps,
                              "placement_group": group.id.hex() if group else None})


def read_log(output_dir: str) -> list[dict]:
    path = Path(output_dir) / "trainer_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
