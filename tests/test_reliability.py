"""Fault injection with a real Ray: killed consumers and shards, persistence, limits, isolation."""

import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import ray

import pype
from pype.errors import ConfigError
from tests.events import until


def shard_pid(server, queue):
    """The pid of the shard of `queue`; None while it cannot be reached (restarting)."""
    stats = ray.get(server.stats.remote())
    return stats["shards"][server.shard_of(queue)].get("pid")


def kill_shard(server, queue):
    """SIGKILL the process of the shard that owns `queue`; Ray restarts it."""
    pid = shard_pid(server, queue)
    os.kill(pid, signal.SIGKILL)
    return pid


def until_restarted(server, queue, old_pid):
    """Wait until the shard of `queue` answers from a new process."""
    def restarted():
        return shard_pid(server, queue) not in (None, old_pid)
    until(restarted, "the shard to come back", interval=0.2)


def durable(tmp_path, **options):
    return {"persistence": {"dir": str(tmp_path), "fsync": "always"}, "shards": 1, **options}


# -- at-least-once delivery ------------------------------------------------------------

def test_ack_nack_and_what_a_pull_with_ack_returns(api, names):
    q = names()
    api.push(list(range(5)), q, expand=True)
    leased = api.pull(q, 3, ack=True)
    assert [item for _, item, _ in leased] == [0, 1, 2]
    assert api.queue_len(q) == 2
    assert api.nack(q, [leased[1][0], leased[2][0]]) == 2
    assert api.ack(q, leased[0][0]) == 1
    assert api.pull(q, -1) == [1, 2, 3, 4]
    assert api.ack(q, [leased[0][0]]) == 0  # acked before: a resent ack is harmless
    with pytest.raises(pype.LeaseNotHeldError, match="not held"):
        api.nack(q, [leased[0][0]])  # but an acked item cannot come back
    with pytest.raises(TypeError, match="lease_ids"):
        api.ack(q, ["x"])
    with pytest.raises(ValueError, match="ack=True"):
        api.pull(q, ack=True, remove=False)


def test_a_consumer_killed_mid_lease_loses_nothing(server, names):
    q = names()
    ray.get(server.add.remote(q, visibility_timeout=1.0))
    ray.get(server.push.remote(list(range(10)), q, expand=True))

    @ray.remote(num_cpus=0)
    class Consumer:
        def take(self, server, q):
            return [item for _, item, _ in ray.get(server.pull.remote(q, 4, ack=True))]

    doomed = Consumer.remote()
    assert ray.get(doomed.take.remote(server, q)) == [0, 1, 2, 3]
    ray.kill(doomed)  # dies holding the lease
    assert ray.get(server.pull.remote(q, -1, ack=True))[0][1] == 4  # the rest, not yet the leased
    # Both leases expire after 1 s; this pull waits, in the shard, until all 10 are back.
    back = ray.get(server.pull.remote(q, 10, ack=True, block=True, timeout=60))
    assert [item for _, item, _ in back] == [0, 1, 2, 3, *range(4, 10)]  # original order, at the head
    assert all(redelivered for _, _, redelivered in back)
    assert ray.get(server.stats.remote())["queues"][q]["redelivered"] == 10


# -- shard failures ------------------------------------------------------------------------

def test_a_killed_shard_restores_acknowledged_pushes_and_leases(fresh_server, names, tmp_path):
    server = fresh_server(**durable(tmp_path))
    q, other = names(), names("other")
    ray.get(server.add.remote(q, kind="priority", maxsize=100))
    ray.get(server.push.remote([3, 1, 2], q, expand=True, priority=5))
    ray.get(server.push.remote("urgent", q, priority=0))
    ray.get(server.push.remote(np.arange(1_000_000), other))  # large: by value into the log
    leased = ray.get(server.pull.remote(q, 2, ack=True))
    assert [item for _, item, _ in leased] == ["urgent", 3]
    until_restarted(server, q, kill_shard(server, q))
    assert ray.get(server.pull.remote(q, -1)) == [1, 2]  # the leased items are still leased
    assert ray.get(server.ack.remote(q, [leased[0][0]])) == 1
    assert ray.get(server.nack.remote(q, [leased[1][0]])) == 1
    assert ray.get(server.pull.remote(q, -1)) == [3]
    np.testing.assert_array_equal(ray.get(server.pull.remote(other))[0], np.arange(1_000_000))
    shard = ray.get(server.stats.remote())["shards"][0]
    assert shard["restarted"] and shard["lost_queues"] == []


