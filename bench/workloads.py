"""The workloads, each for every system. One call measures one round of one system.

Every function returns a dict of metrics. Items are small ints unless said. The
chain is the seed README's: a source, 6 stages, a sink, one queue per link.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import statistics
import time
import uuid

import numpy as np
import psutil
import ray
from ray.util.queue import Queue as RayQueue

import pype
from bench.seed_examples.data_communication_chains import f, start

STAGES = 6
END = -1
FRAME_SHAPE = (1080, 1920, 3)


def _links(prefix: str, tagged: bool = False) -> list[str]:
    """The chain's queue names; tagged: with one hash tag, so that they live on one shard."""
    tag = f"{prefix}-{uuid.uuid4().hex[:6]}"
    if tagged:
        tag = f"{{{tag}}}"
    return [f"{tag}-{i}" for i in range(STAGES + 1)]


class Arrivals:
    """Counts items at a chain's sink and reports their rate and the first item's delay.

    from_first=True: the rate runs from the first arrival on, leaving out the seconds
    Ray takes to start processes before it (the seed's chain, video). Otherwise it runs
    from the start to the last arrival: the chains below run warm (see warmed), and a
    batched chain may deliver all its items in a few batches, where a rate from the
    first arrival would measure nothing.
    """

    def __init__(self, from_first: bool = False):
        self.started = time.perf_counter()
        self.from_first = from_first
        self.first_at = self.last_at = None
        self.counted = 0

    def add(self, count: int) -> None:
        self.last_at = time.perf_counter()
        if self.first_at is None:
            self.first_at = self.last_at
            if self.from_first:
                return
        self.counted += count

    def result(self) -> dict:
        since = self.first_at if self.from_first else self.started
        return {"items_per_s": self.counted / (self.last_at - since),
                "first_item_s": self.first_at - self.started}


WARM_ITEMS = 50


def warmed(chain):
    """Run `chain` with WARM_ITEMS items first, so that Ray has started the chain's
    task processes (seconds on 2 cores) before the measured run reuses them."""
    signature = inspect.signature(chain)

    @functools.wraps(chain)
    def run(*args, **kwargs):
        warm = signature.bind(*args, **kwargs)
        warm.arguments["items"] = WARM_ITEMS
        chain(*warm.args, **warm.kwargs)
        return chain(*args, **kwargs)

    return run


# -- chain: Pype ------------------------------------------------------------------------

@ray.remote(num_cpus=0)
def pype_source(server, queue, items, mode):
    if mode == "single":
        for i in range(items):
            server.push.remote(i, queue)
        server.push.remote(END, queue)
    elif mode == "batched":
        for first in range(0, items, 1000):
            server.push.remote(list(range(first, min(first + 1000, items))), queue, expand=True)
        server.push.remote(END, queue)
    elif mode in ("native single", "native push_pull"):
        for i in range(items):
            server.push(i, queue)
        server.push(END, queue)
    elif mode == "native batched":
        for first in range(0, items, 1000):
            server.push(list(range(first, min(first + 1000, items))), queue, expand=True)
        server.push(END, queue)
    else:
        with server.producer(queue) as out:
            for i in range(items):
                out.push(i)
            out.push(END)


@ray.remote(num_cpus=0)
def pype_stage(server, source, output, mode):
    if mode == "single":
        while True:
            item = ray.get(server.pull.remote(source, block=True))[0]
            server.push.remote(item, output)
            if item == END:
                return
    elif mode == "batched":
        while True:
            items = ray.get(server.pull.remote(source, batch_size=-1, block=True))
            server.push.remote(items, output, expand=True)
            if items[-1] == END:
                return
    elif mode == "native single":
        while True:
            item = server.pull(source, block=True)[0]
            server.push(item, output)
            if item == END:
                return
    elif mode == "native push_pull":  # its push and its next pull in one round trip
        item = server.pull(source, block=True)[0]
        while item != END:
            item = server.push_pull(item, output, source, block=True)[0]
        server.push(END, output)
    elif mode == "native batched":
        while True:
            items = server.pull(source, batch_size=-1, block=True)
            server.push(items, output, expand=True)
            if items[-1] == END:
                return
    elif mode == "helpers batches":  # each pull's batch handed over whole
        with server.producer(output) as out, server.consume(source) as stream:
            for batch in stream.batches():
                out.extend(batch)
                if batch[-1] == END:
                    break
    else:
        with server.producer(output) as out, \
                server.consume(source) as items:
            for item in items:
                out.push(item)
                if item == END:
                    break


