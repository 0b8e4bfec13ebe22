"""Data at scale: what a short `rayft train` costs the driver and the worker as the dataset grows, how long it
takes to the first optimizer step, and read + convert + tokenise throughput against LLaMA-Factory 0.9.5's own
preprocessing (preprocessing_num_workers: 2) on the same rows, side by side in one invocation.

    .venv/bin/python benchmarks/data_scale.py [--rows 100000,1000000] [--formats alpaca,sharegpt]
        [--first-step 20000,2000000] [--tokenize-rows 2000000] [--lf-venv .cache/lf-venv] [--parts memory,...]

Datasets are generated once under .cache/bench-data, as 8 JSON-lines files each (10,000,000 alpaca rows are
about 2 GB). The driver's peak is its own process's (getrusage, printed by a wrapper around `rayft`'s main); the
worker's is training_peak_rss_gb of train_results.json. Throughput: rayft is `rayft tokenize` into a
tokenized_path, LLaMA-Factory `llamafactory-cli train` with a new tokenized_path, which preprocesses, saves the
result and exits before loading the model; both are whole commands, start-up included.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import ROOT, TINY, table, write
from vs_llamafactory import ensure_lf_venv, timed_run

DATA = ROOT / ".cache" / "bench-data"
WORDS = ("the a cat dog fox horse bee white red blue three two one plus minus is are of and to in what why how "
         "many letters word sentence describe reverse order these").split()
# the driver's own peak memory, printed when its `rayft` command returns
DRIVER = ("import resource, sys\nfrom rayft.orchestrator.cli import main\ntry:\n    code = main(sys.argv[1:])\n"
          "finally:\n    print('DRIVER_PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,"
          " flush=True)\nsys.exit(code)\n")


def dataset(rows: int, formatting: str, files: int = 8) -> tuple[Path, str]:
    """A generated dataset of `rows` rows (alpaca or sharegpt) in `files` JSON-lines files: (dataset_dir, name)."""
    name = f"{formatting}_{rows}"
    folder = DATA / name
    if not (folder / "dataset_info.json").is_file():
        print(f"generating {rows} {formatting} rows in {folder} (once)", flush=True)
        rng = random.Random(rows)
        (folder / name).mkdir(parents=True, exist_ok=True)
        for part in range(files):
            with (folder / name / f"part-{part:03d}.jsonl").open("w") as f:
                for i in range(part * rows // files, (part + 1) * rows // files):
                    prompt, answer = _words(rng, 12), _words(rng, 24)
                    if formatting == "alpaca":
                        row = {"instruction": prompt, "input": _words(rng, 4) if i % 3 else "", "output": answer}
                    else:
                        row = {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}
                    f.write(json.dumps(row) + "\n")
        entry = {"file_name": name, **({"formatting": "sharegpt"} if formatting == "sharegpt" else {})}
        (folder / "dataset_info.json").write_text(json.dumps({name: entry}))
    return folder, name


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def recipe(folder: Path, name: str, out: Path) -> dict:
    return {"model_name_or_path": str(TINY), "stage": "sft", "do_train": True, "finetuning_type": "lora",
            "lora_target": "all", "dataset": name, "dataset_dir": str(folder), "template": "qwen", "cutoff_len": 128,
            "per_device_train_batch_size": 2, "max_steps": 2, "logging_steps": 1, "save_strategy": "no",
            "output_dir": str(out), "overwrite_output_dir": True, "report_to": "none"}


def short_run(folder: Path, name: str, work: Path, env: dict, *overrides: str) -> dict:
    """A 2-step, 1-worker `rayft train`: the driver's and worker's peaks, and seconds to the first step."""
    out = work / f"train-{name}{'-'.join(('',) + overrides).replace('=', '')}"
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe(folder, name, out)))
    log = out.with_suffix(".log")
    timing = timed_run([sys.executable, "-c", DRIVER, "train", str(path), "ray_num_workers=1",
                        f"ray_storage_path={out}-ray", *overrides], env, out, log)
    driver = max(float(line.split()[1]) for line in log.read_text().splitlines() if line.startswith("DRIVER_PEAK"))
    worker = json.loads((out / "train_results.json").read_text())["training_peak_rss_gb"] * 1024
    return {"driver peak (MB)": driver, "worker peak (MB)": worker, "first step (s)": timing["first step"],
            "wall (s)": timing["wall"]}


def tokenise_side_by_side(rows: int, work: Path, env: dict, lf_cli: Path) -> list[dict]:
    """rayft tokenize and LLaMA-Factory's preprocessing of the same alpaca rows: rows per second of each."""
    folder, name = dataset(rows, "alpaca")
    results = []
    for tool in ("llamafactory", "rayft"):
        out = work / f"tokenize-{tool}"
        settings = {**recipe(folder, name, out), "tokenized_path": str(out) + "-tokens", "overwrite_cache": True}
        path = out.with_suffix(".yaml")
        run_env = dict(env)
        if tool == "llamafactory":
            settings["preprocessing_num_workers"] = 2
            path.write_text(yaml.safe_dump(settings))
            command = [str(lf_cli), "train", str(path)]
            run_env["PATH"] = f"{lf_cli.parent}{os.pathsep}{env.get('PATH', '')}"
        else:
            path.write_text(yaml.safe_dump(settings))
            command = [sys.executable, "-m", "rayft.orchestrator.cli", "tokenize", str(path),
                       f"ray_storage_path={out}-ray"]
        started = time.time()
        done = subprocess.run(command, env=run_env, cwd=ROOT, capture_output=True, text=True)
        seconds = time.time() - started
        out.with_suffix(".log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise SystemExit(f"{tool} failed ({done.returncode}); its output is in {out.with_suffix('.log')}")
        results.append({"tool": tool, "rows": rows, "seconds": seconds, "rows/s": rows / seconds})
        print(table(results[-1:], list(results[-1])), flush=True)
    lf, ours = results
    results.append({"tool": "rayft / LF", "rows": rows, "seconds": ours["seconds"] / lf["seconds"],
                    "rows/s": ours["rows/s"] / lf["rows/s"]})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="100000,1000000", help="dataset sizes of the memory runs")
    parser.add_argument("--formats", default="alpaca,sharegpt")
    parser.add_argument("--first-step", default="20000,2000000", help="dataset sizes timed to the first step")
    parser.add_argument("--tokenize-rows", type=int, default=2000000)
    parser.add_argument("--lf-venv", default=str(ROOT / ".cache" / "lf-venv"))
    parser.add_argument("--parts", default="memory,first-step,tokenize")
    args = parser.parse_args()
    parts = args.parts.split(",")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "OMP_", "MKL_"))}
    env.update(HF_HUB_OFFLINE="1", DISABLE_VERSION_CHECK="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    work = Path(tempfile.mkdtemp(prefix="data-scale-"))
    payload = {}

    if "memory" in parts:
        memory = []
        for formatting in args.formats.split(","):
            for rows in (int(r) for r in args.rows.split(",")):
                folder, name = dataset(rows, formatting)
                memory.append({"format": formatting, "rows": rows, **short_run(folder, name, work, env)})
                print(table(memory[-1:], list(memory[-1])), flush=True)
            ours = [m for m in memory if m["format"] == formatting]
            memory.append({"format": formatting, "rows": "largest / smallest",
                           **{k: ours[-1][k] / ours[0][k] for k in ("driver peak (MB)", "worker peak (MB)")}})
        payload["memory"] = memory
        print(table(memory, ["format", "rows", "driver peak (MB)", "worker peak (MB)", "first step (s)", "wall (s)"]))

    if "first-step" in parts:
        first = []
        sizes = [int(r) for r in args.first_step.split(",")]
        # materialised (the default), and streamed (tokenised while the worker trains) at the largest size
        for rows, streaming in [(rows, False) for rows in sizes] + [(sizes[-1], True)]:
            folder, name = dataset(rows, "alpaca")
            extra = ("streaming=true",) if streaming else ()
            first.append({"rows": rows, "streaming": streaming, **short_run(folder, name, work, env, *extra)})
            print(table(first[-1:], list(first[-1])), flush=True)
        payload["first_step"] = first
        print(table(first, ["rows", "streaming", "first step (s)", "wall (s)", "driver peak (MB)"]))

    if "tokenize" in parts:
        lf_cli = ensure_lf_venv(Path(args.lf_venv))
        payload["tokenize"] = tokenise_side_by_side(args.tokenize_rows, work, env, lf_cli)
        print(table(payload["tokenize"], ["tool", "rows", "seconds", "rows/s"]))
        print("(the ratio row: seconds and rows/s are rayft / LLaMA-Factory)")
    print(f"results: {write('data_scale', payload)}")


if __name__ == "__main__":
    main()
