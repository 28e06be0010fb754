"""Online resharding: server.resize(N) moves queues between shards while they serve."""

import os
import signal
import threading
from collections import Counter

import psutil
import pytest
import ray

import pype
from pype.hashing import shard_for
from tests.events import until

QUEUES = 12


def queue_names(tag):
    return [f"resize-{tag}-{i}" for i in range(QUEUES)] + [f"hot-{tag}"]


@ray.remote(num_cpus=0)
class Producer:
    """Pushes (producer, queue, sequence) to each queue in turn, one item per call,
    until told to stop; returns how many it pushed."""

    def __init__(self, server, names, producer, native):
        self.server, self.names, self.producer, self.native = server, names, producer, native
        self.stopping = False

    def run(self):
        sequence = 0
        while not self.stopping:
            name = self.names[sequence % len(self.names)]
            item = (self.producer, name, sequence)
            if self.native:
                self.server.push(item, name)
            else:  # fire and forget: order must hold anyway
                self.server.push.remote(item, name)
            sequence += 1
        if not self.native:
            ray.get(self.server.queue_len.remote(self.names[0]))  # after each of its pushes
        return sequence

    def stop(self):
        self.stopping = True


@ray.remote(num_cpus=0)
class Consumer:
    """Pulls from every queue in turn until told to stop and nothing is left."""

    def __init__(self, server, names, native):
        self.server, self.names, self.native = server, names, native
        self.got, self.stopping = [], False
        self.done = threading.Event()

    def run(self):
        while True:
            stopping = self.stopping
            found = 0
            for name in self.names:
                if self.native:
                    items = self.server.pull(name, 20)
                else:
                    items = ray.get(self.server.pull.remote(name, 20))
                found += len(items)
                self.got += items
            if stopping and not found:
                return self.got

    def stop(self):
        self.stopping = True

    def count(self):
        return len(self.got)


def test_resize_under_load_loses_duplicates_and_reorders_nothing(fresh_server):
    server = fresh_server(shards=2)
    names = queue_names("load")
    server.add(names[-1], partitions=4)
    consumers = [Consumer.options(max_concurrency=2).remote(server, names, native)
                 for native in (True, False)]
    running = [consumer.run.remote() for consumer in consumers]
    producers = [Producer.options(max_concurrency=2).remote(server, names, p, native)
                 for p, native in enumerate((True, True, False))]
    producing = [producer.run.remote() for producer in producers]

    def consumed():
        return sum(ray.get([consumer.count.remote() for consumer in consumers]))
    for shards in (3, 5, 2):  # each while items flow
        before = consumed()
        until(lambda before=before: consumed() > before + 50, "consumers to make progress")
        assert server.resize(shards)["shards"] == shards
    until(lambda: consumed() > before + 50, "consumers to make progress after the last resize")
    ray.get([producer.stop.remote() for producer in producers])
    pushed = ray.get(producing)
    ray.get([consumer.stop.remote() for consumer in consumers])
    received = ray.get(running)
    everything = [item for got in received for item in got]
    assert Counter(everything) == Counter(
        (p, names[s % len(names)], s) for p, count in enumerate(pushed) for s in range(count))
    for got in received:  # each consumer sees each producer's items of a queue in order
        streams = {}
        for producer, name, sequence in got:
            streams.setdefault((producer, name), []).append(sequence)
        for sequences in streams.values():
            assert sequences == sorted(sequences)
    stats = server.stats()
    assert len(stats["shards"]) == 2 and stats["totals"]["depth"] == 0
    for name, queue in stats["queues"].items():  # each queue is where the hash says
        if "partitions" not in queue:
            assert queue["shard"] == shard_for(name, 2)


@ray.remote(num_cpus=0)
class LongLived:
    """An actor that holds a handle from before the resizes."""

    def __init__(self, server):
        self.server = server

    def round_trip(self, name, item):
        self.server.push(item, name)
        ray.get(self.server.push.remote(item, name))
        return self.server.pull(name, -1)


def test_old_handles_are_redirected_without_a_restart(fresh_server, names):
    """Also once the shards a shrink removed have stopped: a call to one of them is sent
    where a newer topology places it."""
    server = fresh_server(shards=2)
    holder = LongLived.remote(server)
    queues = [names(f"q{i}") for i in range(8)]
    for q in queues:
        assert ray.get(holder.round_trip.remote(q, 0)) == [0, 0]
    for shards in (4, 1, 3):
        removed = [shard["pid"] for shard in ray.get(server.stats.remote())["shards"][shards:]]
        server.resize(shards)
        until(lambda pids=removed: not any(psutil.pid_exists(pid) for pid in pids),
              "the shards a shrink removed to stop")
        for q in queues:  # the actor's handle still routes by the first topology
            assert ray.get(holder.round_trip.remote(q, shards)) == [shards, shards]


def test_items_leases_and_options_move_whole(fresh_server, names):
    server = fresh_server(shards=1)
    seed = server.routes.topology.config.hash_seed
    # Random names all stay on shard 0 one run in 729: pick half that move, half that stay.
    moving = [q for q in (names(f"q{i}") for i in range(100)) if shard_for(q, 3, seed) != 0]
    staying = [q for q in (names(f"q{i}") for i in range(100)) if shard_for(q, 3, seed) == 0]
    queues = moving[:3] + staying[:3]
    leases = {}
    for q in queues:
        server.add(q, kind="lifo", maxsize=50)
        server.push(list(range(10)), q, expand=True)
        leases[q] = server.pull(q, 2, ack=True)
    outcome = server.resize(3)
    assert outcome["moved_queues"] == 3
    for q in queues:
        assert server.ack(q, [lease for lease, _, _ in leases[q]]) == 2  # leases moved along
        assert server.pull(q, -1) == [7, 6, 5, 4, 3, 2, 1, 0]  # a stack still
        described = ray.get(server.routes.call(server.shard_of(q), pype.protocol.Describe(q)))
        assert described["kind"] == "lifo" and described["maxsize"] == 50


def test_bad_resizes_are_clear_errors_and_change_nothing(fresh_server, names):
    server = fresh_server(shards=2)
    q = names()
    server.push(1, q)
    for bad, error in ((0, ValueError), (-1, ValueError), (1.5, TypeError), ("3", TypeError)):
        with pytest.raises(error, match="shard"):
            server.resize(bad)
    assert len(server.stats()["shards"]) == 2
    assert server.pull(q) == [1]


def test_a_shard_killed_during_a_resize_loses_nothing_and_a_second_resize_finishes_it(
        fresh_server, tmp_path):
    server = fresh_server(shards=2, persistence={"dir": str(tmp_path), "fsync": "always"})
    names = [f"kill-{i}" for i in range(30)]
    for name in names:
        server.push([name, 1, 2], name, expand=True)
    victim = server.stats()["shards"][0]["pid"]
    resizing = server.routes.router.resize.remote(4)
    # The new topology is published before the queues move: kill a giver in the move.
    until(lambda: ray.get(server.routes.router.topology.remote()).epoch == 1, "the move to begin",
          interval=0.002)
    os.kill(victim, signal.SIGKILL)
    try:
        ray.get(resizing)
    except (ray.exceptions.RayError, pype.PypeError):
        pass  # cut short: the second resize below finishes it
    until(lambda: _alive(server), "the killed shard to come back")
    server.resize(4)
    for name in names:
        assert server.pull(name, -1) == [name, 1, 2]
    assert server.stats()["totals"]["depth"] == 0


def _alive(server):
    try:
        server.stats()
        return True
    except (ray.exceptions.RayError, pype.PypeError):
        return False
