"""The driver's live progress bar for a training run, fed by rank 0's logged records and log messages.

Rank 0 posts every record it logs, and its rayft log messages, to a small Ray actor the driver starts (by name:
plain data crosses the boundary); a thread on the driver drains it, moves the bar and shows the messages. On a
terminal the bar redraws in place (tqdm); in a log file it becomes one line at every tenth of the run.
"""

import sys
import threading

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from rayft.recipe.logs import logger

POLL_SECONDS = 0.5


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Holds the records rank 0 posted until the driver takes them."""

    def __init__(self):
        self.records: list[dict] = []

    def post(self, record: dict) -> None:
        self.records.append(record)

    def take(self) -> list[dict]:
        taken, self.records = self.records, []
        return taken


class ProgressBar:
    """A context manager: starts the board and the drain thread, and closes the bar when the run ends."""

    def __init__(self, name: str | None, total_steps: int, global_batch_size: int):
        """`name` is the plan's progress board (None: no bar, e.g. a sweep's trial, whose driver shows its own)."""
        self.name, self.total, self.global_batch_size, self.enabled = name, total_steps, global_batch_size, bool(name)
        self.board = None
        self.bar = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.shown_tenths = 0

    def __enter__(self) -> "ProgressBar":
        if self.enabled:
            # on the driver's own node: a worker node may leave during the run (an elastic run goes on without it)
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self.board = ProgressBoard.options(name=self.name, scheduling_strategy=here).remote()
            if sys.stdout.isatty():
                self.bar = tqdm(total=self.total, unit="step", dynamic_ncols=True, file=sys.stdout)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        self.stop.set()
        self.thread.join()
        self._show(ray.get(self.board.take.remote()))
        if self.bar is not None:
            self.bar.close()
        ray.kill(self.board)

    def _drain(self) -> None:
        while not self.stop.wait(POLL_SECONDS):
            try:
                self._show(ray.get(self.board.take.remote(), timeout=10))
            except (ray.exceptions.RayError, TimeoutError):  # a slow or restarting cluster: try at the next poll
                continue

    def _show(self, records: list[dict]) -> None:
        for record in records:
            if "message" in record:  # a log message of rank 0
                if self.bar is not None:
                    self.bar.clear()
                logger.log(record["level"], record["message"])
                if self.bar is not None:
                    self.bar.refresh()
                continue
            step, total = record.get("step", 0), record.get("total_steps") or self.total
            shown = {k: record[k] for k in ("loss", "learning_rate", "reward", "eval_loss")
                     if isinstance(record.get(k), (int, float))}
            if record.get("elapsed_seconds"):
                samples = record.get("steps_this_run", step) * self.global_batch_size
                shown["samples/s"] = samples / record["elapsed_seconds"]
            if self.bar is not None:
                self.bar.total = total
                self.bar.update(max(0, step - self.bar.n))
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=True)
                continue
            tenths = int(10 * step / max(total, 1))
            if tenths > self.shown_tenths or "eval_loss" in shown:
                self.shown_tenths = max(tenths, self.shown_tenths)
                logger.info(f"step {step}/{total} " + " ".join(f"{k}={v:.4g}" for k, v in shown.items()))
