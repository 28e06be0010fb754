"""The public API against a real Ray: semantics, ordering, waiting, errors, discovery."""

import pickle
import statistics
import threading
import time

import pytest
import ray

import pype
from pype.hashing import shard_for
from tests.events import until


def waiting_calls(server, queue):
    """Calls waiting in the shard of `queue` (blocking pulls and pushes, can_pull, ...)."""
    return ray.get(server.stats.remote())["shards"][server.shard_of(queue)]["waiting_calls"]


def names_on_different_shards(server, base, count=2):
    """`count` queue names that hash to different shards of `server`."""
    found, i = {}, 0
    while len(found) < count:
        name = f"{base}-{i}"
        found.setdefault(server.shard_of(name), name)
        i += 1
    return list(found.values())


@ray.remote(num_cpus=0)
def produce(server, queue, producer, count, block=False):
    for i in range(count):
        server.push.remote((producer, i), queue, block=block)  # fire and forget
    return count


@ray.remote(num_cpus=0)
def consume(server, queue, idle_timeout=2.0):
    got = []
    while True:
        items = ray.get(server.pull.remote(queue, batch_size=16, block=True, timeout=idle_timeout))
        if not items:
            return got
        got.extend(items)


# -- pull and push contract ----------------------------------------------------------

def test_pull_returns_lists(server, names):
    q = names()
    assert ray.get(server.pull.remote(q)) == []
    assert ray.get(server.push.remote([1, 2, 3, 4, 5], q, expand=True)) == 5
    assert ray.get(server.pull.remote(q)) == [1]
    assert ray.get(server.pull.remote(q, batch_size=2, remove=False)) == [2, 3]
    assert ray.get(server.pull.remote(q, batch_size=2)) == [2, 3]
    assert ray.get(server.pull.remote(q, batch_size=-1)) == [4, 5]
    assert ray.get(server.push.remote([1, 2], q)) == 1  # without expand a list is one item
    assert ray.get(server.pull.remote(q, batch_size=-1)) == [[1, 2]]


def test_queue_kinds(server, names):
    ray.get(server.add.remote(names("stack"), kind="lifo"))
    ray.get(server.push.remote([1, 2, 3], names("stack"), expand=True))
    assert ray.get(server.pull.remote(names("stack"), batch_size=-1)) == [3, 2, 1]

    ray.get(server.add.remote(names("prio"), kind="priority"))
    for item, priority in [("low", 5), ("first", -1), ("mid", 2), ("first-too", -1)]:
        server.push.remote(item, names("prio"), priority=priority)
    assert ray.get(server.pull.remote(names("prio"), batch_size=-1)) == ["first", "first-too", "mid", "low"]

    ray.get(server.add.remote(names("fresh"), maxsize=3, overflow="drop_oldest"))
    ray.get(server.push.remote(list(range(10)), names("fresh"), expand=True))
    assert ray.get(server.pull.remote(names("fresh"), batch_size=-1)) == [7, 8, 9]
    assert ray.get(server.stats.remote())["queues"][names("fresh")]["dropped"] == 7


def test_batch_queue_waits_for_a_full_batch_then_returns_a_partial_one(server, names):
    q = names()
    ray.get(server.add.remote(q, kind="batch", batch_size=4, batch_timeout=0.2))
    ray.get(server.push.remote(list(range(6)), q, expand=True))
    assert ray.get(server.pull.remote(q)) == [0, 1, 2, 3]  # a full batch: at once
    started = time.monotonic()
    assert ray.get(server.pull.remote(q)) == [4, 5]
    assert time.monotonic() - started >= 0.18  # it waited for the batch_timeout
    # a consumer that waits gets the batch as soon as it is full, long before its timeout
    pending = server.pull.remote(q, block=True, timeout=60)
    until(lambda: waiting_calls(server, q), "the pull to wait in the shard")
    ray.get(server.push.remote(list(range(4)), q, expand=True))
    ready, _ = ray.wait([pending], timeout=30)
    assert ready and ray.get(pending) == [0, 1, 2, 3]


