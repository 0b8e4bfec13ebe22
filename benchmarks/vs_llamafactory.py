"""rayft against LLaMA-Factory 0.9.5 on the same job, side by side in one command: one LLaMA-Factory recipe
file, trained unchanged by both tools, for 1 and 2 workers, with and without packing.

    .venv/bin/python benchmarks/vs_llamafactory.py [--lf-venv .cache/lf-venv] [--steps 40] [--only 1w]

The job: LoRA SFT of the tiny Qwen2-style model on `alpaca_en_demo` (../shared), template qwen, cutoff 256,
batch 4 per worker, 40 steps, no DeepSpeed; every other key at its default but `logging_steps: 1` (the first
logged step marks the time to the first optimizer step) and `include_num_input_tokens_seen: non_padding`
(both count the tokens they train). LLaMA-Factory runs `llamafactory-cli train` in its own virtual environment
(created under .cache/lf-venv when missing: torch 2.13.0 CPU, torchvision and torchaudio removed, an empty
`torchaudio` module in their place), on 2 workers through torchrun (`FORCE_TORCHRUN=1`, `NPROC_PER_NODE=2`).
rayft runs its own command, `rayft train <the same file> ray_num_workers=N`, which starts a local Ray instance.
Both run as subprocesses from a cold start; their wall time is the whole command.

Printed per run: samples/s and non-pad tokens/s over the training (the Trainer's train_runtime), seconds from
the command's start to the end of the first optimizer step, and wall seconds; then rayft / LLaMA-Factory. For
rayft also its start-up milestones, from its output as printed: the data tokenised on the driver (after its
imports, checks and the local Ray instance's start) and rank 0's first message (the worker group is up).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from common import ROOT, TINY, table, write

LF_VERSION = "0.9.5"
TORCH_VERSION = "2.13.0"
SHARED_DATA = ROOT.parent / "shared" / "data" / "llamafactory"


def ensure_lf_venv(venv: Path) -> Path:
    """LLaMA-Factory's own virtual environment (never rayft's): created once, returns its `llamafactory-cli`."""
    cli = venv / "bin" / "llamafactory-cli"
    if cli.is_file():
        return cli
    print(f"installing LLaMA-Factory {LF_VERSION} into {venv} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [f"torch=={TORCH_VERSION}", f"llamafactory=={LF_VERSION}"], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio"],
                   check=True)
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([str(venv / "bin" / "python"), "-c", where], check=True, capture_output=True,
                          text=True).stdout.strip()
    (Path(site) / "torchaudio").mkdir(exist_ok=True)  # LLaMA-Factory imports it; on CPU nothing of it is used
    (Path(site) / "torchaudio" / "__init__.py").write_text("")
    return cli


def recipe(out: Path, steps: int, packing: bool) -> dict:
    """The one LLaMA-Factory recipe both tools train."""
    return {
        "model_name_or_path": str(TINY), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_target": "all", "dataset": "alpaca_en_demo", "dataset_dir": str(SHARED_DATA), "template": "qwen",
        "cutoff_len": 256, "packing": packing, "per_device_train_batch_size": 4, "max_steps": steps,
        "output_dir": str(out), "overwrite_output_dir": True, "report_to": "none", "logging_steps": 1,
        "include_num_input_tokens_seen": "non_padding", "save_strategy": "no",
    }


# rayft's own milestones in its console output, for the start-up phases (LLaMA-Factory prints none of these)
MILESTONES = {"ray started": "[rayft] train data:", "workers started": " on 1 node(s)"}


def first_log_line(path: Path, started: float, stop: threading.Event, seen: dict) -> None:
    """Records when `path` (trainer_log.jsonl, written at each logging step) first has a line."""
    while not stop.is_set():
        if path.is_file() and path.stat().st_size > 0:
            seen["first step"] = time.time() - started
            return
        time.sleep(0.05)


def timed_run(command: list[str], env: dict, out: Path, log: Path) -> dict:
    """Runs one command to the end; its wall time, when its first optimizer step was logged, and when each of
    rayft's milestones appeared in its output (read as it is printed)."""
    seen, stop = {}, threading.Event()
    started = time.time()
    watcher = threading.Thread(target=first_log_line, args=(out / "trainer_log.jsonl", started, stop, seen))
    watcher.start()
    with log.open("w") as sink:
        proc = subprocess.Popen(command, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd=ROOT, text=True)
        for line in proc.stdout:
            sink.write(line)
            for name, marker in MILESTONES.items():
                if marker in line:
                    seen.setdefault(name, time.time() - started)
        returncode = proc.wait()
    wall = time.time() - started
    stop.set()
    watcher.join()
    if returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed ({returncode}); its output is in {log}")
    return {"wall": wall, **seen}


