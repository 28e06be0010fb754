"""The public API against a real Ray: semantics, ordering, waiting, errors, discovery."""

import asyncio
import functools
import pickle
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray

import pype
from pype.hashing import shard_for
from pype.routing import TOPOLOGY_CHECK
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
def produce(server, queue, producer, count, block=False, native=False):
    for i in range(count):
        if native:
            server.push((producer, i), queue, block=block)
        else:
            server.push.remote((producer, i), queue, block=block)  # fire and forget
    return count


END = "end of stream"  # a consumer stops at the first batch that holds one
BATCH = 16


@ray.remote(num_cpus=0)
def consume(server, queue, native=False):
    got = []
    while True:
        if native:
            items = server.pull(queue, batch_size=BATCH, block=True, timeout=120)
        else:
            items = ray.get(server.pull.remote(queue, batch_size=BATCH, block=True, timeout=120))
        got.extend(item for item in items if item != END)
        if END in items:
            return got


def end_streams(server, queue, pushed, consumers):
    """Once all `pushed` items are in `queue`, push END markers behind them until every
    consumer has ended (its last batch may wait to be full, or for room in the queue)."""
    until(lambda: server.stats()["queues"][queue]["pushed"] >= pushed, "every item to be pushed")
    while ray.wait(consumers, num_returns=len(consumers), timeout=0)[1]:
        try:
            server.push(END, queue, block=True, timeout=1)
        except pype.QueueTimeoutError:  # full: the consumers still running will make room
            pass


# -- pull and push contract ----------------------------------------------------------

def test_pull_returns_lists(api, names):
    q = names()
    assert api.pull(q) == []
    assert api.push([1, 2, 3, 4, 5], q, expand=True) == 5
    assert api.pull(q) == [1]
    assert api.pull(q, batch_size=2, remove=False) == [2, 3]
    assert api.pull(q, batch_size=2) == [2, 3]
    assert api.pull(q, batch_size=-1) == [4, 5]
    assert api.push([1, 2], q) == 1  # without expand a list is one item
    assert api.pull(q, batch_size=-1) == [[1, 2]]


def test_queue_kinds(api, names):
    api.add(names("stack"), kind="lifo")
    api.push([1, 2, 3], names("stack"), expand=True)
    assert api.pull(names("stack"), batch_size=-1) == [3, 2, 1]

    api.add(names("prio"), kind="priority")
    for item, priority in [("low", 5), ("first", -1), ("mid", 2), ("first-too", -1)]:
        api.push(item, names("prio"), priority=priority)
    assert api.pull(names("prio"), batch_size=-1) == ["first", "first-too", "mid", "low"]

    api.add(names("fresh"), maxsize=3, overflow="drop_oldest")
    api.push(list(range(10)), names("fresh"), expand=True)
    assert api.pull(names("fresh"), batch_size=-1) == [7, 8, 9]
    assert api.stats()["queues"][names("fresh")]["dropped"] == 7


def test_batch_queue_waits_for_a_full_batch_then_returns_a_partial_one(api, names):
    q = names()
    api.add(q, kind="batch", batch_size=4, batch_timeout=0.2)
    api.push(list(range(6)), q, expand=True)
    assert api.pull(q) == [0, 1, 2, 3]  # a full batch: at once
    started = time.monotonic()
    assert api.pull(q) == [4, 5]
    assert time.monotonic() - started >= 0.18  # it waited for the batch_timeout
    # a consumer that waits gets the batch as soon as it is full, long before its timeout
    pending = api.start("pull", q, block=True, timeout=60)
    until(lambda: waiting_calls(api.server, q), "the pull to wait in the shard")
    api.push(list(range(4)), q, expand=True)
    started = time.monotonic()
    assert pending() == [0, 1, 2, 3]
    assert time.monotonic() - started < 30  # woken by the push, not its 60 s timeout


def test_fan_out_to_queues_on_different_shards(api, names):
    a, b = names_on_different_shards(api.server, names("fan"))
    assert api.push("x", [a, b]) == 2
    assert api.push([1, 2], (a, b), expand=True) == 4
    assert api.pull(a, batch_size=-1) == ["x", 1, 2]
    assert api.pull(b, batch_size=-1) == ["x", 1, 2]


# -- flow control ---------------------------------------------------------------------

def test_full_queue_raises_and_blocking_push_waits(api, names):
    q = names()
    api.add(q, maxsize=1)
    assert api.push(1, q) == 1
    assert not api.can_push(q)
    with pytest.raises(pype.QueueFullError, match=q):
        api.push(2, q)
    with pytest.raises(pype.QueueTimeoutError) as caught:
        api.push(3, q, block=True, timeout=0.1)
    assert isinstance(caught.value, TimeoutError)
    waiting = api.start("push", 4, q, block=True, timeout=60)
    until(lambda: api.stats()["queues"][q]["waiting_producers"],
          "the push to wait in line")
    assert api.pull(q) == [1]
    assert waiting() == 1
    assert api.pull(q, batch_size=-1) == [4]  # 2 and 3 were never accepted


