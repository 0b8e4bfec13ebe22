"""A checkpoint on SIGTERM: the notice a spot or preemptible node gets before it is taken away.

Ray's worker process exits at once on SIGTERM. rayft's handler instead notes the time and lets training reach the
end of its optimizer step. There every rank learns that some rank got the notice, and all of them save a checkpoint
when the rest of the grace period allows it. Then they wait for the warned node to go, to the end of the grace period
at most, and stop; Ray Train restarts the group from that checkpoint without the node. If the grace period runs out
first, the process leaves as Ray's handler would have.
"""

import math
import os
import signal
import threading
import time

import ray
import torch
import torch.distributed as dist
from transformers import TrainerCallback

from rayft.recipe.logs import logger

# Set by the handler (on the process's main thread), read by the training thread. One per process: a Ray Train
# worker process runs one training function.
NOTICE = threading.Event()
_NOTICED_AT: list[float] = []


class Preempted(RuntimeError):
    """The group stops after a SIGTERM, so that Ray Train restarts it from the checkpoint (if one was saved)."""


def install(grace_s: float) -> None:
    """Replaces Ray's SIGTERM handler of this process; must run on the main thread (an actor task does)."""

    def on_sigterm(signum, frame):
        if NOTICE.is_set():
            return
        _NOTICED_AT.append(time.monotonic())
        NOTICE.set()
        # the platform kills the node when the grace period ends; leave by then whatever training is doing
        threading.Timer(grace_s, os._exit, args=(128 + signal.SIGTERM,)).start()

    signal.signal(signal.SIGTERM, on_sigterm)


def install_in_this_worker(grace_s: float) -> None:
    """Installs the handler from the training thread, through a task on this worker actor's main thread."""
    actor = ray.get_runtime_context().current_actor
    ray.get(actor.execute.remote(install, grace_s))


def grace_left(grace_s: float) -> float:
    """Seconds of the grace period left on this worker (infinite when it got no notice)."""
    return grace_s - (time.monotonic() - _NOTICED_AT[0]) if NOTICE.is_set() else math.inf


class CheckpointOnSigterm(TrainerCallback):
    """At the end of every optimizer step, all ranks agree whether one of them got SIGTERM; if so they save a
    checkpoint (when the shortest grace left exceeds the last save's duration), wait for the warned node to go, and
    stop with `Preempted`.

    The wait matters: a group that stops at once is restarted by Ray Train at its old size, on the node about to
    go, and a node that goes while Ray Train creates the new group's workers leaves it waiting for that worker for
    good (Ray 2.60 bounds the wait for the placement group, not for the workers). When the node goes, its worker
    dies with it and Ray Train restarts the group without it; if it does not (a SIGTERM that was no preemption),
    the group stops one second before the warned worker's grace period ends.
    """

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.save_seconds = 0.0  # how long the last checkpoint took; nothing measured yet: assume it fits
        self.save_started: float | None = None
        self.leaving_at: int | None = None
        self.leave_by = math.inf  # monotonic time: the warned worker's grace period, as all ranks agreed on it

    def on_step_end(self, args, state, control, **kwargs):
        shortest = self._shortest_grace_left(args.device)
        if shortest < math.inf:
            self.leaving_at = state.global_step
            self.leave_by = time.monotonic() + shortest
            if shortest > self.save_seconds:
                control.should_save = True
                logger.warning(f"SIGTERM: saving a checkpoint at step {state.global_step} ({shortest:.0f} s of "
                               f"the grace period left; {self._last_save()})")
            else:
                self._leave(state.global_step, f"no checkpoint: {shortest:.0f} s of the grace period left, "
                                               f"{self._last_save()}")
        if control.should_save:
            self.save_started = time.monotonic()
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.save_started is not None:
            self.save_seconds = time.monotonic() - self.save_started
        if self.leaving_at is not None:
            # Ray Train learns of the checkpoint when its controller polls this worker's report: wait for that
            _wait_until_reported(min(10.0, max(grace_left(self.grace_s), 0.0)))
            self._leave(state.global_step, "checkpoint saved")

    def _last_save(self) -> str:
        return f"the last save took {self.save_seconds:.1f} s" if self.save_seconds else "no save timed yet"

    def _shortest_grace_left(self, device) -> float:
        left = torch.tensor([min(grace_left(self.grace_s), 1e30)], dtype=torch.float64,
                            device=device if device.type == "cuda" else "cpu")
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(left, op=dist.ReduceOp.MIN)
        return math.inf if left.item() >= 1e30 else left.item()

    def _leave(self, step: int, what: str):
        left = self.leave_by - 1.0 - time.monotonic()
        if left > 0:
            logger.warning(f"SIGTERM: the group waits for the warned node to go ({left:.0f} s at most)")
            time.sleep(left)
        raise Preempted(f"a worker got SIGTERM; the group stops at step {step} ({what}) and Ray Train restarts it "
                        "from the latest checkpoint")


def _wait_until_reported(timeout_s: float) -> None:
    """Blocks until Ray Train's controller has taken this worker's reports (it polls every 0.5 to 2 s), or for
    `timeout_s` at most: a controller that cannot poll a lost worker's group may not take them at all."""
    from ray.train.v2._internal.execution.context import get_train_context  # Ray Train keeps no public form

    results = get_train_context().execution_context.result_queue
    deadline = time.monotonic() + timeout_s
    while results.unfinished_tasks and time.monotonic() < deadline:
        time.sleep(0.05)
