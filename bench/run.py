"""`python -m bench` / `pype bench`: every workload, every system, in one run.

Each round runs every system of a workload once; the order of the systems
rotates from round to round, so no system always runs first or last. Reported
values are medians over rounds. Results: bench/results/latest.json, latest.md
and latest.png, and the table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
from rich.console import Console
from rich.progress import Progress

import pype
from bench import workloads as w
from bench.peers import redis_server
from bench.report import check_targets, markdown, write_chart
from pype import video_demo

RESULTS = Path(__file__).parent / "results"
ORIGINAL_SEED_CHAIN = 3.7  # items/s of the original implementation here (DESIGN.md)


def machine() -> dict:
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpus": os.cpu_count(), "memory_gb": round(memory_gb, 1), "python": platform.python_version(),
            "ray": ray.__version__, "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}


def plan(server, echo, port, durable_servers, quick: bool) -> dict[str, dict[str, callable]]:
    """workload -> system -> a function measuring one round."""
    scale = 0.2 if quick else 1.0

    def n(count):
        return max(10, int(count * scale))

    chain = {
        "pype .remote(), seed README polling code": lambda: w.seed_chain(server),
        "pype .remote(), one item per call": lambda: w.pype_chain(server, n(600), "single"),
        "pype .remote(), batched": lambda: w.pype_chain(server, n(300_000), "batched"),
        "pype native, one item per call": lambda: w.pype_chain(server, n(5000), "native single"),
        "pype native, one item per call, push_pull": lambda: w.pype_chain(server, n(5000), "native push_pull"),
        "pype native, batched": lambda: w.pype_chain(server, n(1_000_000), "native batched"),
        "pype native, consume/producer": lambda: w.pype_chain(server, n(200_000), "helpers"),
        "pype native, consume/producer, whole batches":
            lambda: w.pype_chain(server, n(200_000), "helpers batches"),
        "ray.util.queue": lambda: w.ray_queue_chain(n(150)),
    }
    pingpong = {
        "raw floor (2 no-op actor calls)": lambda: w.ping_pong("raw floor", echo, n(400)),
        "pype .remote()": lambda: w.ping_pong("pype", echo, n(400), server=server),
        "pype native": lambda: w.ping_pong("pype native", echo, n(2000), server=server),
        "ray.util.queue": lambda: w.ping_pong("ray.util.queue", echo, n(200)),
    }
    bulk = {
        "pype .remote()": lambda: w.bulk("pype", n(1_000_000), server=server),
        "pype native": lambda: w.bulk("pype native", n(1_000_000), server=server),
        "ray.util.queue": lambda: w.bulk("ray.util.queue", n(100_000)),
    }
    frames = {
        "raw floor (ray.put + ray.get, one process)": lambda: w.frames("raw floor", n(60)),
        "cross-process floor (a task's ray.put, handed over by Ray)":
            lambda: w.frames("cross-process floor", n(60)),
        "pype .remote() (by reference)": lambda: w.frames("pype", n(60), server=server),
        "pype native (shared memory)": lambda: w.frames("pype native", n(60), server=server),
    }
    capacity = {"pype native, 4 processes, one-item pushes, 64 in flight each":
                lambda: w.capacity(per_process=n(20_000))}
    if port is not None:
        chain["redis, LPUSH/BRPOP"] = lambda: w.redis_chain(port, n(3000), batched=False)
        chain["redis, LPUSH+BRPOP pipelined"] = lambda: w.redis_chain(port, n(3000), batched=False,
                                                                      pipelined=True)
        chain["redis, BLMPOP COUNT 1000"] = lambda: w.redis_chain(port, n(300_000), batched=True)
        pingpong["redis"] = lambda: w.ping_pong("redis", echo, n(400), port=port)
        bulk["redis"] = lambda: w.bulk("redis", n(1_000_000), port=port)
        frames["redis (raw bytes)"] = lambda: w.frames("redis", n(60), port=port)
        capacity["redis, 4 processes, pipelines of 64 LPUSH"] = lambda: w.redis_capacity(
            port, per_process=n(20_000))
    clip = str(video_demo.synthetic_clip(Path(tempfile.mkdtemp(prefix="pype-bench-")) / "clip.avi",
                                         n(90), size=(1920, 1080)))
    video = {"opencv decode only": lambda: w.video("opencv decode only", clip),
             "pype VideoServer, one hop": lambda: w.video("pype", clip, server=server)}
    spread = {f"pype, {shards} shard{'s' * (shards > 1)}": (lambda s=shards: w.spread(s))
              for shards in (1, 2, 4, 8)}
    scaling = {f"{what}, {shards} shard{'s' * (shards > 1)}":
               (lambda s=shards, p=partitioned: w.scale(s, p, per_process=n(1000)))
               for partitioned, what in ((False, "1024 queues"), (True, "one queue of 8 partitions"))
               for shards in (1, 2, 4, 8)}
    durability = {f"{label}, {path}": (lambda s=durable, native=path == "native":
                                        w.durable_pushes(s, n(2000 if native else 500), native))
                  for label, durable in durable_servers.items() for path in (".remote()", "native")}
    queue = {}
    for system in ("pype.Queue", "ray.util.queue"):
        queue.update({
            f"{system}, blocking put+get": lambda s=system: w.queue_put_get(s, n(2000 if s == "pype.Queue" else 300)),
            f"{system}, 4 producer + 4 consumer tasks":
                lambda s=system: w.queue_tasks(s, n(5000 if s == "pype.Queue" else 300)),
            f"{system}, put_nowait_batch + get_nowait_batch": lambda s=system: w.queue_batches(s, n(100_000)),
        })
    return {"chain": chain, "ping-pong": pingpong, "bulk": bulk, "frames": frames,
            "capacity": capacity, "video": video, "spread": spread, "scale": scaling,
            "durability": durability, "queue": queue}


def start_durable_servers(journals: Path) -> dict[str, pype.Server]:
    """One single-shard server per persistence setting, for the durability workload."""
    servers = {"pype, no persistence": pype.Server.remote(shards=1)}
    for fsync in ("never", "batch", "always"):
        servers[f"pype, fsync {fsync}"] = pype.Server.remote(
            shards=1, persistence={"dir": str(journals / fsync), "fsync": fsync})
    return servers


def measure_memory(items: int = 1_000_000) -> dict:
    """Peak RSS of a shard holding `items` small items."""
    server = pype.Server.remote(shards=1)
    try:
        before = ray.get(server.stats.remote())["shards"][0]["peak_rss_mb"]
        for first in range(0, items, 100_000):
            ray.get(server.push.remote(list(range(first, first + 100_000)), "memory", expand=True))
        after = ray.get(server.stats.remote())["shards"][0]
        assert after["depth"] == items
        return {"items": items, "shard_peak_rss_mb_empty": before, "shard_peak_rss_mb": after["peak_rss_mb"]}
    finally:
        server.shutdown()


def run(rounds: int, quick: bool, only: list[str] | None, console: Console) -> dict:
    results: dict = {"machine": machine(), "rounds": rounds, "quick": quick, "workloads": {}}
    with redis_server() as port:
        if port is None:
            console.print("[yellow]redis-server is not installed: the Redis peers are skipped "
                          "(apt-get install redis-server)[/]")
        server = pype.Server.remote()
        echo = w.Echo.remote()
        ray.get(echo.noop.remote())
        durable_servers = start_durable_servers(Path(tempfile.mkdtemp(prefix="pype-bench-journals-")))
        workloads = plan(server, echo, port, durable_servers, quick)
        selected = {k: v for k, v in workloads.items() if not only or k in only}
        total = rounds * sum(len(systems) for systems in selected.values())
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("benchmarks", total=total)
            for workload, systems in selected.items():
                names = list(systems)
                samples: dict[str, list[dict]] = {name: [] for name in names}
                for round_ in range(rounds):
                    order = names[round_ % len(names):] + names[:round_ % len(names)]
                    for name in order:
                        progress.update(task, description=f"{workload}: {name}")
                        samples[name].append(systems[name]())
                        progress.advance(task)
                results["workloads"][workload] = {
                    name: {metric: statistics.median(s[metric] for s in runs) for metric in runs[0]}
                    for name, runs in samples.items()}
        for each in (server, *durable_servers.values()):
            each.shutdown()
    if not only or "memory" in only:
        results["memory"] = measure_memory()
    results["targets"] = check_targets(results, ORIGINAL_SEED_CHAIN)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["soak"]:
        from bench import soak

        return soak.main(argv[1:])
    parser = argparse.ArgumentParser(prog="pype bench", description=__doc__.split("\n\n")[0],
                                     epilog="pype bench soak --minutes N: the fault-injection soak "
                                            "(see bench/soak.py)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per workload (default 3)")
    parser.add_argument("--quick", action="store_true", help="smaller workloads, for a smoke test")
    parser.add_argument("--only", nargs="+", metavar="WORKLOAD",
                        help="chain, ping-pong, bulk, frames, capacity, video, spread, scale, "
                             "durability, queue, memory, replication (on a local multi-node "
                             "cluster of its own), item-life (timers of delayed pushes, the "
                             "cost of ttl and dead letters)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where results go (default bench/results/, or a temporary "
                             "directory with --only, so a partial run never replaces the full one)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="pype-bench-")) if args.only else RESULTS
    console = Console()
    if args.only and "replication" in args.only:  # a multi-node cluster of its own
        from bench import replication

        args.out.mkdir(parents=True, exist_ok=True)
        console.print(replication.main(args.rounds, args.quick, args.out, machine()))
        console.print(f"written: {args.out}/replication.json, replication.md")
        args.only.remove("replication")
        if not args.only:
            return 0
    if args.only and "item-life" in args.only:  # a Ray session of its own
        from bench import item_life

        console.print(item_life.main(args.rounds, args.quick, args.out, machine()))
        console.print(f"written: {args.out}/item-life.json, item-life.md")
        args.only.remove("item-life")
        if not args.only:
            return 0
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        results = run(args.rounds, args.quick, args.only, console)
    finally:
        ray.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "latest.md").write_text(table)
    write_chart(results, args.out / "latest.png")
    console.print(table)
    console.print(f"written: {args.out}/latest.json, latest.md, latest.png")
    return 0
