"""`pype bench --only item-life`: delayed delivery's timers, and what an item's life costs.

Timers: `items` one-item native pushes with delays drawn uniformly from 0 to 5 s, while a
consumer in another process pulls (blocking, everything there) and notes when each item
came. An item's lateness is the time it came minus the time it was due (the producer's
clock before the push, plus its delay): the push's and the pull's own latency included.
The consumer keeps up (items fall due at about items/5 per second, far below what one
consumer pulls), so the figures measure the shard's timers, not a backlog.

Cost: the same native workloads on a plain queue and on one with ttl, max_deliveries and
a dead-letter queue (no item expires or is given up during the run), alternating round
by round: one-item pushes then one-item pulls, and 1,000-item pushes then 1,000-item
pulls. Medians, the runs' spread (min to max) and the ratio of the medians. Memory: a
shard's peak RSS holding 1,000,000 small items, in a plain queue and in a queue with a ttl.

Results: <out>/item-life.json and item-life.md.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

import ray

TIMER_QUEUE = "bench-timers"
LIFE = {"ttl": 3600.0, "max_deliveries": 5, "dead_letter": "bench-life-dead"}


@ray.remote(num_cpus=0)
class Consumer:
    """Pulls `count` items of (due time, sequence) and notes how late each came."""

    def lateness(self, server, queue: str, count: int) -> list[float]:
        late = []
        while len(late) < count:
            for due, _ in server.pull(queue, -1, block=True, timeout=60):
                late.append(time.time() - due)
        return late


def timers(server, items: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    consumer = Consumer.remote()
    ray.get(consumer.__ray_ready__.remote())
    waiting = consumer.lateness.remote(server, TIMER_QUEUE, items)
    started = time.perf_counter()
    for sequence in range(items):
        delay = rng.uniform(0.0, 5.0)
        server.push((time.time() + delay, sequence), TIMER_QUEUE, delay=delay)
    pushing = time.perf_counter() - started
    late = sorted(ray.get(waiting))
    ray.kill(consumer)
    server.remove(TIMER_QUEUE)
    return {"items": items, "push_seconds": pushing,
            "p50_ms": 1000 * statistics.median(late),
            "p99_ms": 1000 * late[int(0.99 * (len(late) - 1))],
            "max_ms": 1000 * late[-1], "min_ms": 1000 * late[0]}


def one_item(server, queue: str, count: int) -> dict:
    started = time.perf_counter()
    for item in range(count):
        server.push(item, queue)
    pushed = time.perf_counter()
    for _ in range(count):
        server.pull(queue)
    done = time.perf_counter()
    return {"push_per_s": count / (pushed - started), "pull_per_s": count / (done - pushed)}


def batches(server, queue: str, count: int) -> dict:
    batch = list(range(1000))
    started = time.perf_counter()
    for _ in range(count):
        server.push(batch, queue, expand=True)
    pushed = time.perf_counter()
    for _ in range(count):
        server.pull(queue, 1000)
    done = time.perf_counter()
    return {"push_items_per_s": 1000 * count / (pushed - started),
            "pull_items_per_s": 1000 * count / (done - pushed)}


def memory(options: dict, items: int = 1_000_000) -> dict:
    import pype

    server = pype.Server.remote(shards=1)
    try:
        server.add("memory", **options)
        before = ray.get(server.stats.remote())["shards"][0]["peak_rss_mb"]
        for first in range(0, items, 100_000):
            server.push(list(range(first, first + 100_000)), "memory", expand=True)
        after = ray.get(server.stats.remote())["shards"][0]
        assert after["depth"] == items
        return {"empty_mb": before, "holding_mb": after["peak_rss_mb"]}
    finally:
        server.shutdown()


def main(rounds: int, quick: bool, out: Path, machine: dict) -> str:
    import pype

    scale = 0.2 if quick else 1.0
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    try:
        server = pype.Server.remote(shards=1)
        server.add("bench-plain")
        server.add("bench-life", **LIFE)
        workloads = {"one-item push and pull": (one_item, int(5000 * scale)),
                     "1,000-item push and pull": (batches, int(200 * scale))}
        cost: dict = {}
        for name, (workload, count) in workloads.items():
            runs = {"plain": [], "ttl + max_deliveries + dead_letter": []}
            for round_ in range(rounds):
                order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
                for kind in order:
                    queue = "bench-plain" if kind == "plain" else "bench-life"
                    runs[kind].append(workload(server, queue, count))
            cost[name] = {kind: {metric: [run[metric] for run in samples]
                                 for metric in samples[0]} for kind, samples in runs.items()}
        timer = timers(server, int(100_000 * scale))
        server.shutdown()
        mem = {"plain": memory({}), "ttl": memory({"ttl": 3600.0})}
    finally:
        ray.shutdown()
    results = {"machine": machine, "rounds": rounds, "quick": quick, "timers": timer,
               "cost": cost, "memory": mem}
    out.mkdir(parents=True, exist_ok=True)
    (out / "item-life.json").write_text(json.dumps(results, indent=2))
    text = report(results)
    (out / "item-life.md").write_text(text)
    return text


def report(results: dict) -> str:
    m, timer = results["machine"], results["timers"]
    lines = [f"# An item's life: timers and cost ({m['date']})", "",
             (f"Machine: {m['cpus']} cores, {m['memory_gb']} GB, Python {m['python']}, "
             f"Ray {m['ray']}. Command: `pype bench --only item-life --rounds "
             f"{results['rounds']}`{' --quick' if results['quick'] else ''}. One shard."), "",
             "## Delayed delivery: how late items come", "",
             (f"{timer['items']:,} one-item native pushes with delays uniform in 0-5 s (pushed in "
             f"{timer['push_seconds']:.1f} s), a consumer in another process pulling all the "
             f"time. Lateness: when the consumer had the item, minus the producer's clock "
             f"before the push plus the delay."), "",
             "| p50 | p99 | max | min |", "| ---: | ---: | ---: | ---: |",
             (f"| {timer['p50_ms']:.2f} ms | {timer['p99_ms']:.2f} ms | {timer['max_ms']:.2f} ms "
             f"| {timer['min_ms']:.2f} ms |"), "",
             "## The cost of ttl, max_deliveries and a dead-letter queue", "",
             (f"Native calls, {results['rounds']} alternating rounds; median (min-max of the "
             f"runs); ratio of the medians, the queue with an item's life over the plain one."),
             "", ("| workload | metric | plain | ttl + max_deliveries + dead_letter | ratio | "
             "within 10% or the spread |"), "| --- | --- | ---: | ---: | ---: | --- |"]
    for name, kinds in results["cost"].items():
        plain, life = kinds["plain"], kinds["ttl + max_deliveries + dead_letter"]
        for metric in plain:
            a, b = plain[metric], life[metric]
            ratio = statistics.median(b) / statistics.median(a)
            spread = max((max(a) - min(a)) / statistics.median(a),
                         (max(b) - min(b)) / statistics.median(b))
            held = "yes" if abs(1 - ratio) <= max(0.10, spread) else "**no**"
            lines.append(f"| {name} | {metric.replace('_', ' ')} | {_runs(a)} | {_runs(b)} | "
                         f"{ratio:.2f} | {held} (spread {spread:.0%}) |")
    mem = results["memory"]
    lines += ["", "## Memory: a shard holding 1,000,000 small items", "",
              "| queue | peak RSS empty | peak RSS holding them |", "| --- | ---: | ---: |"]
    for kind, figures in mem.items():
        lines.append(f"| {kind} | {figures['empty_mb']:.0f} MB | {figures['holding_mb']:.0f} MB |")
    return "\n".join(lines) + "\n"


def _runs(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"
