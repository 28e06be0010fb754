"""`pype bench soak --minutes N`: at-least-once delivery while shards and consumers die.

`pype bench soak --nodes N`: the same on a local multi-node cluster (a head node and N
workers, bench.cluster), with 2 replicas of each shard and each node's journals on its
own disk: whole worker nodes die (raylet and processes SIGKILLed, directory deleted)
and fresh ones join, while shard processes are SIGKILLed too. Producers and consumers
run on the head node and are not killed; a consumer whose ack was cut off sends it
again until it is answered (acking an acked id succeeds), so every ack has a sure
outcome and the verdict needs no journal (a dead node's is gone).

Producers push numbered items, (producer, queue, sequence), in batches and note
which pushes were acknowledged (their reference resolved) and which are unsure
(the shard died with the push in flight: Ray cannot say whether it ran).
Consumers pull with ack=True and tell a ledger actor, synchronously, each
delivery, each ack before they send it, and its answer; they sometimes dawdle past
the visibility timeout. Meanwhile the driver SIGKILLs shard processes (Ray
restarts them; persistence restores them) and ray.kills consumers (their leases
expire and the items go to the others).

An ack whose answer never came (its consumer or its shard died with it in flight)
is "unsure": the judge asks the shards' journals, which it replays item by item,
whether the shard applied it. So a consumer killed between its ack and its
ledger record cannot look like a lost item.

At the end, after the queues drained:
- lost: acknowledged pushes never acked (must be 0 with persistence); each lost
  item is listed with its deliveries, acks (by whom) and journal history;
- acked twice: items acked twice (must be 0: an expired lease cannot be acked);
- phantoms: acked items nobody pushed (must be 0);
- per-producer order: in each queue, the items of one producer were first
  delivered in the order they were pushed (first deliveries, by lease id);
- also reported: faults injected, items moved, items redelivered, unsure pushes
  and acks, and items of unsure pushes that arrived (Ray's at-least-once push).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from rich.console import Console
from rich.table import Table

import pype
from bench.cluster import LocalCluster
from pype.options import QueueOptions
from pype.partitions import split_name
from pype.shards import records
from pype.shards.journal import read_journal
from pype.shards.store import QueueStore

RESULTS = Path(__file__).parent / "results"
VISIBILITY_TIMEOUT = 2.0
DRAIN_PATIENCE = 30.0  # seconds the drain may go without progress
HOT, HOT_PARTITIONS = "soak-hot", 4  # a partitioned queue among the plain ones
QUEUES = (*(f"soak-{letter}" for letter in "abcdefgh"), HOT)
RESIZE_EVERY = 4.0  # seconds between resizes (--resize)
REPLICAS = 2  # of each shard, with --nodes
# What Ray raises for a .remote() call whose shard died with it in flight (its node too:
# a replica pinned to a lost node is unschedulable); it may or may not have run.
RAY_CUT_OFF = (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError)
NODE_LOSS_EVERY = 15.0  # seconds between node losses (--nodes), each once the last was made good


@ray.remote(num_cpus=0)
class Ledger:
    """What the consumers saw and did; it lives in its own process, so it outlives them.

    Consumers tell it synchronously, and before they act: a consumer killed at any
    moment leaves an ack it began but never saw answered as an open attempt, which
    the judge resolves from the shard's journal, never as a loss.
    """

    def __init__(self):
        self.deliveries = []  # (consumer, queue, lease_id, item, redelivered)
        # (consumer, queue, lease_id, item, outcome): "acked", "not held", "unsure" (the ack
        # failed with the shard's death) or "unanswered" (the consumer died first)
        self.outcomes = []
        self.attempts = {}    # (consumer, queue, lease_id) -> item: acks begun, not yet answered
        self.stop = False

    def delivered(self, consumer, queue, leased):
        self.deliveries.extend((consumer, queue, lease, item, again) for lease, item, again in leased)

    def acking(self, consumer, queue, items_by_lease):
        for lease, item in items_by_lease.items():
            self.attempts[(consumer, queue, lease)] = item

    def settled(self, consumer, queue, outcome_by_lease):
        for lease, outcome in outcome_by_lease.items():
            item = self.attempts.pop((consumer, queue, lease))
            self.outcomes.append((consumer, queue, lease, item, outcome))

    def stopping(self):
        return self.stop

    def finish(self):
        self.stop = True

    def report(self):
        """Deliveries, answered acks, and acks whose consumer died before the answer."""
        unanswered = [(*key, item, "unanswered") for key, item in self.attempts.items()]
        return self.deliveries, self.outcomes + unanswered


@ray.remote(num_cpus=0)
class Producer:
    def run(self, server, producer, seconds, rate, native, batch=10):
        """Push `rate` items/s for `seconds`: a pace the consumers keep up with.

        Natively, a push cut off by a shard's death is sent again by the client and
        applied once (producer sequence numbers): no push is ever unsure. Through
        Ray, it fails with RayActorError and may or may not have been applied.
        """
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
                if native:
                    server.push(items, queue, expand=True)
                else:
                    ray.get(server.push.remote(items, queue, expand=True))
                acknowledged.extend(items)
            except (pype.ShardLostError, pype.NotEnoughReplicasError):  # not applied: the queue
                sequence[queue] -= batch  # lost its items, or too few replicas are in sync
            except (*RAY_CUT_OFF, pype.ShardUnavailableError, pype.NotPrimaryError):
                unsure.extend(items)  # NotPrimaryError: its primary was replaced before it committed
                time.sleep(0.2)  # the shard is restarting
        return acknowledged, unsure


CUT_OFF = (*RAY_CUT_OFF, pype.ShardLostError, pype.ShardRestartedError,
           pype.ShardUnavailableError, pype.NotEnoughReplicasError, pype.NotPrimaryError)


def settle(ack, queue: str, leases: list[int], attempts: int) -> dict:
    """Ack `leases`; each one's outcome: "acked", "not held" (it went back to the queue),
    or "unsure" (every one of `attempts` was cut off by a shard's death)."""
    for attempt in range(attempts):
        try:
            ack(queue, leases)
            return dict.fromkeys(leases, "acked")
        except pype.LeaseNotHeldError as error:
            late = set(error.lease_ids)
            return {lease: "not held" if lease in late else "acked" for lease in leases}
        except CUT_OFF:
            if attempt + 1 < attempts:
                time.sleep(0.2)
    return dict.fromkeys(leases, "unsure")


@ray.remote(num_cpus=0)
class Consumer:
    def run(self, server, ledger, name, seed, native, resend_acks=False):
        """Pull, tell the ledger, ack. resend_acks: send an ack cut off by a shard's
        death again until it is answered, so that its outcome is sure."""
        rng = random.Random(seed)
        pull = server.pull if native else lambda *a, **k: ray.get(server.pull.remote(*a, **k))
        ack = server.ack if native else lambda *a, **k: ray.get(server.ack.remote(*a, **k))
        rounds = 0
        while rounds % 10 or not ray.get(ledger.stopping.remote()):
            rounds += 1
            queue = rng.choice(QUEUES)
            try:
                leased = pull(queue, 50, block=True, timeout=0.2, ack=True)
            except pype.ShardLostError:
                continue
            except CUT_OFF:
                time.sleep(0.2)
                continue
            if not leased:
                continue
            ray.get(ledger.delivered.remote(name, queue, leased))
            if rng.random() < 0.01:
                time.sleep(VISIBILITY_TIMEOUT + 0.5)  # too slow: the lease expires
            items = {lease: item for lease, item, _ in leased}
            ray.get(ledger.acking.remote(name, queue, items))  # before the ack, never after
            outcome = settle(ack, queue, list(items), 300 if resend_acks else 1)
            ray.get(ledger.settled.remote(name, queue, outcome))


class ShardsUnreachable(Exception):
    """stats() could not reach every shard (one is restarting): its totals are partial."""


def full_stats(server) -> dict:
    """The server's stats with every shard in them; ShardsUnreachable if one did not answer."""
    stats = ray.get(server.stats.remote())
    if stats["totals"]["unreachable"]:
        raise ShardsUnreachable(stats["totals"]["unreachable"])
    return stats


def shard_pids(server) -> list[int]:
    return [shard["pid"] for shard in full_stats(server)["shards"]]


def with_retries(call, attempts=100):
    for _ in range(attempts):
        try:
            return call()
        except (*RAY_CUT_OFF, ShardsUnreachable):
            time.sleep(0.2)
    return call()


class Resizer:
    """Grows and shrinks the server every few seconds, on a thread of its own, while the
    driver goes on killing shards and consumers (a kill may cut a resize short: then the
    same resize runs again, which finishes it)."""

    def __init__(self, server, smallest: int, largest: int, every: float, console: Console):
        self.server, self.every, self.console = server, every, console
        self.sizes = list(range(smallest + 1, largest + 1)) + list(range(largest - 1, smallest - 1, -1))
        self.counts = Counter()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak-resizer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for size in itertools.cycle(self.sizes):
            if self.stopping.wait(self.every):
                return
            for _ in range(10):
                try:
                    moved = self.server.resize(size)["moved_queues"]
                    self.counts["resizes"] += 1
                    self.counts["queues moved"] += moved
                    break
                except Exception as error:  # noqa: BLE001 - cut short by a kill: run it again
                    self.counts["resizes cut short"] += 1
                    self.console.print(f"  resize to {size} cut short: {error!r:.120}")
                    time.sleep(1.0)

    def stop(self) -> Counter:
        self.stopping.set()
        self.thread.join()
        return self.counts


def start_server(shards: int, fsync: str, cluster: LocalCluster | None):
    """The soak's server and the directory of its journals (None: on each node's disk,
    or no persistence)."""
    persistence = {"dir": None} if fsync == "off" else {"fsync": fsync}
    if cluster is not None:
        if fsync != "off":
            persistence["dir"] = "${PYPE_DATA}/pype"
        return pype.Server.remote(
            shards=shards, replicas=REPLICAS, placement={"resource": "pype"},
            shard={"max_restarts": -1}, transport={"request_timeout": 10},
            persistence=persistence, queue_defaults={"visibility_timeout": VISIBILITY_TIMEOUT}), None
    journal_dir = None
    if fsync != "off":  # a log that is never compacted holds every item's whole history
        journal_dir = tempfile.mkdtemp(prefix="pype-soak-")
        persistence.update({"dir": journal_dir, "compact_mb": 1 << 20})
    return pype.Server.remote(
        shards=shards, shard={"max_restarts": -1}, persistence=persistence,
        queue_defaults={"visibility_timeout": VISIBILITY_TIMEOUT}), journal_dir


def replica_pids(server) -> list[int]:
    """The pids of every replica of every shard that answers now."""
    pids = []
    for actor in ray.get(server.routes.router.actors.remote()):
        try:
            pids.append(ray.get(actor.stats.remote(), timeout=10)["pid"])
        except (ray.exceptions.RayError, TimeoutError):
            pass  # its node is gone, or it is restarting
    return pids


class NodeLosses:
    """Loses a worker node that holds replicas every `every` seconds, once every shard
    is whole again (two replicas survive one loss at a time, not a second one before
    the first was made good); a fresh node joins just before, so that the router has a
    node to put the new replica on."""

    def __init__(self, cluster: LocalCluster, server, every: float):
        self.cluster, self.server, self.every = cluster, server, every
        self.next_at = time.monotonic() + every
        self.lost: list[str] = []

    def _record(self) -> list[dict]:
        return ray.get(self.server.routes.router.stats.remote())["replicas"]

    def due(self) -> bool:
        if time.monotonic() < self.next_at:
            return False
        return all(len(shard["replicas"]) == REPLICAS and not shard["under_replicated"]
                   and not any(replica["gone"] for replica in shard["replicas"])
                   for shard in self._record())

    def lose_one(self, rng: random.Random) -> str:
        for node in self.lost:  # Ray has long noticed: tidy up
            self.cluster.forget(node)
        self.lost.clear()
        self.cluster.add_worker()
        holding = sorted({replica["node"] for shard in self._record() for replica in shard["replicas"]})
        victim = rng.choice(holding)
        self.cluster.lose(victim)
        self.lost.append(victim)
        self.next_at = time.monotonic() + self.every
        return victim


def soak(minutes: float, fsync: str, producers: int, consumers: int, shards: int, rate: int,
         path: str, console: Console, resize: bool = False,
         cluster: LocalCluster | None = None) -> dict:
    """One soak; path "native", "remote" or "both" (even-numbered producers and
    consumers native, the others .remote()). With a `cluster`, shards are replicated
    and its worker nodes die (NodeLosses)."""
    def native(number: int) -> bool:
        return path == "native" or (path == "both" and number % 2 == 0)

    server, journal_dir = start_server(shards, fsync, cluster)
    server.add(HOT, partitions=HOT_PARTITIONS)
    # With a cluster, the clients live on the head node, whose loss is the cluster's loss.
    on_head = {} if cluster is None else {"scheduling_strategy": NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)}
    ledger = Ledger.options(**on_head).remote()
    seconds = minutes * 60
    running = [Producer.options(**on_head).remote().run.remote(
        server, p, seconds, rate / producers, native(p)) for p in range(producers)]
    crew = {c: Consumer.options(**on_head).remote() for c in range(consumers)}
    runs = {c: consumer.run.remote(server, ledger, f"consumer {c}", c, native(c), cluster is not None)
            for c, consumer in crew.items()}
    faults = Counter()
    rng = random.Random(0)
    resizer = Resizer(server, shards, shards + 2, RESIZE_EVERY, console) if resize else None
    losses = NodeLosses(cluster, server, NODE_LOSS_EVERY) if cluster is not None else None
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        time.sleep(rng.uniform(1.0, 3.0))
        if losses is not None and losses.due():
            console.print(f"  node {losses.lose_one(rng)[:12]} lost")
            faults["nodes lost (a fresh one joined)"] += 1
        elif losses is not None or rng.random() < 0.5:
            pids = with_retries(lambda: replica_pids(server) if losses else shard_pids(server))
            try:
                os.kill(rng.choice(pids), signal.SIGKILL)
                faults["shard processes killed"] += 1
            except (ProcessLookupError, IndexError):
                pass  # gone with its node meanwhile
        else:
            victim = rng.choice(list(crew))
            ray.kill(crew[victim])
            faults["consumers killed"] += 1
            crew[victim] = Consumer.remote()
            name = f"consumer {victim}, incarnation {faults['consumers killed']}"
            runs[victim] = crew[victim].run.remote(server, ledger, name, rng.randrange(1 << 30),
                                                   native(victim))
        console.print(f"  {time.strftime('%H:%M:%S')}  faults so far: {dict(faults)}")
    if resizer is not None:
        faults.update(resizer.stop())
    outcomes = ray.get(running)
    backlog, progress_at = None, time.monotonic()
    while time.monotonic() - progress_at < DRAIN_PATIENCE:
        totals = with_retries(lambda: full_stats(server))["totals"]
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
    ray.wait(list(runs.values()), num_returns=len(runs), timeout=60)  # their last acks answered
    deliveries, acks = ray.get(ledger.report.remote())
    stats = with_retries(lambda: full_stats(server))
    for consumer in crew.values():
        ray.kill(consumer)
    server.shutdown()
    journal = trace_journals(Path(journal_dir)) if journal_dir else None
    result = judge(outcomes, deliveries, acks, journal, faults, stats, minutes, fsync)
    result["unsure pushes of native producers (items)"] = sum(
        len(unsure) for number, (_, unsure) in enumerate(outcomes) if native(number))
    paths = {"native": "native", "remote": ".remote()", "both": "native and .remote()"}
    nodes = {} if cluster is None else {"nodes": f"{len(cluster.data)} workers, {REPLICAS} replicas"}
    return {"path": paths[path], **nodes, **result}


