"""A run's fixed cost, phase by phase, as whole commands: this checkout against an earlier one (--before).

    .venv/bin/python benchmarks/startup.py [--before ../other-checkout] [--repeats 3] [--empty-runs 3]

1. `rayft keys lora_rank` and `rayft plan configs/demo_sft_lora.yaml`: the median of `--repeats` whole commands.
2. `rayft train configs/demo_sft_lora.yaml max_steps=2 logging_steps=1` (2 workers, ZeRO-2, a fresh local Ray
   instance), `--repeats` times: the seconds from the command's start to each line that ends a phase (medians),
   the driver process's own peak resident memory (sampled every 0.05 s; its helper process is shown apart), and the
   workers' own start-up line (imports per library, model, first step) where the checkout prints one.
3. On a local instance that is already up (as tests and a `ray start --head` session have it): the same 2-step
   command joining it (`ray_address`), and Ray Train's own floor, a 2-worker run of a function that only reports,
   with rayft's local settings and with Ray Train's own.

Both checkouts run with their own `.venv`, one after the other on the same machine.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from common import ROOT, TINY, table, write

# (phase name, the first line that ends it); a phase ends when its line is printed, the last when the command exits
PHASES = [
    ("recipe read, model and data checked", "[rayft] starting a local Ray instance"),
    ("Ray started, data tokenised", "[rayft] train data:"),
    ("worker group started (Ray Train), workers' imports", "[rayft] 2 worker(s) on"),
    ("model loaded, LoRA applied", "[rayft] lora: trainable params"),
    ("first optimizer step", "[rayft] step 1/"),
    ("second step, saving, workers stopped", "[rayft] training finished"),
]


def timed_command(python: Path, cwd: Path, args: list[str]) -> dict:
    """Runs `python -m rayft.orchestrator.cli ARGS` in `cwd`: when each output line came, the exit, the driver's peak
    RSS (its own process) and its children's (the helper)."""
    start = time.perf_counter()
    proc = subprocess.Popen([str(python), "-m", "rayft.orchestrator.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, "TORCH_EXTENSIONS_DIR": str(cwd / ".cache" / "torch_extensions")})
    peaks = {"driver": 0, "helper": 0}
    done = threading.Event()

    def sample():
        me = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                peaks["driver"] = max(peaks["driver"], me.memory_info().rss)
                for child in me.children():
                    if "rayft.orchestrator.helper" in " ".join(child.cmdline()):  # the helper process
                        peaks["helper"] = max(peaks["helper"], child.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = [(time.perf_counter() - start, line.rstrip()) for line in proc.stdout]
    code = proc.wait()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return {"lines": lines, "seconds": seconds, "code": code, "driver_mb": peaks["driver"] / 2**20,
            "helper_mb": peaks["helper"] / 2**20}


def phases_of(run: dict) -> dict:
    """Seconds per phase of one `rayft train` run, from the lines that end them."""
    ends, last = {}, 0.0
    for name, marker in PHASES:
        at = next((t for t, line in run["lines"] if line.startswith(marker)), None)
        if at is not None:
            ends[name], last = at - last, at
    ends["exit (Ray stopped)"] = run["seconds"] - last
    return ends


def median(values) -> float:
    return round(statistics.median(values), 2)


def measure(checkout: Path, repeats: int, tmp: Path) -> dict:
    python = checkout / ".venv" / "bin" / "python"
    found = {"keys": [], "plan": [], "train": []}
    for i in range(repeats):
        found["keys"].append(timed_command(python, checkout, ["keys", "lora_rank"]))
        found["plan"].append(timed_command(python, checkout, ["plan", "configs/demo_sft_lora.yaml",
                                                              f"model_name_or_path={TINY}"]))
        found["train"].append(timed_command(python, checkout, train_args(tmp / f"{checkout.name}-{i}")))
    for kind, runs in found.items():
        failed = [r for r in runs if r["code"] != 0]
        if failed:
            raise SystemExit(f"{checkout}: rayft {kind} failed:\n" + "\n".join(line for _, line in failed[0]["lines"]))
    phases = [phases_of(run) for run in found["train"]]
    workers = [line for run in found["train"] for _, line in run["lines"] if "worker start-up:" in line]
    return {
        "keys_s": median(r["seconds"] for r in found["keys"]), "plan_s": median(r["seconds"] for r in found["plan"]),
        "train_s": median(r["seconds"] for r in found["train"]),
        "phases": {name: median(p.get(name, 0.0) for p in phases) for name in phases[0]},
        "driver_mb": median(r["driver_mb"] for r in found["train"]),
        "helper_mb": median(r["helper_mb"] for r in found["train"]),
        "plan_driver_mb": median(r["driver_mb"] for r in found["plan"]),
        "worker_startup": workers[len(workers) // 2] if workers else None,
    }


def train_args(out: Path, *extra: str) -> list[str]:
    """The 2-step, 2-worker demo command's arguments, its outputs under `out`."""
    return ["train", "configs/demo_sft_lora.yaml", "max_steps=2", "logging_steps=1", f"model_name_or_path={TINY}",
            f"output_dir={out}/out", f"ray_storage_path={out}/ray", "ray_run_name=startup", *extra]


def on_a_running_instance(repeats: int, empty: int, tmp: Path) -> dict:
    """On a local instance this process starts and holds (as a `ray start --head` session, or the tests, have one):
    the whole 2-step command joining it (ray_address) `repeats` times, then Ray Train's own cost, `empty` times each:
    a 2-worker run of a function that only reports, with rayft's trainer for local runs and with Ray Train's own
    (its placement-group cleaner and metrics on), in turn."""
    import logging

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from rayft.orchestrator.launch import LocalRunTrainer, ray_train_settings
    from rayft.trainers.entry import TorchBackend

    def report_once(config):
        import ray.train

        ray.train.report({"done": 1})

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    seconds: dict[str, list[float]] = {"rayft": [], "ray_train": []}
    address = ray.get_runtime_context().gcs_address
    try:
        commands = [timed_command(ROOT / ".venv" / "bin" / "python", ROOT,
                                  train_args(tmp / f"session-{i}", f"ray_address={address}")) for i in range(repeats)]
        failed = [run for run in commands if run["code"] != 0]
        if failed:
            raise SystemExit("rayft train on the running instance failed:\n"
                             + "\n".join(line for _, line in failed[0]["lines"]))
        for i in range(empty):
            for name, cls in (("ray_train", DataParallelTrainer), ("rayft", LocalRunTrainer)):
                with ray_train_settings(local=True):
                    if name == "ray_train":
                        os.environ["RAY_TRAIN_METRICS_ENABLED"] = "1"
                    start = time.perf_counter()
                    cls(report_once, backend_config=TorchBackend(backend="gloo"),
                        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                        run_config=RunConfig(name=f"empty-{name}-{i}", storage_path=str(tmp / "empty"))).fit()
                    seconds[name].append(time.perf_counter() - start)
                    os.environ.pop("RAY_TRAIN_METRICS_ENABLED", None)
    finally:
        ray.shutdown()
    phases = [phases_of(run) for run in commands]
    return {"train_s": [run["seconds"] for run in commands],
            "phases": {name: median(p.get(name, 0.0) for p in phases) for name in phases[0]}, "empty_runs_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", type=Path, help="an earlier checkout with its own .venv, measured the same way")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--empty-runs", type=int, default=3)
    args = parser.parse_args()
    checkouts = {"before": args.before.resolve()} if args.before else {}
    checkouts["this checkout"] = ROOT
    with tempfile.TemporaryDirectory() as tmp:
        found = {name: measure(path, args.repeats, Path(tmp)) for name, path in checkouts.items()}
        running = on_a_running_instance(args.repeats, args.empty_runs, Path(tmp))
    names = list(found)
    rows = [{"what": "rayft keys lora_rank (s)", **{n: found[n]["keys_s"] for n in names}},
            {"what": "rayft plan, demo recipe (s)", **{n: found[n]["plan_s"] for n in names}},
            {"what": "rayft plan: driver peak RSS (MB)", **{n: round(found[n]["plan_driver_mb"]) for n in names}}]
    rows += [{"what": f"train: {phase} (s)", **{n: found[n]["phases"].get(phase) for n in names}}
             for phase in found[names[-1]]["phases"]]
    rows += [{"what": "rayft train, 2 steps, 2 workers, whole command (s)", **{n: found[n]["train_s"] for n in names}},
             {"what": "rayft train: driver peak RSS (MB)", **{n: round(found[n]["driver_mb"]) for n in names}},
             {"what": "rayft train: helper process peak RSS (MB)", **{n: round(found[n]["helper_mb"]) for n in names}}]
    print(table(rows, ["what", *names]))
    for name in names:
        print(f"{name}: {found[name]['worker_startup'] or 'no worker start-up line'}")
    session = running["train_s"]
    print(f"rayft train, 2 steps, 2 workers, joining a running local instance: median {median(session)} s "
          f"({', '.join(f'{s:.1f}' for s in session)}); phases: "
          + ", ".join(f"{name} {seconds}" for name, seconds in running["phases"].items()))
    for name, runs in running["empty_runs_s"].items():
        print(f"empty 2-worker run on a running local instance, {name}'s trainer: median {median(runs)} s "
              f"({', '.join(f'{s:.1f}' for s in runs)})")
    write("startup", {"commands": found, "running_instance": running, "argv": sys.argv[1:]})


if __name__ == "__main__":
    main()
