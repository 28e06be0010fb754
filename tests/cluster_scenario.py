"""A multi-node Ray cluster on this machine, Pype served on it as an operator would.

Run by tests/test_cluster.py in its own process (a process can join only one Ray
cluster, and the test session already runs one). It starts a head node and 3
worker nodes with ray.cluster_utils.Cluster, then, each in a process of its own:
`pype serve`, a producer driver, a consumer driver, `pype stats`, `pype scale`,
`pype redrive`, `pype shutdown`.
It checks placement and Ray's metrics export, prints one "ok: ..." line per check,
and stops the cluster, which stops every process it started.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter

from ray.cluster_utils import Cluster

NODES = 4
NAME, NAMESPACE = "pype-cluster-test", "cluster-test"
CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "cluster.yaml")

PRODUCER = """
import sys, ray, pype
ray.init(address=sys.argv[1], log_to_driver=False)
server = pype.connect(sys.argv[2], namespace=sys.argv[3])
for q in range(16):
    ray.get(server.push.remote([(q, i) for i in range(50)], f"orders-{q}", expand=True))
    server.push([(q, i) for i in range(50, 100)], f"orders-{q}", expand=True)  # natively
print("pushed", 1600)
"""

CONSUMER = """
import sys, json, ray, pype
ray.init(address=sys.argv[1], log_to_driver=False)
server = pype.connect(sys.argv[2], namespace=sys.argv[3])
got = {q: server.pull(f"orders-{q}", -1) for q in range(16)}
print(json.dumps({"counts": [len(v) for v in got.values()],
                  "in_order": all(v == [(q, i) for i in range(100)] for q, v in got.items())}))
"""

REDRIVEN = """
import sys, json, ray, pype
ray.init(address=sys.argv[1], log_to_driver=False)
server = pype.connect(sys.argv[2], namespace=sys.argv[3])
items = server.pull("redriven", 100, block=True, timeout=60)  # the outbox may be a moment late
items += server.pull("redriven", -1)
print(json.dumps({"redriven": items, "orders-3": server.queue_len("orders-3")}))
"""

# A task on another node than the drivers: native calls to shards off its node go over
# TCP with CURVE, to shards on its node over their Unix socket.
RELAY = """
import sys, json, ray, pype
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1], log_to_driver=False)
server = pype.connect(sys.argv[2], namespace=sys.argv[3])
here = ray.get_runtime_context().get_node_id()
elsewhere = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here)[0]

@ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(elsewhere, soft=False))
def relay(server):
    moved = 0
    for q in range(16):
        items = server.pull(f"relay-in-{q}", -1, block=True, timeout=60)
        moved += server.push(items, f"relay-out-{q}", expand=True)
    return moved, ray.get_runtime_context().get_node_id()

for q in range(16):
    server.push(list(range(q, q + 10)), f"relay-in-{q}", expand=True)
