"""Dead letters: items a queue gives up on, and the outbox that sends them on (no Ray).

The live path (the shard's sender, dead-letter queues on other shards, consumers that
die) is in tests/test_dead_letters_live.py.
"""

import pytest

from pype.dead_letters import DeadLetter
from pype.errors import LeaseNotHeldError
from pype.options import QueueOptions
from pype.shards.journal import Journal
from pype.shards.store import QueueStore


def lease_all(store, name):
    return [lease for lease, _, _ in store.pull(name, -1, ack=True)]


def send_outbox(source, target):
    """What the shard's sender does: push each entry as the outbox's producer."""
    while (outgoing := source.outgoing()) is not None:
        entry, producer = outgoing
        target.push((entry.queue,), entry.items, producer=producer)
        source.delivered(entry.number)


def test_an_item_is_given_up_after_max_deliveries_and_counts_its_deliveries():
    store = QueueStore(QueueOptions())
    store.add("q", QueueOptions(max_deliveries=3, dead_letter="dead"))
    store.push(("q",), ["poison", "fine"])
    for delivery in range(3):
        leased = store.pull("q", -1, ack=True)
        assert [(item, earlier) for _, item, earlier in leased] == [("poison", delivery),
                                                                   ("fine", delivery)]
        poison, fine = (lease for lease, _, _ in leased)
        store.settle("q", [poison, fine] if delivery < 2 else [poison], "nack")
    # The third failed delivery of "poison" gave it up; "fine" is still leased.
    assert store.length("q") == 0
    assert store.stats()["per_queue"]["q"]["dead_lettered"] == 1
    entry, _ = store.outgoing()
    assert entry.queue == "dead"
    assert entry.items == [DeadLetter("poison", "q", "deliveries", 3)]
    store.settle("q", [fine], "ack")
    assert store.stats()["outbox"] == 1


def test_an_expired_lease_is_a_failed_delivery():
    store = QueueStore(QueueOptions())
    store.add("q", QueueOptions(max_deliveries=2))
    store.push(("q",), ["x"])
    lease_all(store, "q")
    store.expire_leases(now=4e9)
    [(_, item, earlier)] = store.pull("q", 1, ack=True)
    assert (item, earlier) == ("x", 1)
    store.expire_leases(now=4e9)
    # No dead-letter queue: dropped, and counted.
    assert store.length("q") == 0
    assert store.stats()["per_queue"]["q"]["dead_dropped"] == 1
    assert store.outgoing() is None


def test_a_reject_gives_up_at_once_and_the_lease_is_gone():
    store = QueueStore(QueueOptions())
    store.add("q", QueueOptions(dead_letter="dead"))
    store.push(("q",), ["a", "b"])
    a, b = lease_all(store, "q")
    assert store.settle("q", [a], "reject") == 1
    with pytest.raises(LeaseNotHeldError):
        store.settle("q", [a], "ack")
    store.settle("q", [b], "nack")
    assert store.pull("q", -1) == ["b"]
    entry, _ = store.outgoing()
    assert entry.items == [DeadLetter("a", "q", "rejected", 1)]


def test_dead_letters_reach_their_queue_once_however_often_they_are_sent():
    source, target = QueueStore(QueueOptions()), QueueStore(QueueOptions())
    source.add("q", QueueOptions(dead_letter="dead"))
    source.push(("q",), [1, 2, 3])
    source.settle("q", lease_all(source, "q"), "reject")
    entry, producer = source.outgoing()
    for _ in range(3):  # a reply lost twice: the same numbers each time
        assert target.push(("dead",), entry.items, producer=producer) == 3
    source.delivered(entry.number)
    assert source.outgoing() is None
    assert target.length("dead") == 3
    # Pulls return the items; dead_letters() tells where each came from and why.
    assert target.dead_letters("dead", -1) == [DeadLetter(i, "q", "rejected", 1) for i in (1, 2, 3)]
    leased = target.pull("dead", 1, ack=True)
    assert [(item, earlier) for _, item, earlier in leased] == [(1, 0)]  # counted afresh
    assert target.pull("dead", -1) == [2, 3]


def test_a_refused_entry_goes_again_under_a_new_number():
    source, target = QueueStore(QueueOptions()), QueueStore(QueueOptions())
    source.add("q", QueueOptions(dead_letter="dead"))
    target.add("dead", QueueOptions(maxsize=1))
    target.push(("dead",), ["filler"])
    source.push(("q",), ["x"])
    source.settle("q", lease_all(source, "q"), "reject")
    entry, producer = source.outgoing()
    with pytest.raises(Exception, match="full"):
        target.push(("dead",), entry.items, producer=producer)
    target.refuse(producer, RuntimeError("full"))  # as the engine keeps a refusal
    source.renumber(entry.number)
    target.pull("dead", 1)
    send_outbox(source, target)
    assert target.pull("dead", -1) == ["x"]