def test_seed_lock_options_bound_the_queue_without_losing_pushes(api, names):
    for option in [{"use_locking": True}, {"semaphore": 2}, {"batch_lock": 3}]:
        q = names(next(iter(option)))
        api.add(q, **option)
        capacity = 1 if "use_locking" in option else next(iter(option.values()))
        accepted = [api.push(i, q) for i in range(capacity + 3)]
        assert accepted == [1] * (capacity + 3)  # accepted: the extra ones wait in line
        assert api.queue_len(q) == capacity
        assert not api.can_push(q)
        assert api.pull(q, batch_size=-1) == list(range(capacity))
        assert api.pull(q, batch_size=-1) == list(range(capacity, capacity + 3))[:capacity]


def test_add_takes_effect_before_other_processes_use_the_queue(server, names):
    @ray.remote(num_cpus=0)
    def use(server, q):
        server.push.remote([1, 2, 3], q, expand=True)
        return ray.get(server.pull.remote(q))

    for _ in range(5):
        q = names(f"late-{_}")
        server.add.remote(q, kind="lifo")  # no ray.get, as in the seed's examples
        assert ray.get(use.remote(server, q)) == [3]


def test_can_pull_and_can_push_see_this_processes_earlier_pushes(api, names):
    q = names()
    api.add(q, maxsize=1)
    for i in range(30):
        api.server.push.remote(i, q)  # fire and forget, then each path asks
        assert not api.can_push(q)
        assert api.can_pull(q)
        assert api.pull(q) == [i]


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
    """Half the producers and one consumer of three on the native path, the rest on .remote()."""
    q = names()
    ray.get(server.add.remote(q, maxsize=maxsize))
    producers, count = 4, 400
    consumers = [consume.remote(server, q, native=c == 1) for c in range(3)]
    assert ray.get([produce.remote(server, q, p, count, block, native=p % 2 == 1)
                    for p in range(producers)]) == [count] * 4
    end_streams(server, q, producers * count, consumers)
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


@pytest.mark.parametrize("native", [False, True])
def test_blocking_pull_wakes_within_milliseconds(server, names, native):
    q = names()

    @ray.remote(num_cpus=0)
    def wait_once(server, q):
        if native:
            items = server.pull(q, block=True, timeout=30)
        else:
            items = ray.get(server.pull.remote(q, block=True, timeout=30))
        return items, time.time()

    delays = []
    for i in range(7):
        waiter = wait_once.remote(server, q)
        until(lambda: waiting_calls(server, q), "the pull to wait in the shard")
        sent = time.time()
        if native:
            server.push(i, q)
        else:
            server.push.remote(i, q)
        items, woke = ray.get(waiter)
        assert items == [i]
        delays.append(woke - sent)
    # A few ms here (the bench measures it); the bound only catches a shard that polls.
    assert statistics.median(delays) < 0.25, delays


# -- the two paths together -------------------------------------------------------------

def test_a_native_call_sees_its_processes_earlier_remote_calls(server, names):
    q = names()
    for i in range(50):
        server.push.remote(i, q)  # fire and forget: Ray may still be carrying them
    assert server.pull(q, batch_size=-1) == list(range(50))
    server.push.remote("x", q)
    assert server.can_pull(q) and server.queue_len(q) == 1


def test_one_threads_calls_to_a_queue_apply_in_order_on_either_path(server, names):
    q = names()
    for i in range(300):
        if i % 3:
            server.push(i, q)
        else:
            server.push.remote(i, q)
    assert ray.get(server.pull.remote(q, batch_size=-1)) == list(range(300))


def test_many_threads_of_one_process_call_natively_at_once(server, names):
    q = names()

    def push_many(thread):
        return sum(server.push((thread, i), q) for i in range(150))

    with ThreadPoolExecutor(max_workers=8) as threads:
        assert sum(threads.map(push_many, range(8))) == 1200
    got = server.pull(q, batch_size=-1)
    assert sorted(got) == sorted((t, i) for t in range(8) for i in range(150))
    for thread in range(8):
        assert [i for t, i in got if t == thread] == list(range(150))


def test_an_async_actor_calls_natively_through_an_executor(server, names):
    """The documented pattern: run the synchronous call in the event loop's executor."""
    q = names()

    @ray.remote(num_cpus=0)
    class AsyncWorker:
        def __init__(self, server):
            self.server = server

        async def relay(self, source, target, count):
            loop = asyncio.get_running_loop()
            for _ in range(count):
                items = await loop.run_in_executor(
                    None, functools.partial(self.server.pull, source, block=True, timeout=60))
                await loop.run_in_executor(None, functools.partial(self.server.push, items[0], target))
            return count

    worker = AsyncWorker.remote(server)
    relayed = worker.relay.remote(q, names("out"), 20)
    for i in range(20):
        server.push(i, q)
    assert ray.get(relayed) == 20
    assert server.pull(names("out"), batch_size=-1) == list(range(20))


# -- errors ------------------------------------------------------------------------------

def test_errors_survive_ray_get(api, names):
    q = names()
    api.add(q)
    with pytest.raises(pype.QueueExistsError):
        api.add(q)
    assert api.add(q, exist_ok=True) is False
    with pytest.raises(pype.QueueNotFoundError):
        api.remove(names("never"))
    with pytest.raises(pype.PypeError):
        api.print_queue(names("never"))


