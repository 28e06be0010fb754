"""Where the CPU of a one-item chain goes: `python -m bench.chain_cpu [--items N] [--rounds R]`.

Runs the 6-stage one-item chain of `pype bench` with push_pull (one request per stage)
and Redis's LPUSH+BRPOP pipelined (one round trip per stage), alternating, and reads
every process's CPU time (psutil) before and after each run. Prints, per system and
round, the items/s and the CPU microseconds per item and hop (7 hops: 6 stages and
the sink), split by process: the shard or redis-server, the Ray worker processes
that run the stages, the driver (source and sink), and Ray's own.
"""

from __future__ import annotations

import argparse
import collections
import json

import psutil
import ray

import pype
from bench import workloads as w
from bench.peers import redis_server

HOPS = w.STAGES + 1


def _cpu_by_process() -> dict[int, tuple[str, float]]:
    seen = {}
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            times = process.cpu_times()
            command = " ".join(process.info["cmdline"] or [])
            seen[process.pid] = (_kind(process.info["name"] or "", command), times.user + times.system)
        except psutil.Error:
            pass
    return seen


def _kind(name: str, command: str) -> str:
    for kind, marks in (("shard", ("Shard",)), ("redis-server", ("redis-server",)),
                        ("Ray's own", ("raylet", "gcs_server", "Router", "Keeper", "dashboard",
                                       "log_monitor", "monitor.py"))):
        if any(mark in name or mark in command for mark in marks):
            return kind
    if "bench.chain_cpu" in command:
        return "driver"
    if name.startswith("ray::") or "default_worker" in command:
        return "stage processes"
    return "other"


def measure(items: int, rounds: int) -> list[dict]:
    results = []
    with redis_server() as port:
        if port is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        server = pype.Server.remote(shards=1)
        systems = {"pype push_pull": lambda: w.pype_chain(server, items, "native push_pull"),
                   "redis LPUSH+BRPOP pipelined": lambda: w.redis_chain(port, items, batched=False,
                                                                         pipelined=True)}
        try:
            for run in range(rounds):
                for system, chain in systems.items():
                    before = _cpu_by_process()
                    rate = chain()["items_per_s"]
                    used: collections.Counter = collections.Counter()
                    for pid, (kind, cpu) in _cpu_by_process().items():
                        used[kind] += cpu - before.get(pid, (kind, 0.0))[1]
                    moved = (items + w.WARM_ITEMS) * HOPS  # the warm-up run is measured too
                    results.append({"system": system, "round": run + 1, "items_per_s": rate,
                                    "us_per_item_and_hop": {kind: round(cpu / moved * 1e6)
                                                            for kind, cpu in used.most_common()},
                                    "us_per_item_and_hop_total": round(sum(used.values()) / moved * 1e6)})
                    print(json.dumps(results[-1]), flush=True)
        finally:
            server.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        measure(args.items, args.rounds)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
