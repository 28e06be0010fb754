"""`pype bench soak --minutes N`: at-least-once delivery while shards and consumers die.

Producers push numbered items, (producer, queue, sequence), in batches and note
which pushes were acknowledged (their reference resolved) and which are unsure
(the shard died with the push in flight: Ray cannot say whether it ran).
Consumers pull with ack=True, report each delivery to a ledger actor, sometimes
dawdle past the visibility timeout, and ack. Meanwhile the driver SIGKILLs shard
processes (Ray restarts them; persistence restores them) and ray.kills consumers
(their leases expire and the items go to the others).

At the end, after the queues drained:
- lost: acknowledged pushes that were never acked (must be 0 with persistence);
- acked twice: items whose ack succeeded twice (must be 0: an expired lease cannot be acked);
- phantoms: acked items nobody pushed (must be 0);
- per-producer order: in each queue, the items of one producer were first
  delivered in the order they were pushed (first deliveries, by lease id);
- also reported: faults injected, items moved, items redelivered, unsure pushes
  and acks, and items of unsure pushes that arrived (Ray's at-least-once push).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import ray
from rich.console import Console
from rich.table import Table

import pype

RESULTS = Path(__file__).parent / "results"
VISIBILITY_TIMEOUT = 2.0
DRAIN_PATIENCE = 30.0  # seconds the drain may go without progress
QUEUES = ("soak-a", "soak-b", "soak-c")


@ray.remote(num_cpus=0)
class Ledger:
    """What the consumers saw; it lives in its own process, so it outlives them."""

    def __init__(self):
        self.deliveries = []   # (queue, lease_id, item, redelivered)
        self.acked = []        # items whose ack succeeded
        self.unsure_acks = []  # items whose ack was in flight when their shard died
        self.stop = False

    def delivered(self, records):
        self.deliveries.extend(records)

    def settled(self, acked, unsure):
        self.acked.extend(acked)
        self.unsure_acks.extend(unsure)

    def stopping(self):
        return self.stop

    def finish(self):
        self.stop = True

    def report(self):
        return self.deliveries, self.acked, self.unsure_acks


@ray.remote(num_cpus=0)
class Producer:
    def run(self, server, producer, seconds, rate, batch=10):
        """Push `rate` items/s for `seconds`: a pace the consumers keep up with."""
        acknowledged, unsure = [], []
        sequence = defaultdict(int)
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            time.sleep(max(0.0, (len(acknowledged) + len(unsure)) / rate - elapsed))
            queue = random.choice(QUEUES)
            items = []
            for _ in range(batch):
                items.append((producer, queue, sequence[queue]))
                sequence[queue] += 1
            try:
                ray.get(server.push.remote(items, queue, expand=True))
                acknowledged.extend(items)
            except pype.ShardLostError:  # not applied: the queue lost its items (no persistence)
                sequence[queue] -= batch  # send these numbers again
            except ray.exceptions.RayActorError:
                unsure.extend(items)
                time.sleep(0.2)  # the shard is restarting
        return acknowledged, unsure


@ray.remote(num_cpus=0)
class Consumer:
    def run(self, server, ledger, seed):
        rng = random.Random(seed)
        rounds = 0
        while rounds % 10 or not ray.get(ledger.stopping.remote()):
            rounds += 1
            queue = rng.choice(QUEUES)
            try:
                leased = ray.get(server.pull.remote(queue, 50, block=True, timeout=0.2, ack=True))
            except pype.ShardLostError:
                continue
            except ray.exceptions.RayActorError:
                time.sleep(0.2)
                continue
            if not leased:
                continue
            ledger.delivered.remote([(queue, lease, item, again) for lease, item, again in leased])
            if rng.random() < 0.01:
                time.sleep(VISIBILITY_TIMEOUT + 0.5)  # too slow: the lease expires
            ids = {lease: item for lease, item, _ in leased}
            try:
                ray.get(server.ack.remote(queue, list(ids)))
                ledger.settled.remote(list(ids.values()), [])
            except pype.LeaseNotHeldError as error:  # those went back to the queue
                late = set(error.lease_ids)
                ledger.settled.remote([item for lease, item in ids.items() if lease not in late], [])
            except (ray.exceptions.RayActorError, pype.ShardLostError):
                ledger.settled.remote([], list(ids.values()))


def shard_pids(server) -> list[int]:
    return [shard["pid"] for shard in ray.get(server.stats.remote())["shards"]]


def with_retries(call, attempts=100):
    for _ in range(attempts):
        try:
            return call()
        except ray.exceptions.RayActorError:
            time.sleep(0.2)
    return call()


def soak(minutes: float, fsync: str, producers: int, consumers: int, shards: int, rate: int,
         console: Console) -> dict:
    journal_dir = tempfile.mkdtemp(prefix="pype-soak-")
    server = pype.Server.remote(
        shards=shards, shard={"max_restarts": -1},
        persistence={"dir": journal_dir if fsync != "off" else None,
                     "fsync": fsync if fsync != "off" else "always"},
        queue_defaults={"visibility_timeout": VISIBILITY_TIMEOUT})
    ledger = Ledger.remote()
    seconds = minutes * 60
    running = [Producer.remote().run.remote(server, p, seconds, rate / producers)
               for p in range(producers)]
    crew = {c: Consumer.remote() for c in range(consumers)}
    runs = {c: consumer.run.remote(server, ledger, c) for c, consumer in crew.items()}
    faults = Counter()
    rng = random.Random(0)
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        time.sleep(rng.uniform(1.0, 3.0))
        if rng.random() < 0.5:
            pid = rng.choice(with_retries(lambda: shard_pids(server)))
            os.kill(pid, signal.SIGKILL)
            faults["shard processes killed"] += 1
        else:
            victim = rng.choice(list(crew))
            ray.kill(crew[victim])
            crew[victim] = Consumer.remote()
            runs[victim] = crew[victim].run.remote(server, ledger, rng.randrange(1 << 30))
            faults["consumers killed"] += 1
        console.print(f"  {time.strftime('%H:%M:%S')}  faults so far: {dict(faults)}")
    outcomes = ray.get(running)
    backlog, progress_at = None, time.monotonic()
    while time.monotonic() - progress_at < DRAIN_PATIENCE:
        totals = with_retries(lambda: ray.get(server.stats.remote()))["totals"]
        if totals["depth"] == 0 and totals["leased"] == 0:
            break
        if backlog is None or totals["depth"] < backlog:
            backlog, progress_at = totals["depth"], time.monotonic()
        failed, _ = ray.wait(list(runs.values()), timeout=0.5)
        for ref in failed:  # a consumer's loop ended on an error: show it, go on without it
            try:
                ray.get(ref)
            except ray.exceptions.RayError as error:
                console.print(f"[red]a consumer failed: {error}[/]")
            runs = {c: r for c, r in runs.items() if r != ref}
        console.print(f"  draining: {totals['depth']} queued, {totals['leased']} leased")
    else:
        console.print(f"[red]the queues stopped draining for {DRAIN_PATIENCE:.0f} s[/]")
    ray.get(ledger.finish.remote())
    time.sleep(1)
    deliveries, acked, unsure_acks = ray.get(ledger.report.remote())
    stats = with_retries(lambda: ray.get(server.stats.remote()))
    for consumer in crew.values():
        ray.kill(consumer)
    server.shutdown()
    return judge(outcomes, deliveries, acked, unsure_acks, faults, stats, minutes, fsync)


def left_in_queues(stats: dict) -> int:
    return stats["totals"]["depth"] + stats["totals"]["leased"]


def judge(outcomes, deliveries, acked, unsure_acks, faults, stats, minutes, fsync) -> dict:
    acknowledged = Counter(item for done, _ in outcomes for item in done)
    unsure_pushes = {item for _, unsure in outcomes for item in unsure}
    acked_count = Counter(acked)
    settled = set(acked) | set(unsure_acks)
    # An unsure ack counts once, unless the item came back and was acked after all.
    effective = acked_count + Counter(item for item in set(unsure_acks) if item not in acked_count)
    lost = [item for item in acknowledged if item not in settled]
    first_delivery = {}
    for queue, lease, item, redelivered in sorted(deliveries, key=lambda d: d[1]):
        if not redelivered:
            first_delivery.setdefault(item, (queue, lease))
    order_breaks = 0
    last = {}
    for item, (queue, _) in sorted(first_delivery.items(), key=lambda kv: kv[1][1]):
        producer, _, sequence = item
        if sequence < last.get((queue, producer), -1):
            order_breaks += 1
        last[(queue, producer)] = sequence
    result = {
        "minutes": minutes, "fsync": fsync,
        "faults": dict(faults),
        "acknowledged pushes (items)": sum(acknowledged.values()),
        "unsure pushes (items)": len(unsure_pushes),
        "items of unsure pushes that arrived": len(set(acked) & unsure_pushes),
        "deliveries": len(deliveries),
        "redelivered": sum(1 for d in deliveries if d[3]),
        "acked": len(acked),
        "unsure acks": len(unsure_acks),
        "left in the queues (not drained)": left_in_queues(stats),
        "lost": len(lost),
        "acked twice": sum(1 for count in acked_count.values() if count > 1),
        "phantoms": len(set(acked) - set(acknowledged) - unsure_pushes),
        "per-producer order breaks": order_breaks,
        "acked multiset equals acknowledged pushes": Counter(
            {item: count for item, count in effective.items() if item in acknowledged}) == acknowledged,
        "shards marked restarted at the end": sum(shard["restarted"] for shard in stats["shards"]),
        "lost queues reported": stats["lost"],
    }
    result["passed"] = (result["lost"] == 0 and left_in_queues(stats) == 0 and result["acked twice"] == 0 and result["phantoms"] == 0
                        and order_breaks == 0)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pype bench soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="how long producers run (default 2)")
    parser.add_argument("--fsync", choices=("always", "batch", "never", "off"), default="always",
                        help="persistence.fsync of the server; off: no persistence (default always)")
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--consumers", type=int, default=3)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--rate", type=int, default=500, help="items/s pushed, all producers together")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where soak.json goes")
    args = parser.parse_args(argv)
    console = Console()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        result = soak(args.minutes, args.fsync, args.producers, args.consumers, args.shards,
                      args.rate, console)
    finally:
        ray.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"soak-{args.fsync}.json").write_text(json.dumps(result, indent=2, default=str))
    table = Table(title=f"soak: {args.minutes:g} min, fsync {args.fsync}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, str(value))
    console.print(table)
    return 0 if result["passed"] else 1
