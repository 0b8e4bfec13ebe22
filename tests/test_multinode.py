"""Placement on a fake multi-node cluster: two Ray nodes on this machine, told apart by node id."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def run_on_two_nodes(tmp_path, tiny_model, *overrides) -> dict:
    # A Ray temp dir of its own: Ray 2.60's placement-group cleaner finds "its" cluster through the temp
    # dir's ray_current_cluster file, and would query another cluster on this machine (short path: sockets).
    ray_tmp = tempfile.mkdtemp(prefix="rft", dir="/tmp")
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_run.py"), str(tmp_path),
                               str(tiny_model), *overrides], capture_output=True, text=True, timeout=600, cwd=ROOT,
                              env={**os.environ, "RAY_TMPDIR": ray_tmp})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith('{"status"')][-1])


@pytest.mark.parametrize("strategy,distinct_nodes", [("STRICT_SPREAD", 2), ("STRICT_PACK", 1)])
def test_placement_strategy_decides_the_node_of_each_worker(tmp_path, tiny_model, strategy, distinct_nodes):
    assert run_on_two_nodes(tmp_path, tiny_model, f"placement_strategy={strategy}") == {"status": "ok"}
    placement = json.loads((tmp_path / "out" / "placement.json").read_text())
    assert [w["rank"] for w in placement] == [0, 1]
    assert len({w["node_id"] for w in placement}) == distinct_nodes
    assert len({w["node_ip"] for w in placement}) == 1  # one machine: only the node id tells nodes apart


def test_an_unsatisfiable_request_is_refused_with_the_clusters_nodes(tmp_path, tiny_model):
    result = run_on_two_nodes(tmp_path, tiny_model, "placement_strategy=STRICT_SPREAD", "ray_num_workers=3")
    assert result["status"] == "refused"
    assert "STRICT_SPREAD needs 3 different nodes that each fit a worker, but only 2 do" in result["message"]
    assert result["message"].count("CPU=2") == 2
    assert not (tmp_path / "out").exists()
