"""Delayed delivery with a real Ray: a delayed push enters its queue when it is due,
as if pushed then, and never before; nack with a delay and extend_lease move a
lease's end; delayed items survive a shard's SIGKILL."""

import math
import time

import pytest
import ray

import pype
from tests.events import until
from tests.test_reliability import durable, kill_shard, until_restarted


def test_a_delayed_item_enters_when_due_and_wakes_a_waiting_pull(api, names):
    q = names()
    pushed = time.time()
    assert api.push("later", q, delay=0.3) == 1
    assert api.pull(q, -1) == [] and api.queue_len(q) == 0
    assert api.pull(q, block=True, timeout=60) == ["later"]  # the shard's timer wakes it
    assert time.time() >= pushed + 0.3


def test_an_item_not_yet_due_never_holds_back_one_that_is(api, names):
    q = names()
    api.push("in an hour", q, delay=3600)
    api.push(["now", "soon"], q, expand=True)
    assert api.pull(q, -1) == ["now", "soon"]
    api.push([1, 2, 3], q, expand=True, delay=0.4)
    api.push(4, q, delay=0.2)  # due first: it enters first
    assert api.pull(q, 1, block=True, timeout=60) == [4]
    assert api.pull(q, 3, block=True, timeout=60) == [1, 2, 3]


def test_delayed_items_wait_beside_the_queue_not_in_it(server, names):
    q = names()
    server.add(q, maxsize=2)
    server.push("in", q)
    assert server.push(["a", "b"], q, expand=True, delay=0.2) == 2  # accepted: no room needed
    stats = ray.get(server.stats.remote())["queues"][q]
    assert (stats["depth"], stats["delayed"]) == (1, 2)
    # Due, they find no room: they wait in the queue's line, accepted, and enter as it empties.
    until(lambda: ray.get(server.stats.remote())["queues"][q]["waiting_producers"] == 1,
          "the delayed push to fall due")
    assert server.queue_len(q) == 1
    assert server.pull(q) == ["in"]
    assert server.pull(q, -1) == ["a", "b"]


def test_a_nack_with_a_delay_returns_the_item_when_it_ends(api, names):
    q = names()
    api.push("retry me", q)
    [(lease, _, _)] = api.pull(q, ack=True)
    handed_back = time.time()
    assert api.nack(q, lease, delay=0.3) == 1
    with pytest.raises(pype.LeaseNotHeldError):
        api.ack(q, lease)  # handed back: nobody holds it now
    assert api.pull(q) == []
    [(_, item, earlier)] = api.pull(q, ack=True, block=True, timeout=60)
    assert (item, earlier) == ("retry me", 1) and time.time() >= handed_back + 0.3


def test_extend_lease_keeps_an_item_leased_past_its_visibility_timeout(api, names):
    q = names()
    api.add(q, visibility_timeout=0.3)
    api.push(["slow", "fast"], q, expand=True)
    slow, fast = (lease for lease, _, _ in api.pull(q, 2, ack=True))
    assert api.extend_lease(q, slow, 3600) == 1
    back = api.pull(q, ack=True, block=True, timeout=60)  # "fast"'s lease ran out
    assert [item for _, item, _ in back] == ["fast"]
    assert api.pull(q, -1) == []  # "slow" is still leased
    assert api.ack(q, slow) == 1
    with pytest.raises(pype.LeaseNotHeldError):
        api.extend_lease(q, fast, 10)


def test_delayed_items_survive_a_shard_kill_and_come_out_at_their_time(
        fresh_server, names, tmp_path):
    server = fresh_server(**durable(tmp_path))
    q = names()
    pushed = time.time()
    server.push(["a", "b"], q, expand=True, delay=3)
    until_restarted(server, q, kill_shard(server, q))
    assert server.pull(q, 2, block=True, timeout=60) == ["a", "b"]
    assert time.time() >= pushed + 3


@pytest.mark.parametrize("delay", [-1, math.inf, math.nan])
def test_a_bad_delay_is_a_clear_error_and_changes_nothing(api, names, delay):
    q = names()
    with pytest.raises(ValueError, match="delay"):
        api.push(1, q, delay=delay)
    with pytest.raises(TypeError, match="delay"):
        api.push(1, q, delay="1")
    with pytest.raises(ValueError, match="block"):
        api.push(1, q, delay=1, block=True)
    api.push(1, q)
    [(lease, _, _)] = api.pull(q, ack=True)
    with pytest.raises(ValueError, match="requeue"):
        api.nack(q, lease, requeue=False, delay=1)
    with pytest.raises(ValueError, match="timeout"):
        api.extend_lease(q, lease, 0)
    assert api.ack(q, lease) == 1
