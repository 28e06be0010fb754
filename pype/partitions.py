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

This module holds what shards and clients share: the names, the Layout, the
Partitioned redirect. What a client does on the partitions is pype.partitioned's.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import xxhash

from pype.hashing import shard_for
from pype.options import QueueOptions
from pype.protocol import Redirect

SEPARATOR = "\x1f"  # unit separator: a control character, never in a user's queue name
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


class Partitioned(Redirect):
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
                    "redelivered", "dead_lettered", "dead_dropped", "expired", "delayed",
                    "waiting_producers"):
            head[key] += counters[key]
    for counters in queues.values():
        if "partitions" in counters:
            counters["partitions"].sort(key=lambda entry: entry["partition"])
