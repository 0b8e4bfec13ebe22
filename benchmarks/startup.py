"""Where a short run's time goes before it trains: the driver's data step with Ray Data's tasks against the
driver's own tokenisation of a small dataset, then one whole run's phases read from its log.

    .venv/bin/python benchmarks/startup.py [--examples 96]

Both data paths tokenise the same DPO demo pairs on a fresh local Ray instance, once each, as a run does.
The run is the DPO demo (2 workers, ZeRO-2, evaluation on the training pairs); its phases are the seconds from
the start of `run_train` to the data summary, to rank 0's first message, to the first logged step, and to the end.
"""

import argparse
import logging
import tempfile
import time

from common import ROOT, TINY, table, write


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=96)
    args = parser.parse_args()

    import ray

    from rayft.data.examples import Rows
    from rayft.data.pipeline import EncodingSettings, load_examples, tokenize
    from rayft.data.tokenizer import TokenizerSpec
    from rayft.orchestrator.launch import run_train
    from rayft.recipe.loading import load_recipe
    from rayft.recipe.logs import logger
    from rayft.recipe.parse import parse_config
    from rayft.trainers.stages import STAGES

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    examples = load_examples("demo_dpo", str(ROOT / "data" / "demo"), args.examples, data="preference")
    spec, settings = TokenizerSpec(str(TINY)), EncodingSettings("chatml", 128, stage="dpo")
    encoder = STAGES["dpo"].encoder
    rows = []
    for name, driver_max in (("Ray Data tasks", 0), ("the driver", 10**9)):
        def once(limit=driver_max):
            tokenize(Rows.of(examples), spec, settings, encoder, 64, driver_max=limit)

        seconds = timed(once)  # cold, as a run meets it: task workers start, each process loads the tokenizer
        rows.append({"tokenised by": name, "examples": len(examples), "seconds": round(seconds, 2)})
    print(table(rows, ["tokenised by", "examples", "seconds"]), flush=True)

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
    write("startup", {"tokenise": rows, "run": phases})
    ray.shutdown()


if __name__ == "__main__":
    main()
