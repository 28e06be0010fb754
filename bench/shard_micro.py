"""A shard's own cost per request: `python -m bench.shard_micro [--requests N] [--profile]`.

Runs one shard's store, engine and I/O loop in this process, without Ray, and
clients in processes of their own that write ready-made requests to its Unix
socket: one-item numbered pushes (what a `producer(batch_size=1)` sends), `window`
unanswered at a time per client, then as many one-item pulls. The clients do no
Python per request beyond reading the answers, so the figure is the shard's: the
CPU time of its loop thread per request (wall-clock rates on 2 cores would mix in
the clients). `--profile` runs the loop thread under cProfile and prints where
its time goes.

Prints one JSON line: {"push_us": ..., "pull_us": ..., ...} (CPU microseconds of
the loop thread per request).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import multiprocessing
import os
import pstats
import socket
import tempfile
import time
from pathlib import Path

from pype import protocol
from pype.framing import StreamReader, stream_message
from pype.options import QueueOptions
from pype.protocol import Pull, Push
from pype.shards.engine import ShardEngine
from pype.shards.listeners import ShardSockets
from pype.shards.loop import ShardLoop
from pype.shards.store import QueueStore
from pype.transport import Keys


def _requests(client: int, count: int, kind: str) -> list[bytes]:
    queue = (f"micro-{client}",)
    messages = []
    for number in range(1, count + 1):
        if kind == "push":
            request = Push(queue, [number], producer=(client + 1, number, max(1, number - 64)))
        else:
            request = Pull(queue[0], 1)
        frames = stream_message(protocol.encode_request(number, (f"client-{client}", 0), request))
        messages.append(b"".join(bytes(frame) for frame in frames))
    return messages


def _client(path: str, client: int, count: int, window: int, kind: str, start) -> None:
    """Send `count` requests, `window` unanswered at a time; read every answer."""
    messages = _requests(client, count, kind)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    reader = StreamReader()
    start.wait()
    sent = answered = 0
    while answered < count:
        if sent - answered < window and sent < count:
            burst = messages[sent:min(count, answered + window)]
            sock.sendall(b"".join(burst))
            sent += len(burst)
        for frames in reader.read(sock):
            _, status, value = protocol.loads(frames)
            assert status == protocol.RESULT, value
            answered += 1
    sock.close()


class _ProfiledLoop(ShardLoop):
    profile: cProfile.Profile | None = None

    def _run(self) -> None:
        if self.profile is None:
            return super()._run()
        self.profile.enable()
        try:
            return super()._run()
        finally:
            self.profile.disable()


def _thread_cpu(thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def measure(requests: int, clients: int, window: int, profile: cProfile.Profile | None) -> dict:
    store = QueueStore(QueueOptions())
    engine = ShardEngine(store, 0, poll_wait=1.0)
    keys, secret = Keys.generate()
    directory = Path(tempfile.mkdtemp(prefix="pype-micro-"))
    sockets = ShardSockets("micro", "127.0.0.1", keys, secret, directory, 0, "micro")
    _ProfiledLoop.profile = profile
    loop = _ProfiledLoop(engine, sockets)
    context = multiprocessing.get_context("fork")
    result = {"requests_per_client": requests, "clients": clients, "window": window}
    try:
        for kind in ("push", "pull"):
            start = context.Event()
            processes = [context.Process(target=_client, args=(
                sockets.address.unix, client, requests, window, kind, start)) for client in range(clients)]
            for process in processes:
                process.start()
            time.sleep(0.5)  # connected and ready to send
            cpu, wall = _thread_cpu(loop._thread), time.perf_counter()
            start.set()
            for process in processes:
                process.join()
                assert process.exitcode == 0, f"a client failed ({process.exitcode})"
            result[f"{kind}_us"] = (_thread_cpu(loop._thread) - cpu) / (requests * clients) * 1e6
            result[f"{kind}_per_s"] = requests * clients / (time.perf_counter() - wall)
        assert all(store.length(f"micro-{client}") == 0 for client in range(clients))
    finally:
        loop.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per client and kind")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="print the loop thread's cProfile")
    args = parser.parse_args()
    profile = cProfile.Profile() if args.profile else None
    result = measure(args.requests, args.clients, args.window, profile)
    result["pype"] = os.path.dirname(protocol.__file__)
    print(json.dumps(result))
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
