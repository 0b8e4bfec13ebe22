"""Trainer callbacks: the `trainer_log.jsonl` record and the driver's progress (rank 0), and Ray reporting."""

import json
import time
from pathlib import Path

import ray
import ray.train
import ray.util
import torch
from transformers import TrainerCallback

from rayft.recipe.logs import logger
from rayft.recipe.values import module_matches, read_log
from rayft.trainers.outputs import save_config


class LogCallback(TrainerCallback):
    """Appends one JSON line per logging step to output_dir/trainer_log.jsonl, logs it (at debug level: the
    driver shows a progress bar), and posts it to the driver's progress board when there is one.

    Every record carries the group's `world_size` and `global_batch_size`; a run resumed by a group of another
    size (an elastic resize) logs the resize and records it with the checkpoint it continued from.
    """

    def __init__(self, output_dir: str, progress: str | None = None, world_size: int = 1,
                 global_batch_size: int | None = None, resumed_from: str | None = None):
        self.path = Path(output_dir) / "trainer_log.jsonl"
        self.group = {"world_size": world_size}
        if global_batch_size is not None:
            self.group["global_batch_size"] = global_batch_size
        self.resumed_from = resumed_from
        self.start = time.time()
        self.first_step = 0
        self.board = None
        self.progress = progress

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()
        self.first_step = state.global_step
        if self.progress and state.is_world_process_zero:
            self.board = ray.get_actor(self.progress)
        if not state.is_world_process_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if state.global_step == 0:
            self.path.write_text("")  # a fresh run, a fresh log
            return
        # Resumed from a checkpoint: keep what was logged up to it, drop what came after it (those steps
        # are trained again), and record the resumption.
        kept = [r for r in read_log(self.path.parent) if r.get("step", 0) <= state.global_step]
        resumed = {"step": state.global_step, "resumed_from_step": state.global_step, **self.group,
                   "timestamp": round(time.time(), 3)}
        before = next((r["world_size"] for r in reversed(kept) if "world_size" in r), self.group["world_size"])
        if before != self.group["world_size"]:
            # the checkpoint as stored (a converted ZeRO checkpoint is a local view linking to its files)
            state_file = Path(self.resumed_from or ".", "trainer_state.json")
            stored = str(state_file.resolve().parent) if state_file.is_file() else self.resumed_from
            resumed.update(previous_world_size=before, checkpoint=stored)
            logger.info(f"resized: {before} -> {self.group['world_size']} worker(s) at step {state.global_step}, "
                        f"from checkpoint {stored}; global batch {self.group.get('global_batch_size')}")
        kept.append(resumed)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        logger.info(f"resumed at step {state.global_step}/{state.max_steps} with {self.group['world_size']} "
                    "worker(s)")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "total_steps": state.max_steps, **logs, **self.group,
                  "epoch": logs.get("epoch", state.epoch), "elapsed_seconds": round(time.time() - self.start, 3),
                  "timestamp": round(time.time(), 3)}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None:
            self.board.post.remote({**record, "steps_this_run": state.global_step - self.first_step})
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in logs.items() if k != "epoch")
        logger.debug(f"step {state.global_step}/{state.max_steps} epoch {state.epoch or 0:.2f} {shown}")


class RecipeInCheckpoint(TrainerCallback):
    """Rank 0 writes the resolved recipe (secrets masked) and the plan into every checkpoint folder before Ray
    Train's callback reports it: a run resumed from the checkpoint says which keys that change training it changed.

    Then the ranks wait for each other. Ray's callback has every rank copy its checkpoint folder, and ranks on one
    node share that folder: without the wait, a rank could copy it while another still writes its files there."""

    def __init__(self, masked_recipe: dict, plan):
        self.masked_recipe, self.plan = masked_recipe, plan

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.process_index == 0 and folder.is_dir():
            save_config(str(folder), self.masked_recipe, self.plan)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()


