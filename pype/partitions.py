"""Partitioned queues: one logical queue made of K sub-queues spread over the shards.

A queue made with add(q, partitions=K) is a *head* named q, which holds no items
and records the queue's options, and K *partitions* named partition_name(q, j),
ordinary queues that the hash places on shards like any other name. A partition's
name holds a control character, which check_name() refuses in a user's name, so
no user queue can take it.

Clients route by themselves, as for every queue. A client that does not know q
is partitioned sends its request to q's shard as usual; the head refuses it with
Partitioned, which carries K, the options and the partition this client is
pinned to. The client remembers that (a Layout) and from then on talks to the
partitions directly:

- a push goes to the producer's pinned partition (the head hands out pins round
  robin, per producer process), or with key=k to the partition of hash(k), so
  per-producer and per-key FIFO hold;
- a pull takes from the partitions in turn, starting where its last pull of this
  queue left off, until it has its batch; a blocking pull that found nothing
  watches every partition at once (a CanPull parked in each) and pulls again
  from the first that has an item, so no item waits in one partition while a
  consumer waits on another;
- lease ids carry their partition (lease * K + j), so ack and nack find it.

A `.remote()` call needs an ObjectRef at once, so it cannot take the redirect
itself: its head's shard runs it natively on the caller's behalf (Shard.call).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import xxhash

from pype.errors import LeaseNotHeldError, PypeError
from pype.hashing import shard_for
from pype.options import QueueOptions
from pype.protocol import CanPull, Length, Moved, Pull, Render, Settle

if TYPE_CHECKING:
    from pype.client import Server

logger = logging.getLogger("pype")

SEPARATOR = "\x1f"  # unit separator: a control character, never in a user's queue name
WATCH_SLICE = 2.0  # seconds; see _watch
SEED_TRIES = 1000  # seeds spreading_seed() tries


def partition_name(queue: str, partition: int, seed: int = 0) -> str:
    """The name of partition `partition` of queue `queue` (`seed`: see spreading_seed)."""
    return f"{queue}{SEPARATOR}{seed}{SEPARATOR}{partition}"


def split_name(name: str) -> tuple[str, int | None]:
    """(queue, partition) of a partition's name; (name, None) for any other name."""
    queue, separator, rest = name.partition(SEPARATOR)
    return (queue, int(rest.rpartition(SEPARATOR)[2])) if separator else (name, None)


