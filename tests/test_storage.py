"""Adapters on a real S3 API: moto's S3 server on loopback (conftest's `s3`), reached the way users reach MinIO or
AWS (the standard AWS environment variables). A run's datasets, tokenised cache and checkpoints on S3, with its
resumption from the bucket, are tested with its faults in test_fault_tolerance.py."""

import pytest
from conftest import ROOT
from conftest import S3_BUCKET as BUCKET

from rayft.recipe.problems import ConfigError

pytestmark = pytest.mark.integration


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


@pytest.mark.unit
def test_a_checkpoint_record_read_while_it_is_rewritten_is_read_again_and_a_broken_one_is_refused(tmp_path):
    import threading

    from rayft.cluster.storage import SNAPSHOT_FILE, latest_checkpoint

    record = tmp_path / "run" / SNAPSHOT_FILE
    record.parent.mkdir()
    whole = '{"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_1"}}'
    record.write_text(whole[:40])  # Ray Train's controller half-way through rewriting it (seen on the S3 server)
    threading.Timer(0.4, record.write_text, args=(whole,)).start()
    assert latest_checkpoint(str(tmp_path), "run") == f"{tmp_path}/run/checkpoint_1"
    record.write_text(whole[:40])  # and one that stays broken
    with pytest.raises(ConfigError, match=r"ray_run_name: .* is not a whole JSON record .* move it away"):
        latest_checkpoint(str(tmp_path), "run")
