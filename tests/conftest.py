"""Shared fixtures: a tiny local model (built once per session), one local Ray instance for integration tests,
an S3 server, and what the rayft logger says during a test; and the markers, which say what a test costs:

- `unit`: no Ray and no subprocess (enforced below: starting either fails the test);
- `integration`: Ray or subprocesses, but no Ray Train run in this process (enforced: a trainer's fit fails it);
- `slow`: starts Ray Train runs (here or through a command);
- `gpu`: needs CUDA (skipped without).
Every test carries one of them (its own, or its module's).
"""

import contextlib
import json
import logging
import os
import socket
import subprocess
from pathlib import Path

import pytest

from rayft.recipe.logs import logger

COST_MARKERS = ("unit", "integration", "slow", "gpu")


def cost_of(item) -> str | None:
    """A test's cost marker: its own, else its class's or module's (the closest one wins)."""
    return next((m.name for m in item.iter_markers() if m.name in COST_MARKERS), None)


def pytest_collection_modifyitems(items):
    unmarked = [item.nodeid for item in items if cost_of(item) is None]
    if unmarked:
        raise pytest.UsageError(f"each test needs one of the markers {COST_MARKERS}: {unmarked[:5]}")


class _Refused:
    def __init__(self, what: str, marker: str):
        self.what, self.marker = what, marker

    def __call__(self, *args, **kwargs):
        raise AssertionError(f"a test marked {self.marker} may not {self.what}; mark it by its cost (conftest.py)")


@pytest.fixture(autouse=True)
def cost_matches_marker(request, monkeypatch):
    """Holds each test to its marker: a unit test starts no subprocess and no Ray, an integration test trains no
    Ray Train run in this process."""
    cost = cost_of(request.node)
    if cost == "unit":
        import ray

        monkeypatch.setattr(subprocess.Popen, "__init__", _Refused("start a subprocess", "unit"))
        monkeypatch.setattr(ray, "init", _Refused("start or join Ray", "unit"))
    elif cost == "integration":
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

        monkeypatch.setattr(DataParallelTrainer, "fit", _Refused("run Ray Train (mark it slow)", "integration"))
    yield


@pytest.fixture(scope="session", autouse=True)
def training_stack():
    """torch, Transformers and PEFT imported once in this process, so that rayft's driver code called here runs its
    helper's work in this process too (orchestrator/helper.py), as a command's helper process would."""
    import rayft.trainers.preflight  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
DEMO_RECIPE = ROOT / "configs" / "demo_sft_lora.yaml"
SHARED_DATA = ROOT.parent / "shared" / "data" / "llamafactory"
# `python -c WITHOUT_TORCH ARGS` is `rayft ARGS` in a process where importing torch or Transformers raises
# ImportError (as where they are not installed); its helper process and Ray's workers import them as usual
WITHOUT_TORCH = ("import sys\n"
                 "for name in ('torch', 'transformers'):\n"
                 "    sys.modules[name] = None\n"
                 "from rayft.orchestrator.cli import main\n"
                 "code = main(sys.argv[1:])\n"
                 "assert sys.modules['torch'] is None and sys.modules['transformers'] is None\n"
                 "sys.exit(code)\n")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from rayft.trainers.tiny_model import write_tiny_model

    demo = ROOT / "data" / "demo"
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", sorted(demo.glob("demo_*.json")))


