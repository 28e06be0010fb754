"""Large items travel by reference: the same data arrives, the shard holds no copy."""


import re

import numpy as np
import ray

import pype
from pype.payloads import LARGE_ITEM
from tests.events import until


def test_large_arrays_and_frames_in_dicts_arrive_intact(server, names):
    q = names()
    frame = np.random.default_rng(1).integers(0, 255, (720, 1280, 3), dtype=np.uint8)
    blob = bytes(range(256)) * (LARGE_ITEM // 256 + 1)
    ray.get(server.push.remote([frame, {"frame": frame, "index": 7}, blob, np.arange(10)], q,
                               expand=True))
    assert "in the object store" in ray.get(server.print_queue.remote(q))  # the shard holds refs
    got_frame, record, got_blob, small = ray.get(server.pull.remote(q, batch_size=-1))
    assert np.array_equal(got_frame, frame)
    assert record["index"] == 7 and np.array_equal(record["frame"], frame)
    assert got_blob == blob
    assert np.array_equal(small, np.arange(10))


def test_an_item_whose_producer_died_is_a_clear_per_item_error(server, names):
    q = names()

    @ray.remote(num_cpus=0)
    class Camera:
        def push(self, server, q):
            return ray.get(server.push.remote(np.ones(LARGE_ITEM, np.uint8), q))

    camera = Camera.remote()
    assert ray.get(camera.push.remote(server, q)) == 1
    ray.get(server.push.remote("small item after it", q))
    ray.kill(camera)
    # Ray frees a dead owner's objects soon after its death: peek until it has.
    until(lambda: isinstance(ray.get(server.pull.remote(q, remove=False))[0], pype.ItemLostError),
          "Ray to free the dead producer's object")
    lost, after = ray.get(server.pull.remote(q, batch_size=-1))
    assert isinstance(lost, pype.ItemLostError) and "died" in str(lost)
    assert after == "small item after it"
    assert ray.get(server.push.remote(1, q)) == 1  # the server is fine


@ray.remote(num_cpus=0)
def stream_frames(server, queue, count):
    frame = np.zeros((1080, 1920, 3), np.uint8)
    for i in range(count):
        frame[0, 0, 0] = i % 256
        server.push(frame, queue)  # natively, in shared memory; the queue's line holds it back
    return count


def plasma_mib() -> int:
    """The object store's usage across the cluster (Ray has no public call for it)."""
    from ray._private.internal_api import memory_summary

    return int(re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True)).group(1))


def test_2000_frames_stream_through_without_growing_the_object_store_or_the_shard(
        fresh_server, names):
    server = fresh_server(shards=1)
    q = names()
    server.add(q, maxsize=8, overflow="block")
    store_before = plasma_mib()
    rss_before = server.stats()["shards"][0]["rss_mb"]
    source = stream_frames.remote(server, q, 2000)
    received = 0
    while received < 2000:
        for frame in server.pull(q, batch_size=-1, block=True, timeout=60):
            assert frame.shape == (1080, 1920, 3) and frame[0, 0, 0] == received % 256
            received += 1
    assert ray.get(source) == 2000
    shard = server.stats()["shards"][0]
    assert plasma_mib() <= store_before + 10, "frames were left in the object store"
    # 2,000 frames are 12 GB: a leak of even 10 of them (60 MB) would show.
    assert shard["rss_mb"] < rss_before + 50, (rss_before, shard["rss_mb"])
