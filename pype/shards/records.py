"""What a shard's journal says: one record type per kind of change to its queues.

QueueStore (pype.shards.store) logs one record for every change it makes, in the
order it made them, before the call that made it returns, and replays them onto
a snapshot when the shard starts again (QueueStore.replay, one method per record
type). Each record is a named tuple whose fields are what replaying it needs:
replay calls the same deterministic Queue methods the original call did, so it
needs the call's outcome (which queues took a push, the lease ids issued), not
its arguments alone. How records are stored, and which older formats are read,
is pype.shards.journal's business.

The types follow the requests of pype.protocol where a request changes a queue;
they are not the same types: a request says what a client asks for, a record
what the shard did (a Push request may log Add, Pin and Push records, or none: a
push sent again).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from pype.options import QueueOptions

# -- queues ---------------------------------------------------------------------------

class Add(NamedTuple):
    """Queue `queue` was created, empty, with `options` (add(), or a first push)."""

    queue: str
    options: QueueOptions


class Remove(NamedTuple):
    """Queue `queue` was removed: its items, leases and parked pushes are gone, and its
    counters were added to those of the removed queues (stats)."""

    queue: str


class Pin(NamedTuple):
    """`producer` (a caller id) pushes to partition `partition` of the partitioned queue
    whose head is `queue` (pype.partitions); the head hands out the next pin after it."""

    queue: str
    producer: str
    partition: int


# -- items in -------------------------------------------------------------------------

class Push(NamedTuple):
    """A non-blocking push of `items` (of `nbytes` in all) was applied to each of `queues`
    that took it: entered[i] says if the items went into queues[i] at once (True) or
    wait in its line, acknowledged (False: a full queue with overflow "block").

    producer: the push's (producer id, sequence number, floor), or None; replay
    remembers that it was applied, so that it is applied once however often it is sent
    (pype.shards.producers; logs of before 2026-12-04 hold (id, sequence)).
    expires: when the items expire in each of `queues` (time.time(), None: never), or
    None if they never do in any.
    """

    queues: tuple[str, ...]
    entered: list[bool]
    items: list
    priority: Any
    nbytes: int
    producer: tuple[int, int, int] | None
    expires: list[float | None] | None = None


class Refuse(NamedTuple):
    """The push numbered `producer` (producer id, sequence number, floor) was refused
    with `error`, wholly or in part (the queues that took part of it have their Push
    record first). Replay remembers the refusal, so that the push, sent again after its
    reply was lost, gets the same answer (pype.shards.producers)."""

    producer: tuple[int, int, int]
    error: Exception


class Delay(NamedTuple):
    """A push of `items` to each of `queues`, delayed until `due` (time.time()): they
    wait beside their queues until Due. producer and expires: as for Push."""

    queues: tuple[str, ...]
    items: list
    priority: Any
    nbytes: int
    producer: tuple[int, int, int] | None
    due: float
    expires: list[float | None] | None


class Due(NamedTuple):
    """The delayed pushes of `queue` due at `now` (time.time()) or before went in, in
    the order of their times (Queue.fall_due): entered[i] says if the i-th went in at
    once (True) or waits in line, acknowledged (False)."""

    queue: str
    now: float
    entered: list[bool]


class Insert(NamedTuple):
    """The items of a blocking push went into `queue`, past flow control: at once, or
    later, when a pull made room for them while they waited in line. They expire at
    `expires` (time.time(); None: never)."""

    queue: str
    items: list
    priority: Any
    nbytes: int
    expires: float | None = None


class Admit(NamedTuple):
    """The oldest acknowledged push waiting in `queue`'s line (see Push.entered) went in:
    a pull made room for it."""

    queue: str


# -- items out ------------------------------------------------------------------------

class Take(NamedTuple):
    """A pull removed the first `count` items of `queue` in pull order."""

    queue: str
    count: int


class Lease(NamedTuple):
    """A pull leased the first `count` items of `queue` in pull order, with the lease ids
    first_id, first_id + 1, ..., until `deadline` (time.time())."""

    queue: str
    count: int
    first_id: int
    deadline: float


class Settle(NamedTuple):
    """Leases of `queue` ended: acked (requeue=False: the items are gone) or returned
    (requeue=True: a nack, or the deadline passed; the items go back to the head of the
    queue). Ids that were not held are passed over."""

    queue: str
    lease_ids: list[int]
    requeue: bool


class Expire(NamedTuple):
    """The items of `queue` whose time to live ended at `now` (time.time()) or before
    were given up (Queue.expire: the same ones again on replay)."""

    queue: str
    now: float


class Extend(NamedTuple):
    """Leases of `queue` end at `deadline` (time.time()) now; handed_back: their
    consumer handed the items back (a nack with a delay), and they come back then."""

    queue: str
    lease_ids: list[int]
    deadline: float
    handed_back: bool


class Reject(NamedTuple):
    """Leases of `queue` ended in a reject (nack with requeue=False): their items were
    given up (pype.dead_letters). Ids that were not held are passed over."""

    queue: str
    lease_ids: list[int]


class Move(NamedTuple):
    """The first `count` items of `queue` in pull order moved to queue `destination`: at
    once (here=True: it is this shard's; entered: into it, or False: into its line,
    acknowledged; they expire at `expires`, its ttl), or through the outbox."""

    queue: str
    destination: str
    count: int
    here: bool
    entered: bool | None
    expires: float | None


# -- the outbox: items on their way to their queue on any shard ---------------------------

class Outbox(NamedTuple):
    """The store's outbox sends its pushes as producer `producer` (pype.shards.producers),
    numbered from 1: logged before the first dead letter of a store's life."""

    producer: int