S3_BUCKET = "rayft-test"
S3_SECRET_KEY = "moto-secret-key-for-rayft-tests"


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on 127.0.0.1, with a bucket holding a folder dataset of two JSON-lines files and its
    dataset_info.json; yields the environment a process needs to reach it (the standard AWS variables, as users
    reach MinIO or AWS) and a boto3 client."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "rayft",
           "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="rayft",
                          aws_secret_access_key=S3_SECRET_KEY, region_name="us-east-1")
    client.create_bucket(Bucket=S3_BUCKET)
    rows = json.loads((ROOT / "data" / "demo" / "demo_sft.json").read_text())
    half = len(rows) // 2
    for name, part in (("part-0.jsonl", rows[:half]), ("part-1.jsonl", rows[half:])):
        body = "\n".join(json.dumps(r) for r in part) + "\n"
        client.put_object(Bucket=S3_BUCKET, Key=f"data/sft/{name}", Body=body.encode())
    client.put_object(Bucket=S3_BUCKET, Key="data/dataset_info.json",
                      Body=json.dumps({"s3_sft": {"file_name": "sft"}}).encode())
    try:
        yield env, client
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_local(s3):
    """A local Ray instance owned by the test session (never `ray stop`: other Ray processes are not ours). Its
    workers reach the session's S3 server, as a cluster's nodes reach their object store, through the environment."""
    import ray

    # The instance's processes inherit this environment at start (every job's workers see it, as on a cluster's
    # nodes); this process gets its own back. No task of the suite may reach a model hub.
    node_env = {"HF_HUB_OFFLINE": "1", **s3[0]}
    before = {key: os.environ.get(key) for key in node_env}
    os.environ.update(node_env)
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
    yield ray
    ray.shutdown()


class _Lines(logging.Handler):
    def __init__(self, lines: list):
        super().__init__(logging.DEBUG)
        self.lines = lines

    def emit(self, record):
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def captured_log():
    """Every message of the rayft logger (debug included) while the block runs, as a list of strings."""
    lines: list[str] = []
    handler, level = _Lines(lines), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def rayft_log():
    """What the rayft logger says during the test (driver side, every level)."""
    with captured_log() as lines:
        yield lines


def train_recipe(recipe_path, tmp_path, tiny_model, *overrides):
    """Runs `rayft train` on a shipped recipe with the test's model and folders; returns (output_dir, loss records)."""
    from rayft.orchestrator.launch import run_train
    from rayft.recipe.loading import load_recipe
    from rayft.recipe.parse import parse_config
    from rayft.recipe.values import read_log

    cfg = parse_config(load_recipe(recipe_path, [
        f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'out'}",
        f"ray_storage_path={tmp_path / 'ray'}", *overrides]), base_dir=ROOT)
    run_train(cfg)
    out = Path(cfg.training["output_dir"])
    return out, [r for r in read_log(out) if "loss" in r]


SECRET = "hf_rayft_test_secret_value"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, tiny_model, ray_local):
    """The demo recipe trained once (2 workers, ZeRO-2, trackers on, a hub token set, a final evaluation on each
    of two datasets) for the tests that check a run's outputs, its logs and what comes after training:
    (output_dir, Result, loss records, driver log lines)."""
    from rayft.orchestrator.launch import run_train
    from rayft.recipe.loading import load_recipe
    from rayft.recipe.parse import parse_config
    from rayft.recipe.values import read_log

    tmp_path = tmp_path_factory.mktemp("demo")
    cfg = parse_config(load_recipe(DEMO_RECIPE, [
        f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'out'}", f"ray_storage_path={tmp_path / 'ray'}",
        f"hf_hub_token={SECRET}", "report_to=[tensorboard,mlflow,wandb]", "use_swanlab=true", "swanlab_mode=offline",
        "eval_dataset=demo_sft_eval,demo_sft",
        "eval_on_each_dataset=true"]), base_dir=ROOT)
    with captured_log() as driver_lines:
        result = run_train(cfg)
    out = Path(cfg.training["output_dir"])
    return out, result, [r for r in read_log(out) if "loss" in r], driver_lines


@pytest.fixture(scope="session")
def reward_run(tmp_path_factory, tiny_model, ray_local):
    """configs/demo_rm_lora.yaml trained once (evaluated on its own pairs): the reward model test_stages
    checks and the PPO tests score with. (output_dir, loss records)."""
    tmp_path = tmp_path_factory.mktemp("rm")
    return train_recipe(ROOT / "configs" / "demo_rm_lora.yaml", tmp_path, tiny_model, "eval_dataset=demo_dpo",
                        "max_samples=96", "num_train_epochs=3")
