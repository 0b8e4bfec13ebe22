"""What the benchmarks share: a model of a chosen size built locally, a rayft run in-process, the output table."""

import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / ".cache" / "models" / "tiny-qwen2"
RESULTS = ROOT / "benchmarks" / "results"
DEMO_RECIPE = ROOT / "configs" / "demo_sft_lora.yaml"


def sized_model(name: str, hidden_size: int, num_layers: int) -> Path:
    """A random Qwen2-style model with the tiny model's tokenizer, saved once under .cache/models/<name>."""
    from rayft.trainers.tiny_model import write_sized_model

    return write_sized_model(ROOT / ".cache" / "models" / name, TINY, hidden_size, num_layers)


def rayft_run(overrides: list[str], out_dir: Path) -> dict:
    """Trains the demo recipe with `overrides` through rayft's driver (a local Ray instance of its own);
    returns all_results.json, the logged records and the driver's start time."""
    from rayft.orchestrator.launch import run_train
    from rayft.recipe.loading import load_recipe
    from rayft.recipe.parse import parse_config
    from rayft.recipe.values import read_log

    started = time.time()
    cfg = parse_config(load_recipe(DEMO_RECIPE, [f"output_dir={out_dir}", f"ray_storage_path={out_dir}-ray",
                                                 "plot_loss=false", "ray_run_name=null", *overrides]), base_dir=ROOT)
    run_train(cfg)
    return {"results": json.loads((out_dir / "all_results.json").read_text()), "log": read_log(out_dir),
            "started": started, "cfg": cfg}


def table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(_cell(r.get(c)).ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=str))
    return path


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)