@warmed
def pype_chain(server: pype.Server, items: int, mode: str) -> dict:
    """mode: single (one item per call), batched (all available per call), each through
    .remote() or natively ("native single", "native batched"); "native push_pull" (one item
    per call, a stage's push and next pull in one request: the queues share a hash tag);
    or helpers (consume and producer, native; "helpers batches": the stages hand each
    batch over whole)."""
    links = _links(f"chain-{mode}", tagged=mode == "native push_pull")
    arrivals = Arrivals()
    pype_source.remote(server, links[0], items, mode)
    for source, output in itertools.pairwise(links):
        pype_stage.remote(server, source, output, mode)
    received = 0
    if mode.startswith("helpers"):
        with server.consume(links[-1]) as stream:
            for item in stream:
                if item == END:
                    break
                received += 1
                arrivals.add(1)
    else:
        size = 1 if mode.endswith(("single", "push_pull")) else -1
        while True:
            if mode.startswith("native"):
                batch = server.pull(links[-1], batch_size=size, block=True)
            else:
                batch = ray.get(server.pull.remote(links[-1], batch_size=size, block=True))
            count = len(batch) - (batch[-1] == END)
            received += count
            if count:
                arrivals.add(count)
            if batch[-1] == END:
                break
    result = arrivals.result()
    assert received == items, (received, items)
    for name in links:
        server.remove.remote(name)
    return result


# -- chain: the seed README's polling code, as written there ---------------------------------
# start and f are imported from the seed's example script, unchanged.


def seed_chain(server: pype.Server) -> dict:
    """The seed's main(), minus ray.init/shutdown and its print; 100 items."""
    links = _links("seed")
    for name in links:
        server.add.remote(name, use_locking=True)
    arrivals = Arrivals(from_first=True)
    start.remote(server, links[0])
    stages = [f.remote(server, source, output) for source, output in itertools.pairwise(links)]
    for _ in range(100):
        while True:
            if ray.get(server.can_pull.remote(links[-1])):
                break
            else:
                time.sleep(1e-3)
        ray.get(server.pull.remote(links[-1]))
        arrivals.add(1)
        server.print_queue.remote(links[-1])
    result = arrivals.result()
    for stage in stages:  # the seed's stages loop forever
        ray.cancel(stage, force=True)
    for name in links:
        server.remove.remote(name)
    return result


# -- chain: ray.util.queue.Queue, one per link ----------------------------------------------

@ray.remote(num_cpus=0)
def ray_queue_stage(source, output):
    while True:
        item = source.get()
        output.put(item)
        if item == END:
            return


@warmed
def ray_queue_chain(items: int) -> dict:
    links = [RayQueue(actor_options={"num_cpus": 0}) for _ in range(STAGES + 1)]
    ray.get([q.actor.qsize.remote() for q in links])  # started before the clock runs
    arrivals = Arrivals()
    for source, output in itertools.pairwise(links):
        ray_queue_stage.remote(source, output)
    for i in range(items):
        links[0].put(i)
    links[0].put(END)
    received = 0
    while links[-1].get() != END:
        received += 1
        arrivals.add(1)
    result = arrivals.result()
    assert received == items
    for q in links:
        q.shutdown()
    return result


# -- chain: Redis lists ----------------------------------------------------------------------