def left_in_queues(stats: dict) -> int:
    return stats["totals"]["depth"] + stats["totals"]["leased"]


_MOVES_ITEMS = {records.Push: "pushed into", records.Insert: "inserted into",
                records.Admit: "admitted into", records.Take: "taken from"}


class JournalTrace:
    """Every item's history in the shards' journals, by replaying them (see QueueStore.replay)."""

    def __init__(self):
        self.events = defaultdict(list)  # item -> what the journal says happened to it
        self.acked_leases = set()        # (queue, lease_id) of leases acked while held
        self.pushes = Counter()          # item -> how often a push brought it in

    def observe(self, shard: str, record: records.Record, moved: list) -> None:
        kind = type(record)
        if kind in _MOVES_ITEMS:
            where = ", ".join(record.queues) if kind is records.Push else record.queue
            for item in moved:
                self.events[item].append(f"{shard}: {_MOVES_ITEMS[kind]} {where}")
                if kind in (records.Push, records.Insert):
                    self.pushes[item] += 1
        elif kind is records.Lease:
            for lease, item, again in moved:
                self.events[item].append(f"{shard}: leased as {lease}{' (again)' * again}")
        elif kind is records.Settle:
            for lease, item in moved:
                verb = "returned" if record.requeue else "acked"
                self.events[item].append(f"{shard}: lease {lease} {verb}")
                if not record.requeue:
                    self.acked_leases.add(self._as_consumers_saw(record.queue, lease))

    @staticmethod
    def _as_consumers_saw(queue: str, lease: int) -> tuple[str, int]:
        """(queue, lease id) as pull() returned them: a partition's lease id carries its
        partition (pype.partitions.Layout.lease_id)."""
        logical, partition = split_name(queue)
        if partition is None:
            return queue, lease
        return logical, lease * HOT_PARTITIONS + partition


