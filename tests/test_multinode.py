"""Placement on a fake multi-node cluster: two Ray nodes on this machine, told apart by node id.

One cluster (started in a subprocess) serves all three scenarios, to spare two cluster start-ups.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

# (STRICT_PACK on one node is what a local run does; the spread run shows the strategy reaches Ray)
RUNS = {
    "STRICT_SPREAD": ["placement_strategy=STRICT_SPREAD"],
    "unsatisfiable": ["placement_strategy=STRICT_SPREAD", "ray_num_workers=3"],
}


@pytest.fixture(scope="module")
def two_node_runs(tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp("multinode")
    # A Ray temp dir of its own: Ray 2.60's placement-group cleaner finds "its" cluster through the temp
    # dir's ray_current_cluster file, and would query another cluster on this machine (short path: sockets).
    ray_tmp = tempfile.mkdtemp(prefix="rft", dir="/tmp")
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_run.py"), str(out), str(tiny_model),
                               json.dumps(RUNS)], capture_output=True, text=True, timeout=900, cwd=ROOT,
                              env={**os.environ, "RAY_TMPDIR": ray_tmp})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"run"')]
    return out, {r["run"]: r for r in results}


def test_strict_spread_puts_each_worker_on_its_own_node(two_node_runs):
    out, results = two_node_runs
    strategy, distinct_nodes = "STRICT_SPREAD", 2
    assert results[strategy]["status"] == "ok"
    placement = json.loads((out / strategy / "out" / "placement.json").read_text())
    assert [w["rank"] for w in placement] == [0, 1]
    assert len({w["node_id"] for w in placement}) == distinct_nodes
    assert len({w["node_ip"] for w in placement}) == 1  # one machine: only the node id tells nodes apart
    # on a cluster rank 0 copies the outputs to the shared storage, under the run's name
    (copy,) = (out / strategy / "ray").glob("*/output/adapter_model.safetensors")
    assert copy.read_bytes() == (out / strategy / "out" / "adapter_model.safetensors").read_bytes()


def test_an_unsatisfiable_request_is_refused_with_the_clusters_nodes(two_node_runs):
    out, results = two_node_runs
    result = results["unsatisfiable"]
    assert result["status"] == "refused"
    assert "STRICT_SPREAD needs 3 different nodes that each fit a worker, but only 2 do" in result["message"]
    assert result["message"].count("CPU=2") == 2
    assert not (out / "unsatisfiable" / "out").exists()