def test_fan_out_to_queues_on_different_shards(server, names):
    a, b = names_on_different_shards(server, names("fan"))
    assert ray.get(server.push.remote("x", [a, b])) == 2
    assert ray.get(server.push.remote([1, 2], (a, b), expand=True)) == 4
    assert ray.get(server.pull.remote(a, batch_size=-1)) == ["x", 1, 2]
    assert ray.get(server.pull.remote(b, batch_size=-1)) == ["x", 1, 2]


# -- flow control ---------------------------------------------------------------------

def test_full_queue_raises_and_blocking_push_waits(server, names):
    q = names()
    ray.get(server.add.remote(q, maxsize=1))
    assert ray.get(server.push.remote(1, q)) == 1
    assert not ray.get(server.can_push.remote(q))
    with pytest.raises(pype.QueueFullError, match=q):
        ray.get(server.push.remote(2, q))
    with pytest.raises(pype.QueueTimeoutError) as caught:
        ray.get(server.push.remote(3, q, block=True, timeout=0.1))
    assert isinstance(caught.value, TimeoutError)
    waiting = server.push.remote(4, q, block=True, timeout=60)
    until(lambda: ray.get(server.stats.remote())["queues"][q]["waiting_producers"],
          "the push to wait in line")
    assert ray.get(server.pull.remote(q)) == [1]
    assert ray.get(waiting) == 1
    assert ray.get(server.pull.remote(q, batch_size=-1)) == [4]  # 2 and 3 were never accepted


def test_seed_lock_options_bound_the_queue_without_losing_pushes(server, names):
    for option in [{"use_locking": True}, {"semaphore": 2}, {"batch_lock": 3}]:
        q = names(next(iter(option)))
        ray.get(server.add.remote(q, **option))
        capacity = 1 if "use_locking" in option else next(iter(option.values()))
        refs = [server.push.remote(i, q) for i in range(capacity + 3)]
        assert ray.get(refs) == [1] * (capacity + 3)  # accepted: the extra ones wait in line
        assert ray.get(server.queue_len.remote(q)) == capacity
        assert not ray.get(server.can_push.remote(q))
        assert ray.get(server.pull.remote(q, batch_size=-1)) == list(range(capacity))
        assert ray.get(server.pull.remote(q, batch_size=-1)) == list(range(capacity, capacity + 3))[:capacity]


def test_add_takes_effect_before_other_processes_use_the_queue(server, names):
    @ray.remote(num_cpus=0)
    def use(server, q):
        server.push.remote([1, 2, 3], q, expand=True)
        return ray.get(server.pull.remote(q))

    for _ in range(5):
        q = names(f"late-{_}")
        server.add.remote(q, kind="lifo")  # no ray.get, as in the seed's examples
        assert ray.get(use.remote(server, q)) == [3]


def test_can_pull_and_can_push_see_this_processes_earlier_pushes(server, names):
    q = names()
    ray.get(server.add.remote(q, maxsize=1))
    for i in range(30):
        server.push.remote(i, q)  # fire and forget
        assert not ray.get(server.can_push.remote(q))
        assert ray.get(server.can_pull.remote(q))
        assert ray.get(server.pull.remote(q)) == [i]


@ray.remote(num_cpus=0)
def wait_with(helper, server, queue, timeout):
    return helper(server, queue, timeout=timeout)


def test_pull_wait_and_push_wait_return_true_or_raise_at_their_timeout(server, names):
    q = names()
    ray.get(server.add.remote(q, maxsize=1))
    started = time.monotonic()
    with pytest.raises(pype.QueueTimeoutError, match=f"pull_wait: queue '{q}'") as caught:
        pype.pull_wait(server, q, timeout=0.2)
    assert time.monotonic() - started >= 0.19
    assert isinstance(caught.value, TimeoutError)  # the original Pype's code catches this

    # timeout=None waits as long as it takes: past the shard's poll_wait, until the push
    waiting = wait_with.remote(pype.pull_wait, server, q, None)
    until(lambda: waiting_calls(server, q), "pull_wait to wait in the shard")
    assert ray.wait([waiting], timeout=0.5)[0] == []
    assert ray.get(server.push.remote("x", q)) == 1
    assert ray.get(waiting) is True
    assert pype.pull_wait(server, q, timeout=0) is True  # it holds now: no wait

    with pytest.raises(pype.QueueTimeoutError, match=f"push_wait: queue '{q}' had no room"):
        pype.push_wait(server, q, timeout=0.1)
    waiting = wait_with.remote(pype.push_wait, server, q, 60)
    until(lambda: waiting_calls(server, q), "push_wait to wait in the shard")
    assert ray.get(server.pull.remote(q)) == ["x"]
    assert ray.get(waiting) is True
    assert pype.push_wait(server, q, timeout=0) is True


