"""pype.Queue keeps ray.util.queue.Queue's contract: the behaviours Ray's own
test_queue.py checks, written for pype.Queue, and what a drop-in must also hold."""

import asyncio
import pickle
import queue
from collections import Counter

import pytest
import ray

import pype
from pype import Empty, Full, Queue
from tests.events import until


def waiting_calls(q: Queue) -> int:
    """Requests parked in the shard of `q` now (blocked gets and puts); give `q` a server
    of its own (fresh_server), so that no other test's requests are counted."""
    return ray.get(q.server.stats.remote())["shards"][q.server.shard_of(q.name)]["waiting_calls"]


# num_cpus=0: a task blocked in a native call holds its CPU slot (Ray frees it only in ray.get)
@ray.remote(num_cpus=0)
def put_task(q, item, block=True, timeout=None):
    q.put(item, block, timeout)


@ray.remote(num_cpus=0)
def get_task(q, block=True, timeout=None):
    return q.get(block, timeout)


def test_simple_usage(ray_session):
    q = Queue()
    items = list(range(10))
    for item in items:
        q.put(item)
    for item in items:
        assert q.get() == item


def test_empty_and_full_are_the_standard_librarys_and_rays():
    import ray.util.queue

    assert issubclass(Empty, queue.Empty) and issubclass(Full, queue.Full)
    assert issubclass(Empty, ray.util.queue.Empty) and issubclass(Full, ray.util.queue.Full)
    assert issubclass(Empty, pype.PypeError)


@ray.remote  # one CPU each, as Ray's own test_queue.py has them
def put_holding_a_cpu(q, item):
    q.put(item)


@ray.remote
def get_holding_a_cpu(q):
    return q.get()


def test_tasks_that_hold_a_cpu_do_not_starve_each_other(ray_session):
    """More consumer tasks than CPUs wait for producer tasks queued behind them: each
    waiting get lends its CPU slot (it waits through a Ray call), as with ray.util.queue."""
    q = Queue()
    consumers = [get_holding_a_cpu.remote(q) for _ in range(6)]  # the session has 2 CPUs
    producers = [put_holding_a_cpu.remote(q, item) for item in range(6)]
    ray.get(producers)
    assert sorted(ray.get(consumers)) == list(range(6))


def test_puts_and_gets_from_tasks_meet(ray_session):
    q = Queue()
    consumers = [get_task.remote(q) for _ in range(10)]  # they wait in the shard
    ray.get([put_task.remote(q, item) for item in range(10)])
    assert sorted(ray.get(consumers)) == list(range(10))


def test_put(ray_session):
    q = Queue(1)
    q.put(0, block=False)
    assert q.get() == 0
    q.put(1, timeout=0.2)
    assert q.get() == 1
    with pytest.raises(ValueError, match="must be >= 0"):
        q.put(0, timeout=-1)
    q.put(0)
    with pytest.raises(Full):
        q.put_nowait(1)
    with pytest.raises(Full):
        q.put(1, timeout=0.2)
    assert q.qsize() == 1  # the refused puts left nothing behind


def test_a_blocked_put_enters_when_a_get_makes_room(fresh_server):
    server = fresh_server(shards=1)
    q = Queue(1, server=server)
    q.put("first")
    blocked = put_task.remote(q, "second")
    until(lambda: waiting_calls(q) == 1, "the put to wait in the shard")
    assert q.get() == "first"
    ray.get(blocked)
    assert q.get_nowait() == "second"


def test_get(ray_session):
    q = Queue()
    q.put(0)
    assert q.get(block=False) == 0
    q.put(1)
    assert q.get(timeout=0.2) == 1
    with pytest.raises(ValueError, match="must be >= 0"):
        q.get(timeout=-1)
    with pytest.raises(Empty):
        q.get_nowait()
    with pytest.raises(Empty):
        q.get(timeout=0.2)


def test_a_blocked_get_wakes_on_a_put(fresh_server):
    server = fresh_server(shards=1)
    q = Queue(server=server)
    waiting = get_task.remote(q)
    until(lambda: waiting_calls(q) == 1, "the get to wait in the shard")
    q.put("item")
    assert ray.get(waiting) == "item"


def test_qsize_empty_full(ray_session):
    q = Queue(3)
    assert q.qsize() == q.size() == len(q) == 0 and q.empty() and not q.full()
    for size in range(1, 4):
        q.put(size)
        assert q.qsize() == size
    assert q.full() and not q.empty()
    for size in range(2, -1, -1):
        q.get()
        assert q.qsize() == size
    unbounded = Queue(-1)  # 0 or less: no bound, as in asyncio.Queue
    unbounded.put_nowait_batch(range(1000))
    assert not unbounded.full()


def test_batches_are_all_or_nothing(ray_session):
    q = Queue(3)
    q.put_nowait_batch([1, 2])
    with pytest.raises(Full):
        q.put_nowait_batch([3, 4])
    assert q.qsize() == 2
    with pytest.raises(Empty):
        q.get_nowait_batch(3)
    assert q.qsize() == 2  # nothing taken
    q.put_nowait_batch(iter([3]))
    assert q.get_nowait_batch(3) == [1, 2, 3]
    with pytest.raises(Full):  # Ray's own test_batch: more than maxsize at once
        Queue(1).put_nowait_batch([1, 2])
    assert q.get_nowait_batch(0) == []
    with pytest.raises(TypeError):
        q.put_nowait_batch(5)
    with pytest.raises(TypeError):
        q.get_nowait_batch(1.5)
    with pytest.raises(ValueError):
        q.get_nowait_batch(-1)


