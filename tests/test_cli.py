"""The `pype` command: the demo as a new user runs it, and its errors."""

import re

from tests.processes import run_script


def test_demo_runs_the_chain_on_both_paths_and_reports_rates_and_spread():
    code, output = run_script("-m", "pype.cli", "demo", "--items", "60", timeout=240)
    assert code == 0, output
    assert "60 items through 6 locked stages, one item per call" in output, output
    rates = {path: float(rate.replace(",", "")) for path, rate in re.findall(
        r"│ (`\.remote\(\)`|native)[^│]*│\s+[\d.]+ │\s+([\d,]+) │", output)}
    assert set(rates) == {"`.remote()`", "native"} and all(rates.values()), output
    assert "remote: all items arrived in order" in output
    assert "native: all items arrived in order" in output
    assert "per-shard spread" in output and "data_native_0" in output


def test_demo_with_a_missing_config_is_one_clear_line(tmp_path):
    code, output = run_script("-m", "pype.cli", "demo", "--config", tmp_path / "nope.yaml", timeout=60)
    assert code == 2
    assert output.strip().splitlines() == [f"pype: error: Pype config file not found: {tmp_path / 'nope.yaml'}"]


def test_help_lists_the_demo():
    code, output = run_script("-m", "pype.cli", "--help", timeout=60)
    assert code == 0 and "demo" in output


def test_video_demo_splits_a_stream_across_workers_and_writes_a_contact_sheet(tmp_path):
    sheet = tmp_path / "sheet.png"
    code, output = run_script("-m", "pype.cli", "demo", "video", "--workers", "1", "2",
                              "--frames", "24", "--out", sheet, timeout=240)
    assert code == 0, output
    rows = re.findall(r"│\s+(\d)\s+│\s+24\s+│\s+([\d.]+)\s+│\s+yes\s+│", output)
    assert [workers for workers, _ in rows] == ["1", "2"], output
    assert all(float(fps) > 0 for _, fps in rows)
    assert sheet.read_bytes()[:4] == b"\x89PNG"
