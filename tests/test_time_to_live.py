"""Time to live with a real Ray: an expired item is never delivered; it goes to the
queue's dead-letter queue with the reason "expired", or is dropped and counted."""

import math

import pytest
import ray

from pype import DeadLetter
from tests.events import until


def test_items_expire_by_the_push_s_ttl_or_the_queue_s_whichever_is_shorter(api, names):
    q, dead = names(), names("dead")
    api.add(q, ttl=3600, dead_letter=dead)
    api.push("lives", q)
    api.push(["short", "lived"], q, expand=True, ttl=0.2)
    # They expire while nobody pulls: the shard gives them up on its own.
    assert api.pull(dead, 2, block=True, timeout=60) == ["short", "lived"]
    assert api.pull(q, -1) == ["lives"]


def test_a_queue_s_ttl_counts_from_the_push(api, names):
    q, dead = names(), names("dead")
    api.add(q, ttl=0.2, dead_letter=dead)
    api.push([1, 2, 3], q, expand=True)
    assert api.pull(dead, 3, block=True, timeout=60, remove=False) == [1, 2, 3]
    assert api.dead_letters(dead) == [DeadLetter(i, q, "expired", 0) for i in (1, 2, 3)]
    assert api.queue_len(q) == 0 and api.pull(q, -1) == []


def test_a_leased_item_is_not_taken_back_but_expires_when_it_comes_back(api, names):
    q, dead = names(), names("dead")
    api.add(q, dead_letter=dead)
    api.push(["kept", "returned"], q, expand=True, ttl=0.3)
    kept, returned = (lease for lease, _, _ in api.pull(q, 2, ack=True))
    api.push("witness", q, ttl=0.3)  # pushed after them: expires after them
    assert api.pull(dead, block=True, timeout=60) == ["witness"]
    assert api.ack(q, kept) == 1  # its time passed while it was leased: the ack holds
    assert api.nack(q, returned) == 1  # back in its queue after its time: it expires
    assert api.pull(dead, block=True, timeout=60, remove=False) == ["returned"]
    assert api.dead_letters(dead) == [DeadLetter("returned", q, "expired", 1)]


def test_without_a_dead_letter_queue_expired_items_are_dropped_and_counted(server, names):
    q = names()
    server.push(list(range(5)), q, expand=True, ttl=0.1)
    until(lambda: ray.get(server.stats.remote())["queues"][q]["expired"] == 5,
          "the items to expire")
    assert server.pull(q, -1) == []


@pytest.mark.parametrize("ttl", [0, -1, math.inf, math.nan])
def test_a_bad_ttl_is_a_clear_error_and_changes_nothing(api, names, ttl):
    q = names()
    with pytest.raises(ValueError, match="ttl"):
        api.push(1, q, ttl=ttl)
    with pytest.raises(ValueError, match="ttl"):
        api.add(q, ttl=ttl)
    with pytest.raises(TypeError, match="ttl"):
        api.push(1, q, ttl="1")
    assert q not in api.queues()