def test_async_variants(ray_session):
    q = Queue(1)

    async def main():
        await q.put_async(1)
        with pytest.raises(Full):
            await q.put_async(2, block=False)
        with pytest.raises(Full):
            await q.put_async(2, timeout=0.1)
        getter = asyncio.ensure_future(asyncio.gather(q.get_async(), q.get_async()))
        await q.put_async(2)  # waits until the first get made room
        assert sorted(await getter) == [1, 2]
        with pytest.raises(Empty):
            await q.get_async(block=False)
        with pytest.raises(ValueError):
            await q.get_async(timeout=-1)

    asyncio.run(main())


def test_an_async_actor_gets_without_blocking_its_loop(fresh_server):
    server = fresh_server(shards=1)
    @ray.remote(num_cpus=0)
    class Consumer:
        async def take(self, q, count):
            return [await q.get_async() for _ in range(count)]

        async def ping(self):
            return "pong"

    q = Queue(server=server)
    consumer = Consumer.remote()
    taken = consumer.take.remote(q, 3)
    until(lambda: waiting_calls(q) == 1, "the actor's get to wait in the shard")
    assert ray.get(consumer.ping.remote()) == "pong"  # its event loop still serves
    q.put_nowait_batch(["a", "b", "c"])
    assert ray.get(taken) == ["a", "b", "c"]


def test_shutdown_removes_the_queue_for_every_process(fresh_server):
    server = fresh_server(shards=1)
    q = Queue(server=server)
    q.put_nowait_batch([1, 2, 3])
    other = Queue(server=server)  # a waiting get on q ends when q goes; others are untouched
    other.put("kept")
    q.get_nowait_batch(3)
    waiting = get_task.remote(q)
    until(lambda: waiting_calls(q) == 1, "the get to wait in the shard")
    q.shutdown()
    with pytest.raises(pype.QueueNotFoundError):  # parked in the shard, or arriving just after
        ray.get(waiting)
    with pytest.raises(pype.QueueNotFoundError):
        q.put(4)
    with pytest.raises(pype.QueueNotFoundError):
        ray.get(put_task.remote(q, 4))  # not made again by a put from another process
    with pytest.raises(pype.QueueNotFoundError):
        q.qsize()
    q.shutdown()  # twice is fine
    assert other.get() == "kept"


def test_a_queue_is_picklable_and_every_copy_is_the_same_queue(ray_session):
    q = Queue()
    copy = pickle.loads(pickle.dumps(q))
    copy.put("via the copy")
    assert q.get() == "via the copy"

    @ray.remote
    class Holder:
        def __init__(self, q):
            self.q = q

        def put(self, item):
            self.q.put(item)

    holder = Holder.remote(q)
    ray.get(holder.put.remote("from an actor"))
    assert q.get() == "from an actor"


def test_queues_of_one_job_share_one_default_server(ray_session):
    first, second = Queue(), Queue()
    assert first.server.name == second.server.name == f"queues-{ray.get_runtime_context().get_job_id()}"

    @ray.remote
    def made_in_a_task():
        return Queue().server.name

    assert ray.get(made_in_a_task.remote()) == first.server.name


def test_options_and_names(ray_session, fresh_server):
    with pytest.raises(ValueError, match="do not apply"):
        Queue(actor_options={"runtime_env": {}})
    server = fresh_server(shards=2)
    with pytest.raises(ValueError, match="default server"):
        Queue(actor_options={"num_cpus": 1}, server=server)
    with pytest.raises(TypeError):
        Queue("10")
    q = Queue(2, server=server, name="jobs")
    assert Queue(2, server=server, name="jobs").name == "jobs"  # attaches to it
    with pytest.raises(pype.QueueExistsError, match="maxsize"):
        Queue(5, server=server, name="jobs")
    q.put(1)
    assert server.pull("jobs") == [1]  # an ordinary queue of that server


@ray.remote(num_cpus=0)
def produce(q, producer, count):
    for sequence in range(count):
        q.put((producer, sequence))


@ray.remote(num_cpus=0)
def consume(q, count):
    return [q.get() for _ in range(count)]


def test_many_producers_and_consumers_exact_multiset_and_per_producer_order(ray_session):
    q = Queue(64)  # small: producers wait for room, consumers for items
    producers, consumers, count = 4, 4, 500
    produced = [produce.remote(q, p, count) for p in range(producers)]
    taken = ray.get([consume.remote(q, producers * count // consumers) for _ in range(consumers)])
    ray.get(produced)
    everything = [item for got in taken for item in got]
    assert Counter(everything) == Counter((p, s) for p in range(producers) for s in range(count))
    for got in taken:  # each consumer sees each producer's items in the order they were put
        for p in range(producers):
            sequences = [s for producer, s in got if producer == p]
            assert sequences == sorted(sequences)
    assert q.empty()
