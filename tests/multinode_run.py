"""Runs the demo recipe on a fake two-node Ray cluster (two raylets on this machine); used by test_multinode.

    python tests/multinode_run.py OUT_DIR MODEL_DIR RUNS_JSON

RUNS_JSON maps a run name to its key=value overrides; each run writes under OUT_DIR/<name>/. Prints one
JSON line per run: {"run": name, "status": "ok"|"refused", "message": ...}. One cluster serves every run;
it shuts down only the cluster it started.
"""

import json
import sys
from pathlib import Path

from ray.cluster_utils import Cluster

from rayft.data.errors import DataError
from rayft.orchestrator.launch import run_train
from rayft.recipe.loading import load_recipe
from rayft.recipe.parse import parse_config
from rayft.recipe.problems import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def main(out: str, model: str, runs: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        import ray

        ray.init(address=cluster.address)
        for name, overrides in json.loads(runs).items():
            cfg = parse_config(load_recipe(ROOT / "configs" / "demo_sft_lora.yaml", [
                f"model_name_or_path={model}", f"output_dir={out}/{name}/out", f"ray_storage_path={out}/{name}/ray",
                f"ray_address={cluster.address}", "max_steps=2", "deepspeed=z0", *overrides]), base_dir=ROOT)
            try:
                run_train(cfg)
                print(json.dumps({"run": name, "status": "ok"}), flush=True)
            except (ConfigError, DataError) as err:
                print(json.dumps({"run": name, "status": "refused", "message": str(err)}), flush=True)
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
