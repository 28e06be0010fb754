"""Partitioned queues: one queue over K partitions on several shards (pype.partitions)."""

import os
import signal
import uuid
from collections import Counter, defaultdict

import pytest
import ray
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

import pype
from pype.options import QueueOptions
from pype.partitions import split_name
from tests.events import until
from tests.model import Model

KEYS = ["a", "b", "c", "d", None]  # None: this process's pinned partition


class PartitionedMachine(RuleBasedStateMachine):
    """A partitioned fifo queue against one model queue per key (per-key FIFO), on both
    paths. Every pull takes as many items as one queue holding them all would (a pull
    visits every partition), each key's items in its model's order, and the queue
    always holds exactly the items the models hold. Items leased twice without an ack,
    or rejected, go to its dead-letter queue, as the models give them up."""

    def __init__(self, server):
        super().__init__()
        self.server = server
        self.queue = f"part-{uuid.uuid4().hex[:8]}"
        self.dead = f"{self.queue}-dead"
        assert server.add(self.queue, partitions=3, max_deliveries=2, dead_letter=self.dead)
        self.models = {key: Model(QueueOptions(max_deliveries=2)) for key in KEYS}
        self.given_up = Counter()  # (item, reason, deliveries) the models gave up
        self.sequence = 0

    def call(self, method, native):
        operation = getattr(self.server, method)
        return operation if native else lambda *a, **k: ray.get(operation.remote(*a, **k))

    def total(self):
        return sum(len(model.entries) for model in self.models.values())

    @rule(key=st.sampled_from(KEYS), count=st.integers(1, 4), native=st.booleans())
    def push(self, key, count, native):
        items = [(key, self.sequence + i) for i in range(count)]
        self.sequence += count
        assert self.call("push", native)(items, self.queue, expand=True, key=key) == count
        self.models[key].insert(items, None)

    def check_taken(self, taken, asked):
        assert len(taken) == (self.total() if asked == -1 else min(asked, self.total()))
        by_key = defaultdict(list)
        for item in taken:
            by_key[item[0]].append(item)
        return by_key

    @rule(batch_size=st.sampled_from([1, 2, 5, -1]), native=st.booleans())
    def pull(self, batch_size, native):
        taken = self.call("pull", native)(self.queue, batch_size)
        for key, items in self.check_taken(taken, batch_size).items():
            assert items == self.models[key].take(len(items))  # per-key order

    @rule(batch_size=st.sampled_from([1, 3, -1]),
          outcome=st.sampled_from(["ack", "nack", "reject"]), native=st.booleans())
    def lease_and_settle(self, batch_size, outcome, native):
        leased = self.call("pull", native)(self.queue, batch_size, ack=True)
        by_key = self.check_taken([item for _, item, _ in leased], batch_size)
        for key, items in by_key.items():
            modelled = self.models[key].lease(len(items), first_id=0)
            assert [(item, again) for _, item, again in leased if item[0] == key] == \
                [(item, again) for _, item, again in modelled]
            missing, given_up = self.models[key].settle([lease for lease, _, _ in modelled],
                                                        outcome)
            assert missing == []
            self.given_up.update(given_up)
        ids = [lease for lease, _, _ in leased]
        if outcome == "ack":
            assert self.call("ack", native)(self.queue, ids) == len(leased)
        else:
            assert self.call("nack", native)(self.queue, ids, requeue=outcome == "nack") == len(leased)
        count = sum(self.given_up.values())
        if count:  # each partition's shard sends them over: wait until all are there
            arrived = self.server.pull(self.dead, count, block=True, timeout=60, remove=False)
            assert len(arrived) == count
        assert Counter((letter.item, letter.reason, letter.deliveries)
                       for letter in self.server.dead_letters(self.dead)) == self.given_up

    @invariant()
    def length_agrees(self):
        assert self.server.queue_len(self.queue) == self.total()

    def teardown(self):
        assert self.server.remove(self.queue) == self.total()
        if self.given_up:
            self.server.remove(self.dead)


def test_a_partitioned_queue_behaves_as_one_queue_with_per_key_order(server):
    run_state_machine_as_test(
        lambda: PartitionedMachine(server),
        settings=settings(max_examples=8, stateful_step_count=25, deadline=None,
                          suppress_health_check=list(HealthCheck)))


def test_stats_queues_and_print_queue_speak_of_the_whole_queue(fresh_server, names, capsys):
    server = fresh_server(shards=3)
    q = names()
    assert server.add(q, partitions=4)
    for key in range(12):
        server.push(key, q, key=key)
    assert server.queues() == [q]
    entry = server.stats()["queues"][q]
    assert entry["depth"] == 12 and entry["pushed"] == 12
    assert [p["partition"] for p in entry["partitions"]] == [0, 1, 2, 3]
    assert sum(p["depth"] for p in entry["partitions"]) == 12
    assert len({p["shard"] for p in entry["partitions"]}) == 3  # spread over every shard
    text = server.print_queue(q)
    assert text.startswith(f"queue {q!r} (fifo, 12 items in 4 partitions)")
    assert text in capsys.readouterr().out
    assert server.remove(q) == 12
    assert server.queues() == []
    assert all(split_name(name)[1] is None for name in server.stats()["queues"])