def test_no_acknowledged_push_is_lost_when_a_shard_is_killed_at_a_random_moment(
        fresh_server, names, tmp_path):
    server = fresh_server(**durable(tmp_path))
    q = names()
    acknowledged, unsure, stop = [], [], threading.Event()

    def produce():
        n = 0
        while not stop.is_set():
            batch = list(range(n, n + 10))
            n += 10
            try:
                ray.get(server.push.remote(batch, q, expand=True))
                acknowledged.extend(batch)
            except ray.exceptions.RayActorError:
                unsure.extend(batch)  # may or may not have been applied: Ray's own contract

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        for _ in range(2):
            time.sleep(random.uniform(0.3, 1.0))  # a random moment of the producer's run
            until_restarted(server, q, kill_shard(server, q))
            pushed = len(acknowledged)
            until(lambda n=pushed: len(acknowledged) > n + 10, "pushes to the restarted shard")
    finally:
        stop.set()
        producer.join(60)
    drained = ray.get(server.pull.remote(q, -1))
    assert len(acknowledged) > 100
    assert set(acknowledged) <= set(drained), "an acknowledged push was lost"
    assert len(drained) == len(set(drained)), "an item arrived twice"
    assert set(drained) - set(acknowledged) <= set(unsure)
    assert drained == sorted(drained), "the producer's order was broken"


def test_native_pushes_are_applied_exactly_once_across_shard_kills(fresh_server, names, tmp_path):
    """The client sends again what a killed shard never answered; the shard drops repeats."""
    server = fresh_server(**durable(tmp_path))
    q = names()
    acknowledged, stop = [], threading.Event()

    def produce():
        n = 0
        while not stop.is_set():
            batch = list(range(n, n + 10))
            n += 10
            assert server.push(batch, q, expand=True) == 10  # never a "may or may not" here
            acknowledged.extend(batch)

    producer = ThreadPoolExecutor(max_workers=1).submit(produce)
    try:
        for _ in range(3):
            time.sleep(random.uniform(0.2, 0.8))  # a random moment of the producer's run
            until_restarted(server, q, kill_shard(server, q))
            pushed = len(acknowledged)
            until(lambda n=pushed: len(acknowledged) > n + 10, "pushes to the restarted shard")
    finally:
        stop.set()
        producer.result(timeout=120)
    drained = server.pull(q, batch_size=-1)
    assert drained == acknowledged, "lost, duplicated or reordered across the restarts"


def test_a_native_call_in_flight_when_its_shard_dies(fresh_server, names, tmp_path):
    """A parked plain pull cannot be sent again (its items could vanish unseen): it fails
    clearly. A parked leasing pull can, and is answered by the restarted shard."""
    server = fresh_server(**durable(tmp_path))
    q, leased = names(), names("leased")
    background = ThreadPoolExecutor(max_workers=2)
    plain = background.submit(server.pull, q, block=True, timeout=120)
    leasing = background.submit(server.pull, leased, block=True, timeout=120, ack=True)
    until(lambda: ray.get(server.stats.remote())["shards"][0]["waiting_calls"] == 2,
          "both pulls to wait in the shard")
    until_restarted(server, q, kill_shard(server, q))
    with pytest.raises(pype.ShardRestartedError, match="may or may not have been applied"):
        plain.result(timeout=120)
    server.push("item", leased)
    [(_, item, _)] = leasing.result(timeout=120)
    assert item == "item"


def test_a_refusal_that_came_before_a_shard_restart_stays_a_refusal(fresh_server, names, tmp_path):
    """A push refused (its queue full) whose answer came, unread, before its shard died
    is not sent again: the restarted shard's exactly-once check, which a later push of
    the same pipeline passed, would answer that it was applied, and the item be lost."""
    from pype.protocol import Length, Pull, Push

    server = fresh_server(**durable(tmp_path))
    q = names()
    server.add(q, maxsize=1)
    server.push(0, q)
    routes, pipeline = server.routes, server.routes.new_pipeline()
    refused = routes.send(Push((q,), [1]), pipeline, 0)  # the queue is full
    pulled = routes.send(Pull(q), pipeline, 0)
    applied = routes.send(Push((q,), [2]), pipeline, 0)
    pipeline.result(applied)  # the two answers before it are read and kept
    until_restarted(server, q, kill_shard(server, q))
    assert pipeline.result(routes.send(Length(q), pipeline, 0)) == 1  # finds the break
    with pytest.raises(pype.QueueFullError):
        pipeline.result(refused)
    assert pipeline.result(pulled) == [0]
    assert server.pull(q, -1) == [2]


