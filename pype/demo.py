"""`pype demo`: the seed README's data-communication chain, the Pype way.

Seven queues with the seed's use_locking=True, a starter task, six stage tasks that
pass every item along, and the driver pulling from the last queue. Where the seed
polled can_pull/can_push in sleep loops, the stages wait in the shards: a blocking
pull waits for an item, and a push to a full locked queue waits in the queue's
line. With --batch the stages move everything available per call, and the queues
use the seed's batch_lock (a capacity of BATCH_LOCK items) instead of use_locking,
so that there is something to batch.
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


@ray.remote(num_cpus=0)
def start(server: pype.Server, output: str, items: int, chunk: int) -> None:
    for first in range(0, items, chunk):
        # a locked queue: a push that does not fit waits in line
        server.push.remote(list(range(first, min(first + chunk, items))), output, expand=True)
    server.push.remote(END, output)


@ray.remote(num_cpus=0)
def stage(server: pype.Server, source: str, output: str, batch: bool) -> None:
    while True:
        items = ray.get(server.pull.remote(source, batch_size=-1 if batch else 1, block=True))
        server.push.remote(items, output, expand=True)
        if items[-1] == END:
            return


@dataclass
class ChainResult:
    items: int
    seconds: float
    in_order: bool
    stats: dict

    @property
    def rate(self) -> float:
        return self.items / self.seconds


def run_chain(server: pype.Server, items: int, batch: bool, progress: Progress | None = None) -> ChainResult:
    """Run the chain once through fresh queues of `server`; return what arrived and how fast."""
    queues = [f"data_{i}" for i in range(STAGES + 1)]
    lock = {"batch_lock": BATCH_LOCK} if batch else {"use_locking": True}
    for name in queues:
        server.add.remote(name, exist_ok=True, **lock)
    started = time.perf_counter()
    start.remote(server, queues[0], items, BATCH_LOCK if batch else 1)
    for source, output in itertools.pairwise(queues):
        stage.remote(server, source, output, batch)
    task = progress.add_task("items through 6 stages", total=items) if progress else None
    received: list = []
    while not received or received[-1] != END:
        received += ray.get(server.pull.remote(queues[-1], batch_size=-1, block=True))
        if progress:
            progress.update(task, completed=len(received) - (received[-1] == END))
    seconds = time.perf_counter() - started
    return ChainResult(items, seconds, received[:-1] == list(range(items)), ray.get(server.stats.remote()))


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
            result = run_chain(server, items, batch, progress)
        mode = "batched calls" if batch else "one item per call"
        console.print(f"{STAGES} locked stages, {mode}: {result.items} items in "
                      f"{result.seconds:.2f} s = [bold]{result.rate:,.0f} items/s[/]")
        console.print("order: all items arrived in order" if result.in_order
                      else "[red]order: items arrived OUT OF ORDER[/]")
        console.print(spread_table(result.stats))
        server.shutdown()
        return 0 if result.in_order else 1
    finally:
        ray.shutdown()


def spread_table(stats: dict) -> Table:
    """Which shard holds which queues, and how much traffic each one carried."""
    table = Table(title="per-shard spread")
    for column in ("shard", "queues", "pushed", "pulled"):
        table.add_column(column, justify="right" if column != "queues" else "left")
    for shard in stats["shards"]:
        names = sorted(name for name, q in stats["queues"].items() if q["shard"] == shard["shard"])
        table.add_row(str(shard["shard"]), ", ".join(names) or "-",
                      f"{shard['pushed']:,}", f"{shard['pulled']:,}")
    return table
