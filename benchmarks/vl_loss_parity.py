"""rayft's loss curve against LLaMA-Factory 0.9.5's own training on the same images: one LLaMA-Factory recipe, a
2-worker LoRA SFT of the tiny Qwen2-VL, trained unchanged by both tools; prints each step's loss and their relative
difference.

    .venv/bin/python benchmarks/vl_loss_parity.py --lf-venv /path/to/lf-venv [--steps 8] [--workers 2]

LLaMA-Factory loads its processor through `AutoProcessor`, which needs torchvision, so its environment is not the
CPU-only one of the other benchmarks: torch with the CUDA build and torchvision from the package index (they run on
a CPU), e.g. `pip install torch==2.14.1 torchvision==0.29.1 llamafactory==0.9.5`, then `pip install --no-deps
pillow==13.0.0` (rayft's Pillow). It runs on `--workers` processes through torchrun (`FORCE_TORCHRUN=1`); rayft
runs `rayft train <the same file> ray_num_workers=[1,N]`.

The data: the rows with images of tests/golden/qwen2_vl (several images per row, none in one, awkward sizes),
repeated. Both tools read them in file order (`disable_shuffling: true`), one example per worker per step, so that
each step trains the same examples in both: LLaMA-Factory's sampler gives step s's examples 2s and 2s + 1 to its
two ranks. rayft's run is elastic (`ray_num_workers=[1,N]`, which stays at N on a machine with N CPUs), so its
workers deal every global batch of one order in the same way (see "Elastic runs"); a run of a fixed size reads Ray
Data's split, whose parts pair other examples in a step. Same seed, LoRA on every linear layer of the language
model, fp32, a constant learning rate.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from common import ROOT, table, write

GOLDEN = ROOT / "tests" / "golden" / "qwen2_vl"


def recipe(model: Path, data: Path, out: Path, steps: int, learning_rate: float) -> dict:
    """The one LLaMA-Factory recipe both tools train."""
    return {
        "model_name_or_path": str(model), "trust_remote_code": True,
        "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_target": "all", "lora_rank": 8,
        "dataset": "shapes", "dataset_dir": str(data), "template": "qwen2_vl", "cutoff_len": 1024,
        "image_max_pixels": 16384, "overwrite_cache": True, "disable_shuffling": True,
        "output_dir": str(out), "logging_steps": 1, "save_strategy": "no", "overwrite_output_dir": True,
        "report_to": "none", "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
        "learning_rate": learning_rate, "lr_scheduler_type": "constant", "max_steps": steps, "seed": 42,
        "bf16": False, "ddp_timeout": 600,
    }


def losses_of(out: Path, tool: str) -> list[float]:
    """Each logged step's loss, in order: LLaMA-Factory's trainer_state.json, rayft's log."""
    from rayft.recipe.values import read_log

    if tool == "llamafactory":
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    else:
        history = read_log(out)
    return [float(r["loss"]) for r in history if "loss" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lf-venv", required=True, help="a venv with llamafactory 0.9.5 and torchvision")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args()
    lf_cli = Path(args.lf_venv) / "bin" / "llamafactory-cli"
    if not lf_cli.is_file():
        raise SystemExit(f"{args.lf_venv} has no llamafactory-cli; see this file's docstring")

    from rayft.trainers.tiny_model import write_tiny_model

    work = Path(tempfile.mkdtemp(prefix="vl-parity-"))
    model = write_tiny_model(work / "tiny-qwen2-vl", sorted((ROOT / "data" / "demo").glob("demo_*.json")),
                             family="qwen2_vl")
    data = work / "data"
    shutil.copytree(GOLDEN / "images", data / "images")
    (data / "dataset_info.json").write_text((GOLDEN / "dataset_info.json").read_text())
    rows = json.loads((GOLDEN / "rows.json").read_text())
    (data / "rows.json").write_text(json.dumps(rows * (args.steps * args.workers // len(rows) + 1)))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "OMP_", "MKL_"))}
    env.update(HF_HUB_OFFLINE="1", DISABLE_VERSION_CHECK="1", TOKENIZERS_PARALLELISM="false")
    curves = {}
    for tool in ("llamafactory", "rayft"):
        out = work / tool
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(recipe(model, data, out, args.steps, args.learning_rate)))
        run_env = dict(env)
        if tool == "llamafactory":
            command = [str(lf_cli), "train", str(path)]
            run_env.update(PATH=f"{lf_cli.parent}{os.pathsep}{env.get('PATH', '')}", FORCE_TORCHRUN="1",
                           NPROC_PER_NODE=str(args.workers))
        else:
            command = [sys.executable, "-m", "rayft.orchestrator.cli", "train", str(path),
                       f"ray_num_workers=[1,{args.workers}]", f"ray_storage_path={out}-ray"]
        with open(out.with_suffix(".log"), "w") as log:
            done = subprocess.run(command, env=run_env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
        if done.returncode != 0:
            raise SystemExit(f"{tool} failed ({done.returncode}); see {out.with_suffix('.log')}")
        curves[tool] = losses_of(out, tool)
    lf, ours = curves["llamafactory"], curves["rayft"]
    if len(lf) != len(ours):
        raise SystemExit(f"LLaMA-Factory logged {len(lf)} steps, rayft {len(ours)}")
    rows = [{"step": i + 1, "LLaMA-Factory": a, "rayft": b, "relative difference": abs(b - a) / abs(a)}
            for i, (a, b) in enumerate(zip(lf, ours))]
    print(table([{k: f"{v:.6g}" for k, v in r.items()} for r in rows], list(rows[0])))
    worst = max(r["relative difference"] for r in rows)
    print(f"largest relative difference per step: {worst:.2e} (target: at most 1e-3)")
    print(f"results: {write('vl_loss_parity', {'rows': rows, 'workers': args.workers, 'steps': args.steps})}")


if __name__ == "__main__":
    main()
