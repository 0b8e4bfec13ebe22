"""Job submission end to end: a head node started with `ray start --head` and token authentication on
127.0.0.1, a recipe submitted with `ray job submit` and followed with `rayft logs` and `rayft status`, and a
failing job submitted with `rayft submit`.

Only the processes of the head node this test started are stopped (never `ray stop`).
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SMALL_RUN = ["max_steps=4", "ray_num_workers=1", "deepspeed=null", "logging_steps=1"]


def processes_of(*markers: str) -> list[int]:
    """The head node's processes (their command lines name its temp dir or GCS port) and their descendants."""
    children, roots = {}, []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
        if any(marker.encode() in cmdline for marker in markers):
            roots.append(int(entry.name))
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return sorted(found)


@pytest.fixture(scope="module")
def head_node():
    temp_dir = tempfile.mkdtemp(prefix="rfj", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # the job's `python` is this venv's
    env.pop("RAY_ADDRESS", None)
    dashboard, gcs = free_port(), free_port()
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                    "--num-cpus=2", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    f"--temp-dir={temp_dir}", "--disable-usage-stats",
                    # ports of their own: the test session's local Ray instance holds the default ones
                    f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                    f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                    f"--ray-client-server-port={free_port()}"], env=env, check=True, capture_output=True,
                   timeout=120)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_until_jobs_are_accepted(address, env)
        yield address, env, f"127.0.0.1:{gcs}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in processes_of(temp_dir, f":{gcs}\x00"):  # /proc cmdlines are NUL-separated
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_until_jobs_are_accepted(address: str, env: dict, timeout: float = 120) -> None:
    """A new head's job API answers before its agent can take jobs ("No available agent"): wait for that."""
    deadline = time.time() + timeout
    while True:
        proc = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--", "echo", "ready"],
                              env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            return
        if time.time() > deadline:
            raise TimeoutError(proc.stdout[-2000:] + proc.stderr[-2000:])
        time.sleep(2)


def rayft(*args, env, timeout=600):
    return subprocess.run([str(BIN / "rayft"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def outputs(tmp_path, tiny_model, name):
    return [f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / name}",
            f"ray_storage_path={tmp_path / 'ray'}", f"ray_run_name={name}", *SMALL_RUN]


def assert_trained(out: Path):
    for folder in (out, out.parent / "ray" / out.name / "output"):  # output_dir, and its copy in storage
        assert (folder / "adapter_model.safetensors").is_file(), folder
        assert json.loads((folder / "all_results.json").read_text())["train_loss"] > 0


def test_ray_job_submit_runs_a_recipe_unchanged_and_rayft_follows_it_and_a_failing_job(head_node, tmp_path,
                                                                                        tiny_model):
    address, env, _ = head_node
    # rayft's own submit (without waiting) of a pipeline, one job for its stages, that fails inside the cluster: its
    # first stage names a dataset the cluster lacks
    failing = rayft("submit", "configs/pipeline_demo.yaml", *outputs(tmp_path, tiny_model, "failing")[:3],
                    "pt.dataset=no_such_dataset", "--address", address, "--no-wait", env=env)
    assert failing.returncode == 0, failing.stdout[-3000:] + failing.stderr[-3000:]
    failed_id = failing.stdout.split("submitted job ", 1)[1].split()[0]
    assert f"rayft logs {failed_id}" in failing.stdout  # says how to follow it

    # beside it, Ray's own CLI runs a recipe unchanged: rayft inside the job joins the cluster
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--no-wait",
         "--runtime-env-json", json.dumps({"excludes": [".venv", ".cache/torch_extensions", ".git", "saves"]}),
         "--", "python", "-m", "rayft.orchestrator.cli", "train", "configs/demo_sft_lora.yaml",
         *outputs(tmp_path, tiny_model, "by-ray-job-submit")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = (proc.stdout + proc.stderr).split("Job '", 1)[1].split("'", 1)[0]

    followed = rayft("logs", job_id, "--address", address, "--follow", env=env)  # any job of the cluster
    assert followed.returncode == 0, followed.stdout[-3000:]
    assert "joining that cluster" in followed.stdout  # rayft took RAY_ADDRESS instead of starting Ray
    assert "[rayft] step 4/4" in followed.stdout and f"job {job_id} SUCCEEDED" in followed.stdout
    assert_trained(tmp_path / "by-ray-job-submit")
    status = rayft("status", job_id, "--address", address, env=env, timeout=60)
    assert (status.returncode, status.stdout.strip()) == (0, "SUCCEEDED")

    followed = rayft("logs", failed_id, "--address", address, "--follow", env=env)  # the job's log, to the end
    assert followed.returncode == 1
    assert "stage pt: " in followed.stdout and "no_such_dataset" in followed.stdout and "FAILED" in followed.stdout
    status = rayft("status", failed_id, "--address", address, env=env, timeout=60)
    assert (status.returncode, status.stdout.strip()) == (1, "FAILED")


def test_rayft_submit_refuses_relative_outputs_and_bad_recipes_before_submitting(tmp_path, tiny_model):
    env = {**os.environ}
    proc = rayft("submit", "configs/demo_sft_lora.yaml", "--address", "http://127.0.0.1:1", env=env, timeout=120)
    assert proc.returncode == 2 and "output_dir: 'saves/demo-sft-lora' is relative" in proc.stderr
    proc = rayft("submit", "configs/demo_sft_lora.yaml", *outputs(tmp_path, tiny_model, "x"), "lora_rnak=4",
                 "--address", "http://127.0.0.1:1", env=env, timeout=120)
    assert proc.returncode == 2 and "did you mean 'lora_rank'" in proc.stderr


def test_rayft_serve_leaves_its_application_on_the_cluster_and_stops_it_by_name(head_node, tiny_model):
    """`rayft serve --detach` deploys to the cluster (token authentication on, sharing the job test's head) and
    returns; the API answers without the command; `--stop` removes that application."""
    import httpx

    _, env, gcs = head_node
    port = free_port()
    recipe = ["configs/serve_lora.yaml", f"model_name_or_path={tiny_model}", "serve_adapters=null",
              f"ray_address={gcs}", f"serve_port={port}", "serve_name=tiny", "do_sample=false", "max_new_tokens=4"]
    detached = rayft("serve", *recipe, "--detach", env=env)
    assert detached.returncode == 0, detached.stdout[-3000:] + detached.stderr[-3000:]
    assert "left running on the cluster; stop it with `rayft serve RECIPE --stop`" in detached.stdout
    base = f"http://127.0.0.1:{port}/v1"
    assert [m["id"] for m in httpx.get(f"{base}/models").json()["data"]] == [tiny_model.name]
    reply = httpx.post(f"{base}/completions", json={"model": tiny_model.name, "prompt": "The crow"}, timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 4
    stopped = rayft("serve", *recipe, "--stop", env=env)
    assert stopped.returncode == 0 and "application 'tiny' stopped" in stopped.stdout, stopped.stderr[-3000:]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{base}/models").raise_for_status()