class ReportEveryLog(TrainerCallback):
    """Reports every logged record to Ray Train, so that a sweep's scheduler sees each measurement.

    Every rank logs the same records (the Trainer averages losses over ranks before logging), and every
    rank must call ray.train.report the same number of times. The record names the run's placement group:
    a trial the scheduler stops is killed with its Train controller, whose placement group outlives it,
    and the sweep's driver removes it by this id.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            group = ray.util.get_current_placement_group()
            ray.train.report({**logs, "step": state.global_step, "total_steps": state.max_steps,
                              "placement_group": group.id.hex() if group else None})






class ModuleTimes(TrainerCallback):
    """`profile_modules` (LLaMA-Factory's key): the forward and backward time of every module whose name matches one
    of its fnmatch patterns (`*.layers.0.self_attn,*.layers.*.mlp`), per call, averaged over each logging window.
    CUDA events time GPU workers (synchronised at each step's end); CPU workers, which compute synchronously, are
    timed with the clock (LLaMA-Factory times CUDA and NPU only). Rank 0 logs one line per module and appends one
    record per logging step to `output_dir/module_times.jsonl`."""

    FILE = "module_times.jsonl"

    def __init__(self, patterns: list[str], output_dir: str, rank: int):
        self.patterns, self.rank, self.file = patterns, rank, Path(output_dir) / self.FILE
        self.handles, self.started, self.cuda = [], {}, torch.cuda.is_available()
        self.times: dict[tuple[str, str], list] = {}  # (module, "forward" / "backward") -> times in ms or events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for name, module in model.named_modules():
            if module_matches(name, self.patterns):
                self.handles += [module.register_forward_pre_hook(self._start(name, "forward")),
                                 module.register_forward_hook(self._stop(name, "forward")),
                                 module.register_full_backward_pre_hook(self._start(name, "backward")),
                                 module.register_full_backward_hook(self._stop(name, "backward"))]
        if self.rank == 0:
            clock = "CUDA events" if self.cuda else "the CPU clock"
            logger.info(f"profile_modules: timing {len(self.handles) // 4} module(s) with {clock}")

    def _start(self, name: str, phase: str):
        def hook(*_):
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                start.record()
                self.started[name, phase] = start
            else:
                self.started[name, phase] = time.perf_counter()
        return hook

    def _stop(self, name: str, phase: str):
        def hook(*_):
            start = self.started.pop((name, phase), None)
            if start is None:
                return
            if self.cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self.times.setdefault((name, phase), []).append((start, end))
            else:
                self.times.setdefault((name, phase), []).append((time.perf_counter() - start) * 1000)
        return hook

    def on_step_end(self, args, state, control, **kwargs):
        if self.cuda and self.times:
            torch.cuda.synchronize()
            self.times = {k: [v if isinstance(v, float) else v[0].elapsed_time(v[1]) for v in values]
                          for k, values in self.times.items()}

    def on_log(self, args, state, control, **kwargs):
        if not self.times:
            return
        names = sorted({name for name, _ in self.times})
        record = {"step": state.global_step, "modules": {name: {
            f"{phase}_ms": round(sum(t) / len(t), 4) if (t := self.times.get((name, phase))) else None
            for phase in ("forward", "backward")} | {"calls": len(self.times.get((name, "forward"), []))}
            for name in names}}
        self.times.clear()
        if self.rank == 0:
            with self.file.open("a") as f:
                f.write(json.dumps(record) + "\n")
            for name, t in record["modules"].items():
                logger.info(f"module time at step {state.global_step}: {name} forward {t['forward_ms']} ms, "
                            f"backward {t['backward_ms']} ms (mean of {t['calls']} calls)")

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class TorchProfiler(TrainerCallback):
    """torch.profiler over the training steps (`enable_torch_profiler`, LLaMA-Factory's `profiler_*` keys): each
    worker writes its own traces (Chrome / TensorBoard JSON) to `<profiler_output_dir>/rank_<N>`, by default
    `<output_dir>/profiler` on that worker's node."""

    def __init__(self, settings, output_dir: str, rank: int):
        self.settings, self.profiler = settings, None
        self.folder = Path(settings.profiler_output_dir or Path(output_dir) / "profiler") / f"rank_{rank}"

    def on_train_begin(self, args, state, control, **kwargs):
        import torch

        s = self.settings
        self.folder.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=s.profiler_wait_steps, warmup=s.profiler_warmup_steps,
                                             active=s.profiler_active_steps, repeat=s.profiler_repeat),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.folder)),
            record_shapes=s.profiler_record_shapes, profile_memory=s.profiler_profile_memory,
            with_stack=s.profiler_with_stack)
        self.profiler.start()
        logger.info(f"torch profiler: wait {s.profiler_wait_steps}, warm-up {s.profiler_warmup_steps}, record "
                    f"{s.profiler_active_steps} step(s), {s.profiler_repeat or 'unlimited'} cycle(s); traces in "
                    f"{self.folder}")

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None:
            self.profiler.step()

    def on_train_end(self, args, state, control, **kwargs):
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None
