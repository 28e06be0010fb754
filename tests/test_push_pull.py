"""push_pull: a stage's push and its next pull in one round trip, with the guarantees of both.

First the request alone (the engine, the wire, what a client may send again), then
live: on one shard (a hash tag) and on two, through a chain, with leases, partitioned
queues, bad input and a shard killed while one is in flight.
"""

import itertools
import pickle
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import ray

import pype
from pype import protocol
from pype.errors import QueueFullError
from pype.options import QueueOptions
from pype.partitions import Partitioned
from pype.protocol import Add, Export, Moved, Pull, PullFailed, Push, PushPull
from tests.events import until
from tests.test_engine import named, run
from tests.test_reliability import durable, kill_shard, until_restarted

# -- the request in a shard's engine (no Ray) ------------------------------------------------


@pytest.fixture
def engine():
    from pype.shards.engine import ShardEngine
    from pype.shards.store import QueueStore

    return ShardEngine(QueueStore(QueueOptions()), 0, poll_wait=0.5)


def test_the_push_is_applied_before_the_pull_runs(engine):
    run(engine, Push(("in",), [1, 2], producer=(7, 1, 1)))
    assert run(engine, PushPull(Push(("out",), ["a"], producer=(7, 2, 2)), Pull("in", 1))).result() == [1]
    assert run(engine, PushPull(Push(("in",), [3], producer=(7, 3, 3)), Pull("in", -1))).result() == [2, 3]
    assert run(engine, Pull("out", -1)).result() == ["a"]


def test_a_push_sent_again_is_applied_once_and_the_pull_runs_again(engine):
    request = PushPull(Push(("out",), ["a"], producer=(7, 1, 1)), Pull("in", 1, ack=True))
    run(engine, Push(("in",), [1, 2]))
    [(_, first, _)] = run(engine, request).result()
    [(_, second, _)] = run(engine, request).result()  # its answer was lost: sent again
    assert (first, second) == (1, 2)
    assert run(engine, Pull("out", -1)).result() == ["a"]


def test_a_refused_push_answers_its_error_and_the_pull_does_not_run(engine):
    run(engine, Add("out", QueueOptions(maxsize=1)))
    run(engine, Push(("out",), ["full"]))
    run(engine, Push(("in",), [1]))
    with pytest.raises(QueueFullError):
        run(engine, PushPull(Push(("out",), ["b"]), Pull("in", 1))).result()
    assert run(engine, Pull("in", -1)).result() == [1]  # still there


def test_a_blocking_pull_waits_after_its_push_was_applied(engine):
    waiting = run(engine, PushPull(Push(("out",), ["a"]), Pull("in", 1, True, None)))
    assert not waiting.done
    assert run(engine, Pull("out", -1)).result() == ["a"]  # applied while the pull waits
    run(engine, Push(("in",), ["next"]))
    assert waiting.result() == ["next"]


def test_a_pull_that_fails_after_the_push_says_the_push_was_applied(engine):
    run(engine, Add("parted", QueueOptions(partitions=2)))
    with pytest.raises(PullFailed) as failed:
        run(engine, PushPull(Push(("out",), ["a"]), Pull("parted", 1))).result()
    assert isinstance(failed.value.error, Partitioned)
    assert run(engine, Pull("out", -1)).result() == ["a"]


def test_a_waiting_pull_whose_queue_moves_says_its_push_was_applied(engine):
    """A resize that takes the queues away ends the waiting pull with Moved: wrapped, so
    that the client sends the pull alone to the new shard, not the push again."""
    source, output = named(2, 5, 1), named(2, 5, 1, avoid=named(2, 5, 1))
    run(engine, Add(source, QueueOptions()))
    waiting = run(engine, PushPull(Push((output,), ["a"], producer=(7, 1, 1)), Pull(source, 1, True)))
    exported = run(engine, Export(shards=2, seed=5, epoch=1)).result()
    assert output in exported  # the push went along with its queue
    with pytest.raises(PullFailed) as failed:
        waiting.result()
    assert isinstance(failed.value.error, Moved)