@ray.remote(num_cpus=0)
def redis_stage(port, source, output, batched, pipelined=False):
    import redis

    client = redis.Redis(port=port)
    if pipelined:  # LPUSH and the next BRPOP in one round trip
        _, item = client.brpop([source])
        while item != b"-1":
            pipe = client.pipeline(transaction=False)
            pipe.lpush(output, item)
            pipe.brpop([source])
            _, (_, item) = pipe.execute()
        client.lpush(output, item)
        return
    while True:
        if batched:
            _, items = client.blmpop(0, 1, source, direction="RIGHT", count=1000)
            client.lpush(output, *items)
            if items[-1] == b"-1":
                return
        else:
            _, item = client.brpop([source])
            client.lpush(output, item)
            if item == b"-1":
                return


@warmed
def redis_chain(port: int, items: int, batched: bool, pipelined: bool = False) -> dict:
    """pipelined: each stage sends its LPUSH and its next BRPOP in one round trip."""
    import redis

    client = redis.Redis(port=port)
    links = _links("redis")
    arrivals = Arrivals()
    for source, output in itertools.pairwise(links):
        redis_stage.remote(port, source, output, batched, pipelined)
    if batched:
        for first in range(0, items, 1000):
            client.lpush(links[0], *range(first, min(first + 1000, items)))
    else:
        for i in range(items):
            client.lpush(links[0], i)
    client.lpush(links[0], END)
    received = 0
    while True:
        if batched:
            _, batch = client.blmpop(0, 1, links[-1], direction="RIGHT", count=1000)
        else:
            batch = [client.brpop([links[-1]])[1]]
        count = len(batch) - (batch[-1] == b"-1")
        received += count
        if count:
            arrivals.add(count)
        if batch[-1] == b"-1":
            break
    result = arrivals.result()
    assert received == items
    return result


# -- ping-pong --------------------------------------------------------------------------------

@ray.remote(num_cpus=0)
class Echo:
    """Sends every ping back as a pong, through each system in turn."""

    def pype(self, server, ping, pong, count):
        for _ in range(count):
            server.push.remote(ray.get(server.pull.remote(ping, block=True))[0], pong)

    def pype_native(self, server, ping, pong, count):
        for _ in range(count):
            server.push(server.pull(ping, block=True)[0], pong)

    def ray_queue(self, ping, pong, count):
        for _ in range(count):
            pong.put(ping.get())

    def redis(self, port, ping, pong, count):
        import redis

        client = redis.Redis(port=port)
        for _ in range(count):
            client.lpush(pong, client.brpop([ping])[1])

    def noop(self):
        return None


def _latencies(send_and_wait, count: int) -> dict:
    times = []
    for i in range(count):
        began = time.perf_counter()
        send_and_wait(i)
        times.append(time.perf_counter() - began)
    times.sort()
    return {"p50_ms": statistics.median(times) * 1e3, "p99_ms": times[int(0.99 * (len(times) - 1))] * 1e3}


def ping_pong(system: str, echo, count: int, server=None, port=None) -> dict:
    if system == "raw floor":  # two round trips to a no-op actor
        return _latencies(lambda i: (ray.get(echo.noop.remote()), ray.get(echo.noop.remote())), count)
    if system == "pype":
        ping, pong = _links("ping")[:2]
        done = echo.pype.remote(server, ping, pong, count)

        def once(i):
            server.push.remote(i, ping)
            ray.get(server.pull.remote(pong, block=True))
    elif system == "pype native":
        ping, pong = _links("ping")[:2]
        done = echo.pype_native.remote(server, ping, pong, count)

        def once(i):
            server.push(i, ping)
            server.pull(pong, block=True)
    elif system == "ray.util.queue":
        ping, pong = RayQueue(actor_options={"num_cpus": 0}), RayQueue(actor_options={"num_cpus": 0})
        done = echo.ray_queue.remote(ping, pong, count)

        def once(i):
            ping.put(i)
            pong.get()
    else:
        import redis

        client = redis.Redis(port=port)
        ping, pong = _links("ping")[:2]
        done = echo.redis.remote(port, ping, pong, count)

        def once(i):
            client.lpush(ping, i)
            client.brpop([pong])
    result = _latencies(once, count)
    ray.get(done)
    return result


# -- bulk -----------------------------------------------------------------------------------