def trace_journals(directory: Path) -> JournalTrace:
    trace = JournalTrace()
    for shard_dir in sorted(directory.glob("*/shard-*")):
        contents = read_journal(shard_dir)
        store = QueueStore(QueueOptions())
        store.replay(contents.state, contents.records,
                     lambda record, moved, shard=shard_dir.name: trace.observe(shard, record, moved))
    return trace


def judge(outcomes, deliveries, acks, journal: JournalTrace | None, faults, stats, minutes,
          fsync) -> dict:
    """The verdict: every acknowledged push acked exactly once, in per-producer order.

    An ack is settled by the consumer's answer; one whose answer never came (the
    shard or the consumer died with it in flight) is resolved by the shard's
    journal: applied if the journal acked that lease. Without a journal it counts
    as applied. Each lost item is listed with its deliveries, acks and journal
    history.
    """
    acknowledged = Counter(item for done, _ in outcomes for item in done)
    unsure_pushes = {item for _, unsure in outcomes for item in unsure}
    cut_off = {"unsure": "the shard's death", "unanswered": "the consumer's death"}
    unsure = [(queue, lease, item, outcome) for _, queue, lease, item, outcome in acks
              if outcome in cut_off]
    applied = [(item, outcome) for queue, lease, item, outcome in unsure
               if journal is None or (queue, lease) in journal.acked_leases]
    applied_unsure = [item for item, _ in applied]
    settled = Counter(item for *_, item, outcome in acks if outcome == "acked") + Counter(applied_unsure)
    lost = sorted(item for item in acknowledged if item not in settled)
    first_delivery = {}
    for _, queue, lease, item, redelivered in sorted(deliveries, key=lambda d: d[2]):
        if not redelivered:
            first_delivery.setdefault(item, (queue, lease))
    order_breaks = Counter()
    last = {}
    for item, (queue, _) in sorted(first_delivery.items(), key=lambda kv: kv[1][1]):
        producer, _, sequence = item
        if sequence < last.get((queue, producer), -1):
            order_breaks[queue] += 1
        last[(queue, producer)] = sequence
    result = {
        "minutes": minutes, "fsync": fsync,
        "faults": dict(faults),
        "acknowledged pushes (items)": sum(acknowledged.values()),
        "unsure pushes (items)": len(unsure_pushes),
        "items of unsure pushes that arrived": len(set(settled) & unsure_pushes),
        "deliveries": len(deliveries),
        "redelivered": sum(1 for d in deliveries if d[4]),
        "acked": sum(settled.values()),
        **{f"acks cut off by {why}: applied per the journal / all": (
            f"{sum(o == outcome for _, o in applied) if journal else '?'} / "
            f"{sum(o == outcome for *_, o in unsure)}") for outcome, why in cut_off.items()},
        "left in the queues (not drained)": left_in_queues(stats),
        "lost": len(lost),
        "acked twice": sum(1 for count in settled.values() if count > 1),
        "phantoms": len(set(settled) - set(acknowledged) - unsure_pushes),
        "duplicated (pushed twice)": duplicated(deliveries, journal),
        "per-producer order breaks": sum(order_breaks.values()),
        "order breaks by queue": dict(order_breaks),
        "shards marked restarted at the end": sum(shard["restarted"] for shard in stats["shards"]),
        "lost queues reported": stats["lost"],
        "lost items": [explain(item, deliveries, acks, journal) for item in lost[:200]],
    }
    result["passed"] = (result["lost"] == 0 and left_in_queues(stats) == 0 and result["acked twice"] == 0
                        and result["phantoms"] == 0 and not order_breaks
                        and result["duplicated (pushed twice)"] == 0)
    return result