def spreading_seed(queue: str, partitions: int, shards: int, hash_seed: int,
                   tries: int = SEED_TRIES) -> int:
    """A seed whose partition names the hash spreads most evenly over `shards` shards.

    The names are hashed like any queue's, so K partitions on S shards land as K
    balls in S bins: 8 on 8 shards leave about 3 shards empty. add() tries seeds
    until no shard holds more than its share and every shard holds some (or `tries`
    ran out, keeping the best).
    """
    even = (-(-partitions // shards), -min(partitions, shards))  # (most on one, shards used)
    best, best_spread = 0, (partitions + 1, 0)
    for seed in range(tries):
        load = Counter(shard_for(partition_name(queue, j, seed), shards, hash_seed)
                       for j in range(partitions))
        spread = (max(load.values()), -len(load))
        if spread < best_spread:
            best, best_spread = seed, spread
            if spread <= even:
                break
    return best


def partition_for_key(key: Any, partitions: int) -> int:
    """The partition of a push with key=`key` (str, bytes or int)."""
    if isinstance(key, str):
        key = key.encode("utf-8")
    elif isinstance(key, int) and not isinstance(key, bool):
        key = key.to_bytes(16, "little", signed=True)
    elif not isinstance(key, bytes):
        raise TypeError(f"key must be a str, bytes or int, got {type(key).__name__}: {key!r}")
    return xxhash.xxh64_intdigest(key) % partitions


class Partitioned(PypeError):
    """A request named the head of a partitioned queue: send it to its partitions.

    Clients handle it (it never reaches a user); it tells them the queue's layout:
    partitions, options, and the partition the asking producer is pinned to.
    """

    def __init__(self, queue: str, partitions: int, options: QueueOptions, pin: int):
        super().__init__(queue, partitions, options, pin)
        self.queue, self.partitions, self.options, self.pin = queue, partitions, options, pin

    def __str__(self) -> str:
        return f"queue {self.queue!r} has {self.partitions} partitions"


@dataclass
class Layout:
    """What a client knows of one partitioned queue."""

    queue: str
    partitions: int
    options: QueueOptions       # the head's (each partition's, but partitions=1)
    pin: int                    # this producer's partition
    cursor: int = 0             # where this client's next pull starts

    @classmethod
    def of(cls, redirect: Partitioned) -> Layout:
        return cls(redirect.queue, redirect.partitions, redirect.options,
                   redirect.pin % redirect.partitions, redirect.pin % redirect.partitions)

    def name(self, partition: int) -> str:
        return partition_name(self.queue, partition, self.options.partition_seed)

    def names(self) -> list[str]:
        return [self.name(j) for j in range(self.partitions)]

    def partition_options(self) -> QueueOptions:
        return replace(self.options, partitions=1)

    def target(self, key: Any = None) -> str:
        """The partition a push goes to: the key's, or this producer's."""
        return self.name(self.pin if key is None else partition_for_key(key, self.partitions))

    def turn(self) -> list[int]:
        """The partitions in the order this pull visits them; the next pull starts one on."""
        start = self.cursor
        self.cursor = (start + 1) % self.partitions
        return [(start + offset) % self.partitions for offset in range(self.partitions)]

    def lease_id(self, lease: int, partition: int) -> int:
        return lease * self.partitions + partition

    def split_lease_id(self, lease_id: int) -> tuple[int, int]:
        """(partition, the partition's own lease id) of an id that pull() returned."""
        lease, partition = divmod(lease_id, self.partitions)
        return partition, lease


# -- operations of a client on a partitioned queue (native) -------------------------------

def pull(server: Server, layout: Layout, batch_size: int | None, block: bool | None,
         timeout: float | None, remove: bool, ack: bool) -> list:
    """Pull from the partitions of `layout` (see the module docstring and Server.pull)."""
    options = layout.options
    is_batch = options.kind == "batch"
    size = options.pull_size if batch_size is None else batch_size
    block = is_batch if block is None else block
    if is_batch and timeout is None:
        timeout = options.batch_timeout
    deadline = None if timeout is None else time.monotonic() + timeout
    got: list = []
    while True:
        got += _take(server, layout, -1 if size == -1 else size - len(got), remove, ack)
        if not block or not remove or (got and (size == -1 or len(got) >= size)):
            return got
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return got
        if not _watch(server, layout, left):
            return got  # the timeout passed with nothing new


def _take(server: Server, layout: Layout, size: int, remove: bool, ack: bool) -> list:
    """Up to `size` items (-1: all) from the partitions, without waiting."""
    pipeline = server.pipeline()
    order = layout.turn()
    if size == -1:  # everything: ask every partition at once
        answers = server.each_queue([_pull(layout, j, -1, remove, ack) for j in order],
                                    tolerate=(Exception,))
        got = [item for j, answer in zip(order, answers, strict=True) if isinstance(answer, list)
               for item in _leased(layout, j, answer, ack)]
        failures = [answer for answer in answers if not isinstance(answer, list)]
        if failures and not got:
            raise failures[0]
        for failure in failures:  # the items of the others are returned, not dropped
            logger.warning("pype: a pull of %r took what %d partitions held; one failed: %r",
                           layout.queue, len(order) - len(failures), failure)
        return got
    got: list = []
    for j in order:
        request = _pull(layout, j, size - len(got), remove, ack)
        answer = server.result(_send(server, pipeline, layout, j, request), request)
        got += _leased(layout, j, answer, ack)
        if len(got) >= size:
            break
    return got


def _pull(layout: Layout, partition: int, size: int, remove: bool, ack: bool) -> Pull:
    """A pull of one partition, which must exist: a missing one means that the queue was
    removed since this client learned its layout (the client then forgets it)."""
    return Pull(layout.name(partition), size, False, None, remove, ack, must_exist=True)


def _send(server: Server, pipeline, layout: Layout, partition: int, request: tuple):
    index = server.shard_of(layout.name(partition))
    return pipeline.send(index, server._after(index), request)


def _leased(layout: Layout, partition: int, items: list, ack: bool) -> list:
    if not ack:
        return items
    return [(layout.lease_id(lease, partition), item, again) for lease, item, again in items]


def _watch(server: Server, layout: Layout, wait: float | None) -> bool:
    """Wait until some partition holds an item; False if `wait` s passed first.

    A watch without a limit lasts WATCH_SLICE seconds at most: the watches of the
    partitions that did not fire stay parked in their shards until their own
    deadline, and must not pile up there.
    """
    deadline = None if wait is None else time.monotonic() + wait
    while True:
        left = WATCH_SLICE if deadline is None else min(WATCH_SLICE, deadline - time.monotonic())
        if left <= 0:
            return False
        if _watch_once(server, layout, left):
            return True


def _watch_once(server: Server, layout: Layout, wait: float) -> bool:
    pipeline = server.pipeline()
    tickets = [_send(server, pipeline, layout, j, CanPull(layout.name(j), 1, wait))
               for j in range(layout.partitions)]
    try:
        first = pipeline.first(tickets, wait)
        return first is not None and pipeline.result(first) is True
    except Moved as moved:  # a partition moved (a resize): look again, where it is now
        server._refresh(moved.epoch)
        return True
    finally:
        for ticket in tickets:
            pipeline.forget(ticket)


def can_pull(server: Server, layout: Layout, batch_size: int | None, wait: float | None) -> bool:
    """True once one partition holds a full pull of batch_size items (see Server.can_pull).

    wait: as CanPull's (None: the shards' poll_wait, math.inf: no limit). A long wait
    goes in slices of WATCH_SLICE, as _watch's, so that unanswered asks never pile up."""
    if wait is None or wait <= WATCH_SLICE:
        return _can_pull_once(server, layout, batch_size, wait)
    deadline = time.monotonic() + wait
    while True:
        left = min(WATCH_SLICE, deadline - time.monotonic())
        if left <= 0:
            return False
        if _can_pull_once(server, layout, batch_size, left):
            return True


def _can_pull_once(server: Server, layout: Layout, batch_size: int | None,
                   wait: float | None) -> bool:
    pipeline = server.pipeline()
    tickets = [_send(server, pipeline, layout, j, CanPull(name, batch_size, wait))
               for j, name in enumerate(layout.names())]
    try:
        while tickets:  # each answers by its own deadline
            first = pipeline.first(tickets, None)
            tickets.remove(first)
            if pipeline.result(first):
                return True
        return False
    except Moved as moved:  # a partition moved (a resize): ask again, where it is now
        server._refresh(moved.epoch)
        return _can_pull_once(server, layout, batch_size, wait)
    finally:
        for ticket in tickets:
            pipeline.forget(ticket)


def length(server: Server, layout: Layout) -> int:
    """Items ready to pull in all partitions."""
    return sum(_each(server, layout, lambda name: Length(name, must_exist=True)))


def settle(server: Server, layout: Layout, lease_ids: list[int], requeue: bool) -> int:
    """Ack or nack leases that pull() returned, in each partition that holds them."""
    by_partition: dict[int, list[int]] = {}
    for lease_id in lease_ids:
        partition, lease = layout.split_lease_id(lease_id)
        by_partition.setdefault(partition, []).append(lease)
    pipeline = server.pipeline()
    requests = {j: Settle(layout.name(j), leases, requeue) for j, leases in by_partition.items()}
    tickets = {j: _send(server, pipeline, layout, j, request) for j, request in requests.items()}
    settled, missing = 0, []
    for j, ticket in tickets.items():
        try:
            settled += server.result(ticket, requests[j])
        except LeaseNotHeldError as error:
            missing += [layout.lease_id(lease, j) for lease in error.lease_ids]
            settled += len(by_partition[j]) - len(error.lease_ids)
    if missing:
        verb = "returned" if requeue else "acked"
        raise LeaseNotHeldError(
            f"queue {layout.queue!r}: {len(missing)} of {len(lease_ids)} lease ids are not held "
            f"(their lease expired and the items went back to the queue, they were settled "
            f"before, or they were never issued): {missing[:10]}; the other {settled} were {verb}",
            missing)
    return settled


def _each(server: Server, layout: Layout, request_for) -> list:
    """The answers of every partition to request_for(partition name), asked at once."""
    return server.each_queue([request_for(name) for name in layout.names()])




def render(server: Server, layout: Layout) -> str:
    """print_queue of a partitioned queue: one line per partition under one heading."""
    texts = _each(server, layout, lambda name: Render(name, show=False))
    heading = (f"queue {layout.queue!r} ({layout.options.kind}, {length(server, layout)} items "
               f"in {layout.partitions} partitions):")
    lines = [heading]
    lines += [f"  {j}: {text.split(': ', 1)[1]}" for j, text in enumerate(texts)]
    text = "\n".join(lines)
    print(text, flush=True)  # print_queue's job, as the shard does for a plain queue
    return text


def fold_stats(queues: dict) -> None:
    """Fold the counters of partitions (by name) into their queue's, in place: a
    partitioned queue's entry then counts all its partitions and lists them."""
    for name in [name for name in queues if split_name(name)[1] is not None]:
        queue, partition = split_name(name)
        counters = queues.pop(name)
        head = queues.get(queue)
        if head is None:  # a partition whose head is gone (a remove in progress)
            continue
        head.setdefault("partitions", []).append(
            {"partition": partition, "shard": counters["shard"], "depth": counters["depth"],
             "leased": counters["leased"], "pushed": counters["pushed"]})
        for key in ("depth", "bytes", "leased", "pushed", "pulled", "dropped", "acked",
                    "redelivered", "waiting_producers"):
            head[key] += counters[key]
    for counters in queues.values():
        if "partitions" in counters:
            counters["partitions"].sort(key=lambda entry: entry["partition"])
