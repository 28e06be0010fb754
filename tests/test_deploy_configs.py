"""The shipped configurations: cluster YAML, the KubeRay manifests, the PBS job script."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pype.config import load_config
from pype.errors import ConfigError
from tests.processes import run_script

CONFIGS = Path(__file__).parent.parent / "configs"


def test_cluster_config_spreads_eight_shards():
    config = load_config(CONFIGS / "cluster.yaml")
    assert (config.shards, config.placement.strategy, config.shard.max_restarts) == (8, "spread", -1)


@pytest.mark.parametrize("value, strategy, resource", [
    ("spread", "spread", None), ("pack", "pack", None), ({"resource": "pype"}, "resource", "pype")])
def test_placement_values(value, strategy, resource):
    placement = load_config(placement=value).placement
    assert (placement.strategy, placement.resource) == (strategy, resource)


@pytest.mark.parametrize("value", ["SPREAD", {"resource": ""}, {"node": "x"}, 3])
def test_bad_placement_is_a_config_error(value):
    with pytest.raises(ConfigError, match="placement must be spread, pack or"):
        load_config(placement=value)


def test_kuberay_manifests_parse_and_serve_pype():
    cluster = yaml.safe_load((CONFIGS / "k8s" / "raycluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    name = cluster["metadata"]["name"]
    workers = cluster["spec"]["workerGroupSpecs"][0]
    assert workers["replicas"] >= 1
    for pod in (cluster["spec"]["headGroupSpec"]["template"], workers["template"]):
        assert pod["spec"]["containers"][0]["image"].endswith("/pype:0.1.0")
    job = yaml.safe_load((CONFIGS / "k8s" / "pype-serve.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["clusterSelector"]["ray.io/cluster"] == name
    assert job["spec"]["entrypoint"].startswith("pype serve --config")
    assert "configs/cluster.yaml" in job["spec"]["entrypoint"]
    assert "pip install" in (CONFIGS / "k8s" / "Dockerfile").read_text()


def test_pbs_script_is_valid_bash_and_passes_shellcheck():
    script = CONFIGS / "pbs" / "pype-serve.pbs"
    text = script.read_text()
    assert "#PBS -l nodes=" in text and "$PBS_NODEFILE" in text.replace("{", "").replace("}", "").replace(
        ":?this script runs inside a PBS job", "")
    assert "pype serve --config" in text and "ray stop" not in text
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (pip install -e '.[test]' brings it)")
    checked = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout


def test_pype_config_prints_the_resolved_config_or_one_error_line(tmp_path):
    code, output = run_script("-m", "pype.cli", "config", CONFIGS / "cluster.yaml", timeout=60)
    assert code == 0, output
    printed = yaml.safe_load(output)
    assert printed["shards"] == 8 and printed["queue_defaults"]["kind"] == "fifo"
    bad = tmp_path / "bad.yaml"
    bad.write_text("shards: 0\n")
    code, output = run_script("-m", "pype.cli", "config", bad, timeout=60)
    assert code == 2 and output.strip().splitlines() == [
        f"pype: error: {CONFIGS.resolve() / 'default.yaml'} + {bad}: shards must be >= 1, got 0"]


def test_operator_commands_without_a_server_fail_with_one_line():
    # --address auto: no cluster here gives ConnectionError, another user's cluster gives
    # "no Pype server named ..."; either is one line and exit status 1.
    code, output = run_script("-m", "pype.cli", "stats", "--name", "no-such-server", timeout=120,
                              env={"RAY_ADDRESS": ""})
    assert code == 1, output
    assert output.strip().splitlines()[-1].startswith("pype: error: "), output
    code, output = run_script("-m", "pype.cli", "serve", "--help", timeout=60)
    assert code == 0 and "--namespace" in output and "--config" in output


def test_a_placement_mapping_is_replaced_whole_by_a_later_value(tmp_path):
    path = tmp_path / "gpu.yaml"
    path.write_text("placement: {resource: gpu}\n")
    assert load_config(path).placement.resource == "gpu"
    assert load_config(path, placement="pack").placement.strategy == "pack"