def duplicated(deliveries, journal: JournalTrace | None) -> int:
    """Items that entered a queue twice: by the journal, else by first deliveries
    (an item that came back from a lease is delivered again flagged redelivered)."""
    if journal is not None:
        return sum(1 for count in journal.pushes.values() if count > 1)
    firsts = Counter(item for *_, item, redelivered in deliveries if not redelivered)
    return sum(1 for count in firsts.values() if count > 1)


def explain(item, deliveries, acks, journal: JournalTrace | None) -> dict:
    """Everything the ledger and the journal know about one item."""
    return {
        "item": item,
        "delivered": [f"{consumer}: {queue} lease {lease}{' (redelivered)' * again}"
                      for consumer, queue, lease, got, again in deliveries if got == item],
        "acks": [f"{consumer}: {queue} lease {lease}: {outcome}"
                 for consumer, queue, lease, got, outcome in acks if got == item],
        "journal": journal.events.get(item, ["never seen"]) if journal else "no journal",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pype bench soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="how long producers run (default 2)")
    parser.add_argument("--fsync", choices=("always", "batch", "never", "off"), default="always",
                        help="persistence.fsync of the server; off: no persistence (default always)")
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--consumers", type=int, default=3)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--rate", type=int, default=500, help="items/s pushed, all producers together")
    parser.add_argument("--path", choices=("native", "remote", "both"), default="native",
                        help="how producers and consumers call: natively (clients resend across "
                             "restarts), with .remote(), or half each (default native)")
    parser.add_argument("--resize", action="store_true",
                        help=f"also grow and shrink the server (shards to shards + 2 and back) "
                             f"every {RESIZE_EVERY:g} s")
    parser.add_argument("--nodes", type=int, default=0,
                        help=f"run on a local cluster of this many worker nodes, {REPLICAS} replicas "
                             f"of each shard, and lose a node every {NODE_LOSS_EVERY:g} s or so "
                             f"(default 0: one node, no replicas)")
    parser.add_argument("--runs", type=int, default=1, help="soaks in a row, each on a fresh "
                                                             "cluster (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where soak.json goes")
    args = parser.parse_args(argv)
    console = Console()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    results = []
    for run in range(args.runs):
        console.print(f"soak {run + 1} of {args.runs}")
        cluster = LocalCluster(args.nodes, "pype-soak-") if args.nodes else None
        if cluster is None:
            ray.init(address="local", include_dashboard=False, log_to_driver=False,
                     logging_level="WARNING")
        try:
            results.append(soak(args.minutes, args.fsync, args.producers, args.consumers,
                                args.shards, args.rate, args.path, console, args.resize, cluster))
        finally:
            if cluster is None:
                ray.shutdown()
            else:
                cluster.stop()
        show(results[-1], args, console)
    args.out.mkdir(parents=True, exist_ok=True)
    named = "".join(("-resize" * args.resize, f"-nodes{args.nodes}" * bool(args.nodes)))
    result = results[0] if args.runs == 1 else {"runs": results}
    (args.out / f"soak-{args.fsync}-{args.path}{named}.json").write_text(
        json.dumps(result, indent=2, default=str))
    passed = sum(result["passed"] for result in results)
    console.print(f"{passed} of {args.runs} soaks passed")
    return 0 if passed == args.runs else 1


def show(result: dict, args, console: Console) -> None:
    table = Table(title=f"soak: {args.minutes:g} min, fsync {args.fsync}, {result['path']}"
                        f"{', resizing' * args.resize}, {result.get('nodes', 'one node')}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if key != "lost items":
            table.add_row(key, str(value))
    console.print(table)
    for explained in result["lost items"][:10]:
        console.print(explained)