# -- ordering and integrity -----------------------------------------------------------

@pytest.mark.parametrize("maxsize, block", [(0, False), (5, True)])
def test_many_producers_many_consumers_keep_per_producer_order(server, names, maxsize, block):
    q = names()
    ray.get(server.add.remote(q, maxsize=maxsize))
    producers, count = 4, 400
    consumers = [consume.remote(server, q) for _ in range(3)]
    assert ray.get([produce.remote(server, q, p, count, block) for p in range(producers)]) == [count] * 4
    results = ray.get(consumers)
    everything = [item for got in results for item in got]
    assert sorted(everything) == [(p, i) for p in range(producers) for i in range(count)]
    for got in results:
        for p in range(producers):
            mine = [i for q_, i in got if q_ == p]
            assert mine == sorted(mine), f"producer {p} out of order at one consumer"


def test_fire_and_forget_pushes_from_one_process_arrive_in_order(server, names):
    qs = names_on_different_shards(server, names("order"))
    for q in qs:
        for i in range(2000):
            server.push.remote(i, q)
    for q in qs:
        assert ray.get(server.pull.remote(q, batch_size=-1)) == list(range(2000))


def test_blocking_pull_wakes_within_milliseconds(server, names):
    q = names()

    @ray.remote(num_cpus=0)
    def wait_once(server, q):
        items = ray.get(server.pull.remote(q, block=True, timeout=30))
        return items, time.time()

    delays = []
    for i in range(7):
        waiter = wait_once.remote(server, q)
        until(lambda: waiting_calls(server, q), "the pull to wait in the shard")
        sent = time.time()
        server.push.remote(i, q)
        items, woke = ray.get(waiter)
        assert items == [i]
        delays.append(woke - sent)
    # A few ms here (the bench measures it); the bound only catches a shard that polls.
    assert statistics.median(delays) < 0.25, delays


# -- errors ------------------------------------------------------------------------------

def test_errors_survive_ray_get(server, names):
    q = names()
    ray.get(server.add.remote(q))
    with pytest.raises(pype.QueueExistsError):
        ray.get(server.add.remote(q))
    assert ray.get(server.add.remote(q, exist_ok=True)) is False
    with pytest.raises(pype.QueueNotFoundError):
        ray.get(server.remove.remote(names("never")))
    with pytest.raises(pype.PypeError):
        ray.get(server.print_queue.remote(names("never")))


@pytest.mark.parametrize("call, error", [
    (lambda s: s.push.remote(1, 5), TypeError),
    (lambda s: s.push.remote(1, None), TypeError),
    (lambda s: s.push.remote(1, ""), ValueError),
    (lambda s: s.push.remote(1, "a\x00b"), ValueError),
    (lambda s: s.push.remote(1, "x" * 300), ValueError),
    (lambda s: s.push.remote(1, []), ValueError),
    (lambda s: s.push.remote(5, "q", expand=True), TypeError),
    (lambda s: s.push.remote(1, "q", timeout=-1), ValueError),
    (lambda s: s.push.remote(1, "q", priority="high"), TypeError),
    (lambda s: s.push.remote(threading.Lock(), "q"), TypeError),  # cannot be pickled
    (lambda s: s.pull.remote(7), TypeError),
    (lambda s: s.pull.remote(""), ValueError),
    (lambda s: s.pull.remote("q", batch_size=0), ValueError),
    (lambda s: s.pull.remote("q", batch_size=-2), ValueError),
    (lambda s: s.pull.remote("q", batch_size=2.5), TypeError),
    (lambda s: s.pull.remote("q", batch_size="3"), TypeError),
    (lambda s: s.can_pull.remote(3), TypeError),
    (lambda s: s.can_pull.remote("q", batch_size=0), ValueError),
    (lambda s: s.can_push.remote(b"q"), TypeError),
    (lambda s: s.add.remote(1), TypeError),
    (lambda s: s.add.remote("q", kind="heap"), ValueError),
    (lambda s: s.add.remote("q", maxsize=-1), ValueError),
    (lambda s: s.add.remote("q", overflow="explode"), ValueError),
    (lambda s: s.add.remote("q", kind="fifo", batch_size=4), ValueError),
    (lambda s: s.add.remote("q", maxsize=3, use_locking=True), ValueError),
    (lambda s: ray.get(s.push.remote(1, "bad-priority-target", priority=1)), ValueError),
    (lambda s: s.queue_len.remote(None), TypeError),
    (lambda s: s.remove.remote(""), ValueError),
])
def test_bad_input_is_a_clear_error_and_the_server_stays_healthy(server, names, call, error):
    with pytest.raises(error):
        call(server)
    q = names()
    assert ray.get(server.push.remote("ok", q)) == 1
    assert ray.get(server.pull.remote(q)) == ["ok"]