class Resend(NamedTuple):
    """Outbox entry `number`, the first, was refused (its queue moved, or was full): it
    and every entry after it take push numbers from `sequence` on, in order."""

    number: int
    sequence: int


class Delivered(NamedTuple):
    """Outbox entry `number` reached its queue."""

    number: int


class Split(NamedTuple):
    """Outbox entry `number` can never fit its queue whole: each of its items becomes an
    entry of its own, in its place, and every entry takes push numbers from `sequence`
    on, in order."""

    number: int
    sequence: int


class Undeliverable(NamedTuple):
    """Outbox entry `number`, of one item, can never fit its queue (`reason`): it is
    dropped, counted and logged."""

    number: int
    reason: str


# -- moving queues between shards (pype.router's resize) ----------------------------------

class Expect(NamedTuple):
    """Queues that a topology of `shards` shards (hash seed `seed`) gave to other shards
    may come here, until Arrived."""

    shards: int
    seed: int


class Import(NamedTuple):
    """Queue `queue` came from another shard: `state` is the whole queue, as it left."""

    queue: str
    state: Any  # a pype.shards.queues.Queue


class Arrived(NamedTuple):
    """Every queue on its way here came."""


class Export(NamedTuple):
    """From now on a topology of `shards` shards (hash seed `seed`, topology `epoch`)
    decides which queues are this shard's; the others were handed over, and stay here
    unserved until Release."""

    shards: int
    seed: int
    epoch: int


class Release(NamedTuple):
    """The queues that the Export topology gives to other shards than this one, shard
    `index`, were dropped here: their new shards hold them."""

    index: int


# -- replication (pype.shards.replication) -------------------------------------------------

class Lead(NamedTuple):
    """Replica `replica` became the shard's primary in leader epoch `epoch`: the first
    record of every epoch, which tells each replica's log which epoch wrote which of
    its records. It changes no queue."""

    epoch: int
    replica: str


RECORD_TYPES = (Add, Remove, Pin, Push, Refuse, Delay, Due, Insert, Admit, Take, Lease, Settle,
                Extend, Reject, Expire, Move, Outbox, Resend, Delivered, Split, Undeliverable,
                Expect, Import, Arrived, Export, Release, Lead)
Record = (Add | Remove | Pin | Push | Refuse | Delay | Due | Insert | Admit | Take | Lease | Settle
          | Extend | Reject | Expire | Move | Outbox | Resend | Delivered | Split
          | Undeliverable | Expect | Import | Arrived | Export | Release | Lead)
