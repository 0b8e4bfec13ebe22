"""End-to-end training on a real local Ray cluster: rayft's TorchTrainer + DeepSpeed + LoRA path."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import DEMO_RECIPE, ROOT, SECRET

from rayft.data.tokenizer import TokenizerSpec
from rayft.orchestrator.launch import prepare, run_train
from rayft.recipe.loading import load_recipe
from rayft.recipe.parse import parse_config
from rayft.recipe.problems import ConfigError
from rayft.recipe.values import read_log


def recipe(tmp_path, tiny_model, *overrides):
    return parse_config(load_recipe(DEMO_RECIPE, [
        f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'out'}",
        f"ray_storage_path={tmp_path / 'ray'}", *overrides]), base_dir=ROOT)


def train(tmp_path, tiny_model, *overrides):
    cfg = recipe(tmp_path, tiny_model, *overrides)
    result = run_train(cfg)
    return Path(cfg.training["output_dir"]), result, [r for r in read_log(cfg.training["output_dir"]) if "loss" in r]


def logits(model_dir, adapter_dir=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    with torch.no_grad():
        return model(torch.arange(1, 40).unsqueeze(0)).logits


@pytest.mark.unit
def test_an_occupied_output_dir_is_refused_and_left_alone(tmp_path, tiny_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"precious")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        prepare(recipe(tmp_path, tiny_model, "overwrite_output_dir=false"))
    assert (out / "adapter_model.safetensors").read_bytes() == b"precious"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors"]


@pytest.mark.slow
def test_demo_recipe_two_workers_zero2(demo_run, tiny_model, ray_local):
    out, result, log, driver_lines = demo_run

    # The loss falls clearly: the last logged loss is at most 75% of the first.
    assert len(log) >= 8
    assert log[-1]["loss"] < 0.75 * log[0]["loss"], [r["loss"] for r in log]
    assert {"step", "loss", "learning_rate", "epoch", "elapsed_seconds"} <= set(log[0])
    assert [r["step"] for r in log[:3]] == [5, 10, 15] and log[-1]["step"] == 45
    assert result.error is None
    # eval_on_each_dataset: the final evaluation reports one loss per dataset of eval_dataset
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_demo_sft_eval_loss"] > 0 and results["eval_demo_sft_loss"] > 0
    assert results["eval_demo_sft_eval_loss"] != results["eval_demo_sft_loss"]

    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "train_results.json",
                 "all_results.json", "trainer_log.jsonl", "training_loss.png", "training_args.yaml", "README.md"):
        assert (out / name).is_file(), name
    results = json.loads((out / "all_results.json").read_text())
    assert {"train_runtime", "train_samples_per_second", "train_loss"} <= set(results)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    assert (out.parent / "ray" / "demo-sft-lora").is_dir()
    # two workers on the 2-CPU instance: one CPU, one thread each
    assert [w["threads"] for w in json.loads((out / "placement.json").read_text())] == [1, 1]

    # The adapter loads over the base model through PEFT and changes its logits.
    base, tuned = logits(tiny_model), logits(tiny_model, out)
    assert (base - tuned).abs().max() > 1e-2

    # The secret reached the workers but no output (trackers' files included) and no log line.
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path.name
    assert SECRET not in "\n".join(driver_lines) and "demo_sft" in "\n".join(driver_lines)
    session_logs = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs"
    worker_logs = [p for p in session_logs.rglob("*") if p.is_file() and p.suffix in (".out", ".err", ".log")]
    assert any(line.startswith("step 45/48") for line in driver_lines)  # rank 0's log reaches the driver
    assert not [p.name for p in worker_logs if SECRET.encode() in p.read_bytes()]
    assert "***" in (out / "training_args.yaml").read_text()


@pytest.mark.slow
def test_neat_packing_of_a_streamed_dataset_trains(tmp_path, tiny_model, ray_local):
    # one worker, no DeepSpeed (a stream's equal shares between workers: test_pipeline.py); LoRA under ZeRO-3
    # in the pre-training test below
    # (with EAFT's entropy-weighted token loss: its weights fall as the model grows confident)
    out, result, log = train(tmp_path, tiny_model, "num_train_epochs=1", "neat_packing=true", "cutoff_len=128",
                             "per_device_train_batch_size=2", "streaming=true", "max_steps=24", "buffer_size=32",
                             "ray_num_workers=1", "deepspeed=null", "use_eaft_loss=true")
    assert log[-1]["loss"] < log[0]["loss"] - 0.3, [r["loss"] for r in log]
    assert (logits(tiny_model) - logits(tiny_model, out)).abs().max() > 1e-3


@pytest.mark.slow
def test_worker_shards_are_disjoint_and_cover_the_dataset(tmp_path, tiny_model, ray_local):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rayft.data.examples import Rows
    from rayft.data.pipeline import EncodingSettings, encode_batch, encode_tables, tokenize

    def collect_shards(loop_config):  # local, so Ray ships it by value to the workers
        import ray.train

        from rayft.trainers.shards import ShardStream

        rank = ray.train.get_context().get_world_rank()
        for name in ("even", "odd"):
            rows = list(ShardStream(ray.train.get_dataset_shard(name), None, 0))
            Path(loop_config["dir"], f"{name}{rank}.json").write_text(json.dumps([r["input_ids"] for r in rows]))

    def examples(count):
        return [{"system": "", "messages": [{"role": "user", "content": f"question {i}"},
                                            {"role": "assistant", "content": f"answer {i}"}]} for i in range(count)]

    settings = EncodingSettings("chatml", 64)
    datasets = {name: tokenize(Rows.of(examples(count)), TokenizerSpec(str(tiny_model)), settings, encode_batch,
                               batch_size=8, here=encode_tables) for name, count in (("even", 40), ("odd", 41))}
    TorchTrainer(
        collect_shards, train_loop_config={"dir": str(tmp_path)}, datasets=datasets,
        torch_config=TorchConfig(backend="gloo"), scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(storage_path=str(tmp_path / "ray")),
    ).fit()
    for name, count in (("even", 40), ("odd", 41)):
        shards = [{tuple(ids) for ids in json.loads((tmp_path / f"{name}{r}.json").read_text())} for r in (0, 1)]
        everything = {tuple(row["input_ids"]) for row in datasets[name].take_all()}
        assert len(everything) == count
        assert shards[0].isdisjoint(shards[1])
        assert len(shards[0]) == len(shards[1]) == count // 2  # equal shards: an odd example out is left out
        assert len(everything - shards[0] - shards[1]) == count % 2


@pytest.mark.integration  # its first case runs the command in a subprocess
@pytest.mark.parametrize("overrides,expected", [
    (("ray_num_workers=3",), "3 workers need {'CPU': 3} but at most"),
    (("placement_strategy=STRICT_SPREAD",), "STRICT_SPREAD needs 2 different nodes"),
    (('resources_per_worker={"GPU": 1}',), "the cluster has no GPUs"),
], ids=["too-many-workers", "strict-spread-on-one-node", "gpu-on-cpu-cluster"])
def test_cli_refuses_an_impossible_request_before_starting_ray(tmp_path, tiny_model, overrides, expected, capsys):
    import subprocess
    import sys

    from rayft.orchestrator.cli import main

    command = ["train", str(DEMO_RECIPE), f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'out'}",
               f"ray_storage_path={tmp_path / 'ray'}", *overrides]
    if overrides[0].startswith("ray_num_workers"):  # one case as a user meets it: the command in its own process
        proc = subprocess.run([sys.executable, "-m", "rayft.orchestrator.cli", *command], capture_output=True,
                              text=True, cwd=ROOT, timeout=300)
        status, out, err = proc.returncode, proc.stdout, proc.stderr
    else:  # the others through the same entry point in this process (a process start costs about 10 s here)
        status = main(command)
        out, err = capsys.readouterr()
    assert status == 2, err[-2000:]
    assert expected in err and "The cluster has node local (127.0.0.1): CPU=" in err
    assert "starting a local Ray instance" not in out + err
    assert not (tmp_path / "out").exists() and not (tmp_path / "ray").exists()


@pytest.mark.integration
def test_plan_prints_config_and_plan_without_training(tmp_path, tiny_model, ray_local, rayft_log):
    from rayft.orchestrator.launch import run_plan

    lines = rayft_log
    plan = run_plan(recipe(tmp_path, tiny_model, "hf_hub_token=hf_plan_secret"))
    text = "\n".join(lines)
    assert plan.total_steps == 48 and plan.zero_stage == 2 and plan.global_batch_size == 16
    assert "ZeRO-2" in text and "8 per device x 2 workers x 1 accumulation = 16 global" in text
    assert '"lora_rank": 8' in text and '"hf_hub_token": "***"' in text and "hf_plan_secret" not in text
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_evaluation_and_checkpoints_during_training(tmp_path, tiny_model, ray_local):
    out, result, log = train(tmp_path, tiny_model, "val_size=32", "eval_strategy=steps", "eval_steps=7",
                             "num_train_epochs=2", "max_steps=21", "logging_steps=7", "compute_accuracy=true",
                             "save_strategy=steps", "save_steps=7", "save_total_limit=2",
                             "load_best_model_at_end=true")
    evaluations = [r for r in read_log(out) if "eval_loss" in r]
    assert [r["step"] for r in evaluations][:2] == [7, 14]
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_loss"] > 0
    # token accuracy on the held-out examples rises as the loss falls
    assert 0 <= evaluations[0]["eval_accuracy"] < evaluations[-1]["eval_accuracy"] <= 1
    assert results["eval_accuracy"] == pytest.approx(max(r["eval_accuracy"] for r in evaluations), abs=0.05)
    state = json.loads((out / "trainer_state.json").read_text())
    best = min(evaluations, key=lambda r: r["eval_loss"])
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best['step']}")  # load_best_model_at_end

    # Checkpoints are reported to Ray Train's storage, which keeps save_total_limit of them.
    assert result.checkpoint is not None
    kept = [p for p in (tmp_path / "ray" / "demo-sft-lora").iterdir() if p.is_dir() and p.name.startswith("checkpoint")]
    assert len(kept) == 2  # CheckpointConfig(num_to_keep=save_total_limit)
    newest = Path(result.checkpoint.path) / "checkpoint"
    assert (newest / "adapter_model.safetensors").is_file() and (newest / "trainer_state.json").is_file()
    assert json.loads((newest / "trainer_state.json").read_text())["global_step"] == 21


@pytest.mark.slow
def test_pretraining_stage_learns_packed_text_with_lora_under_zero3(tmp_path, tiny_model, ray_local, rayft_log):
    cfg = parse_config(load_recipe(ROOT / "configs" / "demo_pt_lora.yaml", [
        f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'out'}",
        f"ray_storage_path={tmp_path / 'ray'}", "num_train_epochs=1", "deepspeed=z3"]), base_dir=ROOT)
    assert cfg.data.packing is True  # derived for stage pt
    lines = rayft_log
    run_train(cfg)
    log = [r for r in read_log(tmp_path / "out") if "loss" in r]
    assert log[-1]["loss"] < log[0]["loss"] - 0.5, [r["loss"] for r in log]
    assert any("packed into" in line for line in lines)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    # the adapter, gathered from its ZeRO-3 partitions when saved, changes the model's logits
    assert (logits(tiny_model) - logits(tiny_model, tmp_path / "out")).abs().max() > 1e-3


@pytest.mark.unit
def test_resuming_from_the_final_checkpoint_trains_no_further_step(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM
    from transformers import Seq2SeqTrainingArguments as HFArgs

    from rayft.data.collator import SupervisedCollator
    from rayft.trainers.common import ShardTrainer

    rows = [{"input_ids": [i + 5, i + 6, i + 7], "labels": [i + 5, i + 6, i + 7]} for i in range(32)]

    def trainer():
        args = HFArgs(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, save_steps=3,
                      use_cpu=True, report_to="none", disable_tqdm=True)
        return ShardTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model), args=args, train_dataset=rows,
                            data_collator=SupervisedCollator(0))

    assert trainer().train().global_step == 3
    resumed = trainer()
    assert resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3")).global_step == 3
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3"]


@pytest.mark.integration
def test_a_shard_stream_is_seeded_reshuffles_every_epoch_and_reads_a_resumed_epoch_again(ray_local):
    import ray.data

    from rayft.trainers.shards import ShardStream

    shard = ray.data.from_items([{"input_ids": [i], "labels": [i]} for i in range(32)]).iterator()

    def epochs(seed, buffer=64, resumed_in=0):
        stream = ShardStream(shard, buffer, seed, length=32)
        stream.resume_at(resumed_in)
        return [[row["input_ids"][0] for row in stream] for _ in range(2)]

    first, second = epochs(seed=7)
    assert sorted(first) == sorted(second) == list(range(32))
    assert first != second  # a new order every epoch
    assert epochs(seed=7) == [first, second]  # and the same orders for the same seed
    assert epochs(seed=8)[0] != first
    assert epochs(seed=7, resumed_in=1)[0] == second  # a run resumed in epoch 1 reads epoch 1's order again
    assert epochs(seed=7, buffer=None)[0] == list(range(32))  # disable_shuffling
    assert len(ShardStream(shard, 64, 7, length=32)) == 32  # the Trainer counts epochs by it


@pytest.mark.unit
def test_ray_trains_local_settings_hold_for_the_run_only_and_the_environment_wins(monkeypatch):
    from rayft.orchestrator.launch import ray_train_settings

    watcher, poll = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    monkeypatch.delenv(watcher, raising=False)
    monkeypatch.delenv(poll, raising=False)
    monkeypatch.delenv("RAY_TRAIN_METRICS_ENABLED", raising=False)
    with ray_train_settings(local=True):
        assert (os.environ[watcher], os.environ[poll], os.environ["RAY_TRAIN_METRICS_ENABLED"]) == ("0", "0.5", "0")
    assert watcher not in os.environ and poll not in os.environ
    with ray_train_settings(local=False):  # a cluster keeps Ray Train's defaults
        assert watcher not in os.environ and poll not in os.environ
    with ray_train_settings(local=True, metrics=True):  # a running instance joined: its dashboard may collect them
        assert os.environ[poll] == "0.5" and "RAY_TRAIN_METRICS_ENABLED" not in os.environ
    monkeypatch.setenv(poll, "3")
    with ray_train_settings(local=True):
        assert os.environ[poll] == "3"
    assert os.environ[poll] == "3" and watcher not in os.environ


@pytest.mark.unit
def test_a_run_on_a_local_instance_starts_no_placement_group_cleaner(tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from rayft.orchestrator.launch import LocalRunTrainer

    def kinds(cls):
        trainer = cls(lambda: None, scaling_config=ScalingConfig(num_workers=2),
                      run_config=RunConfig(storage_path=str(tmp_path)))
        return [type(c) for c in trainer._create_default_callbacks()]

    assert PlacementGroupCleanerCallback in kinds(DataParallelTrainer)  # a cluster's run keeps it
    assert PlacementGroupCleanerCallback not in kinds(LocalRunTrainer) and len(kinds(LocalRunTrainer)) > 2


@pytest.mark.integration  # subprocesses
def test_a_worker_that_does_not_quantise_never_imports_bitsandbytes_and_the_built_op_is_found(tmp_path, monkeypatch):
    import subprocess
    import sys

    from rayft.trainers import WORKER_WITHOUT_BITSANDBYTES
    from rayft.trainers.deepspeed_ops import shm_op_is_built

    # as launch starts a worker of a run without quantization_bit: PEFT imports, and sees no bitsandbytes
    probe = ("import sys, rayft.trainers, peft; from peft.import_utils import is_bnb_available; "
             "print('bitsandbytes' in sys.modules and sys.modules['bitsandbytes'] is not None, is_bnb_available())")
    found = subprocess.run([sys.executable, "-c", probe], env={**os.environ, WORKER_WITHOUT_BITSANDBYTES: "1"},
                           capture_output=True, text=True, timeout=120)
    assert found.stdout.split() == ["False", "False"], found.stderr[-2000:]
    # nor does the `rayft` command's own process for a command that loads no model (here one refused at once)
    command = ("import sys; from rayft.orchestrator.cli import main; sys.argv = ['rayft', 'plan', 'missing.yaml']; "
               "code = main(); import peft; from peft.import_utils import is_bnb_available; "
               "print(code, 'bitsandbytes' in sys.modules and sys.modules['bitsandbytes'] is not None, "
               "is_bnb_available())")
    found = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, timeout=120)
    assert found.stdout.split() == ["2", "False", "False"], found.stderr[-2000:]

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert not shm_op_is_built()  # not built: the driver builds it before the workers start
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    assert shm_op_is_built()
