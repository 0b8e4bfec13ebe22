"""Fault injection on a real local Ray cluster: a worker killed mid-run, then its driver killed and restarted.

The run must resume from the latest checkpoint reported to Ray Train each time and end at the same
optimizer step as an uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEMO_RECIPE, ROOT

from rayft.cluster.storage import latest_checkpoint
from rayft.recipe.values import read_log

pytestmark = pytest.mark.slow

STEPS = ("max_steps=60", "save_strategy=steps", "save_steps=10", "logging_steps=5", "deepspeed=z2")


def wait_for_checkpoint(storage: Path, run_name: str, timeout: float = 300, newer_than: str | None = None) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = latest_checkpoint(str(storage), run_name)
        if found and found != newer_than:
            return found
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint of {run_name} in {storage} after {timeout} s")


def train_workers_of_this_session() -> list[int]:
    """PIDs of Ray Train worker processes started by this test session's own Ray instance."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                continue
            pid = int(entry.name)
            for _ in range(4):  # worker -> raylet -> ... -> this test process
                pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if pid == me:
                    found.append(int(entry.name))
                    break
        except (OSError, ValueError, IndexError):
            continue
    return found


def assert_resumed_and_finished(out: Path, times: int) -> list[int]:
    records = read_log(out)
    resumed = [r["resumed_from_step"] for r in records if "resumed_from_step" in r]
    assert len(resumed) == times and all(s >= 10 and s % 10 == 0 for s in resumed), records
    assert resumed == sorted(resumed), resumed
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(5, 61, 5)), steps  # every logging step once: the retrained ones replaced
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 60  # as uninterrupted
    assert (out / "adapter_model.safetensors").is_file()
    return resumed


def test_a_killed_worker_and_then_a_killed_driver_both_resume_from_the_latest_checkpoint(tmp_path, tiny_model,
                                                                                        ray_local):
    """One run takes both faults: a worker dies (Ray Train restarts the workers from the latest checkpoint),
    later the driver dies (rerunning the same command resumes the run from storage)."""
    address = ray_local._private.worker._global_node.address
    storage = tmp_path / "ray"
    command = [sys.executable, "-m", "rayft.orchestrator.cli", "train", str(DEMO_RECIPE),
               f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'out'}", f"ray_storage_path={storage}",
               "ray_run_name=faults", f"ray_address={address}", "ray_max_failures=1", *STEPS]
    driver = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = wait_for_checkpoint(storage, "faults")
        workers = train_workers_of_this_session()
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        # the restarted workers go on from `first` and report a later checkpoint before the driver is killed
        second = wait_for_checkpoint(storage, "faults", newer_than=first)
    finally:
        driver.kill()  # SIGKILL: no clean-up; Ray ends the dead driver's actors and placement group
        driver.wait()

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "has a checkpoint in storage: resuming from" in again.stdout
    after_worker, after_driver = assert_resumed_and_finished(tmp_path / "out", times=2)
    assert after_worker == step_of(first)
    assert after_driver >= step_of(second)


def step_of(checkpoint: str) -> int:
    return int(json.loads((Path(checkpoint) / "checkpoint" / "trainer_state.json").read_text())["global_step"])
