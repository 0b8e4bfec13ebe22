"""Random draws, Optuna's TPE and Population Based Training on the demo SFT job, each with one budget of trial-steps.

    .venv/bin/python benchmarks/sweep_search.py [--seeds 0 1 2] [--strategies random optuna pbt]

Every sweep is configs/sweep_sft_pbt.yaml's job and space (learning_rate loguniform 1e-5..1e-2, weight_decay
uniform 0..0.1; 4 trials of 24 steps, 2 at a time, one worker each, eval_loss every 8 steps): 96 trial-steps for
each strategy, none stopped early, so the strategies differ only in how they choose values. `random` is a grid
sweep of those ranges (rayft draws every point at random with the sweep's seed); `optuna` is TPE starting from the
recipe's own values; `pbt` draws the same population (the recipe's values first), then every 8 steps the worst
quarter continues from the best quarter's checkpoint with perturbed values. The sweep's seed (`sweep.seed`) is
what changes between repeats. Each sweep runs as `rayft sweep` in its own process with a local Ray instance of its
own. Printed: the best final eval_loss among the trials of each sweep, the mean over seeds, and the wall time.
"""

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import ROOT, TINY, table, write

RECIPE = ROOT / "configs" / "sweep_sft_pbt.yaml"
PBT_ONLY = ("perturbation_interval", "quantile_fraction", "resample_probability")


def sweep_section(strategy: str, seed: int) -> dict:
    section = dict(yaml.safe_load(RECIPE.read_text())["sweep"], seed=seed)
    if strategy == "pbt":
        return section
    section = {k: v for k, v in section.items() if k not in PBT_ONLY}
    section["scheduler"] = "fifo"
    section["search"] = "optuna" if strategy == "optuna" else "grid"
    return section


def run(strategy: str, seed: int, work: Path) -> dict:
    raw = yaml.safe_load(RECIPE.read_text())
    raw.update(sweep=sweep_section(strategy, seed), model_name_or_path=str(TINY),
               dataset_dir=str(ROOT / "data" / "demo"), output_dir=str(work / f"{strategy}-{seed}"),
               ray_storage_path=str(work / "ray"),
               ray_run_name=f"bench-{strategy}-{seed}")
    recipe = work / f"{strategy}-{seed}.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "rayft.orchestrator.cli", "sweep", str(recipe)], cwd=ROOT,
                          capture_output=True, text=True)
    seconds = time.time() - started
    if proc.returncode != 0:
        raise SystemExit(f"{strategy} seed {seed} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with (work / f"{strategy}-{seed}" / "sweep_results.csv").open() as f:
        rows = list(csv.DictReader(f))
    scored = [float(r["eval_loss"]) for r in rows if r["eval_loss"]]
    steps = sum(int(r["step"] or 0) for r in rows)
    return {"strategy": strategy, "seed": seed, "best_eval_loss": min(scored), "trials": len(rows),
            "trial_steps": steps, "seconds": round(seconds, 1),
            "exploits": sum(bool(r.get("exploited")) for r in rows) if strategy == "pbt" else None,
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=["random", "optuna", "pbt"],
                        choices=["random", "optuna", "pbt"])
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="rayft-sweep-bench-") as work:
        for seed in args.seeds:
            for strategy in args.strategies:
                runs.append(run(strategy, seed, Path(work)))
                print(f"{strategy} seed {seed}: best eval_loss {runs[-1]['best_eval_loss']:.4f} "
                      f"({runs[-1]['trial_steps']} trial-steps, {runs[-1]['seconds']} s)", flush=True)
    summary = []
    for strategy in args.strategies:
        mine = [r for r in runs if r["strategy"] == strategy]
        summary.append({"strategy": strategy,
                        **{f"seed {r['seed']}": r["best_eval_loss"] for r in mine},
                        "mean": statistics.mean(r["best_eval_loss"] for r in mine),
                        "trial-steps": mine[0]["trial_steps"],
                        "seconds (mean)": statistics.mean(r["seconds"] for r in mine)})
    print(table(summary, list(dict.fromkeys(k for row in summary for k in row))))
    print(f"written to {write('sweep_search', {'runs': runs, 'summary': summary})}")


if __name__ == "__main__":
    main()
