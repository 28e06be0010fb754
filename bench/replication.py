"""`pype bench --only replication`: what replicas cost, and how fast a shard fails over.

On a local multi-node Ray cluster (ray.cluster_utils: a head node and 3 worker nodes of
this machine, Ray's failure detection shortened as in the tests), one server per replica
count (1, 2, 3), one shard each, placed on the workers; journals with fsync "always",
each replica's in its own node's directory. The driver runs on the head node, so every
call crosses nodes (ZeroMQ with CURVE), as in a data center. Rows, for each replica count,
alternating round by round, medians:

- acknowledged one-item native pushes, one in flight;
- one-item pushes with 64 in flight (a Producer of batch size 1, window 64);
- 1,000-item native pushes (items/s);
- the one-item native chain (a source task, a stage task, the driver as sink).

Failover: the node of a shard's primary dies (its raylet and every process it started
SIGKILLed, its directory deleted) while the driver pushes; the time from the kill to the
first acknowledged push, and from the router's record of the promotion to it, over
`losses` losses, with replicas 3 (min_insync 2) and replicas 2. A fresh node joins before
each loss (the router puts the lost replica's successor on a node free at the loss), and
the bench waits until the shard is whole again.

Results: <out>/replication.json and replication.md.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from bench import workloads as w
from bench.cluster import LocalCluster

WORKERS = 3
FSYNC = "always"


def start_server(replicas: int, min_insync: int | None = None):
    import pype

    return pype.Server.remote(shards=1, replicas=replicas, min_insync=min_insync,
                              placement={"resource": "pype"}, transport={"request_timeout": 10},
                              persistence={"dir": "${PYPE_DATA}/pype", "fsync": FSYNC})


def one_in_flight(server, count: int) -> dict:
    started = time.perf_counter()
    for item in range(count):
        server.push(item, "bench-one")
    rate = count / (time.perf_counter() - started)
    server.remove("bench-one")
    return {"pushes_per_s": rate}


def window_of_64(server, count: int) -> dict:
    started = time.perf_counter()
    with server.producer("bench-window", batch_size=1, window=64) as out:
        for item in range(count):
            out.push(item)
    rate = count / (time.perf_counter() - started)
    assert server.queue_len("bench-window") == count
    server.remove("bench-window")
    return {"pushes_per_s": rate}


def thousands(server, count: int) -> dict:
    batch = list(range(1000))
    started = time.perf_counter()
    for _ in range(count):
        server.push(batch, "bench-bulk", expand=True)
    rate = count * 1000 / (time.perf_counter() - started)
    server.remove("bench-bulk")
    return {"items_per_s": rate}


def failovers(cluster: LocalCluster, replicas: int, min_insync: int, losses: int) -> dict:
    """Seconds from each primary's node loss to the first acknowledged push after it."""
    ray = cluster.ray
    server = start_server(replicas, min_insync)
    from_kill, from_record = [], []
    try:
        for _ in range(losses):
            cluster.add_worker()  # a free node for the new replica (none is moved to a node
            record = _replicas(ray, server)  # that joins later, before a resize)
            primary = next(r["node"] for r in record["replicas"] if r["role"] == "primary")
            killed = time.time()
            cluster.lose(primary)
            server.push("after", "bench-failover")  # waits for the failover
            acknowledged = time.time()
            promoted = ray.get(server.routes.router.stats.remote())["failovers"][-1]["at"]
            from_kill.append(acknowledged - killed)
            from_record.append(acknowledged - promoted)
            cluster.forget(primary)
            _until_whole(ray, server, replicas)
        assert server.queue_len("bench-failover") == losses
    finally:
        server.shutdown()
    return {"p50_from_kill_s": statistics.median(from_kill), "max_from_kill_s": max(from_kill),
            "p50_from_router_s": statistics.median(from_record),
            "max_from_router_s": max(from_record)}


def _replicas(ray, server) -> dict:
    return ray.get(server.routes.router.stats.remote())["replicas"][0]


def _until_whole(ray, server, replicas: int, timeout: float = 120) -> None:
    """Wait until every replica of shard 0 is in sync again (a new one caught up)."""
    deadline = time.monotonic() + timeout
    while True:
        record = _replicas(ray, server)
        if len(record["replicas"]) == replicas and not record["under_replicated"]:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"shard 0 not whole again within {timeout:g} s: {record}")
        time.sleep(0.2)


def run(rounds: int, quick: bool, losses: int) -> dict:
    scale = 0.2 if quick else 1.0
    n = lambda count: max(10, int(count * scale))
    cluster = LocalCluster(WORKERS)
    try:
        servers = {replicas: start_server(replicas) for replicas in (1, 2, 3)}
        rows = {}
        for replicas, server in servers.items():
            label = f"replicas {replicas}, fsync {FSYNC}"
            rows[f"one-item pushes, one in flight; {label}"] = lambda s=server: one_in_flight(s, n(2000))
            rows[f"one-item pushes, 64 in flight; {label}"] = lambda s=server: window_of_64(s, n(20_000))
            rows[f"1,000-item pushes; {label}"] = lambda s=server: thousands(s, n(300))
            rows[f"one-item native chain; {label}"] = (
                lambda s=server: w.pype_chain(s, n(3000), "native single"))
        samples: dict[str, list[dict]] = {name: [] for name in rows}
        names = list(rows)
        for round_ in range(rounds):  # rotate, so that no row always runs first
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                samples[name].append(rows[name]())
        results = {name: {metric: statistics.median(s[metric] for s in runs) for metric in runs[0]}
                   for name, runs in samples.items()}
        for server in servers.values():
            server.shutdown()
        for replicas, min_insync in ((3, 2), (2, 1)):
            results[f"failover over {losses} node losses; replicas {replicas}, min_insync "
                    f"{min_insync}"] = failovers(cluster, replicas, min_insync, losses)
    finally:
        cluster.stop()
    return results


def markdown(results: dict, machine: dict, rounds: int) -> str:
    lines = [(f"Machine: {machine['cpus']} cores, {machine['memory_gb']} GB, Python "
             f"{machine['python']}, Ray {machine['ray']}, {machine['date']}; a head and {WORKERS} "
             f"worker nodes of ray.cluster_utils on it; {rounds} rounds, medians."), "",
             "| row | result |", "| --- | --- |"]
    for name, metrics in results.items():
        shown = ", ".join(f"{value:,.2f} {key.replace('_per_s', '/s').replace('_', ' ')}"
                          if value < 100 else f"{value:,.0f} {key.replace('_per_s', '/s')}"
                          for key, value in metrics.items())
        lines.append(f"| {name} | {shown} |")
    lines += ["", "| target | value | goal |", "| --- | --- | --- |"]
    for what, metric, goal in (("one-item pushes, one in flight", "pushes_per_s", 0.5),
                               ("one-item pushes, 64 in flight", "pushes_per_s", 0.5),
                               ("1,000-item pushes", "items_per_s", 0.8)):
        one = results[f"{what}; replicas 1, fsync {FSYNC}"][metric]
        two = results[f"{what}; replicas 2, fsync {FSYNC}"][metric]
        lines.append(f"| {what}: replicas 2 / replicas 1 | {two / one:.2f} | >= {goal} |")
    return "\n".join(lines) + "\n"


def main(rounds: int, quick: bool, out: Path, machine: dict, losses: int = 5) -> str:
    results = run(rounds, quick, losses if not quick else 2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replication.json").write_text(json.dumps(
        {"machine": machine, "rounds": rounds, "quick": quick, "rows": results}, indent=2))
    table = markdown(results, machine, rounds)
    (out / "replication.md").write_text(table)
    return table