def test_the_outbox_survives_a_restart_and_its_producer_with_it(tmp_path):
    def open_store():
        store = QueueStore(QueueOptions(), journal=Journal(tmp_path, "never"))
        store.restore()
        return store

    store = open_store()
    store.add("q", QueueOptions(max_deliveries=1, dead_letter="dead"))
    store.push(("q",), ["a", "b"])
    store.settle("q", lease_all(store, "q"), "nack")
    first, producer = store.outgoing()
    store.renumber(first.number)
    expected = store.outgoing()
    assert expected[1] != producer
    store.close()
    restored = open_store()
    assert restored.outgoing() == expected
    restored.delivered(first.number)
    restored.close()
    assert open_store().outgoing() is None


def test_bad_options_are_refused_and_change_nothing():
    store = QueueStore(QueueOptions())
    for bad in ({"max_deliveries": 0}, {"max_deliveries": -1}, {"dead_letter": ""}):
        with pytest.raises(ValueError):
            QueueOptions(**bad)
    for bad in ({"max_deliveries": 1.5}, {"max_deliveries": True}, {"dead_letter": 7}):
        with pytest.raises(TypeError):
            QueueOptions(**bad)
    with pytest.raises(ValueError, match="its own dead-letter queue"):
        store.add("q", QueueOptions(dead_letter="q"))
    assert store.names() == []


def test_the_default_dead_letter_queue_made_by_a_push_has_none_of_its_own():
    store = QueueStore(QueueOptions(max_deliveries=1, dead_letter="dead"))
    store.push(("dead",), ["x"])
    assert store.describe("dead")["dead_letter"] is None


def test_each_store_s_outbox_sends_as_a_producer_of_its_own():
    """Two shards' dead letters to one queue must never be taken for each other's."""
    stores = [QueueStore(QueueOptions(), wall_clock=lambda: 100.0) for _ in range(2)]
    stores[0].add("q", QueueOptions(dead_letter="dead"))
    stores[0].push(("q",), ["rejected"])
    stores[0].settle("q", lease_all(stores[0], "q"), "reject")
    stores[1].add("q", QueueOptions(dead_letter="dead", ttl=1))
    stores[1].push(("q",), ["expired"])
    stores[1].expire_items(now=101.0)
    producers = [store.outgoing()[1] for store in stores]
    assert None not in (producers[0][0], producers[1][0])
    assert producers[0][0] != producers[1][0]
    target = QueueStore(QueueOptions())
    for store in stores:
        send_outbox(store, target)
    assert target.pull("dead", -1) == ["rejected", "expired"]


# -- what a hostile review found (2026-12-04) -------------------------------------------

def restored_copy(directory, store):
    """The store that directory's journal restores (`store` closes it first: one journal,
    one writer), and `store`'s picture beside it."""
    from tests.test_journal import picture

    written = picture(store)
    store.close()
    again = QueueStore(QueueOptions(), journal=Journal(directory, "never"))
    again.restore()
    return picture(again), written


def test_a_delayed_push_that_falls_due_behind_a_waiting_push_replays_the_same(tmp_path):
    store = QueueStore(QueueOptions(), journal=Journal(tmp_path, "never"))
    store.restore()  # opens its log
    store.add("q", QueueOptions(maxsize=5, overflow="block"))
    store.push(("q",), [1, 2, 3])
    store.push(("q",), ["x", "y", "z"], block=True, timeout=60)  # waits: in no journal
    store.push(("q",), ["late"], delay=1)
    store.fall_due(now=store.wall_clock() + 2)  # in line behind the waiting push
    store.pull("q", 3)
    assert store.stats()["bytes"] == sum(q["bytes"] for q in store.stats()["per_queue"].values())
    restored, written = restored_copy(tmp_path, store)
    assert restored[0]["q"][1] == written[0]["q"][1]  # the same items, in the same order


def test_an_admitted_push_keeps_its_time_to_live_on_replay(tmp_path):
    store = QueueStore(QueueOptions(), journal=Journal(tmp_path, "never"))
    store.restore()  # opens its log
    store.add("q", QueueOptions(maxsize=1, overflow="block", ttl=10))
    store.push(("q",), ["a"])
    store.push(("q",), ["b"])  # waits in line, acknowledged
    assert store.pull("q", 1) == ["a"]  # "b" goes in
    store.close()
    again = QueueStore(QueueOptions(), journal=Journal(tmp_path, "never"))
    again.restore()
    later = store.wall_clock() + 11
    assert again.expire_items(now=later) == ["q"] and again.length("q") == 0


