"""`pype demo`: the seed README's data-communication chain, on both of Pype's paths.

Seven queues with the seed's use_locking=True, a starter task, six stage tasks that
pass every item along, and the driver pulling from the last queue. It runs twice:
once with the seed's `.remote()` calls (Ray actor calls, ObjectRefs, ray.get), once
with the native calls (server.push(x, q), server.pull(q): a direct socket to the
shard), and prints both rates side by side. Where the seed polled can_pull/can_push
in sleep loops, the stages wait in the shards: a blocking pull waits for an item,
and a push to a full locked queue waits in the queue's line. With --batch the
stages move everything available per call, and the queues use the seed's
batch_lock (a capacity of BATCH_LOCK items) instead of use_locking.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import ray
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

import pype
from pype.config import load_config

STAGES = 6
BATCH_LOCK = 1000  # capacity of the queues in --batch mode: room for the batches
END = "__pype_demo_end__"
PATHS = {"remote": "`.remote()`, as the seed wrote it", "native": "native: server.push / server.pull"}


def _calls(server: pype.Server, native: bool):
    """push(data, queue, **options) and pull(queue, **options) on one path, both returning."""
    if native:
        return server.push, server.pull
    return (lambda *args, **kwargs: server.push.remote(*args, **kwargs),  # fire and forget
            lambda *args, **kwargs: ray.get(server.pull.remote(*args, **kwargs)))


@ray.remote(num_cpus=0)
def start(server: pype.Server, output: str, items: int, chunk: int, native: bool) -> None:
    push, _ = _calls(server, native)
    for first in range(0, items, chunk):
        # a locked queue: a push that does not fit waits in line
        push(list(range(first, min(first + chunk, items))), output, expand=True)
    push(END, output)


@ray.remote(num_cpus=0)
def stage(server: pype.Server, source: str, output: str, batch: bool, native: bool) -> None:
    push, pull = _calls(server, native)
    while True:
        items = pull(source, batch_size=-1 if batch else 1, block=True)
        push(items, output, expand=True)
        if items[-1] == END:
            return


@dataclass
class ChainResult:
    path: str
    items: int
    seconds: float
    in_order: bool
    stats: dict

    @property
    def rate(self) -> float:
        return self.items / self.seconds


def run_chain(server: pype.Server, items: int, batch: bool, native: bool = False,
              progress: Progress | None = None) -> ChainResult:
    """Run the chain once through fresh queues of `server`; return what arrived and how fast."""
    path = "native" if native else "remote"
    queues = [f"data_{path}_{i}" for i in range(STAGES + 1)]
    lock = {"batch_lock": BATCH_LOCK} if batch else {"use_locking": True}
    for name in queues:
        server.add.remote(name, exist_ok=True, **lock)
    _, pull = _calls(server, native)
    started = time.perf_counter()
    start.remote(server, queues[0], items, BATCH_LOCK if batch else 1, native)
    for source, output in itertools.pairwise(queues):
        stage.remote(server, source, output, batch, native)
    task = progress.add_task(f"{PATHS[path]}", total=items) if progress else None
    received: list = []
    while not received or received[-1] != END:
        received += pull(queues[-1], batch_size=-1, block=True)
        if progress:
            progress.update(task, completed=len(received) - (received[-1] == END))
    seconds = time.perf_counter() - started
    return ChainResult(path, items, seconds, received[:-1] == list(range(items)), server.stats())


def main(items: int = 1000, batch: bool = False, config: str | None = None,
         shards: int | None = None) -> int:
    console = Console()
    overrides = {"shards": shards} if shards else {}
    load_config(config, **overrides)  # a bad file fails here, before Ray starts
    started = time.perf_counter()
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    try:
        server = pype.Server.remote(config, **overrides)
        console.print(f"[bold]pype demo[/]: Ray up and {server} made in "
                      f"{time.perf_counter() - started:.1f} s")
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            results = [run_chain(server, items, batch, native, progress) for native in (False, True)]
        mode = "batched calls" if batch else "one item per call"
        console.print(rates_table(results, f"{items} items through {STAGES} locked stages, {mode}"))
        for result in results:
            console.print(f"{result.path}: all items arrived in order" if result.in_order
                          else f"[red]{result.path}: items arrived OUT OF ORDER[/]")
        console.print(spread_table(results[-1].stats))
        server.shutdown()
        return 0 if all(result.in_order for result in results) else 1
    finally:
        ray.shutdown()


def rates_table(results: list[ChainResult], title: str) -> Table:
    table = Table(title=title)
    for column in ("path", "seconds", "items/s"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for result in results:
        table.add_row(PATHS[result.path], f"{result.seconds:.2f}", f"{result.rate:,.0f}")
    if len(results) == 2:
        table.caption = f"native / .remote(): {results[1].rate / results[0].rate:.1f}x"
    return table


def spread_table(stats: dict) -> Table:
    """Which shard holds which queues, and how much traffic each one carried."""
    table = Table(title="per-shard spread (both runs)")
    for column in ("shard", "queues", "pushed", "pulled", "ray requests", "native requests"):
        table.add_column(column, justify="right" if column != "queues" else "left")
    for shard in stats["shards"]:
        if "unreachable" in shard:
            table.add_row(str(shard["shard"]), "(unreachable)", "", "", "", "")
            continue
        names = sorted(name for name, q in stats["queues"].items() if q["shard"] == shard["shard"])
        table.add_row(str(shard["shard"]), ", ".join(names) or "-",
                      f"{shard['pushed']:,}", f"{shard['pulled']:,}", f"{shard['ray_requests']:,}",
                      f"{shard['native_requests']:,}")
    return table