def figures(out: Path, timing: dict, tokens_key: str) -> dict:
    results = json.loads((out / "all_results.json").read_text())
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    tokens = max(r.get(tokens_key, 0) for r in records)
    return {"samples/s": results["train_samples_per_second"], "tokens/s": tokens / results["train_runtime"],
            "data ready (s)": timing.get("ray started"), "workers (s)": timing.get("workers started"),
            "first step (s)": timing.get("first step"), "wall (s)": timing["wall"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lf-venv", default=str(ROOT / ".cache" / "lf-venv"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--only", default="", help="run only the cases whose name holds this text (1w, 2w, packed)")
    args = parser.parse_args()
    if not (SHARED_DATA / "alpaca_en_demo.json").is_file():
        raise SystemExit(f"needs LLaMA-Factory's alpaca_en_demo in {SHARED_DATA}")
    lf_cli = ensure_lf_venv(Path(args.lf_venv))
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "OMP_", "MKL_"))}
    base_env.update(HF_HUB_OFFLINE="1", DISABLE_VERSION_CHECK="1", TOKENIZERS_PARALLELISM="false")
    for python in (Path(args.lf_venv) / "bin" / "python", Path(sys.executable)):  # warm the page cache, untimed
        subprocess.run([str(python), "-c", "import torch, transformers, peft"], env=base_env, check=True,
                       capture_output=True)

    work = Path(tempfile.mkdtemp(prefix="vs-lf-"))
    rows = []
    for workers in (1, 2):
        for packing in (False, True):
            case = f"{workers}w" + (" packed" if packing else "")
            if args.only not in case:
                continue
            figures_of = {}
            for tool in ("llamafactory", "rayft"):
                out = work / f"{tool}-{workers}w{'-packed' if packing else ''}"
                path = out.with_suffix(".yaml")
                path.write_text(yaml.safe_dump(recipe(out, args.steps, packing)))
                env = dict(base_env)
                if tool == "llamafactory":
                    command = [str(lf_cli), "train", str(path)]
                    env["PATH"] = f"{lf_cli.parent}{os.pathsep}{env.get('PATH', '')}"  # its launcher runs torchrun
                    if workers > 1:
                        env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE=str(workers))
                    tokens_key = "total_tokens"
                else:
                    command = [sys.executable, "-m", "rayft.orchestrator.cli", "train", str(path),
                               f"ray_num_workers={workers}", f"ray_storage_path={out}-ray"]
                    tokens_key = "num_input_tokens_seen"
                timing = timed_run(command, env, out, out.with_suffix(".log"))
                figures_of[tool] = figures(out, timing, tokens_key)
                rows.append({"case": case, "tool": tool, **figures_of[tool]})
                print(table(rows[-1:], list(rows[-1])), flush=True)
            lf, ours = figures_of["llamafactory"], figures_of["rayft"]
            rows.append({"case": case, "tool": "rayft / LF",
                         "samples/s": ours["samples/s"] / lf["samples/s"],
                         "tokens/s": ours["tokens/s"] / lf["tokens/s"],
                         "first step (s)": ours["first step (s)"] - lf["first step (s)"],
                         "wall (s)": ours["wall (s)"] / lf["wall (s)"]})
    columns = ["case", "tool", "samples/s", "tokens/s", "data ready (s)", "workers (s)", "first step (s)", "wall (s)"]
    print(table(rows, columns))
    print("(ratio rows: samples/s, tokens/s and wall are rayft / LLaMA-Factory; first step is rayft's seconds later)")
    print(f"results: {write('vs_llamafactory', {'rows': rows, 'steps': args.steps})}")


if __name__ == "__main__":
    main()