def bulk(system: str, items: int, server=None, port=None) -> dict:
    """Push `items` small items in batched calls, then pull them all back."""
    data = list(range(items))
    if system == "pype":
        queue = _links("bulk")[0]
        started = time.perf_counter()
        ray.get(server.push.remote(data, queue, expand=True))
        back = ray.get(server.pull.remote(queue, batch_size=-1))
    elif system == "pype native":
        queue = _links("bulk")[0]
        started = time.perf_counter()
        server.push(data, queue, expand=True)
        back = server.pull(queue, batch_size=-1)
    elif system == "ray.util.queue":
        queue = RayQueue(actor_options={"num_cpus": 0})
        started = time.perf_counter()
        queue.put_nowait_batch(data)
        back = queue.get_nowait_batch(items)
        queue.shutdown()
    else:
        import redis

        client = redis.Redis(port=port)
        queue = _links("bulk")[0]
        started = time.perf_counter()
        for first in range(0, items, 10_000):
            client.rpush(queue, *data[first:first + 10_000])
        back = []
        while len(back) < items:
            back += client.lpop(queue, 10_000)
    seconds = time.perf_counter() - started
    assert len(back) == items
    return {"items_per_s": items / seconds}


# -- queue: pype.Queue and ray.util.queue.Queue, the same code for both ----------------------

def make_queue(system: str, maxsize: int = 0):
    kind = RayQueue if system == "ray.util.queue" else pype.Queue
    return kind(maxsize, actor_options={"num_cpus": 0})


def queue_put_get(system: str, count: int) -> dict:
    """Blocking put then get of one item, `count` times, in the driver."""
    queue = make_queue(system)
    started = time.perf_counter()
    for item in range(count):
        queue.put(item)
        assert queue.get() == item
    seconds = time.perf_counter() - started
    queue.shutdown()
    return {"pairs_per_s": count / seconds}


@ray.remote(num_cpus=0)
def queue_producer(queue, producer: int, count: int) -> None:
    for sequence in range(count):
        queue.put((producer, sequence))


@ray.remote(num_cpus=0)
def queue_consumer(queue, count: int) -> int:
    for _ in range(count):
        queue.get()
    return count


def queue_tasks(system: str, per_task: int, tasks: int = 4) -> dict:
    """`tasks` producer tasks and `tasks` consumer tasks, one item per call, through one queue."""
    queue = make_queue(system, maxsize=1000)
    ray.get([queue_producer.remote(queue, 0, 0) for _ in range(2 * tasks)])  # workers started
    started = time.perf_counter()
    consumers = [queue_consumer.remote(queue, per_task) for _ in range(tasks)]
    ray.get([queue_producer.remote(queue, p, per_task) for p in range(tasks)])
    assert sum(ray.get(consumers)) == tasks * per_task
    seconds = time.perf_counter() - started
    queue.shutdown()
    return {"items_per_s": tasks * per_task / seconds}


def queue_batches(system: str, items: int) -> dict:
    """put_nowait_batch of `items` small items, then get_nowait_batch of them all."""
    queue, data = make_queue(system), list(range(items))
    started = time.perf_counter()
    queue.put_nowait_batch(data)
    back = queue.get_nowait_batch(items)
    seconds = time.perf_counter() - started
    assert back == data
    queue.shutdown()
    return {"items_per_s": items / seconds}


# -- frames ---------------------------------------------------------------------------------

@ray.remote(num_cpus=0)
def frame_source(system, count, server=None, queue=None, port=None):
    frame = np.random.default_rng(0).integers(0, 255, FRAME_SHAPE, dtype=np.uint8)
    if system == "pype":
        for i in range(count):
            server.push.remote(frame, queue)  # a full queue: the push waits in its line
    elif system == "pype native":
        for i in range(count):
            server.push(frame, queue)  # by value, out of band; a full queue: waits in line
    else:
        import redis

        client = redis.Redis(port=port)
        for i in range(count):
            client.lpush(queue, frame.tobytes())


@ray.remote(num_cpus=0, num_returns="streaming", _generator_backpressure_num_objects=8)
def frame_stream(count):
    """Ray's own way to hand frames to another process: each yield is a ray.put."""
    frame = np.random.default_rng(0).integers(0, 255, FRAME_SHAPE, dtype=np.uint8)
    for _ in range(count):
        yield frame


