"""`pype demo video`: split one video stream across N worker actors.

One VideoServer pushes frames into a shared queue. N workers pull from it, detect
edges with OpenCV and push results into a results queue. The driver reassembles
them in frame order. The pattern, for any per-frame operation:

    video = pype.VideoServer.remote(server, file=path, output_queues="frames")
    workers = [EdgeWorker.remote() for _ in range(n)]
    runs = [w.run.remote(server, "frames", "results") for w in workers]
    # pull "results" until every frame is back; sort by record["index"]

A worker that receives the EndOfStream pushes it back for the other workers and
stops. Results keep the frame's index, so arrival order does not matter.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import ray
from rich.console import Console
from rich.table import Table

import pype


@ray.remote(num_cpus=0)
class EdgeWorker:
    """Pulls frames, detects edges, pushes {"index", "edges"} records."""

    def run(self, server: pype.Server, source: str, results: str) -> int:
        import cv2

        done = 0
        while True:
            for item in ray.get(server.pull.remote(source, block=True)):
                if isinstance(item, pype.EndOfStream):
                    server.push.remote(item, source)  # pass it on to the other workers
                    return done
                gray = cv2.cvtColor(item["frame"], cv2.COLOR_BGR2GRAY)
                edges = cv2.Canny(gray, 80, 160)
                ray.get(server.push.remote({"index": item["index"], "edges": edges}, results))
                done += 1


def synthetic_clip(path: Path, frames: int, size=(1280, 720)) -> Path:
    """A clip of moving shapes, so that there are edges to find."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, size)
    gradient = np.linspace(0, 90, size[0], dtype=np.uint8)
    background = np.dstack([np.tile(gradient, (size[1], 1))] * 3)
    for i in range(frames):
        frame = background.copy()
        for k in range(6):
            x = (i * (7 + 3 * k) + 150 * k) % (size[0] - 160)
            cv2.circle(frame, (x + 80, 120 + 90 * k), 60, (40 * k, 255 - 30 * k, 200), -1)
        cv2.putText(frame, f"frame {i}", (40, size[1] - 40), cv2.FONT_HERSHEY_SIMPLEX, 2, (255,) * 3, 4)
        writer.write(frame)
    writer.release()
    return path


def split(server: pype.Server, clip: Path, workers: int) -> tuple[float, list[dict]]:
    """Stream `clip` through `workers` edge workers; return (fps, results in frame order)."""
    tag = uuid.uuid4().hex[:6]
    frames_queue, results_queue = f"frames-{tag}", f"results-{tag}"
    pool = [EdgeWorker.remote() for _ in range(workers)]
    ray.get([w.__ray_ready__.remote() for w in pool])  # started before the clock runs
    started = time.perf_counter()
    video = pype.VideoServer.remote(server, file=clip, output_queues=frames_queue)
    runs = [w.run.remote(server, frames_queue, results_queue) for w in pool]
    received: list[dict] = []
    expected = None
    while expected is None or len(received) < expected:
        received += ray.get(server.pull.remote(results_queue, batch_size=-1, block=True, timeout=0.5))
        if expected is None and not ray.wait(runs, num_returns=len(runs), timeout=0)[1]:
            expected = sum(ray.get(runs))
    fps = len(received) / (time.perf_counter() - started)
    received.sort(key=lambda record: record["index"])
    ray.get(video.stop.remote())
    for name in (frames_queue, results_queue):
        server.remove.remote(name)
    return fps, received


def contact_sheet(records: list[dict], path: Path, tiles: int = 8, width: int = 320) -> Path:
    """A grid of evenly spaced processed frames, each labeled with its index."""
    import cv2

    chosen = [records[i] for i in np.linspace(0, len(records) - 1, tiles).astype(int)]
    images = []
    for record in chosen:
        edges = record["edges"]
        tile = cv2.resize(edges, (width, int(edges.shape[0] * width / edges.shape[1])))
        tile = cv2.cvtColor(tile, cv2.COLOR_GRAY2BGR)
        cv2.putText(tile, f"#{record['index']}", (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 200, 255), 2)
        images.append(tile)
    rows = [np.hstack(images[i:i + 4]) for i in range(0, len(images), 4)]
    cv2.imwrite(str(path), np.vstack(rows))
    return path


def main(file: str | None, workers: list[int], frames: int, out: str) -> int:
    console = Console()
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    try:
        server = pype.Server.remote()
        with tempfile.TemporaryDirectory(prefix="pype-video-") as workdir:
            clip = Path(file) if file else synthetic_clip(Path(workdir) / "clip.avi", frames)
            table = Table(title=f"edge detection on {clip.name}, split across workers")
            for column in ("workers", "frames", "fps", "in order"):
                table.add_column(column, justify="right")
            for count in workers:
                fps, records = split(server, clip, count)
                in_order = [r["index"] for r in records] == list(range(len(records)))
                table.add_row(str(count), str(len(records)), f"{fps:.1f}", "yes" if in_order else "NO")
            console.print(table)
            sheet = contact_sheet(records, Path(out))
        console.print(f"contact sheet of the processed frames: {sheet}")
        server.shutdown()
        return 0 if in_order else 1
    finally:
        ray.shutdown()
