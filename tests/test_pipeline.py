"""The Ray Data side of the data path: tokenisation tasks and the keyed Parquet cache."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from rayft.data.errors import DataError
from rayft.data.examples import Rows
from rayft.data.pipeline import (
    EncodingSettings,
    encode_batch,
    encode_tables,
    load_examples,
    locate_datasets,
    stage_encoder,
    token_stats,
    tokenize,
    tokenize_cached,
)
from rayft.data.tokenizer import TokenizerSpec

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def examples():
    return load_examples("demo_sft", str(ROOT / "data" / "demo"), 40)


def run(examples, tiny_model, cache_dir, strict, cutoff_len=256, overwrite=False, packing=False):
    settings = EncodingSettings("chatml", cutoff_len, packing=packing, neat_packing=packing)
    identity = {"examples": len(examples)}  # stands for the datasets' files and the selection settings
    # driver_max=0: Ray Data's tasks tokenise even these few examples
    return tokenize_cached(lambda: Rows.of(examples), identity, TokenizerSpec(str(tiny_model)), settings,
                           encode_batch, 16, str(cache_dir), strict, overwrite, driver_max=0)


def rows(dataset):
    return sorted(tuple(np.asarray(r["input_ids"]).tolist()) for r in dataset.take_all())


def every_column(dataset):
    """Every row with every column, comparable across the ways a dataset was made."""
    return sorted(json.dumps({k: np.asarray(v).tolist() for k, v in r.items()}, sort_keys=True)
                  for r in dataset.take_all())


def test_a_named_tokenized_path_is_written_then_reused(tmp_path, tiny_model, ray_local, examples):
    first, reused = run(examples, tiny_model, tmp_path / "tok", strict=True)
    assert not reused and (tmp_path / "tok" / "rayft_tokenized.json").is_file()
    second, reused = run(examples, tiny_model, tmp_path / "tok", strict=True)
    assert reused  # loaded from Parquet: no tokenisation ran
    assert rows(first) == rows(second) and token_stats(first) == token_stats(second)
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]  # no staging folder left behind


def test_a_named_tokenized_path_from_other_settings_is_refused_not_overwritten(tmp_path, tiny_model, ray_local,
                                                                                examples):
    run(examples, tiny_model, tmp_path / "tok", strict=True)
    before = (tmp_path / "tok" / "rayft_tokenized.json").read_text()
    with pytest.raises(DataError, match="other data or settings"):
        run(examples, tiny_model, tmp_path / "tok", strict=True, cutoff_len=16)
    with pytest.raises(DataError, match="other data or settings"):
        run(examples[:-1], tiny_model, tmp_path / "tok", strict=True)
    assert (tmp_path / "tok" / "rayft_tokenized.json").read_text() == before
    replaced, reused = run(examples, tiny_model, tmp_path / "tok", strict=True, cutoff_len=16, overwrite=True)
    assert not reused and json.loads((tmp_path / "tok" / "rayft_tokenized.json").read_text())["settings"][
        "cutoff_len"] == 16
    assert max(len(r) for r in rows(replaced)) <= 16


def test_a_foreign_folder_is_never_taken_for_a_cache(tmp_path, tiny_model, ray_local, examples):
    (tmp_path / "tok" / "data").mkdir(parents=True)
    (tmp_path / "tok" / "data" / "part.parquet").write_bytes(b"half-written")
    with pytest.raises(DataError, match="holds no rayft tokenised data"):
        run(examples, tiny_model, tmp_path / "tok", strict=True)


def test_the_automatic_cache_is_keyed_on_inputs(tmp_path, tiny_model, ray_local, examples):
    _, reused = run(examples, tiny_model, tmp_path / "auto", strict=False)
    assert not reused
    _, reused = run(examples, tiny_model, tmp_path / "auto", strict=False)
    assert reused
    packed, reused = run(examples, tiny_model, tmp_path / "auto", strict=False, packing=True)
    assert not reused and "position_ids" in packed.columns()
    assert len(list((tmp_path / "auto").iterdir())) == 2


@pytest.mark.parametrize("stage,columns", [("dpo", {"chosen_input_ids", "rejected_labels"}),
                                           ("kto", {"kl_input_ids", "kto_tag"})])
def test_preference_and_kto_data_tokenise_as_ray_data_tasks(tiny_model, ray_local, stage, columns):
    message = [{"role": "user", "content": "q"}]
    if stage == "dpo":
        examples = [{"system": "", "messages": message, "chosen": f"yes {i}", "rejected": "no"} for i in range(6)]
    else:
        examples = [{"system": "", "messages": message + [{"role": "assistant", "content": f"a{i}"}],
                     "kto_tag": i % 2 == 0} for i in range(6)]
    settings, spec = EncodingSettings("chatml", 64, stage=stage), TokenizerSpec(str(tiny_model))
    # tasks=1 (preprocessing_num_workers): one task at a time, the same rows
    dataset = tokenize(Rows.of(examples), spec, settings, stage_encoder(stage), batch_size=4, driver_max=0, tasks=1)
    assert columns <= set(dataset.columns()) and dataset.count() == 6
    assert token_stats(dataset)["trained_tokens"] > 0
    # the driver's helper tokenises a small dataset itself, into the same rows and statistics
    here = tokenize(Rows.of(examples), spec, settings, stage_encoder(stage), batch_size=4, here=encode_tables)
    assert every_column(here) == every_column(dataset) and token_stats(here) == token_stats(dataset)


@pytest.mark.unit
def test_the_automatic_cache_is_used_on_a_cluster_only_with_a_shared_file_system(tmp_path):
    from conftest import DEMO_RECIPE, ROOT

    from rayft.orchestrator.launch import tokenized_cache
    from rayft.recipe.loading import load_recipe
    from rayft.recipe.parse import parse_config

    def where(*overrides):
        cfg = parse_config(load_recipe(DEMO_RECIPE, [f"ray_storage_path={tmp_path}", *overrides]), base_dir=ROOT)
        return tokenized_cache(cfg, "train")

    assert where() == (f"{tmp_path}/.tokenized", False)  # a local run
    assert where("ray_address=10.0.0.1:6379") == (None, False)  # a cluster: the path may be one node's own
    assert where("ray_address=10.0.0.1:6379", "data_shared_file_system=true") == (f"{tmp_path}/.tokenized", False)
    assert where("ray_storage_path=s3://bucket/runs") == ("s3://bucket/runs/.tokenized", False)  # every node's
    assert where(f"tokenized_path={tmp_path / 'tok'}") == (f"{tmp_path / 'tok'}/train", True)


@pytest.mark.unit
def test_every_encoding_setting_changes_the_cache_key():
    import dataclasses

    from rayft.data import cache
    from rayft.data.media import ImageGeometry

    examples = [{"system": "", "messages": [{"role": "user", "content": "q"}]}]
    base = EncodingSettings("chatml", 64)
    other = {"template": "qwen", "cutoff_len": 128, "train_on_prompt": True, "mask_history": True,
             "packing": True, "neat_packing": True, "stage": "pt", "enable_thinking": False,
             "preserve_thinking": True, "default_system": "S", "tool_format": "qwen",
             "images": ImageGeometry(768 * 768, 32 * 32, 14, 2, 784, 16384)}
    assert set(other) == {f.name for f in dataclasses.fields(EncodingSettings)}

    def key(settings):
        return cache.cache_key({"rows": examples}, TokenizerSpec("no/such/tokenizer"), dataclasses.asdict(settings))

    for name, value in other.items():
        assert key(dataclasses.replace(base, **{name: value})) != key(base), name


def test_a_streamed_dataset_is_never_materialised_and_each_worker_shuffles_its_share(tiny_model, ray_local,
                                                                                      examples):
    import threading

    from ray.data.dataset import MaterializedDataset

    from rayft.data.pipeline import tokenize
    from rayft.trainers.shards import ShardStream

    settings = EncodingSettings("chatml", 256)
    lazy = tokenize(Rows.of(examples), TokenizerSpec(str(tiny_model)), settings, encode_batch, 16, stream_tasks=2)
    assert not isinstance(lazy, MaterializedDataset)
    everything = rows(tokenize(Rows.of(examples), TokenizerSpec(str(tiny_model)), settings, encode_batch, 16))
    shards = [ShardStream(split, buffer_size=8, seed=1) for split in lazy.streaming_split(2, equal=True)]
    epochs = []
    for _ in range(2):  # split iterators are read at the same time, as the workers read them
        seen = [None, None]
        readers = [threading.Thread(target=lambda i=i, seen=seen: seen.__setitem__(i, list(shards[i])))
                   for i in range(2)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout=120)
        assert len(seen[0]) == len(seen[1]) == len(examples) // 2  # equal shares: no worker runs out first
        assert set(seen[0][0]) == {"input_ids", "labels"}  # the count columns are left out
        assert isinstance(seen[0][0]["input_ids"], list)
        ids = [tuple(r["input_ids"]) for r in seen[0] + seen[1]]
        assert sorted(ids) == everything  # together the shares are the whole dataset, each row once
        epochs.append(ids)
    assert epochs[0] != epochs[1]  # each pass reads through the buffer with another seed


def hub_cache(tmp_path, tiny_model, repo="rayft-test/gated-tokenizer", revision="v1") -> Path:
    """A Hugging Face hub cache holding `repo`'s tokenizer only at `revision` (no `main`), as a download of a
    revision-pinned, gated model leaves it; read offline, it loads only when the revision reaches the loader."""
    folder = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / revision).write_text(commit)
    shutil.copytree(tiny_model, folder / "snapshots" / commit, ignore=shutil.ignore_patterns("*.safetensors"))
    return tmp_path / "hub"


def test_a_pinned_gated_models_tokenizer_keys_reach_the_ray_data_tasks(tmp_path, tiny_model, ray_local, examples):
    cache_dir, repo = hub_cache(tmp_path, tiny_model), "rayft-test/gated-tokenizer"
    pinned = TokenizerSpec(repo, revision="v1", cache_dir=str(cache_dir), token="hf_secret_for_the_tasks")
    settings = EncodingSettings("chatml", 256)
    # the tasks load the tokenizer from the hub cache at revision v1 (the ray_local cluster has no hub access)
    dataset = tokenize(Rows.of(examples[:8]), pinned, settings, encode_batch, batch_size=4, driver_max=0)
    local = tokenize(Rows.of(examples[:8]), TokenizerSpec(str(tiny_model)), settings, encode_batch, batch_size=4,
                     here=encode_tables)
    assert rows(dataset) == rows(local)
    # bad input met inside a task comes back as rayft's one-line DataError, not the task's traceback
    call = json.dumps({"name": "add", "arguments": {"a": 2}})
    tool_rows = [{"system": "", "messages": [{"role": "user", "content": "q"}, {"role": "function", "content": call},
                                             {"role": "observation", "content": "3"},
                                             {"role": "assistant", "content": "3"}]}] * 4
    with pytest.raises(DataError, match="'seed_oss' writes tools in the 'seed_oss' format") as caught:
        tokenize(Rows.of(tool_rows), TokenizerSpec(str(tiny_model)), EncodingSettings("seed_oss", 64), encode_batch,
                 batch_size=2, driver_max=0)
    assert "Traceback" not in str(caught.value) and len(str(caught.value).splitlines()) == 1
    with pytest.raises(Exception, match="main|revision|offline|not found|couldn't"):
        tokenize(Rows.of(examples[:8]), replace(pinned, revision="main"), settings, encode_batch, batch_size=4,
                 driver_max=0)
    # the cache key tells revisions apart, and never holds the token
    from rayft.data import cache

    key = cache.cache_key({"examples": 8}, pinned, {})
    assert key != cache.cache_key({"examples": 8}, replace(pinned, revision="v2"), {})
    assert key == cache.cache_key({"examples": 8}, replace(pinned, token="another"), {})


@pytest.mark.unit
def test_the_recipe_keys_make_the_tokenizer_spec():
    from rayft.recipe.schema import ModelArguments

    spec = TokenizerSpec.of(ModelArguments(model_name_or_path="org/m", model_revision="v1", cache_dir="/c",
                                           hf_hub_token="t", trust_remote_code=True, use_fast_tokenizer=False))
    assert spec == TokenizerSpec("org/m", revision="v1", cache_dir="/c", token="t", trust_remote_code=True,
                                 use_fast=False)


READ_AND_MEASURE = """
import json, resource, sys
import ray
import ray.data
from rayft.data.errors import DataError
from rayft.data.pipeline import locate_datasets, read_dataset
from rayft.orchestrator.launch import configure_ray_data
from rayft.recipe.logs import DEFAULT, configure

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

