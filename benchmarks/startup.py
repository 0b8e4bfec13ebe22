"""Where a short run's time goes before it trains: the driver's data step with Ray Data's tasks against the
driver's own tokenisation of a small dataset, then one whole run's phases read from its log.

    .venv/bin/python benchmarks/startup.py [--examples 96] [--empty-runs 3]

Both data paths tokenise the same DPO demo pairs on a fresh local Ray instance, once each, as a run does.
The run is the DPO demo (2 workers, ZeRO-2, evaluation on the training pairs); its phases are the seconds from
the start of `run_train` to the data summary, to rank 0's first message, to the first logged step, and to the end.
Between them, Ray Train's own cost: a 2-worker run of a function that only reports, at Ray Train's default
controller poll and at rayft's local one.
"""

import argparse
import logging
import os
import tempfile
import time

from common import ROOT, TINY, table, write


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def empty_runs(repeats: int, storage: str) -> list[dict]:
    """Ray Train's own cost: a 2-worker TorchTrainer whose training function only reports, under rayft's settings
    for a local run (launch.ray_train_settings), once with Ray Train's default controller poll put back (2 s),
    once with rayft's, alternating, `repeats` each."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayft.orchestrator.launch import ray_train_settings

    def report_once(config):
        import ray.train

        ray.train.report({"done": 1})

    poll = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    seconds: dict[str, list[float]] = {}
    for i in range(repeats):
        for ray_default in (True, False):
            if ray_default:
                os.environ[poll] = "2.0"
            with ray_train_settings(local=True):
                interval = os.environ[poll]
                start = time.perf_counter()
                TorchTrainer(report_once, scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                             run_config=RunConfig(name=f"empty-{interval}-{i}", storage_path=storage)).fit()
                seconds.setdefault(interval, []).append(time.perf_counter() - start)
            if ray_default:
                os.environ.pop(poll)
    return [{"controller poll (s)": interval, "runs": len(runs), "median (s)": round(sorted(runs)[len(runs) // 2], 2),
             "min (s)": round(min(runs), 2), "max (s)": round(max(runs), 2)} for interval, runs in seconds.items()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--empty-runs", type=int, default=3, help="empty TorchTrainer runs per controller poll")
    args = parser.parse_args()

    import ray

    from rayft.data.examples import Rows
    from rayft.data.pipeline import EncodingSettings, encode_tables, load_examples, stage_encoder, tokenize
    from rayft.data.tokenizer import TokenizerSpec
    from rayft.orchestrator.launch import run_train
    from rayft.recipe.loading import load_recipe
    from rayft.recipe.logs import logger
    from rayft.recipe.parse import parse_config

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    examples = load_examples("demo_dpo", str(ROOT / "data" / "demo"), args.examples, data="preference")
    spec, settings = TokenizerSpec(str(TINY)), EncodingSettings("chatml", 128, stage="dpo")
    encoder = stage_encoder("dpo")
    rows = []
    for name, driver_max in (("Ray Data tasks", 0), ("the driver", 10**9)):
        def once(limit=driver_max):
            tokenize(Rows.of(examples), spec, settings, encoder, 64, driver_max=limit, here=encode_tables)

        seconds = timed(once)  # cold, as a run meets it: task workers start, each process loads the tokenizer
        rows.append({"tokenised by": name, "examples": len(examples), "seconds": round(seconds, 2)})
    print(table(rows, ["tokenised by", "examples", "seconds"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        empty = empty_runs(args.empty_runs, tmp) if args.empty_runs else []
    if empty:
        print(table(empty, list(empty[0])), flush=True)

    marks: dict[str, float] = {}

    class Marks(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            now = time.perf_counter()
            for mark, starts in (("data", "train data:"), ("workers", "lora:"), ("first step", "step ")):
                if message.startswith(starts):
                    marks.setdefault(mark, now)

    logger.addHandler(Marks())
    logger.setLevel(logging.DEBUG)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config(load_recipe(ROOT / "configs" / "demo_dpo_lora.yaml", [
            f"model_name_or_path={TINY}", f"output_dir={tmp}/out", f"ray_storage_path={tmp}/ray",
            "eval_dataset=demo_dpo", f"max_samples={args.examples}", "num_train_epochs=3", "plot_loss=false"]),
            base_dir=ROOT)
        start = time.perf_counter()
        run_train(cfg)
        marks["end"] = time.perf_counter()
    phases = [{"phase": f"to {mark}", "seconds": round(marks[mark] - start, 2)}
              for mark in ("data", "workers", "first step", "end") if mark in marks]
    print(table(phases, ["phase", "seconds"]), flush=True)
    write("startup", {"tokenise": rows, "empty runs": empty, "run": phases})
    ray.shutdown()


if __name__ == "__main__":
    main()
