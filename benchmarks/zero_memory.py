"""ZeRO memory: peak resident memory per worker for full fine-tuning with 2 workers under ZeRO 0, 2 and 3,
next to the memory planner's estimate.

    .venv/bin/python benchmarks/zero_memory.py [--hidden 768 --layers 10 --steps 6]

Each row is one rayft run of a random ~70 M parameter model; the peaks are the highest of the two workers
(rank 0 saves the model, under ZeRO-3 after gathering it whole). A worker's memory before the model loads
(Python and the libraries) is measured first and printed: it is the planner's `runtime` part.
"""

import argparse
import tempfile
from pathlib import Path

from common import rayft_run, sized_model, table, write

GB = 1024**3


def runtime_baseline() -> float:
    """Peak RSS of a Ray worker that imported what a training worker imports, before any model: GB."""
    import ray

    @ray.remote(num_cpus=1)
    def imported() -> float:
        import resource

        import deepspeed  # noqa: F401
        import peft  # noqa: F401
        import ray.train.torch  # noqa: F401
        import transformers  # noqa: F401
        from transformers import Trainer  # noqa: F401

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        return ray.get(imported.remote())
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--stages", default="z0,z2,z3")
    args = parser.parse_args()

    from rayft.cluster.session import local_machine
    from rayft.orchestrator.memory import ModelShape
    from rayft.orchestrator.plan import make_plan
    from rayft.trainers.deepspeed_ops import prebuild_cpu_ops
    from rayft.trainers.probe import model_shape

    prebuild_cpu_ops()
    model = sized_model(f"bench-h{args.hidden}-l{args.layers}", args.hidden, args.layers)
    baseline = runtime_baseline()
    print(f"a worker's resident memory before its model (Python + libraries): {baseline:.3f} GB")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages.split(","):
            overrides = [f"model_name_or_path={model}", "finetuning_type=full", "lora_rank=8", "lora_target=all",
                         f"deepspeed={stage}", "ray_num_workers=2", f"max_steps={args.steps}", "cutoff_len=128",
                         "per_device_train_batch_size=2", "logging_steps=1", "learning_rate=1e-5"]
            overrides = [o for o in overrides if not o.startswith("lora_")]
            run = rayft_run(overrides, Path(tmp) / Path(stage).stem)
            cfg = run["cfg"]
            shape = ModelShape(**model_shape(cfg))
            plan = make_plan(cfg, local_machine(), 256, shape=shape)
            estimated = sum(v for k, v in plan.memory_per_worker.items() if k != "budget" and v) / GB
            measured = run["results"]["peak_rss_gb"]
            rows.append({"deepspeed": stage, "params (M)": round(shape.total_params / 1e6, 1),
                         "training peak GB": run["results"]["training_peak_rss_gb"], "peak GB (with saving)": measured,
                         "estimate GB": round(estimated, 3), "estimate / measured": round(estimated / measured, 3),
                         "parts": {k: round(v / GB, 3) for k, v in plan.memory_per_worker.items() if v}})
            columns = ["deepspeed", "training peak GB", "peak GB (with saving)", "estimate GB"]
            print(table(rows[-1:], columns), flush=True)
    zero0 = next((r for r in rows if r["deepspeed"] == "z0"), None)
    for r in rows:
        if zero0:
            r["peak vs ZeRO-0"] = round(r["peak GB (with saving)"] / zero0["peak GB (with saving)"], 3)
            r["training peak vs ZeRO-0"] = round(r["training peak GB"] / zero0["training peak GB"], 3)
    print()
    print(table(rows, ["deepspeed", "params (M)", "training peak GB", "peak GB (with saving)", "estimate GB",
                       "estimate / measured", "training peak vs ZeRO-0", "peak vs ZeRO-0"]))
    print(f"\nwritten to {write('zero_memory', {'args': vars(args), 'runtime_baseline_gb': baseline, 'rows': rows})}")


if __name__ == "__main__":
    main()
