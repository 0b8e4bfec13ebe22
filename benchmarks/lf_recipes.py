"""Trains every LLaMA-Factory example recipe in configs/llamafactory/examples for two steps, unchanged but for
the model path, dataset_dir and output_dir, and prints one line per recipe (steps, first and last loss, seconds).

    .venv/bin/python benchmarks/lf_recipes.py [--dataset-dir ../shared/data/llamafactory]

Besides the paths, each run sets max_steps=2 and rayft's storage folder; the predict recipe reads the adapter
the LoRA SFT recipe wrote and generates at most 16 tokens per answer (the tiny model never stops by itself).
Runs one recipe at a time on a local Ray instance of the script's own.
"""

import argparse
import tempfile
import time
from pathlib import Path

from common import ROOT, TINY, table, write

LF_ROOT = ROOT / "configs" / "llamafactory"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset-dir", default=str(ROOT.parent / "shared" / "data" / "llamafactory"))
    args = parser.parse_args()

    import ray

    from rayft.orchestrator.launch import run_train
    from rayft.orchestrator.predict import run_predict
    from rayft.recipe.derive import is_prediction
    from rayft.recipe.loading import load_recipe
    from rayft.recipe.parse import parse_config
    from rayft.trainers.callbacks import read_log

    recipes = sorted((LF_ROOT / "examples").rglob("*.yaml"), key=lambda p: ("predict" in p.name, str(p)))
    work = Path(tempfile.mkdtemp(prefix="lf-recipes-"))
    ray.init(address="local", runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    rows, sft_adapter = [], None
    for path in recipes:
        name = path.relative_to(LF_ROOT / "examples").as_posix()
        out = work / name.replace("/", "_").removesuffix(".yaml")
        overrides = [f"model_name_or_path={TINY}", f"dataset_dir={args.dataset_dir}", f"output_dir={out}",
                     f"ray_storage_path={out}-ray", "max_steps=2"]
        if "predict" in name:
            overrides = overrides[:-1] + [f"adapter_name_or_path={sft_adapter}", "max_new_tokens=16"]
        cfg = parse_config(load_recipe(path, overrides), base_dir=LF_ROOT)
        started = time.time()
        if is_prediction(cfg):
            run_predict(cfg)
        else:
            run_train(cfg)
        losses = [r["loss"] for r in read_log(out) if "loss" in r] if not is_prediction(cfg) else []
        rows.append({"recipe": name, "stage": cfg.finetuning.stage, "type": cfg.finetuning.finetuning_type,
                     "steps": len(losses), "first loss": losses[0] if losses else None,
                     "last loss": losses[-1] if losses else None, "seconds": time.time() - started})
        if name == "train_lora/qwen3_lora_sft.yaml":
            sft_adapter = out
    ray.shutdown()
    print(table(rows, ["recipe", "stage", "type", "steps", "first loss", "last loss", "seconds"]))
    print(f"results: {write('lf_recipes', {'rows': rows})}")


if __name__ == "__main__":
    main()