moved, node = ray.get(relay.remote(server))
back = [server.pull(f"relay-out-{q}", -1) == list(range(q, q + 10)) for q in range(16)]
shards = ray.get(server.stats.remote())["shards"]
print(json.dumps({"moved": moved, "all back": all(back), "task node is not the driver's": node != here,
                  "tcp requests on shards off the task's node": sum(
                      s["tcp_requests"] for s in shards if s["node_id"] != node),
                  "tcp requests on the task's node": sum(
                      s["tcp_requests"] for s in shards if s["node_id"] == node)}))
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(*args: str, timeout: float = 120) -> str:
    done = subprocess.run([sys.executable, *args], check=False, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"FAILED: {' '.join(args[:3])}: exit {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done.stdout


def pype_cli(*args: str) -> str:
    return run("-m", "pype.cli", *args)


def scrape(ports: list[int], wanted: str, timeout: float = 240) -> str:
    """The Prometheus endpoints of Ray's nodes (each exports its own processes), once
    one of them shows `wanted`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for port in ports:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            except OSError:
                continue
            if wanted in text.decode():
                return text.decode()
        time.sleep(1)
    raise SystemExit(f"FAILED: {wanted} never appeared in the metrics export on ports {ports}")


def main() -> None:
    # `pype stats --watch` below is left with Ctrl-C (SIGINT). A process started in the
    # background by a shell without job control (`cmd &` in a script) ignores SIGINT,
    # and passes that on to its children: take Python's default back, which they then
    # start with, as a terminal's foreground job does.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    metrics_ports = [free_port() for _ in range(NODES)]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "metrics_export_port": metrics_ports[0],
        "_system_config": {"metrics_report_interval_ms": 1000}})
    import ray  # imported after Cluster, as Ray's own tests do

    try:
        for port in metrics_ports[1:]:
            cluster.add_node(num_cpus=1, metrics_export_port=port)
        cluster.wait_for_nodes()
        address = cluster.address
        print(f"ok: {NODES} nodes at {address}")

        served = pype_cli("serve", "--config", CONFIG, "--address", address, "--name", NAME,
                          "--namespace", NAMESPACE)
        assert f"8 shards on {NODES} nodes" in served, served
        print("ok: pype serve returned; the server outlives it")

        print("ok:", run("-c", PRODUCER, address, NAME, NAMESPACE).strip(), "from one driver")
        consumed = json.loads(run("-c", CONSUMER, address, NAME, NAMESPACE).strip().splitlines()[-1])
        assert consumed == {"counts": [100] * 16, "in_order": True}, consumed
        print("ok: another driver pulled all 1600 items natively, in order")
        relayed = json.loads(run("-c", RELAY, address, NAME, NAMESPACE).strip().splitlines()[-1])
        assert relayed["moved"] == 160 and relayed["all back"], relayed
        assert relayed["task node is not the driver's"], relayed
        assert relayed["tcp requests on shards off the task's node"] > 0, relayed
        print(f"ok: a task on another node pulled and pushed natively over TCP with CURVE: {relayed}")

        stats = pype_cli("stats", "--address", address, "--name", NAME, "--namespace", NAMESPACE)
        assert "orders-0" in stats and "requests served:" in stats and "over TCP" in stats, stats
        watch = subprocess.Popen([sys.executable, "-m", "pype.cli", "stats", "--watch", "--interval",
                                  "0.5", "--address", address, "--name", NAME, "--namespace",
                                  NAMESPACE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        shown = []
        for line in watch.stdout:  # piped, it prints every view: wait for two of them
            shown.append(line)
            if sum("orders-15" in seen for seen in shown) >= 2:
                break
        watch.send_signal(signal.SIGINT)
        out, err = watch.communicate(timeout=120)
        out = "".join(shown) + out
        assert watch.returncode == 0 and out.count("orders-15") >= 2, (
            watch.returncode, out[-500:], err[-2000:])
        print("ok: pype stats --watch refreshed until Ctrl-C, exit 0")

        import pype
        ray.init(address=address, log_to_driver=False)  # this process joins only now
        server = pype.connect(NAME, namespace=NAMESPACE)
        per_node = Counter(shard["node_id"] for shard in ray.get(server.stats.remote())["shards"])
        assert sorted(per_node.values()) == [2] * NODES, per_node
        print(f"ok: placement spread puts 2 shards on each of {NODES} nodes; pype stats shows the queues")
        ray.get(server.push.remote(list(range(5)), "metered", expand=True))
        text = scrape(metrics_ports, 'queue="metered"')
        assert any(line.startswith("ray_pype_queue_depth") and 'queue="metered"' in line
                   and line.rstrip().endswith(" 5.0") for line in text.splitlines()), text[-2000:]
        print("ok: ray_pype_queue_depth{queue=\"metered\"} 5.0 in Ray's metrics export")
        exported = sorted({line.split("{")[0] for line in text.splitlines() if line.startswith("ray_pype")})
        print("ok: metrics exported:", " ".join(exported))
        ray.shutdown()

        scaled = pype_cli("scale", "--shards", "5", "--address", address, "--name", NAME,
                          "--namespace", NAMESPACE)
        assert "resized" in scaled and "5 shards" in scaled, scaled
        run("-c", PRODUCER, address, NAME, NAMESPACE)
        consumed = json.loads(run("-c", CONSUMER, address, NAME, NAMESPACE).strip().splitlines()[-1])
        assert consumed == {"counts": [100] * 16, "in_order": True}, consumed
        print("ok: pype scale --shards 5 resized it while it served; 1600 more items went "
              "through, in order")

        run("-c", PRODUCER, address, NAME, NAMESPACE)
        redriven = pype_cli("redrive", "orders-3", "redriven", "--address", address, "--name",
                            NAME, "--namespace", NAMESPACE)
        assert "moved 100 items from 'orders-3' to 'redriven'" in redriven, redriven
        back = json.loads(run("-c", REDRIVEN, address, NAME, NAMESPACE).strip().splitlines()[-1])
        assert back == {"redriven": [[3, i] for i in range(100)], "orders-3": 0}, back
        print("ok: pype redrive moved a queue's 100 items to another, in order, once")

        print(pype_cli("shutdown", "--address", address, "--name", NAME, "--namespace",
                       NAMESPACE).strip())
        gone = subprocess.run([sys.executable, "-m", "pype.cli", "connect", "--address", address,
                               "--name", NAME, "--namespace", NAMESPACE],
                              check=False, capture_output=True, text=True, timeout=120)
        assert gone.returncode == 1 and "no Pype server named" in gone.stderr, gone
        print("ok: pype shutdown stopped it; connect then fails with one line, exit 1")
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
