"""Pype served on a real multi-node Ray cluster on this machine (tests/cluster_scenario.py)."""

from pathlib import Path

import pytest

from tests.processes import run_script

# Ray's Cluster writes the newest cluster's address here and removes it on shutdown;
# a scenario killed midway would leave it pointing at a dead cluster.
CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")


@pytest.mark.timeout(480)
def test_serve_push_pull_stats_placement_metrics_scale_and_shutdown_on_four_nodes():
    before = CURRENT_CLUSTER.read_text() if CURRENT_CLUSTER.exists() else None
    try:
        code, output = run_script(Path(__file__).parent / "cluster_scenario.py", timeout=420)
    finally:
        if before is None:
            CURRENT_CLUSTER.unlink(missing_ok=True)
        else:
            CURRENT_CLUSTER.write_text(before)
    assert code == 0, output[-6000:]
    checks = [line for line in output.splitlines() if line.startswith("ok: ")]
    assert len(checks) == 11, output[-6000:]
    assert "ray_pype_queue_pushed" in output and "ray_pype_queue_depth" in output
