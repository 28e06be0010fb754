"""The soak's judge (bench/soak.py) tells a lost item from an ack cut off by a kill (no Ray).

A consumer killed after the shard applied its ack, but before it heard the answer,
leaves the ledger an ack attempt without an outcome. The judge must resolve it from
the shard's journal as applied, and must still count an item nobody acked as lost.
"""

from bench.soak import HOT, HOT_PARTITIONS, judge, trace_journals
from pype.hashing import shard_for
from pype.options import QueueOptions
from pype.partitions import partition_name
from pype.shards.journal import Journal
from pype.shards.store import QueueStore

QUEUE = "soak-a"
DRAINED = {"totals": {"depth": 0, "leased": 0}, "shards": [], "lost": []}


def run_shard(directory, acked_by_shard: int):
    """A journaled shard: 3 items pushed, all leased, the first `acked_by_shard` acked."""
    store = QueueStore(QueueOptions(), journal=Journal(directory / "server" / "shard-0"))
    store.restore()  # opens the (empty) log, as a starting shard does
    items = [(0, QUEUE, sequence) for sequence in range(3)]
    store.push((QUEUE,), items)
    leased = store.pull(QUEUE, -1, ack=True)
    store.settle(QUEUE, [lease for lease, _, _ in leased[:acked_by_shard]], outcome="ack")
    store.close()
    return items, leased


def ledger_of(leased, outcome):
    deliveries = [("consumer 0", QUEUE, lease, item, again) for lease, item, again in leased]
    acks = [("consumer 0", QUEUE, lease, item, outcome) for lease, item, _ in leased]
    return deliveries, acks


def verdict(tmp_path, items, deliveries, acks):
    return judge([(items, [])], deliveries, acks, trace_journals(tmp_path), {}, DRAINED, 1, "always")


def test_acks_the_shard_applied_before_the_consumer_died_are_not_lost(tmp_path):
    items, leased = run_shard(tmp_path, acked_by_shard=3)
    deliveries, acks = ledger_of(leased, "unanswered")  # the consumer died first
    result = verdict(tmp_path, items, deliveries, acks)
    assert result["acks cut off by the consumer's death: applied per the journal / all"] == "3 / 3"
    assert result["lost"] == 0 and result["passed"]


def test_an_item_nobody_acked_is_lost_and_its_history_is_named(tmp_path):
    items, leased = run_shard(tmp_path, acked_by_shard=2)
    deliveries, acks = ledger_of(leased, "unsure")  # the ack failed: the shard died
    result = verdict(tmp_path, items, deliveries, acks)
    assert result["acks cut off by the shard's death: applied per the journal / all"] == "2 / 3"
    assert result["lost"] == 1 and not result["passed"]
    [lost] = result["lost items"]
    lease = leased[2][0]
    assert lost["item"] == (0, QUEUE, 2)
    assert lost["delivered"] == [f"consumer 0: {QUEUE} lease {lease}"]
    assert lost["acks"] == [f"consumer 0: {QUEUE} lease {lease}: unsure"]
    assert lost["journal"] == [f"shard-0: pushed into {QUEUE}", f"shard-0: leased as {lease}"]


def test_acks_answered_by_the_shard_count_without_the_journal(tmp_path):
    items, leased = run_shard(tmp_path, acked_by_shard=3)
    deliveries, acks = ledger_of(leased, "acked")
    result = judge([(items, [])], deliveries, acks, None, {}, DRAINED, 1, "off")
    assert result["acked"] == 3 and result["lost"] == 0 and result["acked twice"] == 0


def test_an_ack_on_a_partition_after_its_queue_moved_is_found_in_the_new_shards_journal(tmp_path):
    """The soak's partitioned queue, moved by a resize: the consumer saw the logical queue
    and lease ids that carry their partition; the journals hold partition names, raw ids,
    and the move (export from shard-0, import into shard-1)."""
    partition = 2
    name = next(n for n in (partition_name(HOT, partition, seed) for seed in range(100))
                if shard_for(n, 2) == 1)  # shard 1's in a topology of 2 shards
    giver = QueueStore(QueueOptions(), journal=Journal(tmp_path / "server" / "shard-0"))
    giver.restore()
    items = [(0, HOT, sequence) for sequence in range(3)]
    giver.push((name,), items)
    leased = giver.pull(name, -1, ack=True)
    exported = giver.export(0, 2, 0, 1)
    receiver = QueueStore(QueueOptions(), journal=Journal(tmp_path / "server" / "shard-1"))
    receiver.restore()
    receiver.import_(exported)
    giver.release(0)
    receiver.settle(name, [lease for lease, _, _ in leased], outcome="ack")
    giver.close()
    receiver.close()
    seen = [(lease * HOT_PARTITIONS + partition, item, again) for lease, item, again in leased]
    deliveries = [("consumer 0", HOT, lease, item, again) for lease, item, again in seen]
    acks = [("consumer 0", HOT, lease, item, "unanswered") for lease, item, _ in seen]
    result = verdict(tmp_path, items, deliveries, acks)
    assert result["acks cut off by the consumer's death: applied per the journal / all"] == "3 / 3"
    assert result["lost"] == 0 and result["passed"]
