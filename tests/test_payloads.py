"""Large items travel by reference: the same data arrives, the shard holds no copy."""


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