def test_a_refused_push_sent_again_where_its_pull_queue_moved_is_not_taken_for_applied(engine):
    """A leasing PushPull may be sent again whole after a restart. If its push had been
    refused, the answer is a bare Moved (nothing applied: the client sends both again),
    never PullFailed (the push applied: the client would send the pull alone)."""
    full, source = named(2, 5, 0), named(2, 5, 1)
    run(engine, Add(full, QueueOptions(maxsize=1)))
    run(engine, Push((full,), ["in"]))
    request = PushPull(Push((full,), ["refused"], producer=(7, 1, 1)), Pull(source, 1, ack=True))
    with pytest.raises(QueueFullError):
        run(engine, request).result()
    run(engine, Export(shards=2, seed=5, epoch=1)).result()  # the pull's queue moves away
    with pytest.raises(Moved):
        run(engine, request).result()


def test_the_push_of_a_push_pull_never_waits(engine):
    with pytest.raises(ValueError, match="never waits"):
        run(engine, PushPull(Push(("out",), ["a"], block=True), Pull("in", 1))).result()
    assert run(engine, Pull("out", -1)).result() == []


# -- on the wire, and what a client may send again -----------------------------------------


def test_a_push_pull_crosses_the_wire_whole():
    request = PushPull(Push(("out",), [b"x", 2], producer=(1, 2, 1)), Pull("in", 5, True, 1.5, ack=True))
    _, _, decoded = protocol.decode_request(protocol.encode_request(3, ("c", 0), request))
    assert decoded == request
    assert (type(decoded.push), type(decoded.pull)) == (Push, Pull)


def test_its_push_is_numbered_and_only_a_retriable_pull_goes_again_with_it():
    leasing = PushPull(Push(("out",), [1]), Pull("in", ack=True))
    plain = PushPull(Push(("out",), [1]), Pull("in"))
    assert protocol.takes_a_sequence(plain)
    numbered = protocol.numbered(plain, (9, 4, 1))
    assert numbered.push.producer == (9, 4, 1) and numbered.pull == plain.pull
    assert not protocol.retriable(plain) and not protocol.retriable(numbered)
    assert protocol.retriable(protocol.numbered(leasing, (9, 5, 1)))
    assert protocol.wait_of(PushPull(Push(("out",), [1]), Pull("in", block=True, timeout=3))) == 3


# -- live --------------------------------------------------------------------------------------


@ray.remote(num_cpus=0)
def stage(server, source, output, end):
    """Pass each item on with push_pull, one at a time, until `end`."""
    item = server.pull(source, block=True, timeout=60)[0]
    while item != end:
        item = server.push_pull(item, output, source, block=True, timeout=60)[0]
    server.push(end, output)


@pytest.mark.parametrize("placement", ["one shard", "two shards"])
def test_a_chain_of_push_pull_stages_passes_every_item_once_in_order(server, names, placement):
    if placement == "one shard":
        links = [f"{{{names('chain')}}}-{i}" for i in range(4)]
        assert len({server.shard_of(link) for link in links}) == 1
    else:  # each stage's two queues on different shards
        links = [names(f"chain-{i}") for i in range(40)]
        picked = [links[0]]
        for link in links[1:]:
            if server.shard_of(link) != server.shard_of(picked[-1]):
                picked.append(link)
        links = picked[:4]
    stages = [stage.remote(server, source, output, -1) for source, output in itertools.pairwise(links)]
    server.push(list(range(300)) + [-1], links[0], expand=True)
    got = []
    while not got or got[-1] != -1:
        got += server.pull(links[-1], batch_size=-1, block=True, timeout=60)
    ray.get(stages)
    assert got == list(range(300)) + [-1]


def test_leases_come_back_as_triples_and_are_acked(server, names):
    tag = names("lease")
    source, output = f"{{{tag}}}.in", f"{{{tag}}}.out"
    server.push("job", source)
    [(lease, item, redelivered)] = server.push_pull("result", output, source, ack=True)
    assert (item, redelivered) == ("job", 0)
    assert server.ack(source, lease) == 1
    assert server.pull(output) == ["result"]


def test_a_refused_push_across_two_shards_hands_over_what_the_pull_took(server, names):
    full = names("full")
    source = next(name for name in (names(f"s{i}") for i in range(40))
                  if server.shard_of(name) != server.shard_of(full))
    server.add(full, maxsize=1)
    server.push("first", full)
    server.push("taken", source)
    with pytest.raises(QueueFullError) as refused:
        server.push_pull("second", full, source)
    assert refused.value.pulled == ["taken"]
    assert server.pull(full, -1) == ["first"]


