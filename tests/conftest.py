"""Shared fixtures: a tiny local model (built once per session), one local Ray instance for integration tests,
and what the rayft logger says during a test."""

import contextlib
import logging
import socket
from pathlib import Path

import pytest

from rayft.recipe.logs import logger

ROOT = Path(__file__).resolve().parent.parent
DEMO_RECIPE = ROOT / "configs" / "demo_sft_lora.yaml"
SHARED_DATA = ROOT.parent / "shared" / "data" / "llamafactory"


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


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance owned by the test session (never `ray stop`: other Ray processes are not ours)."""
    import ray

    # no task of the suite may reach a model hub: tokenizers load from folders or a prepared hub cache
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
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
        f"hf_hub_token={SECRET}", "report_to=[tensorboard,mlflow,wandb]", "eval_dataset=demo_sft_eval,demo_sft",
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
