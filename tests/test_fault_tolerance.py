"""Fault injection on a real local Ray cluster whose storage is a real S3 API (moto's server on loopback): a worker
killed mid-run, then its driver killed and the command run again.

The run reads its dataset from the bucket, keeps its tokenised data and checkpoints there, and must resume from the
latest checkpoint in the bucket each time and end at the same optimizer step as an uninterrupted run; the rerun reuses
the tokenised data, and the credentials appear in no log or saved file.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEMO_RECIPE, ROOT, S3_BUCKET, S3_SECRET_KEY, WITHOUT_TORCH

from rayft.cluster.session import only_this_machine
from rayft.cluster.storage import latest_checkpoint
from rayft.recipe.values import read_log

pytestmark = pytest.mark.slow

STEPS = ("max_steps=20", "save_strategy=steps", "save_steps=5", "logging_steps=5", "deepspeed=z2")


def wait_for_checkpoint(storage: str, run_name: str, driver: subprocess.Popen, log: Path, timeout: float = 300,
                        newer_than: str | None = None) -> str:
    """The run's latest checkpoint once there is one (newer than `newer_than`); fails at once if the driver ended."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = latest_checkpoint(storage, run_name)
        if found and found != newer_than:
            return found
        if driver.poll() is not None:
            raise AssertionError(f"the driver ended ({driver.returncode}) before a checkpoint:\n"
                                 + log.read_text()[-3000:])
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint of {run_name} in {storage} after {timeout} s:\n{log.read_text()[-3000:]}")


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


def step_of(client, checkpoint: str) -> int:
    """The optimizer step of a checkpoint in the bucket (s3://bucket/ray/run/checkpoint_...)."""
    key = checkpoint.removeprefix(f"s3://{S3_BUCKET}/") + "/checkpoint/trainer_state.json"
    return int(json.loads(client.get_object(Bucket=S3_BUCKET, Key=key)["Body"].read())["global_step"])


def test_a_killed_worker_and_then_a_killed_driver_both_resume_from_the_latest_checkpoint_on_s3(
        tmp_path, tiny_model, ray_local, s3, monkeypatch):
    """One run takes both faults: a worker dies (Ray Train restarts the workers from the latest checkpoint),
    later the driver dies (rerunning the same command resumes the run from the bucket)."""
    env, client = s3
    for key, value in env.items():  # this process lists the bucket's checkpoints, as the driver does
        monkeypatch.setenv(key, value)
    address = ray_local._private.worker._global_node.address
    # a running instance of one node, this machine's: the run joins it with a local instance's settings (no
    # placement-group cleaner; the killed driver's group is freed by Ray with its job, or the rerun could not start)
    assert only_this_machine()
    storage, out = f"s3://{S3_BUCKET}/ray", tmp_path / "out"
    command = [sys.executable, "-m", "rayft.orchestrator.cli", "train", str(DEMO_RECIPE),
               f"model_name_or_path={tiny_model}", f"output_dir={out}", "dataset=s3_sft", "eval_dataset=null",
               f"dataset_dir=s3://{S3_BUCKET}/data", f"tokenized_path=s3://{S3_BUCKET}/tok",
               f"ray_storage_path={storage}", "ray_run_name=faults", f"ray_address={address}", "ray_max_failures=1",
               *STEPS]
    run_env = {**os.environ, **env}
    log = tmp_path / "first_driver.log"
    with log.open("w") as sink:
        driver = subprocess.Popen(command, cwd=ROOT, env=run_env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        first = wait_for_checkpoint(storage, "faults", driver, log)
        workers = train_workers_of_this_session()
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        # the restarted workers go on from `first` and report a later checkpoint before the driver is killed
        second = wait_for_checkpoint(storage, "faults", driver, log, newer_than=first)
    finally:
        driver.kill()  # SIGKILL: no clean-up; Ray ends the dead driver's actors and placement group
        driver.wait()
    first_output = log.read_text()
    assert "train data: 256 examples" in first_output  # read from the bucket by Ray Data tasks
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=S3_BUCKET)["Contents"]}
    assert "tok/train/rayft_tokenized.json" in keys and any(k.startswith("tok/train/data/") for k in keys)

    # the rerun's driver cannot import torch or Transformers: a whole run, resume included, needs neither there
    again = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *command[3:]], cwd=ROOT, env=run_env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"has a checkpoint in storage: resuming from s3://{S3_BUCKET}/ray/faults/checkpoint_" in again.stdout
    assert f"reusing tokenised data from s3://{S3_BUCKET}/tok/train" in again.stdout
    records = read_log(out)
    after_worker, after_driver = [r["resumed_from_step"] for r in records if "resumed_from_step" in r]
    assert after_worker == step_of(client, first) == 5 and after_driver >= step_of(client, second) >= 10
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(5, 21, 5)), steps  # every logging step once: the retrained ones replaced
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 20  # as uninterrupted
    assert (out / "adapter_model.safetensors").is_file()
    # credentials reach Ray through the environment, never the saved config, logs or model card
    saved = "".join(p.read_text(errors="ignore") for p in out.iterdir() if p.suffix in (".yaml", ".json", ".md",
                                                                                          ".jsonl"))
    assert S3_SECRET_KEY not in saved + first_output + again.stdout + again.stderr