def connected(server, queue) -> bool:
    """True once a native call reached the shard of `queue` (its first one looks up where
    the shard listens, within request_timeout)."""
    try:
        return server.queue_len(queue) >= 0
    except pype.ShardUnavailableError:
        return False


def test_a_native_call_to_a_shard_that_is_gone_fails_in_bounded_time(fresh_server, names):
    server = fresh_server(shards=1, shard={"max_restarts": 0}, transport={"request_timeout": 3})
    q = names()
    ray.get(server.push.remote(1, q))  # the shard is up (no 3 s bound on a loaded machine)
    until(lambda: connected(server, q), "the first native call to reach the shard")
    kill_shard(server, q)
    started = time.monotonic()
    with pytest.raises(pype.ShardUnavailableError, match="shard 0"):
        server.pull(q)
    assert time.monotonic() - started < 60


def test_a_blocking_call_over_tcp_to_a_shard_that_stopped_answering_fails(fresh_server, names):
    """The connection stays open (the process is stopped, as a machine that died sends no
    FIN): heartbeats find it out, even for a pull that would wait forever."""
    server = fresh_server(shards=1, transport={"local": "tcp", "request_timeout": 3})
    q, empty = names(), names("empty")
    ray.get(server.push.remote(1, q))
    until(lambda: connected(server, q), "the first native call to reach the shard")
    assert server.pull(q) == [1]
    pid = shard_pid(server, q)
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(pype.ShardUnavailableError, match="shard 0"):
            server.pull(empty, block=True, timeout=None)
    finally:
        os.kill(pid, signal.SIGCONT)
    until(lambda: connected(server, q), "the shard to answer again")
    server.push("back", q)
    assert server.pull(q) == ["back"]


def test_a_killed_router_restarts_and_carries_on_with_the_same_shards(fresh_server, names):
    """Ray restarts the router; it carries on from its record in the keeper: the same
    shards (no second set), their items and leases, and resizes still work."""
    server = fresh_server(shards=2)
    queues = [names(f"q{i}") for i in range(8)]
    for q in queues:
        server.push([1, 2, 3], q, expand=True)
    [(lease, item, _)] = server.pull(queues[0], 1, ack=True)
    before = server.stats()
    epoch = server.routes.topology.epoch
    os.kill(before["router"]["pid"], signal.SIGKILL)
    after = server.stats()  # Ray holds router calls until the new process answers
    assert after["router"]["pid"] != before["router"]["pid"]
    assert [shard["pid"] for shard in after["shards"]] == [shard["pid"] for shard in before["shards"]]
    assert len(ray.get(server.routes.router.actors.remote())) == 2
    assert ray.get(server.routes.router.topology.remote()).epoch > epoch
    assert server.ack(queues[0], [lease]) == 1 and item == 1
    assert server.pull(queues[0], -1) == [2, 3]
    assert server.resize(3)["shards"] == 3
    for q in queues[1:]:
        assert ray.get(server.pull.remote(q, -1)) == [1, 2, 3]


def test_without_persistence_a_restarted_shard_reports_the_queues_it_lost(fresh_server, names):
    server = fresh_server(shards=1)
    q = names()
    ray.get(server.push.remote([1, 2, 3], q, expand=True))
    until(lambda: q in ray.get(server.routes.router.stats.remote())["reported_queues"].get(0, ()),
          "the shard to report its queue to the router")
    until_restarted(server, q, kill_shard(server, q))
    with pytest.raises(pype.ShardLostError, match=f"queue '{q}' lost its items.*not applied"):
        ray.get(server.pull.remote(q))
    assert ray.get(server.pull.remote(q)) == []  # told once; the queue works again, empty
    assert ray.get(server.push.remote(4, q)) == 1
    stats = ray.get(server.stats.remote())
    assert stats["lost"][0]["queues"] == [q]
    assert stats["shards"][0]["lost_queues"] == [q]


def test_a_blocking_pull_of_a_restarted_shard_does_not_hang(fresh_server, names):
    # The pull carries the caller's read-your-writes number from the old process; the new
    # one has applied nothing of that caller and must not hold the pull behind it (a hang
    # here ends at the suite's timeout). Another queue of the same shard, so that no
    # ShardLostError for the push's queue comes first.
    server = fresh_server(shards=1)
    pushed, pulled = names("pushed"), names("pulled")
    ray.get(server.push.remote(1, pushed))
    until_restarted(server, pushed, kill_shard(server, pushed))
    assert ray.get(server.pull.remote(pulled, block=True, timeout=0.5)) == []


