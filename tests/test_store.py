"""QueueStore: one shard's queues, called by one thread, never waiting (no Ray, no threads).

Waiting (blocking pulls and pushes, can_pull/can_push with a wait, read-your-writes)
is the loop's job: see tests/test_loop.py.
"""

import sys
import time

import pytest

from pype.errors import (
    LeaseNotHeldError,
    QueueExistsError,
    QueueFullError,
    QueueNotFoundError,
    QueueTimeoutError,
    ShardLostError,
)
from pype.options import QueueOptions
from pype.shards.store import PendingPush, QueueStore


@pytest.fixture
def store():
    return QueueStore(QueueOptions())


def test_push_creates_queue_and_pull_takes_in_order(store):
    assert store.push(("q",), [1, 2, 3]) == 3
    assert store.pull("q", 2) == [1, 2]
    assert store.pull("q", -1) == [3]
    assert store.pull("q", 1) == []
    assert store.pull("unknown", 1) == []


def test_non_blocking_push_does_not_jump_the_line_of_parked_producers(store):
    store.add("q", QueueOptions(maxsize=2))
    store.push(("q",), ["a"])
    pending = store.push(("q",), ["b", "c"], block=True)  # needs 2 places, 1 is free
    with pytest.raises(QueueFullError, match="pushes waiting"):
        store.push(("q",), ["jumper"])  # would fit the free place
    assert store.push_outcome(pending, time.monotonic()) is None  # 1 place: not yet
    assert store.pull("q", 1) == ["a"]
    assert store.push_outcome(pending, time.monotonic()) == 2
    assert store.pull("q", -1) == ["b", "c"]


def test_block_policy_queues_keep_every_push_in_line(store):
    store.add("q", QueueOptions(maxsize=1, overflow="block"))
    assert store.push(("q",), [1]) == 1
    assert store.push(("q",), [2]) == 1  # no room: accepted into the line, not refused
    assert store.push(("q",), [3]) == 1
    assert store.length("q") == 1
    assert not store.can_push("q")
    assert [store.pull("q", 1) for _ in range(4)] == [[1], [2], [3], []]
    assert store.can_push("q")


def test_blocking_push_times_out_and_is_not_accepted(store):
    store.add("q", QueueOptions(maxsize=1))
    store.push(("q",), ["a"])
    pending = store.push(("q",), ["late"], block=True, timeout=0.1)
    assert store.push_outcome(pending, time.monotonic()) is None
    with pytest.raises(QueueTimeoutError, match="'q'"):
        store.push_outcome(pending, pending.deadline)  # at its deadline the part is withdrawn
    assert store.pull("q", -1) == ["a"]
    assert store.can_push("q")


def test_fan_out_push_names_the_full_queue_and_keeps_the_others(store):
    store.add("full", QueueOptions(maxsize=1))
    store.push(("full",), [0])
    with pytest.raises(QueueFullError, match="'full'.*other 1 queues"):
        store.push(("full", "open"), ["x"])
    assert store.pull("open", 1) == ["x"]
    assert store.pull("full", 1) == [0]


def test_priority_on_a_non_priority_queue_is_an_error(store):
    with pytest.raises(ValueError, match="priority"):
        store.push(("fifo",), [1], priority=3)
    assert store.length("fifo") == 0


def test_add_remove_and_stats(store):
    assert store.add("q", QueueOptions(kind="lifo"))
    with pytest.raises(QueueExistsError):
        store.add("q", QueueOptions())
    assert store.add("q", QueueOptions(), exist_ok=True) is False
    store.push(("q",), [1, 2, 3])
    assert store.pull("q", 1) == [3]
    assert "lifo, 2 items): [2, 1]" in store.render("q")
    stats = store.stats()
    assert stats["per_queue"]["q"] == {
        "kind": "lifo", "depth": 2, "maxsize": 0, "bytes": 2 * sys.getsizeof(1), "max_bytes": 0,
        "leased": 0, "pushed": 3, "pulled": 1, "dropped": 0, "acked": 0, "redelivered": 0,
        "dead_lettered": 0, "dead_dropped": 0, "expired": 0, "delayed": 0, "waiting_producers": 0}
    assert stats["bytes"] == 2 * sys.getsizeof(1)
    assert store.remove("q") == 2
    with pytest.raises(QueueNotFoundError):
        store.remove("q")
    assert store.stats()["discarded"] == 2
    assert store.stats()["pushed"] == 3


# -- leases ---------------------------------------------------------------------------

