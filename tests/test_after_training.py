"""After the demo run (the session's `demo_run`): its trackers read back, and prediction with its adapter."""

import json

import pytest
from conftest import ROOT, SECRET

from rayft.orchestrator.predict import run_predict
from rayft.recipe.loading import load_recipe
from rayft.recipe.parse import parse_config

pytestmark = pytest.mark.slow  # the demo run it reads is a Ray Train run
PREDICT_RECIPE = ROOT / "configs" / "predict_lora.yaml"


def test_trackers_hold_the_loss_series_of_rank_zero(demo_run, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, log, _ = demo_run
    losses = [(r["step"], r["loss"]) for r in log]

    # TensorBoard: one writer (rank 0's), with the loss of every logged step
    (run_dir,) = (out / "runs").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")] == [(s, round(v, 4)) for s, v in losses]

    # MLflow: one run named after ray_run_name in the local file store, with the loss series and the
    # final metrics
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((out / "mlruns").as_uri())
    (run,) = client.search_runs(["0"])
    assert run.info.run_name == "demo-sft-lora" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, round(m.value, 4)) for m in history] == [(s, round(v, 4)) for s, v in losses]
    results = json.loads((out / "all_results.json").read_text())
    assert run.data.metrics["train_loss"] == pytest.approx(results["train_loss"])

    # Weights & Biases: one offline run, closed, with the run's name
    (wandb_run,) = (out / "wandb").glob("offline-run-*")
    assert any(p.suffix == ".wandb" and p.stat().st_size > 0 for p in wandb_run.iterdir())

    # SwanLab (use_swanlab, offline mode): one run in output_dir/swanlog, finished, named after ray_run_name, with
    # the loss of every logged step and the final evaluation, its config the recipe with the hub token masked
    records = swanlab_records(out / "swanlog")
    assert records["start"][0].name == "demo-sft-lora" and records["finish"][0].state == 1  # RUN_STATE_FINISHED
    scalars = [(r.step, round(r.value.number, 4)) for r in records["scalar"] if r.key == "train/loss"]
    assert scalars == [(s, round(v, 4)) for s, v in losses]
    assert any(r.key.startswith("eval/") for r in records["scalar"])
    (config,) = (out / "swanlog").glob("run-*/files/config.yaml")
    assert "hf_hub_token" in config.read_text() and SECRET not in config.read_text()
    assert not [p for p in (out / "swanlog").rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def swanlab_records(folder) -> dict[str, list]:
    """The records of the one SwanLab run under `folder`, by kind (start, scalar, finish, ...), read with SwanLab's
    own reader of its run file."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    (run_file,) = folder.glob("run-*/run-*.swanlab")
    reader, records = DataStoreReader(), {}
    reader.open(run_file)
    for raw in reader:
        record = Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        records.setdefault(kind, []).append(getattr(record, kind))
    reader.close()
    return records


def test_predict_with_generate_on_the_demo_adapter(demo_run, tmp_path, tiny_model, ray_local, rayft_log):
    out = demo_run[0]
    cfg = parse_config(load_recipe(PREDICT_RECIPE, [
        f"model_name_or_path={tiny_model}", f"adapter_name_or_path={out}", f"output_dir={tmp_path / 'predict'}",
        "max_samples=20", "per_device_eval_batch_size=4"]), base_dir=ROOT)
    lines = rayft_log
    metrics = run_predict(cfg)

    examples = json.loads((ROOT / "data" / "demo" / "demo_sft_eval.json").read_text())[:20]
    predictions = (tmp_path / "predict" / "generated_predictions.jsonl").read_text()
    rows = [json.loads(line) for line in predictions.splitlines()]
    assert len(rows) == 20 and all(set(row) == {"prompt", "predict", "label"} for row in rows)
    # in the dataset's order, though two actors answered batches of four in whatever order they finished
    assert [row["label"] for row in rows] == [e["output"] for e in examples]
    assert all(e["instruction"] in row["prompt"] and row["prompt"].endswith("<|im_start|>assistant\n")
               for e, row in zip(examples, rows))
    assert "generating for 20 examples with 2 worker(s)" in "\n".join(lines)
    shares = [line for line in lines if "(node/pid) answered" in line]
    assert len(shares) == 2, lines  # both generation actors had work

    results = json.loads((tmp_path / "predict" / "predict_results.json").read_text())
    assert results == metrics and results["predict_samples"] == 20
    assert set(results) >= {"predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_bleu-4"}
    # the trained adapter answers in the demo's words: clearly above what unrelated text would score
    assert results["predict_rouge-1"] > 20 and results["predict_bleu-4"] > 10, results
    from rayft.trainers.metrics import similarity_scores

    rescored = similarity_scores([r["predict"] for r in rows], [r["label"] for r in rows])
    assert results["predict_rouge-l"] == pytest.approx(rescored["rouge-l"], abs=1e-3)

    # do_eval alone scores without writing the answers
    cfg = parse_config(load_recipe(PREDICT_RECIPE, [
        f"model_name_or_path={tiny_model}", f"adapter_name_or_path={out}", f"output_dir={tmp_path / 'eval'}",
        "max_samples=20", "do_predict=false", "do_eval=true", "ray_num_workers=1"]), base_dir=ROOT)
    scores = run_predict(cfg)
    assert scores["eval_rouge-l"] == pytest.approx(results["predict_rouge-l"], abs=1e-3)  # greedy: same answers
    # one generation worker on the 2-CPU instance gets one CPU: Ray Data stalls an actor holding every CPU
    assert any("1 CPU(s) for the one generation worker, a node's CPUs but one" in line for line in lines)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["all_results.json", "eval_results.json"]