def test_a_blocking_pull_wakes_for_an_item_in_any_partition(api, names):
    q = names()
    api.add(q, partitions=4)
    for key in ["w", "x", "y", "z"]:  # land in several partitions, one at a time
        waiting = api.start("pull", q, block=True, timeout=60)
        api.push(key, q, key=key)
        assert waiting() == [key]
    assert api.pull(q, block=True, timeout=0.2) == []  # a timeout with nothing: []


def test_a_batch_gathers_across_partitions(api, names):
    q = names()
    api.add(q, kind="batch", batch_size=6, batch_timeout=30, partitions=3)
    waiting = api.start("pull", q)  # a batch queue's pull waits for batch_size items
    for key in range(6):
        api.push(key, q, key=key)
    assert sorted(waiting()) == list(range(6))


@ray.remote(num_cpus=0)
class Producer:
    """A producer process of its own (tasks may share a worker process, and so a pin)."""

    def produce(self, server, queue, producer, count):
        for sequence in range(count):
            server.push((producer, sequence), queue)
        return producer


@ray.remote(num_cpus=0)
def consume(server, queue, native):
    got = []
    while True:
        if native:
            items = server.pull(queue, 10, block=True, timeout=5)
        else:
            items = ray.get(server.pull.remote(queue, 10, block=True, timeout=5))
        if not items:
            return got
        got += items


def test_producers_in_other_processes_spread_and_keep_their_order(server, names):
    q = names()
    server.add(q, partitions=3)
    crew = [Producer.remote() for _ in range(3)]
    producers = [producer.produce.remote(server, q, p, 300) for p, producer in enumerate(crew)]
    consumers = [consume.remote(server, q, native) for native in (True, False)]
    ray.get(producers)
    received = ray.get(consumers)
    everything = [item for got in received for item in got]
    assert Counter(everything) == Counter((p, s) for p in range(3) for s in range(300))
    for got in received:  # each consumer sees each producer's items in order
        for producer in range(3):
            sequences = [s for p, s in got if p == producer]
            assert sequences == sorted(sequences)
    # The head pins producers round robin: three producers, three partitions.
    assert sum(1 for p in server.stats()["queues"][q]["partitions"] if p["pushed"]) == 3


def test_maxsize_bounds_each_partition(api, names):
    q = names()
    api.add(q, maxsize=2, partitions=2)
    assert api.push([1, 2], q, expand=True, key="k") == 2
    with pytest.raises(pype.QueueFullError):
        api.push(3, q, key="k")  # that partition is full
    other = next(key for key in map(str, range(100))
                 if pype.partitions.partition_for_key(key, 2)
                 != pype.partitions.partition_for_key("k", 2))
    assert api.push([4, 5], q, expand=True, key=other) == 2  # the other is not
    assert api.queue_len(q) == 4


def test_bad_partition_arguments_are_clear_errors_and_change_nothing(server, names):
    q = names()
    for bad, error in ((0, ValueError), (-3, ValueError), (2000, ValueError),
                       (True, TypeError), ("4", TypeError)):
        with pytest.raises(error, match="partitions"):
            server.add(q, partitions=bad)
    assert q not in server.queues()
    server.add(q)
    with pytest.raises(pype.QueueExistsError, match="partitions"):
        server.add(q, partitions=3, exist_ok=True)
    with pytest.raises(TypeError, match="key"):
        server.push(1, q, key=1.5)
    with pytest.raises(TypeError, match="key"):
        server.push.remote(1, q, key=[1])
    assert "partitions" not in server.stats()["queues"][q]
    assert server.queue_len(q) == 0
    assert server.remove(q) == 0


def test_a_removed_partitioned_queue_is_gone_for_handles_that_knew_it(server, names):
    q = names()
    server.add(q, partitions=3)
    server.push(1, q)
    other = pype.Server(server.routes.router, server.routes.topology)  # another handle, same process
    assert other.pull(q) == [1]  # it learns the layout
    assert server.remove(q) == 0
    server.push("plain now", q)  # a first push makes a plain queue
    assert other.pull(q) == ["plain now"]
    assert server.remove(q) == 0


def test_queue_defaults_can_partition_every_new_queue(fresh_server, names):
    server = fresh_server(shards=2, queue_defaults={"partitions": 3})
    q = names()
    assert server.push([1, 2, 3], q, expand=True) == 3  # a first push makes the head and partitions
    assert ray.get(server.push.remote(4, q)) == 1
    assert sorted(server.pull(q, -1)) == [1, 2, 3, 4]
    assert len(server.stats()["queues"][q]["partitions"]) == 3


def test_a_partitioned_queue_survives_a_shard_kill_with_persistence(fresh_server, names, tmp_path):
    server = fresh_server(shards=2, persistence={"dir": str(tmp_path), "fsync": "always"})
    q = names()
    server.add(q, partitions=4)
    server.push(list(range(40)), q, expand=True)
    for key in range(20):
        server.push(100 + key, q, key=key)
    for shard in range(2):  # each shard in turn: the head's and the partitions'
        pid = server.stats()["shards"][shard]["pid"]
        os.kill(pid, signal.SIGKILL)
        until(lambda shard=shard, pid=pid: restarted(server, shard, pid),
              f"shard {shard} to come back")
    assert sorted(server.pull(q, -1)) == list(range(40)) + [100 + key for key in range(20)]


def restarted(server, shard, old_pid):
    return server.stats()["shards"][shard].get("pid", old_pid) != old_pid  # none: unreachable
