"""Dead letters with a real Ray: given-up items reach their dead-letter queue on any
shard, exactly once, on both paths; a poisoned item whose consumer dies each time
ends there after exactly max_deliveries deliveries."""

import os

import pytest
import ray

import pype
from pype import DeadLetter


def name_on_another_shard(server, names, queue, base):
    """A queue name of this test whose shard is not `queue`'s."""
    for i in range(100):
        name = names(f"{base}{i}")
        if server.shard_of(name) != server.shard_of(queue):
            return name
    raise AssertionError("no name hashed to another shard")


def test_given_up_items_reach_a_dead_letter_queue_on_another_shard(api, server, names):
    q = names()
    dead = name_on_another_shard(server, names, q, "dead")
    api.add(q, max_deliveries=2, dead_letter=dead)
    api.push(["poison", "bad", "good"], q, expand=True)
    first = api.pull(q, -1, ack=True)
    assert [(item, earlier) for _, item, earlier in first] == [("poison", 0), ("bad", 0), ("good", 0)]
    poison, bad, good = (lease for lease, _, _ in first)
    assert api.nack(q, [bad], requeue=False) == 1  # given up at once
    assert api.ack(q, good) == 1
    assert api.nack(q, poison) == 1
    [(poison, item, earlier)] = api.pull(q, -1, ack=True)
    assert (item, earlier) == ("poison", 1)
    assert api.nack(q, poison) == 1  # its second failed delivery: max_deliveries spent
    assert api.pull(q, -1) == []
    # The shard's sender pushes them over; a pull that waits sees them come.
    assert api.pull(dead, 2, block=True, timeout=60, remove=False) == ["bad", "poison"]
    assert api.dead_letters(dead) == [DeadLetter("bad", q, "rejected", 1),
                                      DeadLetter("poison", q, "deliveries", 2)]
    assert api.dead_letters(dead, 1) == [DeadLetter("bad", q, "rejected", 1)]
    stats = ray.get(server.stats.remote())
    assert stats["queues"][q]["dead_lettered"] == 2
    assert stats["queues"][dead]["pushed"] == 2  # once each
    assert api.pull(dead, -1) == ["bad", "poison"]


def test_without_a_dead_letter_queue_given_up_items_are_dropped_and_counted(api, server, names):
    q = names()
    api.add(q, max_deliveries=1)
    api.push("x", q)
    [(lease, _, _)] = api.pull(q, ack=True)
    api.nack(q, lease)
    assert api.pull(q, -1) == []
    assert ray.get(server.stats.remote())["queues"][q]["dead_dropped"] == 1


def test_bad_dead_letter_options_are_clear_errors_and_change_nothing(api, names):
    q = names()
    with pytest.raises(ValueError, match="own dead-letter queue"):
        api.add(q, dead_letter=q)
    with pytest.raises(ValueError, match="max_deliveries"):
        api.add(q, max_deliveries=0)
    with pytest.raises(TypeError, match="max_deliveries"):
        api.add(q, max_deliveries=2.5)
    with pytest.raises(ValueError, match="name"):
        api.add(q, dead_letter="")
    assert q not in api.queues()
    api.push(1, q)
    [(lease, _, _)] = api.pull(q, ack=True)
    api.ack(q, lease)
    with pytest.raises(pype.LeaseNotHeldError):
        api.nack(q, lease, requeue=False)


@ray.remote(num_cpus=0, max_retries=0)
def consume_and_die(server, q, seen):
    """A consumer that crashes while it holds its lease (after telling how often the item
    was delivered before)."""
    [(_, item, earlier)] = server.pull(q, ack=True, block=True, timeout=60)
    server.push((item, earlier), seen)
    os._exit(1)


def test_a_poisoned_item_ends_in_the_dead_letter_queue_after_exactly_k_deliveries(
        server, names):
    q, seen = names(), names("seen")
    dead = name_on_another_shard(server, names, q, "dead")
    server.add(q, max_deliveries=3, dead_letter=dead, visibility_timeout=0.5)
    server.push("poison", q)
    for delivery in range(3):
        with pytest.raises(ray.exceptions.WorkerCrashedError):
            ray.get(consume_and_die.remote(server, q, seen))
        assert server.pull(seen, block=True, timeout=60) == [("poison", delivery)]
    # The third lease expires: the item is given up, not delivered a fourth time.
    assert server.pull(dead, ack=False, block=True, timeout=60, remove=False) == ["poison"]
    assert server.dead_letters(dead) == [DeadLetter("poison", q, "deliveries", 3)]
    assert server.pull(q, -1) == [] and server.queue_len(q) == 0


def test_a_partitioned_queue_dead_letters_from_every_partition(server, names):
    q, dead = names(), names("dead")
    server.add(q, partitions=4, max_deliveries=1, dead_letter=dead)
    server.push(list(range(20)), q, expand=True)
    leased = []
    while len(leased) < 20:
        leased += server.pull(q, -1, ack=True)
    server.nack(q, [lease for lease, _, _ in leased])
    assert sorted(server.pull(dead, 20, block=True, timeout=60, remove=False)) == list(range(20))
    assert {letter.queue for letter in server.dead_letters(dead)} == {q}  # not its partitions'
    assert ray.get(server.stats.remote())["queues"][q]["dead_lettered"] == 20  # all partitions'


def name_on_the_same_shard(server, names, queue, base):
    for i in range(100):
        name = names(f"{base}{i}")
        if server.shard_of(name) == server.shard_of(queue):
            return name
    raise AssertionError("no name hashed to the same shard")


def test_a_redrive_moves_dead_letters_back_in_order_and_counts_afresh(api, server, names):
    q = names()
    dead = name_on_another_shard(server, names, q, "dead")
    api.add(q, dead_letter=dead)
    api.push(list(range(5)), q, expand=True)
    api.nack(q, [lease for lease, _, _ in api.pull(q, -1, ack=True)], requeue=False)
    assert api.pull(dead, 5, block=True, timeout=60, remove=False) == list(range(5))
    assert api.move(dead, q) == 5  # across shards: through the outbox, once
    back = api.pull(q, 5, ack=True, block=True, timeout=60)
    assert [(item, earlier) for _, item, earlier in back] == [(i, 0) for i in range(5)]
    assert api.queue_len(dead) == 0
    assert ray.get(server.stats.remote())["queues"][q]["pushed"] == 10  # 5, and 5 once more


def test_a_move_on_one_shard_is_atomic_and_a_full_destination_takes_nothing(api, server, names):
    q = names()
    full = name_on_the_same_shard(server, names, q, "full")
    other = name_on_the_same_shard(server, names, q, "other")
    api.push(list(range(4)), q, expand=True)
    assert api.move(q, other, 3) == 3
    assert api.pull(other, -1) == [0, 1, 2]  # there at once: no waiting
    api.add(full, maxsize=1)
    api.push("x", full)
    with pytest.raises(pype.QueueFullError):
        api.move(q, full)
    assert api.pull(q, -1) == [3]


def test_bad_moves_are_clear_errors_and_change_nothing(api, server, names):
    q, part = names(), names("part")
    api.push(1, q)
    with pytest.raises(ValueError, match="another queue"):
        api.move(q, q)
    with pytest.raises(ValueError, match="count"):
        api.move(q, names("x"), 0)
    with pytest.raises(pype.QueueNotFoundError):
        api.move(names("missing"), q)
    api.add(part, partitions=2)
    with pytest.raises(ValueError, match="partitioned"):
        api.move(part, q)
    assert api.pull(q, -1) == [1]