def test_every_waiting_entry_takes_a_number_above_a_refused_one(tmp_path):
    store = QueueStore(QueueOptions(), journal=Journal(tmp_path, "never"))
    store.restore()  # opens its log
    store.add("q", QueueOptions(dead_letter="dead"))
    store.push(("q",), [1, 2])
    for lease in lease_all(store, "q"):  # two outbox entries
        store.settle("q", [lease], "reject")
    numbers = [entry.sequence for entry in store.outbox.values()]
    assert len(numbers) == 2
    first, _ = store.outgoing()
    store.renumber(first.number)
    renumbered = [e.sequence for e in store.outbox.values()]
    assert min(renumbered) > max(numbers) and renumbered == sorted(renumbered)
    assert all(e.position == store.position for e in store.outbox.values())  # sent once committed
    restored, written = restored_copy(tmp_path, store)
    assert restored[2] == written[2]


def test_a_priority_item_that_expires_after_coming_back_keeps_its_deliveries():
    store = QueueStore(QueueOptions(), wall_clock=lambda: 100.0)
    store.add("q", QueueOptions(kind="priority", dead_letter="dead", ttl=5))
    store.push(("q",), ["x"])
    for _ in range(2):
        store.settle("q", lease_all(store, "q"), "nack")
    store.expire_items(now=106.0)
    entry, _ = store.outgoing()
    assert entry.items == [DeadLetter("x", "q", "expired", 2)]


@pytest.mark.parametrize("kind", ["fifo", "lifo", "priority"])
def test_items_taken_leave_no_expiry_entries_behind(kind):
    store = QueueStore(QueueOptions())
    store.add("q", QueueOptions(kind=kind, ttl=3600))
    for item in range(2000):
        store.push(("q",), [item])
        store.pull("q", 1)
    queue = store._queues["q"]
    assert len(queue._expiries) + len(queue._span_expiries) < 200


def test_an_entry_too_large_for_its_queue_goes_item_by_item_and_an_item_that_never_fits_is_dropped(
        tmp_path):
    source = QueueStore(QueueOptions(), journal=Journal(tmp_path, "never"))
    source.restore()
    target = QueueStore(QueueOptions())
    source.add("q", QueueOptions(dead_letter="dead"))
    target.add("dead", QueueOptions(maxsize=2, max_bytes=1000))
    source.push(("q",), [1, "x" * 2000, 3])
    source.settle("q", lease_all(source, "q"), "reject")  # one entry of 3: can never fit
    entry, producer = source.outgoing()
    with pytest.raises(ValueError, match="never fit"):
        target.push(("dead",), entry.items, producer=producer)
    source.never_fits(entry.number, "3 items can never fit")
    assert [len(entry.items) for entry in source.outbox.values()] == [1, 1, 1]
    for _ in range(3):
        entry, producer = source.outgoing()
        try:
            target.push(("dead",), entry.items, producer=producer)
            source.delivered(entry.number)
        except ValueError as error:  # the 2,000-byte item, alone
            source.never_fits(entry.number, str(error))
    assert source.outgoing() is None and source.stats()["undeliverable"] == 1
    assert target.pull("dead", -1) == [1, 3]
    restored, written = restored_copy(tmp_path, source)
    assert restored[2:] == written[2:]


def test_a_move_is_never_sent_again_on_its_own_after_a_lost_reply():
    """A pipeline resends what a restarted shard may have applied only if that is safe:
    a move applied twice would move twice the items."""
    from pype import protocol

    assert not protocol.retriable(protocol.Move("src", "dst", 5))
    assert protocol.retriable(protocol.DeadLetters("dead"))
    assert not protocol.retriable(protocol.Settle("q", [1], "extend", 10.0))


@pytest.mark.parametrize("seed", range(4))
def test_a_backup_applying_its_primary_s_records_holds_the_same_item_lives(seed):
    """What a failover promotes: every clock-driven change (expiry, falling due, leases
    running out, give-ups, the outbox) reaches the backup as the primary made it."""
    import pickle
    import random

    from tests.test_journal import DEFAULTS, picture, random_operations

    primary, backup = QueueStore(DEFAULTS), QueueStore(DEFAULTS)
    shipped = []
    primary.replicate = lambda position, record: shipped.append(
        pickle.loads(pickle.dumps(record)))  # as the wire carries it
    rng = random.Random(seed)
    random_operations(primary, rng, 300)
    primary.expire_leases(now=primary.wall_clock() + 3600)
    random_operations(primary, rng, 100)
    backup.apply_replicated(shipped)
    assert picture(backup) == picture(primary)
    assert backup.stats()["bytes"] == primary.stats()["bytes"]
