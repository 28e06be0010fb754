"""Replicated shards fail over when a primary's process or node dies, on a real
multi-node Ray cluster on this machine, also when the router dies with a primary or
a primary stops without dying (tests/failover_scenario.py)."""

from pathlib import Path

import pytest

from tests.processes import run_cluster_scenario


@pytest.mark.timeout(660)
def test_replicated_shards_fail_over_and_lose_nothing_acknowledged():
    code, output = run_cluster_scenario(Path(__file__).parent / "failover_scenario.py", timeout=600)
    assert code == 0, output[-8000:]
    checks = [line for line in output.splitlines() if line.startswith("ok: ")]
    assert len(checks) == 19, output[-8000:]