configure(DEFAULT)
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
configure_ray_data()
ray.data.range(8).map_batches(lambda b: b).materialize()  # Ray Data's executor imported before measuring
(source,) = locate_datasets("big", sys.argv[1])
before = peak_mb()
result = {"count": read_dataset(source, None, max_bad_ratio=0.01).count(), "growth_mb": peak_mb() - before}
try:
    read_dataset(source, None, max_bad_ratio=0.001)
except DataError as err:
    result["refused"] = str(err)
print("RESULT " + json.dumps(result), flush=True)
ray.shutdown()
"""


def test_a_large_dataset_is_read_in_tasks_its_bad_rows_counted_exactly_and_the_driver_holds_no_rows(tmp_path):
    import subprocess
    import sys

    # 100,000 alpaca rows in two JSON-lines files (about 16 MB, past the 8 MB that the driver reads itself: Ray
    # Data's tasks read them);
    # every 250th row is bad, alternately not JSON and without its response: 400 bad rows, 0.4%
    (tmp_path / "big").mkdir()
    for part in range(2):
        lines = []
        for i in range(50_000):
            if i % 250 == 7:
                lines.append('{"instruction": "broken' if i % 500 == 7 else json.dumps({"instruction": f"q{i}"}))
            else:
                lines.append(json.dumps({"instruction": f"question {part} {i}", "input": "",
                                         "output": f"answer {i}: " + "a longer response " * 6}))
        (tmp_path / "big" / f"part-{part}.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"big": {"file_name": "big"}}))
    # its own local Ray instance: the driver process measured is the one that started it, as `rayft train` does
    done = subprocess.run([sys.executable, "-c", READ_AND_MEASURE, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    result, output = json.loads(line[len("RESULT "):]), done.stdout + done.stderr
    assert result["count"] == 100_000 - 400
    assert ("dataset 'big': skipped 400 of 100000 malformed rows: part-0.jsonl line 8: not valid JSON "
            "(Unterminated string") in output
    assert "part-0.jsonl line 258: missing column 'output'" in output and "(and 395 more)" in output
    assert not locate_datasets("big", str(tmp_path))[0].small
    # the rows as Python objects would be hundreds of MB on the driver (the issue measured 434 MB at 200,000);
    # reading and checking them in tasks grew it by 15 MB (32 MB at 1,000,000 rows of benchmarks/data_scale.py)
    assert result["growth_mb"] < 60, result
    assert result["refused"].startswith("dataset 'big': 400 of 100000 rows (0.40%) are malformed, more than "
                                       "max_bad_row_ratio=0.001: part-0.jsonl line 8: not valid JSON")