def frames(system: str, count: int, server=None, port=None) -> dict:
    """1080p uint8 BGR frames (6 MB) through one queue hop, from a task to the driver."""
    if system == "cross-process floor":  # a task puts each frame, the driver gets it
        started = time.perf_counter()
        for ref in frame_stream.remote(count):
            got = ray.get(ref)
        assert got.shape == FRAME_SHAPE
        return {"frames_per_s": count / (time.perf_counter() - started)}
    if system == "raw floor":  # ray.put + ray.get of the same array
        frame = np.random.default_rng(0).integers(0, 255, FRAME_SHAPE, dtype=np.uint8)
        started = time.perf_counter()
        for _ in range(count):
            got = ray.get(ray.put(frame))
        assert got.shape == FRAME_SHAPE
        return {"frames_per_s": count / (time.perf_counter() - started)}
    queue = _links("frames")[0]
    if system.startswith("pype"):  # bounded, as a video pipeline would be
        ray.get(server.add.remote(queue, maxsize=8, overflow="block"))
    started = time.perf_counter()
    source = frame_source.remote(system, count, server, queue, port)
    if system.startswith("pype"):
        received = 0
        while received < count:  # each pull takes every frame there (at least one)
            if system == "pype":
                batch = ray.get(server.pull.remote(queue, batch_size=-1, block=True))
            else:
                batch = server.pull(queue, batch_size=-1, block=True)
            received += len(batch)
        got = batch[-1]
    else:
        import redis

        client = redis.Redis(port=port)
        for _ in range(count):
            got = np.frombuffer(client.brpop([queue])[1], np.uint8).reshape(FRAME_SHAPE)
    seconds = time.perf_counter() - started
    ray.get(source)
    assert got.shape == FRAME_SHAPE
    return {"frames_per_s": count / seconds}


# -- spread -----------------------------------------------------------------------------------

@ray.remote(num_cpus=0)
def spread_producer(server, names, rounds):
    for _ in range(rounds):
        for name in names:
            server.push.remote(list(range(10)), name, expand=True)
    return len(names) * rounds  # calls made


@ray.remote(num_cpus=0)
def spread_consumer(server, names, expected):
    got = calls = 0
    while got < expected:
        for name in names:
            got += len(ray.get(server.pull.remote(name, batch_size=-1)))
            calls += 1
    return calls


def spread(shards: int, queues: int = 1000, workers: int = 4, rounds: int = 5) -> dict:
    """Many queues, many producers and consumers, over `shards` shards."""
    server = pype.Server.remote(shards=shards)
    try:
        ray.get(server.queues.remote())  # every shard up before the clock runs
        names = [f"spread-{i}" for i in range(queues)]
        parts = [names[w::workers] for w in range(workers)]
        started = time.perf_counter()
        consumers = [spread_consumer.remote(server, part, len(part) * rounds * 10) for part in parts]
        push_calls = sum(ray.get([spread_producer.remote(server, part, rounds) for part in parts]))
        pull_calls = sum(ray.get(consumers))
        seconds = time.perf_counter() - started
        stats = ray.get(server.stats.remote())
        assert stats["totals"]["pulled"] == stats["totals"]["pushed"] == queues * rounds * 10
        load = [s["pushed"] for s in stats["shards"]]
        return {"items_per_s": queues * rounds * 10 / seconds,
                "max_over_mean_load": max(load) / statistics.mean(load),
                "router_calls_per_op": (stats["router"]["topology_requests"] - 1)
                / (push_calls + pull_calls)}
    finally:
        server.shutdown()


# -- video --------------------------------------------------------------------------------

