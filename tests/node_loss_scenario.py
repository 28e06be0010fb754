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
import sys
import time

from bench.cluster import LocalCluster  # the repository's root is on PYTHONPATH

WORKERS = 3
REQUEST_TIMEOUT = 5.0


def queues_by_shard(server, shards: int) -> dict[int, str]:
    """A queue name for each shard."""
    found, n = {}, 0
    while len(found) < shards:
        found.setdefault(server.shard_of(f"q{n}"), f"q{n}")
        n += 1
    return found


def timed(call):
    """(seconds, the error call() raised or None)."""
    started = time.monotonic()
    try:
        call()
    except Exception as error:  # noqa: BLE001 - what the user would see
        return time.monotonic() - started, error
    return time.monotonic() - started, None


def main() -> None:
    cluster = LocalCluster(WORKERS, "pype-node-loss-")
    ray, data = cluster.ray, cluster.data
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

        ip = cluster.lose(nodes[0])
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
        cluster.forget(nodes[0])

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
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