def test_leased_items_come_back_on_nack_and_on_expiry_in_their_order(store):
    store.push(("q",), list(range(6)))
    first = store.pull("q", 2, ack=True)
    second = store.pull("q", 2, ack=True)
    assert [item for _, item, _ in first + second] == [0, 1, 2, 3]
    assert store.length("q") == 2 and store.stats()["leased"] == 4
    assert store.settle("q", [lease for lease, _, _ in second], outcome="nack") == 2
    assert store.expire_leases(now=time.time() + 31) == ["q"]  # the default visibility_timeout is 30 s
    assert store.pull("q", -1) == [0, 1, 2, 3, 4, 5]
    counters = store.stats()["per_queue"]["q"]
    assert counters["redelivered"] == 4 and counters["leased"] == 0 and counters["bytes"] == 0


def test_acked_items_are_gone_and_stale_lease_ids_are_a_clear_error(store):
    store.push(("q",), ["a", "b"])
    (lease_a, _, _), (lease_b, _, _) = store.pull("q", 2, ack=True)
    assert store.settle("q", [lease_a], outcome="ack") == 1
    store.expire_leases(now=time.time() + 60)  # b's lease ends: b goes back
    [(lease_b_again, item, redelivered)] = store.pull("q", -1, ack=True)
    assert item == "b" and redelivered
    assert store.settle("q", [lease_a], outcome="ack") == 0  # acked before: harmless, as SQS's
    with pytest.raises(LeaseNotHeldError, match=r"1 of 3 lease ids are not held.*other 2 were acked"):
        store.settle("q", [lease_a, lease_b, lease_b_again], outcome="ack")
    with pytest.raises(LeaseNotHeldError, match=r"1 of 1 lease ids are not held"):
        store.settle("q", [lease_a], outcome="nack")  # an acked item cannot be returned
    assert store.pull("q", -1) == []
    assert store.stats()["per_queue"]["q"]["acked"] == 2


# -- limits ---------------------------------------------------------------------------

def test_max_bytes_bounds_a_queue_like_maxsize(store):
    store.add("q", QueueOptions(max_bytes=3000))
    store.push(("q",), [b"x" * 1000, b"y" * 1000])
    with pytest.raises(QueueFullError, match="of 3000 bytes"):
        store.push(("q",), [b"z" * 1000])
    with pytest.raises(ValueError, match="can never fit"):
        store.push(("q",), [b"z" * 4000])
    store.pull("q", 1)
    assert store.push(("q",), [b"z" * 1000]) == 1


def test_memory_budget_and_max_item_size_refuse_a_push_and_change_nothing():
    store = QueueStore(QueueOptions(), memory_budget=10_000, max_item_bytes=6_000)
    store.push(("a",), [b"x" * 5000])
    with pytest.raises(ValueError, match="larger than the shard's max_item_bytes"):
        store.push(("b",), [b"x" * 7000])
    with pytest.raises(QueueFullError, match="memory budget is spent"):
        store.push(("b",), [b"x" * 3000, b"x" * 3000])
    assert store.length("b") == 0
    store.pull("a", 1)
    assert store.push(("b",), [b"x" * 3000, b"x" * 3000]) == 2
    assert store.stats()["bytes"] == store.stats()["per_queue"]["b"]["bytes"] > 6000


# -- parked pushes and exactly-once pushes ------------------------------------------------

def test_a_parked_push_is_done_when_admitted_or_its_queue_is_removed(store):
    store.add("q", QueueOptions(maxsize=1))
    store.push(("q",), ["a"])
    pending = store.push(("q",), ["b"], block=True)
    assert isinstance(pending, PendingPush) and pending.deadline is None
    assert store.push_outcome(pending, time.monotonic()) is None
    assert store.remove("q") == 1
    with pytest.raises(QueueNotFoundError, match="removed while the push waited"):
        store.push_outcome(pending, time.monotonic())


def test_a_parked_push_the_store_never_issued_was_lost_in_a_restart(store):
    with pytest.raises(ShardLostError, match="restarted while this push waited"):
        store.push_outcome(PendingPush(accepted=0, tickets={"q": 12345}), time.monotonic())


def test_a_producer_sequence_number_is_applied_once(store):
    assert store.push(("q",), ["a"], producer=(7, 1)) == 1
    assert store.push(("q",), ["a"], producer=(7, 1)) == 1   # sent again after a restart
    assert store.push(("q",), ["b"], producer=(7, 2)) == 1
    assert store.push(("q",), ["a"], producer=(7, 1)) == 1   # an older one, also seen
    assert store.push(("q",), ["c"], producer=(8, 1)) == 1   # another producer's own numbers
    assert store.pull("q", -1) == ["a", "b", "c"]