def video(system: str, clip: str, server=None) -> dict:
    """Frames of a 1080p clip: decoded by OpenCV alone, or through a VideoServer and one hop."""
    import cv2

    if system == "opencv decode only":
        capture = cv2.VideoCapture(clip)
        started, frames = time.perf_counter(), 0
        while capture.read()[0]:
            frames += 1
        capture.release()
        return {"frames_per_s": frames / (time.perf_counter() - started)}
    queue = _links("video")[0]
    arrivals = Arrivals(from_first=True)  # the video actor's process start is reported apart
    stream = pype.VideoServer.remote(server, file=clip, output_queues=queue)
    while True:
        items = ray.get(server.pull.remote(queue, batch_size=-1, block=True))
        ended = isinstance(items[-1], pype.EndOfStream)
        if len(items) - ended:
            arrivals.add(len(items) - ended)
        if ended:
            break
    result = arrivals.result()
    ray.get(stream.stop.remote())
    server.remove.remote(queue)
    return {"frames_per_s": result["items_per_s"], "first_frame_s": result["first_item_s"]}


# -- durability ---------------------------------------------------------------------------------

def durable_pushes(server, count: int, native: bool, batch: int = 1000) -> dict:
    """Acknowledged pushes to a server: one item per call, then batches of `batch`."""
    queue = _links("durable")[0]
    push = server.push if native else (lambda *a, **k: ray.get(server.push.remote(*a, **k)))
    started = time.perf_counter()
    for item in range(count):
        push(item, queue)
    single = count / (time.perf_counter() - started)
    data = list(range(batch))
    started = time.perf_counter()
    for _ in range(count // 10):
        push(data, queue, expand=True)
    batched = count // 10 * batch / (time.perf_counter() - started)
    server.remove(queue)
    return {"pushes_per_s": single, "items_per_s": batched}


# -- one shard's capacity -----------------------------------------------------------------------

@ray.remote(num_cpus=0)
def pipelined_producer(server, queue, count, window):
    """One-item pushes, `window` of them unanswered at a time (a Producer of batch_size 1)."""
    with server.producer(queue, batch_size=1, window=window) as out:
        server.push("ready", "capacity-ready")  # connected; now wait for the start
        server.pull(f"{queue}-go", block=True)
        for i in range(count):
            out.push(i)
    return count


@ray.remote(num_cpus=0)
def redis_pipelined_producer(port, queue, count, window):
    """One-item LPUSHes to a redis-server, `window` of them per pipeline: Redis's way of keeping
    `window` requests in flight from one connection."""
    import redis

    client = redis.Redis(port=port)
    client.lpush("capacity-ready", 1)
    client.brpop(f"{queue}-go")
    for first in range(0, count, window):
        pipe = client.pipeline(transaction=False)
        for i in range(first, min(first + window, count)):
            pipe.lpush(queue, i)
        pipe.execute()
    return count


def redis_capacity(port: int, processes: int = 4, per_process: int = 20_000, window: int = 64) -> dict:
    """One redis-server under the load of `capacity`: `processes` processes, each sending
    pipelines of `window` one-item LPUSHes."""
    import redis

    client = redis.Redis(port=port)
    names = [f"capacity-{p}" for p in range(processes)]
    client.delete("capacity-ready", *names)
    done = [redis_pipelined_producer.remote(port, name, per_process, window) for name in names]
    for _ in range(processes):
        client.brpop("capacity-ready")
    started = time.perf_counter()
    for name in names:
        client.lpush(f"{name}-go", 1)
    done = ray.get(done)
    seconds = time.perf_counter() - started
    assert sum(done) == sum(client.llen(name) for name in names) == processes * per_process
    client.delete(*names)
    return {"items_per_s": processes * per_process / seconds}


def capacity(processes: int = 4, per_process: int = 20_000, window: int = 64) -> dict:
    """Pipelined one-item native pushes from `processes` processes into one shard."""
    server = pype.Server.remote(shards=1)
    try:
        names = [f"capacity-{p}" for p in range(processes)]
        done = [pipelined_producer.remote(server, name, per_process, window) for name in names]
        ready = 0
        while ready < processes:  # every process started and connected before the clock runs
            ready += len(server.pull("capacity-ready", batch_size=-1, block=True))
        started = time.perf_counter()
        for name in names:
            server.push("go", f"{name}-go")
        done = ray.get(done)
        seconds = time.perf_counter() - started
        assert sum(done) == sum(server.queue_len(name) for name in names) == processes * per_process
        return {"items_per_s": processes * per_process / seconds}
    finally:
        server.shutdown()


# -- scale: many queues, or one partitioned queue, over 1 to 8 shards ----------------------

def _ready_set_go(server) -> None:
    """Tell the bench this process is up and connected; wait for its start signal."""
    server.push("ready", "scale-ready")
    server.pull("scale-go", block=True)


@ray.remote(num_cpus=0)
def scale_producer(server, names, count):
    """`count` native one-item pushes, over `names` in turn."""
    _ready_set_go(server)
    for i in range(count):
        server.push(i, names[i % len(names)])
    return count


@ray.remote(num_cpus=0)
def scale_consumer(server, names, count):
    """`count` native blocking one-item pulls, over `names` in the order a scale_producer
    pushes to them (for many queues each waits for the very item its producer sends next)."""
    _ready_set_go(server)
    got = 0
    for i in range(count):
        got += len(server.pull(names[i % len(names)], 1, block=True, timeout=60))
    return got


def _shard_cpu(processes) -> list[float]:
    return [sum(process.cpu_times()[:2]) for process in processes]


def scale(shards: int, partitioned: bool, processes: int = 8, per_process: int = 1000,
          queues: int = 1024) -> dict:
    """`processes` producers and as many consumers, native, one item per call: over many
    queues (producer p and consumer p share queues[p::processes]), or all on one queue of
    `processes` partitions (a producer is pinned to one; so many keep every shard busy).

    Measures items/s; each shard's CPU per 1,000 requests it served, with its idle CPU
    (housekeeping, Ray's threads; measured for a second before) taken off; how evenly the
    shards were loaded (pushes per shard, max over mean); router calls per operation."""
    server = pype.Server.remote(shards=shards)
    try:
        if partitioned:
            server.add("scale-hot", partitions=processes)
            parts = [["scale-hot"]] * processes
        else:
            names = [f"scale-{i}" for i in range(queues)]
            parts = [names[p::processes] for p in range(processes)]
        before = server.stats()
        shard_processes = [psutil.Process(shard["pid"]) for shard in before["shards"]]
        idle_before, idle_started = _shard_cpu(shard_processes), time.perf_counter()
        time.sleep(1.0)
        idle = [(c - b) / (time.perf_counter() - idle_started)
                for c, b in zip(_shard_cpu(shard_processes), idle_before, strict=True)]
        consumers = [scale_consumer.remote(server, part, per_process) for part in parts]
        producers = [scale_producer.remote(server, part, per_process) for part in parts]
        ready = 0
        while ready < 2 * processes:  # every process started and connected: now the clock runs
            ready += len(server.pull("scale-ready", batch_size=-1, block=True))
        before = server.stats()
        cpu_before = _shard_cpu(shard_processes)
        started = time.perf_counter()
        server.push(["go"] * 2 * processes, "scale-go", expand=True)
        pushed, pulled = sum(ray.get(producers)), sum(ray.get(consumers))
        seconds = time.perf_counter() - started
        busy = [c - b - rate * seconds for c, b, rate
                in zip(_shard_cpu(shard_processes), cpu_before, idle, strict=True)]
        after = server.stats()
        assert pushed == pulled == processes * per_process
        pushed_go = 2 * processes  # the start signals, on one shard: not the workload's
        pairs = list(zip(after["shards"], before["shards"], strict=True))
        requests = [a["native_requests"] + a["ray_requests"] - b["native_requests"] - b["ray_requests"]
                    for a, b in pairs]
        pushes = [a["pushed"] - b["pushed"] for a, b in pairs]
        pushes[server.shard_of("scale-go")] -= pushed_go
        return {"items_per_s": pushed / seconds,
                "shard_cpu_ms_per_1000_requests": 1e6 * sum(busy) / sum(requests),
                "requests_per_item": sum(requests) / pushed,
                "max_over_mean_load": max(pushes) / statistics.mean(pushes),
                "router_calls_per_op": (after["router"]["topology_requests"]
                                        - before["router"]["topology_requests"]) / sum(requests)}
    finally:
        server.shutdown()
