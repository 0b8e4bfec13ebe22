"""Fault injection on a real local Ray cluster: a worker killed mid-run, and a driver killed and restarted.

Both runs must resume from the latest checkpoint reported to Ray Train and end at the same optimizer
step as an uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rayft.cluster.storage import latest_checkpoint
from rayft.orchestrator.config import load_recipe, parse_config
from rayft.orchestrator.launch import run_train
from rayft.trainers.callbacks import read_log

from conftest import DEMO_RECIPE, ROOT

pytestmark = pytest.mark.slow

STEPS = ("max_steps=60", "save_strategy=steps", "save_steps=10", "logging_steps=5", "deepspeed=z2")


def wait_for_checkpoint(storage: Path, run_name: str, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = latest_checkpoint(str(storage), run_name)
        if found:
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


def assert_resumed_once_and_finished(out: Path):
    records = read_log(out)
    resumed = [r["resumed_from_step"] for r in records if "resumed_from_step" in r]
    assert len(resumed) == 1 and resumed[0] >= 10 and resumed[0] % 10 == 0, records
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(5, 61, 5)), steps  # every logging step once: the retrained ones replaced
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 60  # as uninterrupted
    assert (out / "adapter_model.safetensors").is_file()
    return resumed[0]


def test_a_killed_worker_restarts_from_the_latest_checkpoint(tmp_path, tiny_model, ray_local):
    cfg = parse_config(load_recipe(DEMO_RECIPE, [
        f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'out'}", f"ray_storage_path={tmp_path / 'ray'}",
        "ray_run_name=worker-kill", "ray_max_failures=1", *STEPS]), base_dir=ROOT)
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(result=run_train(cfg)))
    runner.start()
    wait_for_checkpoint(tmp_path / "ray", "worker-kill")
    workers = train_workers_of_this_session()
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    runner.join(timeout=600)
    assert not runner.is_alive() and outcome["result"].error is None
    assert_resumed_once_and_finished(tmp_path / "out")


def test_rerunning_after_the_driver_died_resumes_the_run(tmp_path, tiny_model, ray_local):
    address = ray_local._private.worker._global_node.address
    command = [sys.executable, "-m", "rayft.orchestrator.cli", "train", str(DEMO_RECIPE),
               f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'out'}",
               f"ray_storage_path={tmp_path / 'ray'}", "ray_run_name=driver-kill", f"ray_address={address}", *STEPS]
    driver = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = wait_for_checkpoint(tmp_path / "ray", "driver-kill")
    finally:
        driver.kill()  # SIGKILL: no clean-up; Ray ends the dead driver's actors and placement group
        driver.wait()

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "has a checkpoint in storage: resuming from" in again.stdout
    resumed = assert_resumed_once_and_finished(tmp_path / "out")
    assert resumed >= int(json.loads((Path(first) / "checkpoint" / "trainer_state.json").read_text())["global_step"])
