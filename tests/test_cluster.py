"""Pype served on a real multi-node Ray cluster on this machine (tests/cluster_scenario.py)."""

from pathlib import Path

import pytest

from tests.processes import run_cluster_scenario


@pytest.mark.timeout(480)
def test_serve_push_pull_stats_placement_metrics_scale_and_shutdown_on_four_nodes():
    code, output = run_cluster_scenario(Path(__file__).parent / "cluster_scenario.py", timeout=420)
    assert code == 0, output[-6000:]
    checks = [line for line in output.splitlines() if line.startswith("ok: ")]
    assert len(checks) == 12, output[-6000:]
    assert "ray_pype_queue_pushed" in output and "ray_pype_queue_depth" in output