@pytest.mark.parametrize("call, error", [
    (lambda s: s.push(1, 5), TypeError),
    (lambda s: s.push(1, None), TypeError),
    (lambda s: s.push(1, ""), ValueError),
    (lambda s: s.push(1, "a\x00b"), ValueError),
    (lambda s: s.push(1, "x" * 300), ValueError),
    (lambda s: s.push(1, []), ValueError),
    (lambda s: s.push(5, "q", expand=True), TypeError),
    (lambda s: s.push(1, "q", timeout=-1), ValueError),
    (lambda s: s.push(1, "q", priority="high"), TypeError),
    (lambda s: s.push(threading.Lock(), "q"), TypeError),  # cannot be pickled
    (lambda s: s.pull(7), TypeError),
    (lambda s: s.pull(""), ValueError),
    (lambda s: s.pull("q", batch_size=0), ValueError),
    (lambda s: s.pull("q", batch_size=-2), ValueError),
    (lambda s: s.pull("q", batch_size=2.5), TypeError),
    (lambda s: s.pull("q", batch_size="3"), TypeError),
    (lambda s: s.can_pull(3), TypeError),
    (lambda s: s.can_pull("q", batch_size=0), ValueError),
    (lambda s: s.can_push(b"q"), TypeError),
    (lambda s: s.add(1), TypeError),
    (lambda s: s.add("q", kind="heap"), ValueError),
    (lambda s: s.add("q", maxsize=-1), ValueError),
    (lambda s: s.add("q", overflow="explode"), ValueError),
    (lambda s: s.add("q", kind="fifo", batch_size=4), ValueError),
    (lambda s: s.add("q", maxsize=3, use_locking=True), ValueError),
    (lambda s: s.push(1, "bad-priority-target", priority=1), ValueError),
    (lambda s: s.queue_len(None), TypeError),
    (lambda s: s.remove(""), ValueError),
])
def test_bad_input_is_a_clear_error_and_the_server_stays_healthy(api, names, call, error):
    with pytest.raises(error):
        call(api)
    q = names()
    assert api.push("ok", q) == 1
    assert api.pull(q) == ["ok"]


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


@ray.remote
class _Holder:
    def ready(self):
        return True


def test_server_remote_returns_once_its_shards_serve(fresh_server, names):
    """A shard that cannot start yet (here: no CPU free for it) keeps Server.remote
    waiting, rather than failing the first call at transport.request_timeout."""
    free = ray.available_resources().get("CPU", 0)
    if not free:
        pytest.skip("another test holds every CPU of this Ray")
    holder = _Holder.options(num_cpus=free).remote()
    ray.get(holder.ready.remote())
    started: list = []
    starting = threading.Thread(target=lambda: started.append(fresh_server(
        shards=1, shard={"num_cpus": 1}, transport={"request_timeout": 1})))
    starting.start()
    try:
        starting.join(timeout=5)  # the window in which it must not return (longer under load)
        assert not started, "Server.remote returned before its shard could start"
    finally:
        ray.kill(holder)
        starting.join()
    q = names()
    started[0].push(1, q)
    assert started[0].pull(q) == [1]


def test_anonymous_servers_do_not_share_queues(fresh_server):
    first, second = fresh_server(), fresh_server()
    ray.get(first.push.remote(1, "q"))
    assert ray.get(second.pull.remote("q")) == []
    assert ray.get(first.pull.remote("q")) == [1]


def test_handle_pickles_and_data_operations_hardly_ask_the_router(fresh_server):
    """Native calls never ask the router; `.remote()` calls, which must learn of a resize
    without waiting, ask it at most once per TOPOLOGY_CHECK seconds and process."""
    server = fresh_server(shards=4)
    copy = pickle.loads(pickle.dumps(server))
    assert copy.shard_of("abc") == shard_for("abc", 4, 0)

    @ray.remote(num_cpus=0)
    class Worker:
        def __init__(self, server):
            self.server = server

        def work(self, n, native):
            started = time.monotonic()
            for i in range(n):
                if native:
                    self.server.push(i, f"w{i % 10}")
                else:
                    self.server.push.remote(i, f"w{i % 10}")
            pulled = sum(len(self.server.pull(f"w{i}", batch_size=-1) if native else
                             ray.get(self.server.pull.remote(f"w{i}", batch_size=-1)))
                         for i in range(10))
            return pulled, time.monotonic() - started

    def asked():
        return server.stats()["router"]["topology_requests"]  # natively: it asks no router
    assert ray.get(Worker.remote(server).work.remote(200, True))[0] == 200
    assert asked() == 1  # only Server.remote() asked
    pulled, seconds = ray.get(Worker.remote(server).work.remote(200, False))
    assert pulled == 200
    assert asked() - 1 <= 1 + seconds / TOPOLOGY_CHECK
    assert server.stats()["totals"]["pushed"] == 400
    copy.push("through the copy", "pickled")
    assert server.pull("pickled") == ["through the copy"]


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
