"""VideoServer on a clip written here (no camera exists on CI machines)."""

import time

import cv2
import numpy as np
import pytest
import ray

import pype
from tests.events import until

FRAMES = 24


def write_clip(path, frames=FRAMES, size=(640, 360)):
    """A short MJPG clip with a moving square: frames differ from each other."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, size)
    for i in range(frames):
        frame = np.full((size[1], size[0], 3), (i * 9) % 255, np.uint8)
        cv2.rectangle(frame, (10 + 20 * i, 50), (60 + 20 * i, 120), (0, 0, 255), -1)
        writer.write(frame)
    writer.release()
    return path


def decoded(path):
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(frame)


def drain(server, queue, timeout=30):
    """Items of `queue` up to and including its EndOfStream."""
    items, deadline = [], time.monotonic() + timeout
    while not items or not isinstance(items[-1], pype.EndOfStream):
        assert time.monotonic() < deadline, f"no end of stream after {len(items)} items"
        items += ray.get(server.pull.remote(queue, batch_size=-1, block=True, timeout=1))
    return items


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("video") / "clip.avi")


def test_every_frame_arrives_once_in_order_pixel_equal(server, names, clip):
    q = names()
    video = pype.VideoServer.remote(server, file=clip, output_queues=q)
    items = drain(server, q)
    records, end = items[:-1], items[-1]
    expected = decoded(clip)
    assert len(expected) == FRAMES
    assert [r["index"] for r in records] == list(range(FRAMES))
    assert all(np.array_equal(r["frame"], e) for r, e in zip(records, expected, strict=True))
    assert {r["stream_name"] for r in records} == {str(clip)}
    assert end == pype.EndOfStream(str(clip), FRAMES)
    assert ray.get(video.stats.remote())["finished"] == "end of stream"


def test_the_seed_call_as_written_with_a_file(server, clip):
    video_server = pype.VideoServer.remote(server, file=clip, output_queues=('frames'))
    data = ray.get(server.pull.remote('frames', block=True, timeout=10))
    assert data[0]["index"] == 0 and data[0]["frame"].shape == (360, 640, 3)
    ray.get(video_server.stop.remote())
    ray.get(server.remove.remote('frames'))


def test_fan_out_and_scale(server, names, clip):
    a, b = names("a"), names("b")
    # policy "block": each queue gets every frame, so one that nobody pulls would stop
    # the stream once full; these queues hold the whole clip, drained one after the other
    pype.VideoServer.remote(server, file=clip, output_queues=[a, b], scale=0.5, stream_name="cam1",
                            queue_size=FRAMES + 1)
    for queue in (a, b):
        items = drain(server, queue)
        assert [r["index"] for r in items[:-1]] == list(range(FRAMES))
        assert items[0]["frame"].shape == (180, 320, 3)
        assert items[-1] == pype.EndOfStream("cam1", FRAMES)


def test_drop_oldest_keeps_the_freshest_frames_of_a_slow_consumer(server, names, clip):
    q = names()
    video = pype.VideoServer.remote(server, file=clip, output_queues=q, policy="drop_oldest",
                                    queue_size=3)
    until(lambda: ray.get(video.stats.remote())["finished"], "the stream to end")  # nobody pulls
    assert ray.get(server.queue_len.remote(q)) <= 3
    items = ray.get(server.pull.remote(q, batch_size=-1))
    assert items[-1] == pype.EndOfStream(str(clip), FRAMES)
    assert [r["index"] for r in items[:-1]] == list(range(FRAMES - len(items) + 1, FRAMES))
    stats = ray.get(video.stats.remote())
    assert stats["read"] == stats["pushed"] == FRAMES
    assert stats["dropped"] == FRAMES + 1 - 3  # evicted to keep the freshest 3 (end marker included)


def test_drop_newest_skips_frames_while_the_queue_is_full(server, names, clip):
    q = names()
    video = pype.VideoServer.remote(server, file=clip, output_queues=q, policy="drop_newest",
                                    queue_size=2)
    until(lambda: ray.get(video.stats.remote())["finished"], "the stream to end")
    first = ray.get(server.pull.remote(q, batch_size=-1))
    assert [r["index"] for r in first] == [0, 1]  # the queue kept the first frames
    assert ray.get(video.stats.remote())["dropped"] == FRAMES - 2
    assert drain(server, q)[-1] == pype.EndOfStream(str(clip), FRAMES)


def test_stop_ends_a_looping_stream(server, names, clip):
    q = names()
    video = pype.VideoServer.remote(server, file=clip, output_queues=q, loop=True,
                                    policy="drop_oldest")
    until(lambda: ray.get(video.stats.remote())["read"] > FRAMES, "the stream to loop")
    stats = ray.get(video.stop.remote())
    assert stats["finished"] == "stopped"
    assert stats["read"] > FRAMES  # it went round the clip


def test_errors(server, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.avi"):
        pype.VideoServer.remote(server, file=tmp_path / "nope.avi")
    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(b"not a video" * 100)
    with pytest.raises(pype.VideoSourceError, match="garbage.avi"):
        pype.VideoServer.remote(server, file=garbage)
    with pytest.raises(pype.VideoSourceError, match="camera 99"):
        pype.VideoServer.remote(server, camera=99)
    with pytest.raises(ValueError):
        pype.VideoServer.remote(server)
    with pytest.raises(ValueError):
        pype.VideoServer.remote(server, file=garbage, camera=0)
    with pytest.raises(ValueError):
        pype.VideoServer.remote(server, file=garbage, policy="sometimes")
    with pytest.raises(TypeError):
        pype.VideoServer.remote(server, file=garbage, output_queues=[1])