# -- servers, discovery, introspection ----------------------------------------------------

def test_named_server_is_found_from_other_processes(ray_session, names):
    name = names("server")
    server = pype.Server.remote(name=name, shards=3)
    try:
        with pytest.raises(pype.ServerExistsError):
            pype.Server.remote(name=name)
        with pytest.raises(pype.ServerNotFoundError):
            pype.connect(names("nobody"))
        with pytest.raises(ValueError, match="a detached server needs a name"):
            pype.Server.remote(detached=True)

        @ray.remote(num_cpus=0)
        def push_through_connect(name):
            handle = pype.connect(name)
            return ray.get(handle.push.remote("from a task", "inbox"))

        assert ray.get(push_through_connect.remote(name)) == 1
        assert ray.get(pype.connect(name).pull.remote("inbox")) == ["from a task"]
    finally:
        server.shutdown()
    for _ in range(50):  # the name is freed once the router is gone
        try:
            pype.connect(name)
        except pype.ServerNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the name stayed taken after shutdown")


def test_anonymous_servers_do_not_share_queues(fresh_server):
    first, second = fresh_server(), fresh_server()
    ray.get(first.push.remote(1, "q"))
    assert ray.get(second.pull.remote("q")) == []
    assert ray.get(first.pull.remote("q")) == [1]


def test_handle_pickles_and_data_operations_never_ask_the_router(fresh_server):
    server = fresh_server(shards=4)
    assert pickle.loads(pickle.dumps(server.shard_of("abc"))) == shard_for("abc", 4, 0)

    @ray.remote(num_cpus=0)
    class Worker:
        def __init__(self, server):
            self.server = server

        def work(self, n):
            for i in range(n):
                self.server.push.remote(i, f"w{i % 10}")
            return sum(len(ray.get(self.server.pull.remote(f"w{i}", batch_size=-1))) for i in range(10))

    worker = Worker.remote(server)
    assert ray.get(worker.work.remote(200)) == 200
    assert ray.get(produce.remote(server, "p", 0, 100)) == 100
    stats = ray.get(server.stats.remote())
    assert stats["router"]["topology_requests"] == 1  # only Server.remote() asked
    assert stats["totals"]["pushed"] == 300


def test_queues_stats_print_and_remove(fresh_server, capsys):
    server = fresh_server(shards=2)
    for i in range(20):
        ray.get(server.push.remote(i, f"q{i}"))
    assert ray.get(server.queues.remote()) == sorted(f"q{i}" for i in range(20))
    assert ray.get(server.queue_len.remote("q3")) == 1
    assert ray.get(server.queue_len.remote("nothing")) == 0
    assert ray.get(server.print_queue.remote("q3")) == "queue 'q3' (fifo, 1 items): [3]"
    stats = ray.get(server.stats.remote())
    assert stats["queues"]["q3"]["shard"] == server.shard_of("q3")
    assert [s["queues"] for s in stats["shards"]] == [
        sum(server.shard_of(f"q{i}") == k for i in range(20)) for k in range(2)]
    assert stats["totals"]["depth"] == stats["totals"]["pushed"] == 20
    assert ray.get(server.remove.remote("q3")) == 1
    assert "q3" not in ray.get(server.queues.remote())
    assert ray.get(server.pull.remote("q3")) == []
