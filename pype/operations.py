"""What the operator's commands do: serve, connect, stats, shutdown, config.

pype/cli.py parses the command line and turns errors into one line; the work is
here, as plain functions that return what they print (rich renderables).
"""

from __future__ import annotations

import time
from collections import Counter

import ray
import yaml
from rich.console import Group
from rich.table import Table

from pype.client import DEFAULT_NAMESPACE, Server, connect
from pype.config import load_config


def attach(address: str | None, namespace: str | None) -> None:
    """Connect this process to a running Ray cluster (ConnectionError if there is none)."""
    if not ray.is_initialized():
        ray.init(address=address or "auto", namespace=namespace or DEFAULT_NAMESPACE,
                 logging_level="WARNING", log_to_driver=False)


def attached(address: str | None, name: str, namespace: str | None) -> Server:
    """A handle to the running server `name` (ServerNotFoundError if there is none)."""
    attach(address, namespace)
    return connect(name, namespace)


def serve(config: str | None, address: str | None, name: str, namespace: str | None,
          **overrides: int) -> Table:
    """Start a detached, named server on the cluster; it outlives this process.
    overrides: config keys given on the command line (shards, replicas, min_insync)."""
    attach(address, namespace)
    server = Server.remote(config, name=name, namespace=namespace, detached=True, **overrides)
    return placement_table(server, f"pype server {name!r} is serving")


def describe(address: str | None, name: str, namespace: str | None) -> Table:
    """Connect to a server and show where its shards run."""
    return placement_table(attached(address, name, namespace), f"pype server {name!r}")


def placement_table(server: Server, title: str) -> Table:
    stats = ray.get(server.stats.remote())
    per_node = Counter(shard["node_id"] for shard in stats["shards"] if "node_id" in shard)
    table = Table(title=f"{title}: {len(stats['shards'])} shards on {len(per_node)} nodes, "
                        f"{stats['totals']['queues']} queues")
    for column in ("shard", "node", "pid", "queues", "depth", "restarted"):
        table.add_column(column, justify="left" if column == "node" else "right")
    for shard in stats["shards"]:
        if "unreachable" in shard:
            table.add_row(str(shard["shard"]), "unreachable", "", "", "", "")
            continue
        table.add_row(str(shard["shard"]), _node(shard),
                      str(shard["pid"]), str(shard["queues"]), f"{shard['depth']:,}",
                      "yes" if shard["restarted"] else "no")
    return table


class StatsView:
    """Tables of a server's queues; rates come from the change between two looks."""

    def __init__(self, server: Server):
        self._server = server
        self._last: tuple[float, dict] | None = None

    def render(self) -> Group:
        stats = ray.get(self._server.stats.remote())
        now = time.monotonic()
        seconds, before = (now - self._last[0], self._last[1]) if self._last else (None, {})
        self._last = (now, stats["queues"])
        nodes = {shard["shard"]: _node(shard) for shard in stats["shards"] if "unreachable" not in shard}
        table = Table(title=f"pype server {stats['server']!r}: {stats['totals']['queues']} queues, "
                            f"{stats['totals']['depth']:,} items, "
                            f"{stats['totals']['leased']:,} leased")
        for column in ("queue", "shard", "node", "kind", "depth", "leased", "push/s", "pull/s",
                       "bytes", "waiting"):
            table.add_column(column, justify="left" if column in ("queue", "node", "kind") else "right")
        for name in sorted(stats["queues"]):
            queue = stats["queues"][name]
            table.add_row(name, str(queue["shard"]), nodes.get(queue["shard"], "?"), queue["kind"],
                          f"{queue['depth']:,}", f"{queue['leased']:,}",
                          _rate(queue, before.get(name), "pushed", seconds),
                          _rate(queue, before.get(name), "pulled", seconds),
                          f"{queue['bytes']:,}", str(queue["waiting_producers"]))
        totals = stats["totals"]
        requests = (f"requests served: {totals['native_requests']:,} native "
                    f"({totals['tcp_requests']:,} of them over TCP), {totals['ray_requests']:,} "
                    f"through Ray (.remote())")
        lost = [f"shard {event['shard']} "
                + (f"was lost with its node {event['node']}" if "node" in event else "restarted")
                + f" and lost {', '.join(event['queues']) or 'nothing known'}"
                for event in stats["lost"]]
        unreachable = [f"shard {shard['shard']} did not answer: {shard['unreachable']}"
                       for shard in stats["shards"] if "unreachable" in shard]
        replicas = [replica_table(stats)] if stats["replicas"] else []
        return Group(table, requests, *lost, *unreachable, *replicas)


def replica_table(stats: dict) -> Table:
    """Each replica of each replicated shard: node, role, leader epoch, in sync, lag (records
    and item bytes)."""
    table = Table(title=f"replicas: {len(stats['failovers'])} failovers, "
                        f"{stats['under_replicated']} shards under-replicated")
    numbers = ("shard", "epoch", "lag", "lag bytes")
    for column in ("shard", "replica", "node", "role", "epoch", "in sync", "lag", "lag bytes"):
        table.add_column(column, justify="right" if column in numbers else "left")
    for record in stats["replicas"]:
        for replica in record["replicas"]:
            lag = ["?" if replica[key] is None else f"{replica[key]:,}"
                   for key in ("lag", "lag_bytes")]
            table.add_row(str(record["shard"]), replica["replica"][:8], replica["node"][:12],
                          replica["role"], str(record["epoch"]),
                          "yes" if replica["in_sync"] else "no", *lag)
    return table


def _node(shard: dict) -> str:
    return f"{shard['node_ip']} {shard['node_id'][:8]}"


def _rate(queue: dict, before: dict | None, key: str, seconds: float | None) -> str:
    if seconds is None or before is None:
        return "-"
    return f"{max(0, queue[key] - before[key]) / seconds:,.0f}"


def scale(address: str | None, name: str, namespace: str | None, shards: int) -> Table:
    """Resize a running server to `shards` shards while it serves."""
    server = attached(address, name, namespace)
    outcome = server.resize(shards)
    return placement_table(server, f"pype server {name!r} resized (epoch {outcome['epoch']}, "
                                   f"{outcome['moved_queues']} queues moved in "
                                   f"{outcome['seconds']:.2f} s)")


def redrive(address: str | None, name: str, namespace: str | None, source: str,
            destination: str, count: int) -> str:
    """Move items of queue `source` to `destination` (Server.move)."""
    moved = attached(address, name, namespace).move(source, destination, count)
    return f"moved {moved} items from {source!r} to {destination!r}"


def shutdown(address: str | None, name: str, namespace: str | None) -> str:
    attached(address, name, namespace).shutdown()
    return f"pype server {name!r} stopped: its shards and router are gone"


def show_config(path: str | None) -> str:
    """The resolved configuration as YAML; raises ConfigError/FileNotFoundError if invalid."""
    config = load_config(path)
    return f"# {config.source}\n" + yaml.safe_dump(config.settings, sort_keys=False)
