"""Datasets, the tokenised cache and checkpoints on a real S3 API: moto's S3 server on loopback, reached the way
users reach MinIO or AWS (the standard AWS environment variables), by `rayft train` as users run it."""

import json
import os
import subprocess
import sys

import pytest
from conftest import DEMO_RECIPE, ROOT

from rayft.recipe.problems import ConfigError
from rayft.recipe.values import read_log

pytestmark = pytest.mark.slow

BUCKET = "rayft-test"
SECRET_KEY = "moto-secret-key-for-rayft-tests"


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1, with a bucket holding a folder dataset of two JSON-lines files and its
    dataset_info.json; yields the environment a run needs to reach it."""
    boto3 = pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "rayft",
           "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="rayft",
                          aws_secret_access_key=SECRET_KEY, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    rows = json.loads((ROOT / "data" / "demo" / "demo_sft.json").read_text())
    half = len(rows) // 2
    for name, part in (("part-0.jsonl", rows[:half]), ("part-1.jsonl", rows[half:])):
        body = "\n".join(json.dumps(r) for r in part) + "\n"
        client.put_object(Bucket=BUCKET, Key=f"data/sft/{name}", Body=body.encode())
    client.put_object(Bucket=BUCKET, Key="data/dataset_info.json",
                      Body=json.dumps({"s3_sft": {"file_name": "sft"}}).encode())
    try:
        yield env, client
    finally:
        server.stop()


def test_a_run_reads_caches_and_checkpoints_on_s3_and_resumes_from_there(tmp_path, tiny_model, s3):
    env, client = s3
    out = tmp_path / "out"
    command = [sys.executable, "-m", "rayft.orchestrator.cli", "train", str(DEMO_RECIPE),
               f"model_name_or_path={tiny_model}", f"output_dir={out}", "dataset=s3_sft", "eval_dataset=null",
               f"dataset_dir=s3://{BUCKET}/data", f"tokenized_path=s3://{BUCKET}/tok",
               f"ray_storage_path=s3://{BUCKET}/ray", "ray_run_name=on-s3", "ray_num_workers=1", "deepspeed=null",
               "save_strategy=steps", "save_steps=2", "logging_steps=1"]
    # its own local Ray instance, started by the run with the S3 settings in its environment, as on a cluster
    # whose nodes have them
    run_env = {**os.environ, **env}
    first = subprocess.run([*command, "max_steps=4"], cwd=ROOT, env=run_env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "train data: 256 examples" in first.stdout  # read from the bucket by Ray Data tasks
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert "tok/train/rayft_tokenized.json" in keys and any(k.startswith("tok/train/data/") for k in keys)
    assert any(k.startswith("ray/on-s3/checkpoint_") for k in keys)

    again = subprocess.run([*command, "max_steps=6"], cwd=ROOT, env=run_env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"has a checkpoint in storage: resuming from s3://{BUCKET}/ray/on-s3/checkpoint_" in again.stdout
    assert f"reusing tokenised data from s3://{BUCKET}/tok/train" in again.stdout
    records = read_log(out)
    assert [r["resumed_from_step"] for r in records if "resumed_from_step" in r] == [4]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    # credentials reach Ray through the environment, never the saved config, logs or model card
    saved = "".join(p.read_text(errors="ignore") for p in out.iterdir() if p.suffix in (".yaml", ".json", ".md",
                                                                                          ".jsonl"))
    assert SECRET_KEY not in saved + first.stdout + first.stderr + again.stdout + again.stderr


def test_an_adapter_in_a_bucket_is_served_by_name(tmp_path, tiny_model, s3, monkeypatch):
    """`serve_adapters` may name a checkpoint on S3 (a Ray checkpoint's layout, `checkpoint/` inside): the driver
    finds it without downloading, and the serving engine downloads and loads it under its name."""
    from test_export import trained_like_adapter

    from rayft.orchestrator.openai_api import chat_request
    from rayft.orchestrator.serving import Engine, serve_spec
    from rayft.recipe.loading import load_recipe
    from rayft.recipe.parse import parse_config

    env, client = s3
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    adapter = trained_like_adapter(tiny_model, tmp_path / "adapter", seed=21)
    for path in adapter.iterdir():
        client.put_object(Bucket=BUCKET, Key=f"adapters/run/checkpoint_0/checkpoint/{path.name}",
                          Body=path.read_bytes())
    location = f"s3://{BUCKET}/adapters/run/checkpoint_0"
    raw = load_recipe(ROOT / "configs" / "serve_lora.yaml", [f"model_name_or_path={tiny_model}", "do_sample=false"])
    raw["serve_adapters"] = {"from-s3": location}
    spec = serve_spec(parse_config(raw, base_dir=ROOT, for_training=False))
    engine = Engine(spec)
    assert engine.spec.names == [tiny_model.name, "from-s3"]
    request = chat_request({"model": "from-s3", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8},
                           engine.defaults, engine.spec.limits)
    served = engine.generate(request, [engine.prompt_ids(request)])[0].text
    base = engine.generate(chat_request({"model": tiny_model.name, "messages": [{"role": "user", "content": "hello"}],
                                         "max_tokens": 8}, engine.defaults, engine.spec.limits),
                           [engine.prompt_ids(request)])[0].text
    assert served != base  # the downloaded adapter is the one answering
    raw["serve_adapters"] = {"missing": f"s3://{BUCKET}/adapters/none"}
    with pytest.raises(ConfigError, match="'missing': s3://.* holds no adapter_config.json"):
        serve_spec(parse_config(raw, base_dir=ROOT, for_training=False))
