"""Per-queue and per-shard metrics through ray.util.metrics.

Each shard exports what its stats() say, about once a second, from its
housekeeping thread (never from a call): Ray's metrics agent serves them on each
node's Prometheus endpoint (ray.init(_metrics_export_port=...) or `ray start
--metrics-export-port`), and the Ray dashboard shows them. Ray prefixes every name
with "ray_". Tags: server (its name, or "anonymous-<id>"), shard, and queue for
per-queue metrics.

Gauges: pype_queue_depth, pype_queue_leased, pype_queue_bytes,
pype_queue_waiting_producers, pype_shard_bytes, pype_shard_waiting_calls.
Counters: pype_queue_pushed, pype_queue_pulled, pype_queue_dropped, pype_queue_acked,
pype_queue_redelivered (items, since the shard started).
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge

QUEUE_GAUGES = {
    "depth": "Items ready to pull",
    "leased": "Items pulled with ack=True and not yet acked",
    "bytes": "Bytes of the items the queue holds, leased ones included",
    "waiting_producers": "Pushes waiting in line for room",
}
QUEUE_COUNTERS = {
    "pushed": "Items pushed",
    "pulled": "Items pulled (leased ones included)",
    "dropped": "Items evicted by overflow=drop_oldest",
    "acked": "Leased items acked",
    "redelivered": "Leased items that went back to their queue (nack or expired lease)",
}
SHARD_GAUGES = {
    "bytes": "Bytes of the items the shard holds",
    "waiting_calls": "Calls waiting in the shard (blocking pulls and pushes, can_pull, can_push)",
}


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
        self._counted: dict[tuple[str, str], int] = {}  # (queue, counter) -> value exported

    def export(self, stats: dict) -> None:
        for key, gauge in self._shard_gauges.items():
            gauge.set(stats[key], self._tags)
        for queue in {queue for queue, _ in self._counted} - set(stats["per_queue"]):
            for gauge in self._queue_gauges.values():  # removed: its gauges read 0
                gauge.set(0, {**self._tags, "queue": queue})
            for key in self._queue_counters:
                self._counted.pop((queue, key), None)
        for queue, counters in stats["per_queue"].items():
            tags = {**self._tags, "queue": queue}
            for key, gauge in self._queue_gauges.items():
                gauge.set(counters[key], tags)
            for key, counter in self._queue_counters.items():
                # A queue removed and made again starts from 0: count from there.
                before = self._counted.get((queue, key), 0)
                value = counters[key]
                if value > before:
                    counter.inc(value - before, tags)
                self._counted[(queue, key)] = value