# -- limits and isolation ----------------------------------------------------------------------

def test_limits_are_clear_errors_and_the_server_stays_healthy(fresh_server, names):
    server = fresh_server(shards=1, shard={"memory_budget_mb": 1, "max_item_mb": 0.5})
    q = names()
    with pytest.raises(ValueError, match="max_item_bytes"):
        ray.get(server.push.remote(b"x" * 600_000, q))
    ray.get(server.push.remote([b"x" * 400_000, b"y" * 400_000], q, expand=True))
    with pytest.raises(pype.QueueFullError, match="memory budget"):
        ray.get(server.push.remote(b"z" * 400_000, q))
    small = names("small")
    ray.get(server.add.remote(small, max_bytes=1000))
    ray.get(server.push.remote(["a" * 300, "b" * 300], small, expand=True))
    with pytest.raises(pype.QueueFullError, match="of 1000 bytes"):
        ray.get(server.push.remote("c" * 300, small))
    with pytest.raises(ValueError, match="can never fit"):
        ray.get(server.push.remote(["a" * 300] * 4, small))  # one item: a list of 4 strings
    assert len(ray.get(server.pull.remote(q, -1))) == 2
    assert ray.get(server.push.remote(b"z" * 400_000, q)) == 1


def test_servers_in_different_namespaces_never_see_each_others_queues(ray_session, names):
    name = names("server")
    first = pype.Server.remote(name=name, namespace=names("ns-a"))
    second = pype.Server.remote(name=name, namespace=names("ns-b"))
    try:
        ray.get(first.push.remote("secret", "q"))
        assert ray.get(second.pull.remote("q")) == []
        assert ray.get(second.queues.remote()) == []
        assert ray.get(first.pull.remote("q")) == ["secret"]
    finally:
        first.shutdown()
        second.shutdown()


def test_with_persistence_large_items_survive_their_producers_death(fresh_server, names, tmp_path):
    """Without persistence they do not: see test_payloads (an ItemLostError in their place)."""
    server = fresh_server(**durable(tmp_path))

    @ray.remote(num_cpus=0)
    class Camera:
        def push(self, server, q):
            return ray.get(server.push.remote(np.full(500_000, 7), q))

    q = names()
    camera = Camera.remote()
    assert ray.get(camera.push.remote(server, q)) == 1
    ray.kill(camera)
    with pytest.raises(ray.exceptions.RayActorError):  # returns once the process is gone
        ray.get(camera.push.remote(server, q))
    [item] = ray.get(server.pull.remote(q))
    assert isinstance(item, np.ndarray) and item.sum() == 3_500_000


# -- where journals lie ----------------------------------------------------------------

def test_persistence_dir_is_expanded_on_the_shards_node(ray_session, names):
    """${VAR} in persistence.dir is the shard's node's variable (the test's Ray sets
    PYPE_TEST_DATA), and a named server started again finds its journal there."""
    name, namespace, q = names("server"), names("ns"), names()
    options = {"name": name, "namespace": namespace, "shards": 1,
               "persistence": {"dir": "${PYPE_TEST_DATA}/journals", "fsync": "always"}}
    server = pype.Server.remote(**options)
    try:
        server.push(["kept"], q, expand=True)
    finally:
        server.shutdown()
    data = Path(os.environ["PYPE_TEST_DATA"])
    assert [path.name for path in (data / "journals").glob("*/shard-0")] == ["shard-0"]
    assert not Path("${PYPE_TEST_DATA}").exists()
    again = pype.Server.remote(**options)
    try:
        assert again.pull(q) == ["kept"]
    finally:
        again.shutdown()


def test_an_unset_variable_in_persistence_dir_starts_nothing(ray_session, names):
    name, namespace = names("server"), names("ns")
    with pytest.raises(ConfigError, match=r"PYPE_NOT_SET_ANYWHERE is not set on node .*\d"):
        pype.Server.remote(name=name, namespace=namespace,
                           persistence={"dir": "${PYPE_NOT_SET_ANYWHERE}/pype"})
    with pytest.raises(pype.ServerNotFoundError):
        pype.connect(name, namespace)
