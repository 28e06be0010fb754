"""A worker node lost with its disk, on a real multi-node Ray cluster on this machine
(tests/node_loss_scenario.py)."""

from pathlib import Path

import pytest

from tests.processes import run_cluster_scenario


@pytest.mark.timeout(480)
def test_a_shard_lost_with_its_node_fails_clearly_and_a_resize_brings_it_back():
    code, output = run_cluster_scenario(Path(__file__).parent / "node_loss_scenario.py", timeout=420)
    assert code == 0, output[-6000:]
    checks = [line for line in output.splitlines() if line.startswith("ok: ")]
    assert len(checks) == 8, output[-6000:]
