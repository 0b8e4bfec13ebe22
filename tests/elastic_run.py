"""An elastic run on a fake two-node Ray cluster (two raylets on this machine, one CPU each); used by test_elastic.

    python tests/elastic_run.py OUT_DIR MODEL_DIR

One run of `ray_num_workers: [1, 2]`, LoRA + ZeRO-2 under STRICT_SPREAD, through a spot instance's life: at its first
logged step the second node's worker gets SIGTERM (the notice) and the group saves a checkpoint at that step; then
the node is removed (reclaimed) and the run goes on with one worker from that checkpoint; once the one-worker group
has a checkpoint of its own, its worker is held (SIGSTOP) and a node is added: Ray Train sees the node at its
coordinator's next tick, replaces the held group by one of two, and the run can never end before it grows, however
fast the machine trains. (Full fine-tuning + ZeRO-3 resizes through the same Ray Train path; its conversion across
sizes is tests/zero_resize.py's. Each restart here costs the suite's budget about half a minute.)

Before it, three workers under STRICT_SPREAD are refused (two nodes). Prints one JSON line per run:
{"run": name, "status": "ok"|"failed"|"refused", "sigterm_checkpoint_step": ..., "shrink_s": ..., "grow_s": ...},
the last two the seconds from a node leaving (joining) to the resized group's start of training. It shuts down only the
cluster it started.
"""

import contextlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from rayft.cluster.session import only_this_machine
from rayft.cluster.storage import latest_checkpoint
from rayft.orchestrator.launch import run_train
from rayft.recipe.loading import load_recipe
from rayft.recipe.parse import parse_config
from rayft.recipe.problems import ConfigError
from rayft.recipe.values import read_log

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["ray_num_workers=[1,2]", "ray_resize_interval_s=1", "ray_max_failures=4",
          "logging_steps=5", "per_device_train_batch_size=4", "gradient_accumulation_steps=1", "cutoff_len=128"]
RUNS = {
    "lora_z2": ["max_steps=20", "deepspeed=z2", "save_strategy=steps", "save_steps=10",
                "placement_strategy=STRICT_SPREAD"],
}


def wait_for(what: str, check, timeout: float = 300.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def checkpoint_step(storage: Path, name: str) -> int | None:
    found = latest_checkpoint(str(storage), name)
    if not found:
        return None
    return json.loads((Path(found) / "checkpoint" / "trainer_state.json").read_text())["global_step"]


def workers_on(node_id: str) -> list[int]:
    return [a.pid for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                                       detail=True) if a.node_id == node_id]


def resumed_at(out: Path, size: int) -> int | None:
    """The step a group of `size` workers resumed from (the latest such resumption), or None."""
    steps = [r["resumed_from_step"] for r in read_log(out) if r.get("world_size") == size and "resumed_from_step" in r]
    return steps[-1] if steps else None


def grown(out: Path) -> bool:
    return any(r.get("previous_world_size") == 1 and r.get("world_size") == 2 for r in read_log(out))


def recipe(cluster: Cluster, name: str, out: Path, model: str, *overrides):
    return parse_config(load_recipe(ROOT / "configs" / "demo_sft_lora.yaml", [
        f"model_name_or_path={model}", f"output_dir={out}/out", f"ray_storage_path={out / 'ray'}",
        f"ray_run_name={name}", f"ray_address={cluster.address}", *overrides]), base_dir=ROOT)


def refused(cluster: Cluster, out: Path, model: str) -> dict:
    try:
        run_train(recipe(cluster, "unsatisfiable", out, model, "placement_strategy=STRICT_SPREAD",
                         "ray_num_workers=3"))
    except ConfigError as err:
        return {"run": "unsatisfiable", "status": "refused", "message": str(err)}
    return {"run": "unsatisfiable", "status": "ok"}


