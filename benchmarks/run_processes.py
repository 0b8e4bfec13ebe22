"""Where a short run's CPU goes, process by process, on a local Ray instance that is already up (as in the tests).

    .venv/bin/python benchmarks/run_processes.py [--runs 3] [--steps 2] [--upstream] [KEY=VALUE ...]

Trains configs/demo_sft_lora.yaml for `--steps` steps (2 workers, ZeRO-2; KEY=VALUE overrides the recipe)
`--runs` times in this process and prints each
run's seconds and, for the last one, the CPU seconds of every process that used any during it (Ray Train's
controller and workers, Ray Data's actors, rayft's progress board, ...). `--upstream` runs Ray Train's trainer as
it comes (its placement-group cleaner and its metrics on) instead of rayft's local settings, as the peer.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import ray
from common import ROOT, TINY, table

sys.path.insert(0, str(ROOT / "tests"))


def cpu_by_process() -> dict[int, tuple[float, str]]:
    """pid -> (CPU seconds so far, its command line's start)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found[int(entry.name)] = ((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), cmdline[:40])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--upstream", action="store_true")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="recipe keys, KEY=VALUE")
    options = parser.parse_args()
    from conftest import DEMO_RECIPE, train_recipe

    import rayft.trainers.preflight  # noqa: F401  (the training stack in this process, as in the tests)
    from rayft.orchestrator import launch

    if options.upstream:
        launch.LocalRunTrainer = launch.DataParallelTrainer
        os.environ["RAY_TRAIN_METRICS_ENABLED"] = "1"
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    seconds, rows = [], []
    for _ in range(options.runs):
        before, start = cpu_by_process(), time.time()
        train_recipe(DEMO_RECIPE, Path(tempfile.mkdtemp()), TINY, f"max_steps={options.steps}", "logging_steps=1",
                     *options.overrides)
        seconds.append(round(time.time() - start, 1))
        after = cpu_by_process()
        # a process that ended during the run is gone from /proc and not counted; the workers are still exiting
        used = sorted(((cpu - before.get(pid, (0.0,))[0], name or "(a worker process, exiting)") for pid, (cpu, name)
                       in after.items()), reverse=True)
        rows = [{"CPU s (last run)": f"{cpu:.2f}", "process": name} for cpu, name in used if cpu >= 0.05]
    print(f"runs ({'Ray Train as it comes' if options.upstream else 'rayft local settings'}): {seconds} s")
    print(table(rows[:12], ["CPU s (last run)", "process"]))
    ray.shutdown()


if __name__ == "__main__":
    main()
