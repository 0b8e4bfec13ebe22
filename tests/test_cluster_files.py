"""The files in cluster/ parse, and say what rayft needs: Ray's schema for the launcher config, a valid
recipe and runtime_env for the KubeRay job, a runtime_env example that fits `ray_runtime_env`."""

import json
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from rayft.recipe.loading import load_recipe
from rayft.recipe.parse import parse_config

pytestmark = pytest.mark.unit
CLUSTER = ROOT / "cluster"


def test_the_launcher_config_is_valid_for_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(prepare_config(config))  # filled with the provider defaults, as `ray up` does; raises if invalid
    assert config["provider"]["type"] == "aws"
    assert any("torch==2.13.0" in c for c in config["setup_commands"])
    assert config["head_node_type"] in config["available_node_types"]
    with pytest.raises(Exception, match="max_workerz"):  # the check can fail: a misspelt key is a schema violation
        validate_config(prepare_config({**config, "max_workerz": 2}))


def test_the_kuberay_job_runs_a_shipped_recipe_that_validates():
    from ray.runtime_env import RuntimeEnv

    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:5] == ["python", "-m", "rayft.orchestrator.cli", "train", "/app/configs/demo_sft_lora.yaml"]
    recipe = ROOT / "configs" / Path(command[4]).name
    overrides = command[5:]
    cfg = parse_config(load_recipe(recipe, overrides), base_dir=ROOT)
    worker_group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert cfg.ray.ray_num_workers == len(worker_group["template"]["spec"]["containers"]) * 2
    paths = [v for k, v in (o.split("=", 1) for o in overrides) if k in ("output_dir", "ray_storage_path")]
    assert all(Path(v).is_absolute() for v in paths)
    RuntimeEnv(**yaml.safe_load(job["spec"]["runtimeEnvYAML"]))  # raises on an invalid runtime_env
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == __import__("ray").__version__


def test_the_runtime_env_example_is_a_valid_ray_runtime_env_key(tmp_path):
    from ray.runtime_env import RuntimeEnv

    from rayft.orchestrator.submit import runtime_env

    example = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    recipe = tmp_path / "r.yaml"
    demo = yaml.safe_load((ROOT / "configs" / "demo_sft_lora.yaml").read_text())
    recipe.write_text(yaml.safe_dump({**demo, **example}))
    cfg = parse_config(load_recipe(recipe, []), base_dir=ROOT)
    env = runtime_env(cfg, str(ROOT))
    RuntimeEnv(**env)
    assert env["working_dir"] == str(ROOT) and ".venv" in env["excludes"] and "data/*.parquet.tmp" in env["excludes"]
    assert json.dumps(env)  # travels to the job API as JSON


def test_only_a_checkpoint_ray_train_recorded_counts_for_resuming(tmp_path):
    from rayft.cluster.storage import SNAPSHOT_FILE, latest_checkpoint, upload_outputs

    run = tmp_path / "run"
    (run / "checkpoint_2026-01-01_00-00-01").mkdir(parents=True)  # written, or half-written, but not recorded
    assert latest_checkpoint(str(tmp_path), "run") is None
    assert latest_checkpoint(str(tmp_path), None) is None
    (run / SNAPSHOT_FILE).write_text(json.dumps({"latest_checkpoint_result": None}))
    assert latest_checkpoint(str(tmp_path), "run") is None
    (run / SNAPSHOT_FILE).write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_2026-01-01_00-00-01", "metrics": {}}}))
    assert latest_checkpoint(str(tmp_path), "run") == f"{tmp_path}/run/checkpoint_2026-01-01_00-00-01"

    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "adapter_model.safetensors").write_bytes(b"weights")
    (out / "sub" / "x.json").write_text("{}")
    assert upload_outputs(str(out), str(tmp_path / "storage"), "run") == f"{tmp_path}/storage/run/output"
    assert (tmp_path / "storage" / "run" / "output" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert (tmp_path / "storage" / "run" / "output" / "sub" / "x.json").is_file()


def test_storage_filesystem_names_a_pyarrow_filesystem():
    import pyarrow.fs

    from rayft.cluster.storage import filesystem

    assert filesystem(None) is None
    assert isinstance(filesystem("s3"), pyarrow.fs.S3FileSystem)
    assert isinstance(filesystem("gs"), pyarrow.fs.GcsFileSystem)
