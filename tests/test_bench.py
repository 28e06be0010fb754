"""The bench harness end to end on small sizes: every file written, Redis peer when installed."""

import json
import shutil

from tests.processes import run_script


def test_bench_quick_run_writes_json_markdown_and_chart(tmp_path):
    code, output = run_script("-m", "bench", "--quick", "--rounds", "1", "--only", "bulk", "ping-pong",
                              "--out", tmp_path, timeout=240)
    assert code == 0, output
    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["machine"]["cpus"] >= 1
    assert results["workloads"]["bulk"]["pype .remote()"]["items_per_s"] > 0
    assert results["workloads"]["bulk"]["pype native"]["items_per_s"] > 0
    assert results["workloads"]["ping-pong"]["pype native"]["p50_ms"] > 0
    if shutil.which("redis-server"):
        assert results["workloads"]["bulk"]["redis"]["items_per_s"] > 0
    assert "| bulk | pype native |" in (tmp_path / "latest.md").read_text()
    assert (tmp_path / "latest.png").read_bytes()[:4] == b"\x89PNG"
