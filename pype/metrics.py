"""Per-queue and per-shard metrics through ray.util.metrics.

Each shard exports what its stats() say, about once a second, from its
housekeeping thread (never from a call): Ray's metrics agent serves them on each
node's Prometheus endpoint (ray.init(_metrics_export_port=...) or `ray start
--metrics-export-port`), and the Ray dashboard shows them. Ray prefixes every name
with "ray_". Tags: server (its name, or "anonymous-<id>"), shard, and queue for
per-queue metrics.

Gauges: pype_queue_depth, pype_queue_leased, pype_queue_bytes, pype_queue_delayed,
pype_queue_waiting_producers, pype_shard_bytes, pype_shard_waiting_calls,
pype_shard_outbox.
Counters: pype_queue_pushed, pype_queue_pulled, pype_queue_dropped, pype_queue_acked,
pype_queue_redelivered, pype_queue_dead_lettered, pype_queue_dead_dropped,
pype_queue_expired (items, since the shard started); pype_shard_requests, tagged
path="native" or "ray" (requests served on each path) and pype_shard_tcp_requests
(native requests that came over TCP, from other nodes).
Replicated shards (exported by each primary): pype_shard_leader_epoch,
pype_shard_replicas_in_sync, pype_shard_replication_lag (records a backup lacks, tagged
replica) and pype_shard_replication_lag_bytes (the item bytes in them). The router
exports pype_failovers (a counter) and pype_under_replicated_shards.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge

QUEUE_GAUGES = {
    "depth": "Items ready to pull",
    "leased": "Items pulled with ack=True and not yet acked",
    "bytes": "Bytes of the items the queue holds, leased and delayed ones included",
    "delayed": "Items of delayed pushes, not yet due",
    "waiting_producers": "Pushes waiting in line for room",
}
QUEUE_COUNTERS = {
    "pushed": "Items pushed",
    "pulled": "Items pulled (leased ones included)",
    "dropped": "Items evicted by overflow=drop_oldest",
    "acked": "Leased items acked",
    "redelivered": "Leased items that went back to their queue (nack or expired lease)",
    "dead_lettered": "Items given up and sent to the dead-letter queue",
    "dead_dropped": "Items given up and dropped (no dead-letter queue)",
    "expired": "Items whose time to live ended before they were delivered",
}
SHARD_GAUGES = {
    "bytes": "Bytes of the items the shard holds",
    "waiting_calls": "Calls waiting in the shard (blocking pulls and pushes, can_pull, can_push)",
    "outbox": "Items on their way from the shard to a queue of any shard (dead letters, moves)",
}
REQUEST_PATHS = {"native": "native_requests", "ray": "ray_requests"}


class ShardMetrics:
    """The metrics of one shard; export(stats) publishes a QueueStore.stats() result."""

    def __init__(self, server: str, shard: int):
        self._tags = {"server": server, "shard": str(shard)}
        queue_tags = ("server", "shard", "queue")
        self._queue_gauges = {key: Gauge(f"pype_queue_{key}", text, queue_tags)
                              for key, text in QUEUE_GAUGES.items()}
        self._queue_counters = {key: Counter(f"pype_queue_{key}", text, queue_tags)
                                for key, text in QUEUE_COUNTERS.items()}
        self._shard_gauges = {key: Gauge(f"pype_shard_{key}", text, ("server", "shard"))
                              for key, text in SHARD_GAUGES.items()}
        self._requests = Counter("pype_shard_requests", "Requests served, by path",
                                 ("server", "shard", "path"))
        self._tcp_requests = Counter("pype_shard_tcp_requests",
                                     "Native requests that came over TCP (other nodes)",
                                     ("server", "shard"))
        self._counted: dict[tuple[str, str], int] = {}  # (queue, counter) -> value exported
        self._epoch = Gauge("pype_shard_leader_epoch", "Leader epoch of a replicated shard",
                            ("server", "shard"))
        self._in_sync = Gauge("pype_shard_replicas_in_sync", "Replicas in sync, the primary too",
                              ("server", "shard"))
        self._lag = Gauge("pype_shard_replication_lag", "Records a backup lacks",
                          ("server", "shard", "replica"))
        self._lag_bytes = Gauge("pype_shard_replication_lag_bytes",
                                "Item bytes of the records a backup lacks",
                                ("server", "shard", "replica"))

    def export(self, stats: dict) -> None:
        for key, gauge in self._shard_gauges.items():
            gauge.set(stats[key], self._tags)
        replication = stats.get("replication")
        if replication is not None and replication["role"] == "primary":
            self._epoch.set(replication["epoch"], self._tags)
            self._in_sync.set(replication["in_sync"], self._tags)
            for replica, lag in replication["lag"].items():
                self._lag.set(lag, {**self._tags, "replica": replica[:8]})
                self._lag_bytes.set(replication["lag_bytes"][replica],
                                    {**self._tags, "replica": replica[:8]})
        for path, key in REQUEST_PATHS.items():
            self._count(self._requests, (None, key), stats[key], {**self._tags, "path": path})
        self._count(self._tcp_requests, (None, "tcp_requests"), stats["tcp_requests"], self._tags)
        counted_queues = {queue for queue, _ in self._counted if queue is not None}  # None: the shard
        for queue in counted_queues - set(stats["per_queue"]):
            for gauge in self._queue_gauges.values():  # removed: its gauges read 0
                gauge.set(0, {**self._tags, "queue": queue})
            for key in self._queue_counters:
                self._counted.pop((queue, key), None)
        for queue, counters in stats["per_queue"].items():
            tags = {**self._tags, "queue": queue}
            for key, gauge in self._queue_gauges.items():
                gauge.set(counters[key], tags)
            for key, counter in self._queue_counters.items():
                self._count(counter, (queue, key), counters[key], tags)

    def _count(self, counter: Counter, key: tuple[str | None, str], value: int, tags: dict) -> None:
        """Add to `counter` what `value` grew by since the last export. A queue removed and
        made again starts from 0: it is counted from there."""
        before = self._counted.get(key, 0)
        if value > before:
            counter.inc(value - before, tags)
        self._counted[key] = value


class RouterMetrics:
    """A server's failovers and under-replicated shards, as its router records them."""

    def __init__(self, server: str):
        self._tags = {"server": server}
        self._failovers = Counter("pype_failovers", "Promotions of a backup to primary",
                                  ("server",))
        self._under_replicated = Gauge("pype_under_replicated_shards",
                                       "Replicated shards with a replica out of sync", ("server",))
        self._counted = 0

    def export(self, failovers: int, under_replicated: int) -> None:
        if failovers > self._counted:
            self._failovers.inc(failovers - self._counted, self._tags)
            self._counted = failovers
        self._under_replicated.set(under_replicated, self._tags)
