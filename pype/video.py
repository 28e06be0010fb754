"""VideoServer: stream camera or file frames into queues.

    video = pype.VideoServer.remote(server, file="clip.mp4", output_queues=["a", "b"])
    records = ray.get(server.pull.remote("a"))
    # [{"frame": ndarray HxWx3 uint8 BGR, "index": 0, "time": ..., "stream_name": "clip.mp4"}]

VideoServer.remote() starts an actor that opens the source, raises at once if it
cannot (FileNotFoundError, VideoSourceError, ValueError), and returns the actor's
handle while a thread inside it reads frames and pushes them. At the end of a
file (without loop) every output queue receives one pype.EndOfStream item.

Frames travel over the native data path (pype.transport): to a shard on the
actor's node in shared memory (pype.segments: one copy, into a segment the shard
and the consumers map), to other nodes by value. The shard holds each frame until
a consumer pulls it, so frames in the queues outlive the video actor. The actor lives as long as its handle or
the Server handle it streams into lives in the process that made it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from pype.errors import QueueFullError, VideoSourceError
from pype.streams import PushWindow

logger = logging.getLogger("pype")

POLICIES = ("block", "drop_oldest", "drop_newest")
PUSH_WINDOW = 4  # frames whose pushes to one queue may be unacknowledged at once


@dataclass(frozen=True)
class EndOfStream:
    """Pushed to every output queue after a file's last frame.

    With several consumers on one queue, a consumer that receives it should push it
    back (server.push.remote(item, queue)) so that the others see it too.
    """

    stream_name: str
    frames: int  # frames pushed before it


def _queue_names(output_queues: str | list[str] | tuple[str, ...]) -> list[str]:
    # the seed writes output_queues=('frames'), which is a str
    names = [output_queues] if isinstance(output_queues, str) else list(output_queues)
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"output_queues must be a str or a list/tuple of str, got {output_queues!r}")
    return names


class VideoServer:
    """Factory of video actors; see the module docstring."""

    @staticmethod
    def remote(server: Any, camera: int | str | None = None, file: str | Path | None = None,
               output_queues: str | list[str] | tuple[str, ...] = ("frames",), scale: float = 1.0,
               fps: float | None = None, loop: bool = False, stream_name: str | None = None,
               policy: str | None = None, queue_size: int = 8) -> ray.actor.ActorHandle:
        """Open the source in a new actor and start streaming; return the actor's handle.

        camera: a device index or URL; file: a video file (exactly one of them).
        policy: "block" (wait for room, nothing dropped; default for files; every
        queue gets every frame, so a full queue nobody pulls holds up the stream),
        "drop_oldest" (keep the freshest queue_size frames; default for cameras) or
        "drop_newest" (skip frames while the queue is full). The output queues are
        made with maxsize=queue_size unless they exist. fps paces a file to that
        rate; None reads as fast as the consumers take. The handle has stop() and
        stats() (frames read, pushed, dropped, fps).
        """
        if (camera is None) == (file is None):
            raise ValueError("give exactly one of camera= and file=")
        policy = policy or ("block" if file is not None else "drop_oldest")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if fps is not None and not fps > 0:
            raise ValueError(f"fps must be > 0 or None, got {fps}")
        names = _queue_names(output_queues)
        source = str(file) if file is not None else camera
        overflow = {"block": "reject", "drop_oldest": "drop_oldest", "drop_newest": "reject"}[policy]
        for name in names:
            ray.get(server.add.remote(name, maxsize=queue_size, overflow=overflow, exist_ok=True))
        actor = _VideoActor.remote()
        try:
            ray.get(actor.start.remote(server, source, file is not None, names, scale, fps, loop,
                                       stream_name or str(source), policy))
        except BaseException:
            ray.kill(actor)
            raise
        server.keep_alive(actor)  # the stream lives on even if the caller drops the handle
        return actor


@ray.remote(num_cpus=0)
class _VideoActor:
    """Reads frames on a thread of its own and pushes them; methods answer meanwhile."""

    def __init__(self):
        self._stop = threading.Event()
        self._server = None
        self._names: list[str] = []
        self._windows: list[PushWindow] = []  # one per output queue, on the capture thread
        self._unanswered: dict[int, list] = {}  # frame index -> [queues not answered, reached one]
        self._counts = {"read": 0, "pushed": 0, "dropped": 0}
        self._started = time.monotonic()
        self._finished: str | None = None
        self._thread: threading.Thread | None = None

    def start(self, server, source, is_file, names, scale, fps, loop, stream_name, policy) -> None:
        import cv2

        if is_file and not Path(source).is_file():
            raise FileNotFoundError(f"video file not found: {source}")
        capture = cv2.VideoCapture(source)
        if not capture.isOpened():
            what = f"video file {source!r}" if is_file else f"camera {source!r}"
            raise VideoSourceError(f"cannot open {what}")
        ok, first = capture.read()
        if not ok:
            capture.release()
            what = f"video file {source!r}" if is_file else f"camera {source!r}"
            raise VideoSourceError(f"cannot decode a frame from {what}")
        self._server, self._names = server, names
        self._thread = threading.Thread(
            target=self._run, daemon=True, name="pype-video",
            args=(server, capture, first, is_file, names, scale, fps, loop, stream_name, policy))
        self._thread.start()

    def stop(self) -> dict:
        """Stop reading (no end-of-stream item is sent); return the final stats."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.stats()

    def stats(self) -> dict:
        """read: frames read; pushed: frames that reached at least one queue; dropped:
        frames skipped at a full queue (drop_newest) plus frames evicted from the output
        queues (drop_oldest; counted by the queues, whoever pushed them); fps: frames
        pushed per second since start; finished: None while running, else why it ended.
        """
        seconds = time.monotonic() - self._started
        queues = ray.get(self._server.stats.remote())["queues"] if self._server else {}
        evicted = sum(queues[name]["dropped"] for name in self._names if name in queues)
        return {**self._counts, "dropped": self._counts["dropped"] + evicted,
                "fps": self._counts["pushed"] / seconds if seconds else 0.0,
                "finished": self._finished}

    def _run(self, server, capture, frame, is_file, names, scale, fps, loop, stream_name, policy):
        import cv2

        block = policy == "block"
        index = 0
        began = time.monotonic()
        try:
            pipeline = server.routes.new_pipeline()
            self._windows = [PushWindow(server.routes, name, PUSH_WINDOW, block, self._answered,
                                        pipeline) for name in names]
            while not self._stop.is_set():
                if frame is None:
                    ok, frame = capture.read()
                    if not ok:
                        if is_file and loop:
                            capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
                            frame = None
                            continue
                        break
                self._counts["read"] += 1
                if scale != 1.0:
                    frame = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
                if fps is not None:
                    delay = began + index / fps - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                record = {"frame": frame, "index": index, "time": time.time(),
                          "stream_name": stream_name}
                self._unanswered[index] = [len(names), False]
                for window in self._windows:
                    window.send([record])
                index += 1
                frame = None
            for window in self._windows:
                window.drain()
            if not self._stop.is_set():
                self._finished = "end of stream"
                server.push(EndOfStream(stream_name, index), names, block=True)
            else:
                self._finished = "stopped"
        except Exception as error:  # the thread's only report: stats() and the log
            self._finished = f"failed: {error!r}"
            logger.exception("pype VideoServer %s failed", stream_name)
        finally:
            capture.release()

    def _answered(self, items: list, accepted: int, error: Exception | None) -> None:
        """A push of one frame to one queue was answered (see PushWindow)."""
        if isinstance(error, QueueFullError):  # drop_newest: this queue skips the frame
            self._counts["dropped"] += 1
        elif error is not None:
            raise error
        frame = items[0]["index"]
        waiting = self._unanswered[frame]
        waiting[0] -= 1
        waiting[1] = waiting[1] or accepted > 0
        if waiting[0] == 0:
            self._counts["pushed"] += waiting[1]
            del self._unanswered[frame]