def refresh_node_view(stop: threading.Event) -> None:
    """Ray Train's elastic policy sees nodes come and go through Ray Data's AutoscalingCoordinator actor, which
    refreshes its view of the cluster every 20 s (`TICK_INTERVAL_S`, a class constant): up to 20 s after a node
    joins before the group grows, and failed starts on a node already gone before it shrinks. The test refreshes
    it every second, as a shorter tick would; what Ray Train then decides is its own."""
    while not stop.wait(1.0):
        with contextlib.suppress(Exception):  # not created yet, or busy: the next second's try
            coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
            ray.get(coordinator._tick.remote(), timeout=5)


def run(cluster: Cluster, second, name: str, out: Path, model: str) -> dict:
    storage = out / "ray"
    cfg = recipe(cluster, name, out, model, *COMMON, *RUNS[name])
    failure: list[str] = []
    stop_refreshing = threading.Event()
    threading.Thread(target=refresh_node_view, args=(stop_refreshing,), daemon=True).start()

    def train():
        try:
            run_train(cfg)
        except Exception:  # reported below, with the events that led to it
            failure.append(traceback.format_exc()[-3000:])

    thread = threading.Thread(target=train, daemon=True)  # a wait that times out ends the process, not the run
    thread.start()
    # two nodes: Ray Train's cluster settings (preemption watcher, placement-group cleaner), not a local instance's
    result = {"run": name, "only_this_machine": only_this_machine()}
    # the notice: the second node's worker gets SIGTERM at the first logged step, and the group checkpoints there
    wait_for("a logged step", lambda: any("loss" in r for r in read_log(out / "out")))
    (pid,) = wait_for("the second node's worker", lambda: workers_on(second.node_id))
    os.kill(pid, signal.SIGTERM)
    result["sigterm_checkpoint_step"] = wait_for("the SIGTERM checkpoint", lambda: checkpoint_step(storage, name))
    result["removed_at"] = time.time()
    cluster.remove_node(second)  # then the node is taken away
    resumed = wait_for("the group of one", lambda: resumed_at(out / "out", 1))
    # its next checkpoint keeps the steps it logs (a resize restarts from the latest one)
    wait_for("the group of one's checkpoint", lambda: (checkpoint_step(storage, name) or 0) > resumed
             or not thread.is_alive())
    # Held until the group grows: the lone worker cannot finish the run before Ray Train sees the returned node
    (held,) = wait_for("the lone worker", lambda: [pid for node in cluster.list_all_nodes()
                                                   for pid in workers_on(node.node_id)])
    os.kill(held, signal.SIGSTOP)
    try:
        second = cluster.add_node(num_cpus=1)
        result["added_at"] = time.time()
        wait_for("the group of two", lambda: grown(out / "out") or not thread.is_alive())
    finally:
        with contextlib.suppress(ProcessLookupError):  # the resize has killed it
            os.kill(held, signal.SIGCONT)
    thread.join(timeout=600)
    stop_refreshing.set()
    result["finished_at"] = time.time()
    result["status"] = "failed" if failure or thread.is_alive() else "ok"
    # how long each resize took: from the node leaving (joining) to the smaller (bigger) group's first step
    resumed = {r["world_size"]: r["timestamp"] for r in read_log(out / "out") if "previous_world_size" in r}
    if 1 in resumed and 2 in resumed:
        result["shrink_s"] = round(resumed[1] - result["removed_at"], 1)
        result["grow_s"] = round(resumed[2] - result["added_at"], 1)
    result["error"] = failure[0] if failure else None
    return result, second


def main(out: str, model: str) -> None:
    # The GCS marks a node dead after 5 missed health checks, one a second here (Ray's default: every 3 s), so that
    # the shrink starts within about 5 s of the node leaving rather than 15
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": {
        "health_check_period_ms": 1000, "health_check_failure_threshold": 5}})
    second = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address)
        print(json.dumps(refused(cluster, Path(out) / "unsatisfiable", model)), flush=True)
        for name in RUNS:
            result, second = run(cluster, second, name, Path(out) / name, model)
            print(json.dumps(result), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
