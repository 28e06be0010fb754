"""A worker node of a multi-node Ray cluster dies, its disk with it: what a server with
one replica per shard (replicas: 1) does, as a user sees it.

Run by tests/test_node_loss.py in its own process (a process joins one Ray cluster,
and the test session already runs one). A head node and 3 worker nodes
(ray.cluster_utils), Ray's failure detection shortened through its system config;
3 shards, one on each worker. The node of shard 0 is then lost as a machine is:
its raylet and every process it started are SIGKILLed (a removed node's processes
can outlive their raylet on one machine) and its directory is deleted. Prints one
"ok: ..." line per check; stops the cluster, which stops what it started.
"""

import os
import shutil
import signal
import sys
import tempfile
import time

import psutil
from ray.cluster_utils import Cluster

WORKERS = 3
REQUEST_TIMEOUT = 5.0
# Ray declares a silent node dead after period x threshold (default 3 s x 5).
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                          "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}


def queues_by_shard(server, shards: int) -> dict[int, str]:
    """A queue name for each shard."""
    found, n = {}, 0
    while len(found) < shards:
        found.setdefault(server.shard_of(f"q{n}"), f"q{n}")
        n += 1
    return found


def start_cluster(workers: int, prefix: str):
    """A head node and `workers` worker nodes with the resource "pype" and each its own
    data directory in $PYPE_DATA, Ray's failure detection shortened, and Ray connected.
    Returns (cluster, ray, data: node id -> its directory, the scratch directory)."""
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "_system_config": FAST_FAILURE_DETECTION})
    import ray  # imported after Cluster, as Ray's own tests do

    scratch = tempfile.mkdtemp(prefix=prefix)
    data = {}
    for index in range(workers):
        directory = os.path.join(scratch, f"node-{index}")
        os.mkdir(directory)
        node = cluster.add_node(num_cpus=1, resources={"pype": 1}, env_vars={"PYPE_DATA": directory})
        data[node.node_id] = directory
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster, ray, data, scratch


def stop_cluster(cluster: Cluster, ray, scratch: str) -> None:
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(scratch, ignore_errors=True)


def lose_node(cluster: Cluster, node_id: str, data: dict) -> str:
    """Lose the worker node `node_id` as a machine is lost: SIGKILL its raylet and every
    process it started, delete its data directory (data: node id -> its PYPE_DATA).
    Returns its IP. Ray learns of it by itself (remove_node() only tidies up after)."""
    node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    processes = [raylet, *raylet.children(recursive=True)]
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)
    shutil.rmtree(data[node_id])
    return node.node_ip_address


def forget_node(cluster: Cluster, node_id: str) -> None:
    node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
    cluster.remove_node(node, allow_graceful=False)


def timed(call):
    """(seconds, the error call() raised or None)."""
    started = time.monotonic()
    try:
        call()
    except Exception as error:  # noqa: BLE001 - what the user would see
        return time.monotonic() - started, error
    return time.monotonic() - started, None


def main() -> None:
    cluster, ray, data, scratch = start_cluster(WORKERS, "pype-node-loss-")
    try:
        import pype

        server = pype.Server.remote(
            shards=3, placement={"resource": "pype"}, transport={"request_timeout": REQUEST_TIMEOUT},
            persistence={"dir": "${PYPE_DATA}/pype", "fsync": "always"})
        queues = queues_by_shard(server, 3)
        for index, name in queues.items():
            server.push(list(range(10)), name, expand=True)
        stats = ray.get(server.stats.remote())
        nodes = {shard["shard"]: shard["node_id"] for shard in stats["shards"]}
        head = ray.get_runtime_context().get_node_id()
        assert head not in nodes.values() and len(set(nodes.values())) == 3, nodes
        for index, node_id in nodes.items():
            assert os.listdir(os.path.join(data[node_id], "pype")), index
        print("ok: 3 shards, one on each worker node, each journaling on its node's disk")
        router_node = stats.get("router", {}).get("node_id")
        assert router_node == head, (router_node, head)
        print("ok: the router runs on the head node")

        ip = lose_node(cluster, nodes[0], data)
        lost = queues[0]
        print(f"ok: lost the node of shard 0 ({ip}): raylet and processes killed, directory deleted")

        seconds, error = timed(lambda: server.push(["x"], lost))
        print(f"native push at once after the kill: {seconds:.1f} s, {error!r}")
        assert isinstance(error, pype.ShardUnavailableError), repr(error)
        assert "shard 0" in str(error) and nodes[0] in str(error), str(error)
        assert seconds <= 3 * REQUEST_TIMEOUT, seconds
        print("ok: a native push to the lost shard fails with ShardUnavailableError naming the "
              "shard and its node, within request_timeout")

        seconds, error = timed(lambda: ray.get(server.push.remote(["x"], lost)))
        print(f".remote() push: {seconds:.1f} s, {error!r}")
        assert isinstance(error, pype.ShardUnavailableError), repr(error)
        assert "shard 0" in str(error) and nodes[0] in str(error), str(error)
        print("ok: a .remote() push to the lost shard fails with ShardUnavailableError, "
              "not a raw Ray error")
        forget_node(cluster, nodes[0])

        for index in (1, 2):
            assert server.pull(queues[index], -1) == list(range(10))
            assert ray.get(server.push.remote("y", queues[index])) == 1
            assert server.pull(queues[index]) == ["y"]
        print("ok: the other shards serve on both paths")

        shards = ray.get(server.stats.remote())["shards"]
        assert shards[0].get("lost") and nodes[0] in str(shards[0]), shards[0]
        print(f"ok: stats() names shard 0 as lost: {shards[0]}")

        server.resize(3)
        assert server.pull(lost, -1) == []  # its items went with its node
        server.push("z", lost)
        assert ray.get(server.pull.remote(lost)) == ["z"]
        new_node = ray.get(server.stats.remote())["shards"][0]["node_id"]
        assert new_node in nodes.values() and new_node != nodes[0], new_node
        print("ok: a resize brings shard 0 back, empty, on another node")
        server.shutdown()
    finally:
        stop_cluster(cluster, ray, scratch)


if __name__ == "__main__":
    sys.exit(main())
