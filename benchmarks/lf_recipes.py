"""Trains every LLaMA-Factory example recipe in configs/llamafactory/examples for two steps, unchanged but for
the model path, dataset_dir and output_dir (a recipe for Llama 3 takes the tiny Qwen2's template with it; the LLaMA
Pro recipe's model is a tiny one of 8 blocks with 8 added, as its expand.sh does), and prints one line per recipe
(steps, train loss, seconds).

    .venv/bin/python benchmarks/lf_recipes.py [--dataset-dir ../shared/data/llamafactory]

Besides the paths, each run sets max_steps=2 and rayft's storage folder; the predict recipe reads the adapter
the LoRA SFT recipe wrote and generates at most 16 tokens per answer (the tiny model never stops by itself).
A last run trains the QLoRA recipe under ZeRO-2 (LLaMA-Factory's ds_z2_config.json) on two workers.
Runs one recipe at a time on a local Ray instance of the script's own.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import ROOT, TINY, table, write

LF_ROOT = ROOT / "configs" / "llamafactory"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset-dir", default=str(ROOT.parent / "shared" / "data" / "llamafactory"))
    parser.add_argument("--only", default="", help="run only the recipes whose path holds this text")
    args = parser.parse_args()

    import ray

    from rayft.orchestrator.launch import run_train
    from rayft.orchestrator.predict import run_predict
    from rayft.recipe.derive import is_prediction
    from rayft.recipe.loading import load_recipe
    from rayft.recipe.parse import parse_config
    from rayft.recipe.values import read_log

    recipes = sorted((LF_ROOT / "examples").rglob("*.yaml"), key=lambda p: ("predict" in p.name, str(p)))
    qlora = LF_ROOT / "examples" / "train_qlora" / "qwen3_lora_sft_bnb_4bit.yaml"
    # and QLoRA under ZeRO-2 from LLaMA-Factory's JSON, on two workers
    runs = [(p, []) for p in recipes] + [(qlora, ["deepspeed=examples/deepspeed/ds_z2_config.json",
                                                  "ray_num_workers=2"])]
    work = Path(tempfile.mkdtemp(prefix="lf-recipes-"))
    ray.init(address="local", runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    rows, sft_adapter = [], None
    for path, extra in runs:
        name = path.relative_to(LF_ROOT / "examples").as_posix() + "".join(f" {e}" for e in extra)
        if args.only not in name or ("predict" in name and sft_adapter is None):
            continue  # (predict reads the adapter of this run's LoRA SFT recipe)
        out = work / name.replace("/", "_").replace(" ", "_").replace("=", "-").removesuffix(".yaml")
        model = TINY
        if "use_llama_pro: true" in path.read_text():  # expand.sh's model: a tiny one of 8 blocks, 8 added
            from rayft.trainers.llama_pro import expand_blocks
            from rayft.trainers.tiny_model import write_tiny_model

            demo = sorted((ROOT / "data" / "demo").glob("demo_*.json"))
            model = expand_blocks(write_tiny_model(work / "tiny-8", demo, num_layers=8), work / "tiny-8-pro", 8)
        overrides = [f"model_name_or_path={model}", f"dataset_dir={args.dataset_dir}", f"output_dir={out}",
                     f"ray_storage_path={out}-ray", "max_steps=2", *extra]
        if "template: llama3" in path.read_text():  # the template of the model's family: the tiny Qwen2
            overrides.append("template=qwen")
        if "predict" in name:
            overrides = [o for o in overrides if o != "max_steps=2"] + [f"adapter_name_or_path={sft_adapter}",
                                                                         "max_new_tokens=16"]
        cfg = parse_config(load_recipe(path, overrides), base_dir=LF_ROOT)
        started = time.time()
        if is_prediction(cfg):
            run_predict(cfg)
        else:
            run_train(cfg)
        seconds = time.time() - started
        results = json.loads((out / "all_results.json").read_text())
        steps = max((r["step"] for r in read_log(out) if "step" in r), default=0)
        answers = len((out / "generated_predictions.jsonl").read_text().splitlines()) if is_prediction(cfg) else None
        rows.append({"recipe": name, "stage": cfg.finetuning.stage, "type": cfg.finetuning.finetuning_type,
                     "steps": steps, "train loss": results.get("train_loss"), "answers": answers,
                     "seconds": seconds})
        if name == "train_lora/qwen3_lora_sft.yaml":
            sft_adapter = out
    ray.shutdown()
    print(table(rows, ["recipe", "stage", "type", "steps", "train loss", "answers", "seconds"]))
    print(f"results: {write('lf_recipes', {'rows': rows})}")


if __name__ == "__main__":
    main()