def test_a_push_refused_after_its_redirect_hands_over_what_the_pull_took(server, names):
    """Across two shards, a push to a partitioned queue that this handle did not know was
    partitioned is redirected while the pull runs; pushed again to its partition, it is
    refused: the error carries the pulled items."""
    parted = names("parted")
    source = next(name for name in (names(f"s{i}") for i in range(40))
                  if server.shard_of(name) != server.shard_of(parted))
    server.add(parted, partitions=2, maxsize=1)
    ray.get(server.push.remote("fills this process's partition", parted))
    server.push("taken", source)
    unaware = pickle.loads(pickle.dumps(server))  # a handle that knows no layouts yet
    with pytest.raises(QueueFullError) as refused:
        unaware.push_pull("refused", parted, source)
    assert refused.value.pulled == ["taken"]


def test_a_refused_push_on_one_shard_pulls_nothing(server, names):
    tag = names("full")
    full, source = f"{{{tag}}}.out", f"{{{tag}}}.in"
    server.add(full, maxsize=1)
    server.push("first", full)
    server.push("kept", source)
    with pytest.raises(QueueFullError) as refused:
        server.push_pull("second", full, source)
    assert refused.value.pulled == []
    assert server.pull(source) == ["kept"]


def test_partitioned_queues_push_then_pull(server, names):
    tag = names("parted")
    parted, plain = f"{{{tag}}}.parted", f"{{{tag}}}.plain"
    server.add(parted, partitions=2)
    server.push("in", plain)
    assert server.push_pull("out", parted, plain) == ["in"]
    assert server.push_pull("again", plain, parted) == ["out"]
    assert server.pull(plain) == ["again"]


def test_bad_input_is_refused_before_anything_is_sent(server, names):
    q = names()
    with pytest.raises(TypeError, match="one queue"):
        server.push_pull(1, [q, q], q)
    with pytest.raises(TypeError, match="native only"):
        server.push_pull.remote(1, q, q)
    with pytest.raises(ValueError):
        server.push_pull(1, q, q, batch_size=0)
    with pytest.raises(ValueError):
        server.push_pull(1, q, q, timeout=-1)
    assert server.queue_len(q) == 0


@ray.remote(num_cpus=0)
class Stage:
    """Holds a handle from before the resizes, and the connections it made."""

    def __init__(self, server):
        self.server = server

    def step(self, item, queue, source):
        return self.server.push_pull(item, queue, source)


def test_a_handle_from_before_resizes_follows_them(fresh_server, names):
    server = fresh_server(shards=2)
    stage = Stage.remote(server)
    pairs = [(f"{{{names(f't{i}')}}}.out", f"{{{names(f't{i}')}}}.in") for i in range(3)]
    pairs += [(names(f"out{i}"), names(f"in{i}")) for i in range(3)]
    for shards in (2, 4, 1, 3):
        if shards != 2:
            removed = [shard["pid"] for shard in ray.get(server.stats.remote())["shards"][shards:]]
            server.resize(shards)
            until(lambda pids=removed: not any(psutil.pid_exists(pid) for pid in pids),
                  "the shards a shrink removed to stop")
        for queue, source in pairs:  # the stage's handle still routes by an older topology
            server.push(("in", shards), source)
            assert ray.get(stage.step.remote(("out", shards), queue, source)) == [("in", shards)]
            assert server.pull(queue, -1) == [("out", shards)]


def test_a_shard_killed_while_the_pull_waits_applies_the_push_once(fresh_server, names, tmp_path):
    """The push part goes again alone under its number; the plain pull part cannot (its
    items could vanish unseen), so the call fails clearly."""
    server = fresh_server(**durable(tmp_path))
    tag = names("killed")
    source, output = f"{{{tag}}}.in", f"{{{tag}}}.out"
    waiting = ThreadPoolExecutor(max_workers=1).submit(
        server.push_pull, "pushed once", output, source, block=True, timeout=120)
    until(lambda: ray.get(server.stats.remote())["shards"][0]["waiting_calls"] == 1,
          "the pull to wait in the shard")
    until_restarted(server, output, kill_shard(server, output))
    with pytest.raises(pype.ShardRestartedError, match="its push was applied"):
        waiting.result(timeout=120)
    assert server.pull(output, -1) == ["pushed once"]
