"""The queues of one shard: plain Python, no Ray, no threads, and nothing here waits.

One thread at a time calls it: the shard's engine (pype.shards.engine), under its
lock, which also parks the requests that wait and asks the store again when
something changed. Every method returns at once. Methods that find a condition
(pull_ready, can_pull, can_push, push_outcome) let the engine decide when a parked
request is done.

Durability: with a Journal (pype.shards.journal), every change is logged in the
order it happened, before the call that made it returns, as one record of
pype.shards.records (Add, Push, Lease, Settle, ...). restore() replays them onto
a snapshot, with one method per record type (_REPLAY); replay calls the same
Queue methods as the call that logged the record, which are deterministic.

Exactly-once pushes: a native push carries its producer's numbers, and a client
that lost the reply to a shard restart or failover sends it again. The store keeps
each number's answer (pype.shards.producers), applied in the push's own journal
record or refused in a Refuse record, and answers a number it has seen with its
first answer, without applying it again.

Dead letters: items a queue gives up on (pype.dead_letters) wait in the store's
outbox, a part of its state like any other, until the shard has pushed them to
their dead-letter queue, wherever it lives: as producer `outbox_producer`, with
numbers from the outbox, so that the target applies each push once however often
it is sent (pype.shards.producers). The shard's sender (pype.shards.shard) takes
them from outgoing() and reports delivered() or renumber().

Limits: a push of an item larger than max_item_bytes is a ValueError; a push that
would take the bytes the shard holds (see item_size) past memory_budget is a
QueueFullError. Neither changes anything.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import pickle
import reprlib
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, NamedTuple

from pype.dead_letters import DeadLetter
from pype.errors import (
    LeaseNotHeldError,
    QueueExistsError,
    QueueFullError,
    QueueNotFoundError,
    QueueTimeoutError,
    ShardLostError,
)
from pype.hashing import shard_for
from pype.options import QueueOptions
from pype.partitions import split_name
from pype.protocol import Moved
from pype.shards import records
from pype.shards.journal import FORMAT, Journal
from pype.shards.producers import APPLIED, Producers
from pype.shards.queues import (
    ACK,
    EXTEND,
    NACK,
    REJECT,
    GivenUp,
    ParkedPush,
    Queue,
    item_sizes,
    make_queue,
    total_size,
)
from pype.shards.replication import EpochHistory

COUNTERS = ("pushed", "pulled", "dropped", "acked", "redelivered", "dead_lettered", "dead_dropped",
            "expired")
MAX_PINS = 100_000  # producers whose partition a partitioned queue keeps (the least recent go)
MAX_OWNED = 100_000  # queue names whose owner belongs_elsewhere remembers

logger = logging.getLogger("pype")


@dataclass
class PendingPush:
    """What a blocking push returns when some of its items had to wait for room.

    push_outcome() says when it is done.
    """

    accepted: int
    tickets: dict[str, int] = field(default_factory=dict)  # queue name -> ticket id
    deadline: float | None = None  # the store's clock() after which the waiting parts give up
    request: Any = None  # the Push, kept by the loop


class Outgoing(NamedTuple):
    """Items on their way to queue `queue` (the store's outbox, entry `number`): dead
    letters, or items that move() took for a queue of another shard."""

    number: int
    queue: str
    items: list
    sequence: int  # the number of the push that carries them (producer: outbox_producer)
    position: int  # of the record that gave them up: they go once it is committed


class QueueStore:
    """Named queues with flow control, leases and a journal; one thread calls it."""

    def __init__(self, queue_defaults: QueueOptions, memory_budget: int = 0,
                 max_item_bytes: int = 0, journal: Journal | None = None,
                 compact_bytes: int = 64 << 20, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        self.queue_defaults = queue_defaults
        # How long blocking pushes wait (a test may drive it). Leases and times to live
        # keep wall-clock time, which their journal records carry across restarts and
        # to backups (on another node: its clock may differ by the nodes' offset).
        self.clock = clock
        self.wall_clock = wall_clock
        self.memory_budget = memory_budget      # bytes; 0 = unbounded
        self.max_item_bytes = max_item_bytes    # bytes; 0 = unbounded
        self._journal = journal
        self._compact_bytes = compact_bytes
        # Replication (pype.shards.replication): every record's position in the shard's
        # log, the epoch that wrote each (Lead records), and who else must see each one.
        self.position = 0
        self.history = EpochHistory()
        self.replicate: Callable[[int, records.Record], None] | None = None
        self._queues: dict[str, Queue] = {}
        self._tickets: dict[int, ParkedPush] = {}
        self._ticket_ids = itertools.count(1)
        # Lease ids grow with time, so that ids from before a restart are never reissued.
        self._next_lease_id = time.time_ns()
        self._nbytes = 0                            # held by all queues
        self._producers = Producers()               # each numbered push's answer
        self._dues: list = []  # heap of (due, queue name) of delayed pushes; stale ones skipped
        self.outbox: dict[int, Outgoing] = {}       # number -> dead letters to send
        self.outbox_producer: int | None = None     # logged (records.Outbox) before first use
        self._outbox_numbers = 0                    # the last entry or push number issued
        self._undeliverable = 0                     # outbox items that could never fit
        self._retired: Counter = Counter()          # counters of removed queues
        # Resharding (pype.router's resize): the topology that decides which names are
        # this shard's once it gave queues away, (shards, hash seed, epoch); and while
        # queues may be on their way here, the topology they come from (shards, seed).
        self.owner: tuple[int, int, int] | None = None
        self.expecting: tuple[int, int] | None = None
        self._mine: dict[str, bool] = {}  # name -> does the owner rule give it to this shard
        self._repr = reprlib.Repr()
        self._repr.maxlist, self._repr.maxother = 50, 80

    # -- durability -------------------------------------------------------------------

    def restore(self) -> int:
        """Load the journal's snapshot and replay its log; return the records replayed.

        A journal of an older format is rewritten in this one at once (a compaction),
        so that its log never mixes two formats.
        """
        contents = self._journal.load()
        self.replay(contents.state, contents.records)
        if contents.format < FORMAT:
            self._compact()
        return len(contents.records)

    def replay(self, state: dict | None, journal_records: list[records.Record],
               observe: Callable[[records.Record, list], None] | None = None) -> None:
        """Load a snapshot's `state`, then apply the records logged after it.

        observe(record, moved), if given, sees each record (pype.shards.records) and the
        items it moved: the items pushed,
        parked, admitted or taken, (lease_id, item, redelivered) for a lease,
        (lease_id, item) of the leases a settle found held. Tools that trace items
        through a journal use it (pype bench soak).
        """
        if state is not None:
            self._load_state(state)
        for record in journal_records:
            moved = self._apply(record)
            if observe is not None:
                observe(record, moved)
        self._nbytes = sum(queue.nbytes for queue in self._queues.values())

    def _load_state(self, state: dict) -> None:
        self._queues = state["queues"]
        self._retired = state["retired"]
        self._next_lease_id = max(self._next_lease_id, state["next_lease_id"])
        self._producers = Producers.load(state.get("producers"))
        self.owner, self._mine = state.get("owner"), {}
        self.expecting = state.get("expecting")
        self.position = state.get("position", 0)
        self.history = EpochHistory(list(state.get("history", ())))
        self.outbox_producer, self._outbox_numbers, self.outbox = state.get("outbox", (None, 0, {}))
        self._undeliverable = state.get("undeliverable", 0)
        self._dues = []
        for name, queue in self._queues.items():
            self._await_due(name, queue)

    def _apply(self, record: records.Record) -> list:
        self.position += 1
        return self._REPLAY[type(record)](self, record)

    def apply_replicated(self, batch: list[records.Record]) -> None:
        """Apply, as a backup, records of the primary's log that follow this store's
        last one, and journal them (pype.shards.replication)."""
        for record in batch:
            self._apply(record)
        self._write(*batch)
        self._nbytes = sum(queue.nbytes for queue in self._queues.values())

    def snapshot(self) -> bytes:
        """The whole state, pickled: for a backup that cannot catch up from the log."""
        return pickle.dumps(self._state(), protocol=pickle.HIGHEST_PROTOCOL)

    def load_snapshot(self, snapshot: bytes) -> None:
        """Replace the whole state with a primary's snapshot() (a backup that could not
        catch up from the log); the journal starts again from it."""
        self._load_state(pickle.loads(snapshot))
        self._nbytes = sum(queue.nbytes for queue in self._queues.values())
        self._tickets.clear()
        if self._journal is not None:
            self._compact()

    def lead(self, epoch: int, replica: str) -> int:
        """Open leader epoch `epoch`, whose primary `replica` is: log its Lead record."""
        self._log(records.Lead(epoch, replica))
        return self.position

    # One method per record type: apply `record` as the call that logged it did, and
    # return the items it moved (see replay's observe).

    def _replay_add(self, record: records.Add) -> list:
        self._queues[record.queue] = make_queue(record.options)
        return []

    def _replay_remove(self, record: records.Remove) -> list:
        self._retire(record.queue)
        return []

    def _replay_pin(self, record: records.Pin) -> list:
        self._pin(self._queues[record.queue], record.producer, record.partition)
        return []

    def _replay_push(self, record: records.Push) -> list:
        expires = record.expires or [None] * len(record.queues)
        for name, now, expiry in zip(record.queues, record.entered, expires, strict=True):
            queue = self._queues[name]  # its Add record came first
            if now:
                queue.insert(record.items, record.priority, record.nbytes, expiry)
            else:
                queue.parked.append(ParkedPush(record.items, record.priority, None, record.nbytes,
                                               acknowledged=True, expires=expiry))
        self._producers.note(record.producer, APPLIED)
        return record.items

    def _replay_refuse(self, record: records.Refuse) -> list:
        self._producers.note(record.producer, record.error)
        return []

    def _replay_delay(self, record: records.Delay) -> list:
        expires = record.expires or [None] * len(record.queues)
        for name, expiry in zip(record.queues, expires, strict=True):
            queue = self._queues[name]
            queue.delay(record.items, record.priority, record.nbytes, record.due, expiry)
            self._await_due(name, queue)
        self._producers.note(record.producer, APPLIED)
        return record.items

    def _replay_due(self, record: records.Due) -> list:
        self._queues[record.queue].fall_due(record.now, record.entered)
        return []

    def _replay_extend(self, record: records.Extend) -> list:
        self._queues[record.queue].extend(record.lease_ids, record.deadline, record.handed_back)
        return []

    def _replay_move(self, record: records.Move) -> list:
        queue = self._queues[record.queue]
        return self._apply_move(record.queue, queue, record.destination, record.count,
                                record.here, record.entered, record.expires)

    def _replay_split(self, record: records.Split) -> list:
        self._split(record.number, record.sequence)
        return []

    def _replay_undeliverable(self, record: records.Undeliverable) -> list:
        items = self.outbox[record.number].items
        self._drop_undeliverable(record.number, record.reason)
        return items

    def _replay_insert(self, record: records.Insert) -> list:
        self._queues[record.queue].insert(record.items, record.priority, record.nbytes,
                                          record.expires)
        return record.items

    def _replay_expire(self, record: records.Expire) -> list:
        queue = self._queues[record.queue]
        given_up = queue.expire(record.now)
        self._send_on(record.queue, queue, given_up)
        return [item for item, _, _ in given_up]

    def _replay_admit(self, record: records.Admit) -> list:
        queue = self._queues[record.queue]
        ticket = queue.parked.popleft()
        queue.insert(ticket.items, ticket.priority, ticket.nbytes, ticket.expires)
        return ticket.items

    def _replay_take(self, record: records.Take) -> list:
        return self._queues[record.queue].take(record.count)

    def _replay_lease(self, record: records.Lease) -> list:
        self._next_lease_id = max(self._next_lease_id, record.first_id + record.count)
        return self._queues[record.queue].lease(record.count, record.first_id, record.deadline)

    def _replay_settle(self, record: records.Settle) -> list:
        return self._replay_end_of_leases(record.queue, record.lease_ids,
                                          NACK if record.requeue else ACK)

    def _replay_reject(self, record: records.Reject) -> list:
        return self._replay_end_of_leases(record.queue, record.lease_ids, REJECT)

    def _replay_end_of_leases(self, name: str, lease_ids: list[int], outcome: str) -> list:
        queue = self._queues[name]
        held = [(lease_id, queue.leases[lease_id].item) for lease_id in lease_ids
                if lease_id in queue.leases]
        _, given_up = queue.settle(lease_ids, outcome)
        self._send_on(name, queue, given_up)
        return held

    def _replay_outbox(self, record: records.Outbox) -> list:
        self.outbox_producer = record.producer
        return []

    def _replay_resend(self, record: records.Resend) -> list:
        self._renumber_all(record.sequence)
        return []

    def _replay_delivered(self, record: records.Delivered) -> list:
        return self.outbox.pop(record.number).items

    def _replay_expect(self, record: records.Expect) -> list:
        self.expecting = (record.shards, record.seed)
        return []

    def _replay_import(self, record: records.Import) -> list:
        self._place(record.queue, record.state)
        return []

    def _replay_arrived(self, record: records.Arrived) -> list:
        self.expecting = None
        return []

    def _replay_export(self, record: records.Export) -> list:
        self.owner, self._mine = (record.shards, record.seed, record.epoch), {}
        return []

    def _replay_release(self, record: records.Release) -> list:
        self._drop_leaving(record.index)
        return []

    def _replay_lead(self, record: records.Lead) -> list:
        self.history.begin(record.epoch, self.position)
        return []

    _REPLAY: ClassVar[dict[type, Callable[[QueueStore, Any], list]]] = {
        records.Add: _replay_add, records.Remove: _replay_remove, records.Pin: _replay_pin,
        records.Push: _replay_push, records.Refuse: _replay_refuse, records.Insert: _replay_insert, records.Admit: _replay_admit,
        records.Take: _replay_take, records.Lease: _replay_lease, records.Settle: _replay_settle,
        records.Reject: _replay_reject, records.Expire: _replay_expire,
        records.Delay: _replay_delay, records.Due: _replay_due, records.Extend: _replay_extend,
        records.Move: _replay_move, records.Split: _replay_split,
        records.Undeliverable: _replay_undeliverable,
        records.Outbox: _replay_outbox,
        records.Resend: _replay_resend, records.Delivered: _replay_delivered,
        records.Expect: _replay_expect, records.Import: _replay_import,
        records.Arrived: _replay_arrived, records.Export: _replay_export,
        records.Release: _replay_release, records.Lead: _replay_lead}

    def _log(self, record: records.Record) -> None:
        """Record one change this store made: its position, its journal, its backups."""
        if type(record) is records.Lead:  # raises, changing nothing, for an epoch not newer
            self.history.begin(record.epoch, self.position + 1)
        self.position += 1
        # A replicated primary syncs its journal on the side, while its backups sync
        # theirs (Replicator); the reply waits for both (PrimaryLog.synced).
        if self._journal is not None:
            self._write(record, sync=self.replicate is None)
        if self.replicate is not None:
            self.replicate(self.position, record)

    def _write(self, *batch: records.Record, sync: bool = True) -> None:
        """Journal records, synced together unless sync=False (then sync() does it);
        compact when the log has grown large."""
        if self._journal is None:
            return
        self._journal.extend(batch, sync=sync)
        if self._journal.log_bytes >= self._compact_bytes:
            self._compact()

    @property
    def syncs_each_write(self) -> bool:
        """Does the journal sync each record before it is acknowledged (fsync "always")?"""
        return self._journal is not None and self._journal.fsync == "always"

    def sync(self) -> None:
        """Sync the journal's records written so far (those _log wrote unsynced). Call
        it without the engine's lock: writers go on meanwhile."""
        if self._journal is not None:
            self._journal.sync()

    def _state(self) -> dict:
        return {"queues": self._queues, "retired": self._retired,
                "next_lease_id": self._next_lease_id, "producers": self._producers,
                "owner": self.owner, "expecting": self.expecting,
                "position": self.position, "history": list(self.history.starts),
                "outbox": (self.outbox_producer, self._outbox_numbers, self.outbox),
                "undeliverable": self._undeliverable}

    def _compact(self) -> None:
        """Make the whole state the journal's next snapshot (see Journal.compact)."""
        self._journal.compact(self._state())

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()

    # -- admin ------------------------------------------------------------------------

    def add(self, name: str, options: QueueOptions, exist_ok: bool = False) -> bool:
        """Create queue `name`; return False if it existed and exist_ok is set."""
        options.check_dead_letter(name)
        if name in self._queues:
            if exist_ok:
                return False
            raise QueueExistsError(f"queue {name!r} already exists")
        self._create(name, options)
        return True

    def _create(self, name: str, options: QueueOptions) -> Queue:
        if options.dead_letter == name:  # queue_defaults' dead-letter queue, made by a push
            options = replace(options, dead_letter=None)
        queue = self._queues[name] = make_queue(options)
        self._log(records.Add(name, options))
        return queue

    def remove(self, name: str) -> int:
        """Delete queue `name` and return how many items it still held (leased ones included).

        Its parked pushes end 'removed' (their producers get QueueNotFoundError).
        """
        if name not in self._queues:
            raise QueueNotFoundError(f"queue {name!r} does not exist")
        discarded = self._retire(name)
        self._log(records.Remove(name))
        return discarded

    def _retire(self, name: str) -> int:
        queue = self._queues.pop(name)
        self._retired.update({key: count for key in COUNTERS if (count := getattr(queue, key))})
        self._nbytes -= queue.nbytes
        discarded = queue.clear()
        self._retired.update(discarded=discarded)
        return discarded

    def names(self) -> list[str]:
        return list(self._queues)

    def partitions(self, name: str, create: bool = False) -> QueueOptions | None:
        """The options of `name` if it is the head of a partitioned queue (pype.partitions),
        else None. create=True first makes a missing `name` when the defaults partition
        queues, as a first push would (a head holds no items)."""
        queue = self._queues.get(name)
        if queue is None and create and self.queue_defaults.partitions > 1:
            queue = self._create(name, self.queue_defaults)
        if queue is None or queue.options.partitions == 1:
            return None
        return queue.options

    def pin(self, name: str, producer: str, assign: bool) -> int:
        """The partition of the partitioned queue `name` (its head) that `producer` (a
        caller id) pushes to. assign=True (a push) gives a new producer the next one, round
        robin, and remembers it on the head, which journals it and takes it along when it
        moves: a producer's partition, and so its order, outlives restarts and resizes."""
        head = self._queues[name]
        pins = head.__dict__.setdefault("pins", OrderedDict())
        pin = pins.get(producer)
        if pin is None:
            pin = head.__dict__.get("next_pin", 0)
            if assign:
                self._pin(head, producer, pin)
                self._log(records.Pin(name, producer, pin))
        return pin

    @staticmethod
    def _pin(head: Queue, producer: str, pin: int) -> None:
        pins = head.__dict__.setdefault("pins", OrderedDict())
        pins[producer] = pin
        head.next_pin = max(head.__dict__.get("next_pin", 0), pin + 1)
        if len(pins) > MAX_PINS:
            pins.popitem(last=False)

    def require(self, names: tuple[str, ...]) -> None:
        """Raise QueueNotFoundError unless every queue of `names` exists."""
        missing = [name for name in names if name not in self._queues]
        if missing:
            raise QueueNotFoundError(f"queue {', '.join(map(repr, missing))} does not exist")

    def length(self, name: str) -> int:
        """Items in queue `name` ready to pull (0 for a queue that does not exist); those
        whose time to live ended are not."""
        queue = self._queues.get(name)
        if queue is None:
            return 0
        self._expire(name, queue)
        return len(queue)

    def dead_letters(self, name: str, batch_size: int) -> list[DeadLetter]:
        """The DeadLetters among the first `batch_size` items of queue `name` (-1: all),
        in pull order; none for a queue that does not exist."""
        queue = self._queues.get(name)
        if queue is None:
            return []
        self._expire(name, queue)
        return queue.peek_letters(batch_size)

    def describe(self, name: str) -> dict | None:
        """The options of queue `name` as a dict, or None if it does not exist."""
        queue = self._queues.get(name)
        return None if queue is None else dict(vars(queue.options))

    def options(self, name: str) -> QueueOptions:
        """The options of queue `name`, or the defaults a first push would give it."""
        queue = self._queues.get(name)
        return queue.options if queue is not None else self.queue_defaults

    def render(self, name: str) -> str:
        """A one-line picture of queue `name` and its items in pull order."""
        queue = self._queues.get(name)
        if queue is None:
            raise QueueNotFoundError(f"queue {name!r} does not exist")
        self._expire(name, queue)
        bound = f" of {queue.options.maxsize}" if queue.options.maxsize else ""
        items = self._repr.repr(queue.peek(-1))
        leased = f", {len(queue.leases)} leased" if queue.leases else ""
        return f"queue {name!r} ({queue.kind}, {len(queue)}{bound} items{leased}): {items}"

    def stats(self) -> dict:
        """Counters of the whole store and of each queue."""
        queues = {
            name: {"kind": q.kind, "depth": len(q), "maxsize": q.options.maxsize,
                   "bytes": q.nbytes, "max_bytes": q.options.max_bytes,
                   "leased": len(q.leases), "pushed": q.pushed, "pulled": q.pulled,
                   "dropped": q.dropped, "acked": q.acked, "redelivered": q.redelivered,
                   "dead_lettered": q.dead_lettered, "dead_dropped": q.dead_dropped,
                   "expired": q.expired, "delayed": q.delayed_items,
                   "waiting_producers": len(q.parked)}
            for name, q in self._queues.items()}
        totals = {key: sum(q[key] for q in queues.values()) + self._retired[key]
                  for key in COUNTERS}
        return {"queues": len(queues), "depth": sum(q["depth"] for q in queues.values()),
                "delayed": sum(q["delayed"] for q in queues.values()),
                "leased": sum(q["leased"] for q in queues.values()),
                "bytes": self._nbytes, "memory_budget": self.memory_budget,
                **totals, "discarded": self._retired["discarded"],
                "outbox": sum(len(entry.items) for entry in self.outbox.values()),
                "undeliverable": self._undeliverable,
                "per_queue": queues}

    # -- moving queues between shards (resize) ------------------------------------------

    def belongs_elsewhere(self, name: str, index: int) -> int | None:
        """The epoch of the topology that gave queue `name` to another shard than this
        one (shard `index`), or None if it is this shard's."""
        if self.owner is None:
            return None
        mine = self._mine.get(name)
        if mine is None:
            if len(self._mine) > MAX_OWNED:
                self._mine.clear()
            shards, seed, _ = self.owner
            mine = self._mine[name] = shard_for(name, shards, seed) == index
        return None if mine else self.owner[2]

    def on_its_way(self, name: str, index: int) -> bool:
        """True while queue `name`, which another shard owned before a resize, may still be
        on its way here: until arrived(), also once it was imported, so that the requests
        held for it run before any that came after them."""
        if self.expecting is None:
            return False
        shards, seed = self.expecting
        return shard_for(name, shards, seed) != index

    def expect(self, old_shards: int, seed: int) -> None:
        """Queues owned by other shards of an `old_shards` topology may come here."""
        self.expecting = (old_shards, seed)
        self._log(records.Expect(old_shards, seed))

    def export(self, index: int, shards: int, seed: int, epoch: int) -> dict[str, bytes]:
        """Hand over the queues that a topology of `shards` shards (topology `epoch`)
        gives to other shards than this one, shard `index`: return them, and from now
        on serve them no more (belongs_elsewhere()). They stay here, unserved, until
        release(): a move interrupted by a shard's death loses nothing, and exporting
        again returns them again.

        The queues leave whole: items, leases, options, counters, and the pushes that
        wait in line with an acknowledgement (overflow "block"). Blocking pushes that
        still wait for room end 'moved' (their producers send them again to the new
        owner).
        """
        self.owner, self._mine = (shards, seed, epoch), {}
        self._log(records.Export(shards, seed, epoch))
        leaving = {name: queue for name, queue in self._queues.items()
                   if shard_for(name, shards, seed) != index}
        for queue in leaving.values():
            queue.next_lease_id = self._next_lease_id  # ids there grow past every id issued here
            for ticket in queue.parked:
                if not ticket.acknowledged and ticket.state == "waiting":
                    ticket.state = "moved"
        # A copy of each as it is now; the originals change no more by the clock (_serves).
        return {name: pickle.dumps(queue, protocol=pickle.HIGHEST_PROTOCOL)
                for name, queue in leaving.items()}

    def import_(self, queues: dict[str, bytes]) -> None:
        """Take over queues that other shards exported (pickled), but for those already
        here (an earlier, interrupted move brought them, and they may have changed since)."""
        for name, pickled in queues.items():
            if name not in self._queues:
                queue = pickle.loads(pickled)
                self._place(name, queue)
                self._log(records.Import(name, queue))

    def arrived(self) -> None:
        """Every queue on its way here has come."""
        self.expecting = None
        self._log(records.Arrived())

    def release(self, index: int) -> None:
        """Drop the queues that export() handed over: their new shards hold them now."""
        self._drop_leaving(index)
        self._log(records.Release(index))

    def _drop_leaving(self, index: int) -> None:
        for name in [name for name in self._queues if self.belongs_elsewhere(name, index)]:
            queue = self._queues.pop(name)
            self._nbytes -= queue.nbytes

    def _place(self, name: str, queue: Queue) -> None:
        self._queues[name] = queue
        self._nbytes += queue.nbytes
        self._await_due(name, queue)
        # Lease ids keep growing across the move: never one issued before, and in order.
        self._next_lease_id = max(self._next_lease_id, getattr(queue, "next_lease_id", 0),
                                  max(queue.leases, default=0) + 1)

    # -- push ---------------------------------------------------------------------

    def push(self, names: tuple[str, ...], items: list, priority: Any = None,
             block: bool = False, timeout: float | None = None,
             producer: tuple[int, int] | None = None, ttl: float | None = None,
             delay: float | None = None) -> int | PendingPush:
        """Push `items` to each queue in `names`, creating missing queues.

        Each queue takes all the items or none, by its overflow policy; a queue that
        refuses them raises QueueFullError, naming it and how many queues took them.
        With block=True, items that do not fit wait in the queue's line until
        `timeout` and a PendingPush is returned (see push_outcome). A push whose
        producer number was seen before gets its first answer (answer_again). The
        items live `ttl` seconds, or their queue's ttl if shorter (_expiry). With a
        `delay` (seconds) the items wait beside each queue until they are due (see
        fall_due): the push is accepted now, whatever room the queues have.
        Returns the number of items accepted (items x queues).
        """
        again = self.answer_again(producer, len(items) * len(names))
        if again is not None:
            return again
        nbytes = self._check_limits(items, len(names))
        queues = [self._queue_for_push(name, len(items), nbytes, priority) for name in names]
        expires = self._expiry(queues, ttl)
        if delay:
            return self._delay(names, queues, items, priority, nbytes, producer, delay, expires)
        if block:
            return self._offer(names, queues, items, priority, nbytes, timeout, expires)
        full, entered, took = [], [], []
        for position, queue in enumerate(queues):
            before = queue.nbytes
            try:
                entered.append(queue.put(items, priority, nbytes,
                                         None if expires is None else expires[position]))
            except QueueFullError as error:
                full.append(f"{names[position]!r} {error}")
                continue
            took.append(position)
            self._nbytes += queue.nbytes - before
        if took:
            self._producers.note(producer, APPLIED)
            logged, logged_expires = names, expires
            if full:  # the queues that took them
                logged = tuple(names[i] for i in took)
                logged_expires = None if expires is None else [expires[i] for i in took]
            self._log(records.Push(logged, entered, items, priority, nbytes, producer,
                                   logged_expires))
        if full:
            rest = f"; the other {len(took)} queues of this push took it" if len(names) > 1 else ""
            raise QueueFullError(f"queue {'; queue '.join(full)}{rest}")
        return len(items) * len(names)

    def answered(self, producer: tuple | None) -> bool:
        """Was the push numbered `producer` answered before (applied or refused)?"""
        return self._producers.first_answer(producer) is not None

    def applied(self, producer: tuple | None) -> bool:
        """Was the push numbered `producer` applied before?"""
        return self._producers.first_answer(producer) is APPLIED

    def answer_again(self, producer: tuple | None, count: int) -> int | None:
        """The answer the push numbered `producer` got when it first came, if it came
        before: `count` (the items it put in) if it was applied; its refusal is raised
        again. None: it is new (or not numbered)."""
        first = self._producers.first_answer(producer)
        if first is None:
            return None
        if first is APPLIED:
            return count
        raise first

    def refuse(self, producer: tuple | None, error: Exception) -> None:
        """Keep `error` as the answer of the push numbered `producer` (None: not
        numbered), refused wholly or in part, and journal it: a change like any other,
        which reaches the backups before the refusal reaches its caller."""
        if producer is not None:
            self._producers.note(producer, error)
            self._log(records.Refuse(producer, error))

    def _check_limits(self, items: list, copies: int) -> int:
        """Return the bytes of `items`; raise if one is too large or the budget is spent."""
        sizes = item_sizes(items)
        if self.max_item_bytes and (largest := max(sizes, default=0)) > self.max_item_bytes:
            raise ValueError(f"an item of {largest:,} bytes is larger than the shard's "
                             f"max_item_bytes of {self.max_item_bytes:,}")
        nbytes = sum(sizes)
        if self.memory_budget and self._nbytes + nbytes * copies > self.memory_budget:
            raise QueueFullError(
                f"the shard's memory budget is spent: it holds {self._nbytes:,} bytes, this push "
                f"adds {nbytes * copies:,}, the budget is {self.memory_budget:,}")
        return nbytes

    def _queue_for_push(self, name: str, count: int, nbytes: int, priority: Any) -> Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._create(name, self.queue_defaults)
        if priority is not None and queue.kind != "priority":
            raise ValueError(f"priority applies to priority queues; {name!r} is a {queue.kind} queue")
        try:
            queue.check_fits(count, nbytes)
        except ValueError as error:
            raise ValueError(f"queue {name!r}: {error}") from None
        return queue

    def _delay(self, names, queues, items, priority, nbytes, producer, delay, expires) -> int:
        due = self.wall_clock() + delay
        for name, queue, expiry in zip(names, queues, expires or [None] * len(names), strict=True):
            queue.delay(items, priority, nbytes, due, expiry)
            self._nbytes += nbytes
            self._await_due(name, queue)
        self._producers.note(producer, APPLIED)
        self._log(records.Delay(names, items, priority, nbytes, producer, due, expires))
        return len(items) * len(names)

    def _await_due(self, name: str, queue: Queue) -> None:
        due = queue.next_due()
        if due is not None:
            heapq.heappush(self._dues, (due, name))

    def next_due(self) -> float | None:
        """When the first delayed push of any queue falls due (wall_clock()), or None."""
        dues = self._dues
        while dues:
            due, name = dues[0]
            queue = self._queues.get(name)
            if queue is not None and queue.next_due() == due:
                return due
            heapq.heappop(dues)  # fallen due, or its queue went (the later ones have entries)
        return None

    def fall_due(self, now: float | None = None, index: int | None = None) -> list[str]:
        """Let in every delayed push due at `now` (wall_clock()); name their queues. The
        queues a resize gave away are left to their new shard (index: this shard's)."""
        now = self.wall_clock() if now is None else now
        changed = []
        while (due := self.next_due()) is not None and due <= now:
            name = heapq.heappop(self._dues)[1]
            if not self._serves(name, index):
                continue
            queue = self._queues[name]
            before = queue.nbytes
            entered = queue.fall_due(now)
            self._nbytes += queue.nbytes - before  # those that wait in line are not counted
            self._log(records.Due(name, now, entered))
            self._await_due(name, queue)
            changed.append(name)
        return changed

    def _expiry(self, queues: list[Queue], ttl: float | None) -> list[float | None] | None:
        """When a push's items expire in each of `queues` (time.time()): `ttl` seconds
        from now, or the queue's ttl if shorter; None if they never do in any."""
        if ttl is None:
            for queue in queues:
                if queue.options.ttl is not None:
                    break
            else:
                return None  # the common case: no clock read
        now = self.wall_clock()
        lives = [[life for life in (ttl, queue.options.ttl) if life is not None] for queue in queues]
        return [now + min(life) if life else None for life in lives]

    def _offer(self, names, queues, items, priority, nbytes, timeout,
               expires) -> int | PendingPush:
        deadline = None if timeout is None else self.clock() + timeout
        pending = PendingPush(accepted=0, deadline=deadline)
        for name, queue, expiry in zip(names, queues, expires or [None] * len(names), strict=True):
            before = queue.nbytes
            ticket = queue.offer(items, priority, deadline, nbytes, expiry)
            if ticket.state == "admitted":
                self._nbytes += queue.nbytes - before
                self._log(records.Insert(name, items, priority, nbytes, expiry))
                pending.accepted += len(items)
            else:
                ticket_id = next(self._ticket_ids)
                self._tickets[ticket_id] = ticket
                pending.tickets[name] = ticket_id
        return pending if pending.tickets else pending.accepted

    def push_outcome(self, pending: int | PendingPush, now: float) -> int | None:
        """The number of items a blocking push got accepted, or None while parts still wait.

        At the deadline (`now`, the store's clock()) the parts still waiting are
        withdrawn. Raises QueueTimeoutError if a part found no room before its
        deadline (that part was not accepted), QueueNotFoundError if its queue was
        removed meanwhile, or ShardLostError if the shard restarted since the push
        (its waiting parts were not accepted).
        """
        if not isinstance(pending, PendingPush):
            return pending
        tickets = {name: self._tickets.get(ticket_id) for name, ticket_id in pending.tickets.items()}
        if None in tickets.values():
            raise ShardLostError(
                f"the shard restarted while this push waited for room in queue "
                f"{', '.join(map(repr, pending.tickets))}; those parts were not accepted "
                f"({pending.accepted} items were); push them again")
        late = pending.deadline is not None and now >= pending.deadline
        if not late and any(ticket.state == "waiting" for ticket in tickets.values()):
            return None
        accepted, failures = pending.accepted, []
        for name, ticket in tickets.items():
            del self._tickets[pending.tickets[name]]
            if ticket.state == "waiting":
                self._queues[name].withdraw(ticket)
            if ticket.state == "admitted":
                accepted += len(ticket.items)
            else:
                failures.append((name, ticket.state))
        if not failures:
            return accepted
        names = ", ".join(repr(name) for name, _ in failures)
        summary = f"{accepted} items were accepted by the other queues of this push"
        moved = tuple(name for name, state in failures if state == "moved")
        if moved and len(moved) == len(failures):  # the rest goes to the queues' new shard
            raise Moved(moved[0], self.owner[2], moved, accepted)
        if any(state == "removed" for _, state in failures):
            raise QueueNotFoundError(f"queue {names} was removed while the push waited; {summary}")
        raise QueueTimeoutError(f"no room in queue {names} before the timeout; {summary}")

    # -- pull ---------------------------------------------------------------------

    def pull(self, name: str, size: int, remove: bool = True, ack: bool = False) -> list:
        """Take (remove=False: peek at) up to `size` items (-1: all) of queue `name`, now.

        With ack=True the items are leased, not removed, and returned as
        (lease_id, item, redelivered) triples; see settle(). A queue that does
        not exist has no items.
        """
        queue = self._queues.get(name)
        if queue is None:
            return []
        self._expire(name, queue)  # an expired item is never delivered
        if not remove:
            return queue.peek(size)
        if ack:
            first_id = self._next_lease_id
            deadline = self.wall_clock() + queue.options.visibility_timeout
            items = queue.lease(size, first_id, deadline)
            self._next_lease_id += len(items)
            if items:
                self._log(records.Lease(name, len(items), first_id, deadline))
        else:
            before = queue.nbytes
            items = queue.take(size)
            self._nbytes += queue.nbytes - before
            if items:
                self._log(records.Take(name, len(items)))
        if items:
            self._admit_parked(name, queue)
        return items

    def _admit_parked(self, name: str, queue: Queue) -> None:
        """Let parked pushes in now that a pull made room."""
        if not queue.parked:
            return
        before = queue.nbytes
        for ticket in queue.admit_parked(self.clock()):
            if ticket.state != "admitted":
                continue
            if ticket.acknowledged:
                self._log(records.Admit(name))
            else:
                self._log(records.Insert(name, ticket.items, ticket.priority, ticket.nbytes,
                                         ticket.expires))
        self._nbytes += queue.nbytes - before

    # -- leases -----------------------------------------------------------------------

    def settle(self, name: str, lease_ids: list[int], outcome: str,
               delay: float | None = None) -> int:
        """End leases of queue `name`: ACK, NACK or REJECT, or EXTEND them
        (pype.shards.queues).

        Acked items are gone for good; nacked ones go back to the head of the queue
        in their original order, unless the queue's max_deliveries is spent; those and
        rejected ones are given up (_send_on). A nack with a `delay` (seconds) hands
        the items back now, and they come back when it ends, as if their lease
        expired then; EXTEND keeps them leased `delay` seconds from now. Returns the
        number settled now: acking an id acked before is no error and counts 0 (a
        resent ack is harmless). Raises LeaseNotHeldError naming the ids that are not
        held (expired and returned, nacked or rejected before, or never issued) after
        settling the others.
        """
        queue = self._queues.get(name)
        if queue is None:
            if lease_ids:
                raise LeaseNotHeldError.of(name, list(lease_ids), len(lease_ids), outcome != ACK)
            return 0
        handed_back = [i for i in lease_ids if i in queue.leases and queue.leases[i].handed_back]
        if handed_back:  # nobody holds them now: they come back at their deadline
            lease_ids = [i for i in lease_ids if i not in set(handed_back)]
        held = len(set(lease_ids) & queue.leases.keys())
        if outcome == EXTEND or (outcome == NACK and delay):
            missing = self._extend(name, queue, lease_ids, self.wall_clock() + delay,
                                   hand_back=outcome == NACK)
        else:
            missing = self._end_leases(name, queue, lease_ids, outcome)
        missing += handed_back
        if missing:
            raise LeaseNotHeldError.of(name, missing, len(lease_ids) + len(handed_back),
                                       outcome != ACK)
        return held

    def _extend(self, name: str, queue: Queue, lease_ids: list[int], deadline: float,
                hand_back: bool) -> list[int]:
        missing = queue.extend(lease_ids, deadline, hand_back)
        if len(missing) < len(lease_ids):
            self._log(records.Extend(name, [i for i in lease_ids if i not in set(missing)],
                                     deadline, hand_back))
        return missing

    def _end_leases(self, name: str, queue: Queue, lease_ids: list[int], outcome: str) -> list[int]:
        """Settle the leases of `queue` and log it if it held any; the ids it does not
        hold (see Queue.settle)."""
        if queue.leases.keys().isdisjoint(lease_ids):  # an ack sent again changes nothing
            return queue.settle(lease_ids, outcome)[0]
        before = queue.nbytes
        missing, given_up = queue.settle(lease_ids, outcome)
        self._nbytes += queue.nbytes - before
        self._name_the_outbox(queue, given_up)
        if outcome == REJECT:
            self._log(records.Reject(name, lease_ids))
        else:
            self._log(records.Settle(name, lease_ids, outcome == NACK))
        self._send_on(name, queue, given_up)
        self._admit_parked(name, queue)  # acked and given-up items made room
        return missing

    def _name_the_outbox(self, queue: Queue, given_up: list[GivenUp]) -> None:
        """Before the first dead letters of the store's life are logged: see _open_outbox."""
        if given_up and queue.options.dead_letter is not None:
            self._open_outbox()

    def _open_outbox(self) -> None:
        """Before the record that first fills the outbox in the store's life is logged: draw
        the outbox's producer id and log it, so that a replay or a backup sends under it."""
        if self.outbox_producer is None:
            self.outbox_producer = int.from_bytes(os.urandom(8), "little") >> 1
            self._log(records.Outbox(self.outbox_producer))

    def _send_on(self, name: str, queue: Queue, given_up: list[GivenUp]) -> None:
        """Put the items that queue `name` gave up in the outbox for its dead-letter
        queue, or count them dropped if it has none. The record that gave them up is
        the last one logged (or the one replayed)."""
        if not given_up:
            return
        target = queue.options.dead_letter
        if target is None:
            queue.dead_dropped += len(given_up)
            logger.warning("pype: queue %r gave up on %d items and has no dead-letter queue: "
                           "they are dropped", name, len(given_up))
            return
        queue.dead_lettered += len(given_up)
        source = split_name(name)[0]  # a partition's letters name its partitioned queue
        self._to_outbox(target, [DeadLetter(item, source, reason, deliveries)
                                 for item, reason, deliveries in given_up])

    def _to_outbox(self, target: str, items: list) -> None:
        """Put `items` in the outbox for queue `target`; the record that took them is the
        last one logged (or the one replayed)."""
        self._outbox_numbers += 1
        number = self._outbox_numbers
        self.outbox[number] = Outgoing(number, target, items, number, self.position)

    # -- moving items between queues (redrive) --------------------------------------------

    def move(self, name: str, destination: str, count: int, here: bool) -> int:
        """Move up to `count` items (-1: all) of queue `name` to queue `destination`, in
        pull order, as one record; return how many. here=True: the destination is this
        shard's: they move at once, atomically, by its overflow policy (a full "reject"
        queue raises QueueFullError and nothing moves). Otherwise they go through the
        outbox, which pushes them there once (see the module docstring). A moved item
        leaves its delivery count, time to live and priority behind: it is pushed anew.
        """
        queue = self._queues.get(name)
        if queue is None:
            raise QueueNotFoundError(f"queue {name!r} does not exist")
        if destination == name:
            raise ValueError(f"queue {name!r}: a move needs another queue to move to")
        self._expire(name, queue)
        count = len(queue) if count == -1 else min(count, len(queue))
        if not count:
            return 0
        if here:
            target = self._queues.get(destination)
            if target is None:
                target = self._create(destination, self.queue_defaults)
            nbytes = sum(item_sizes(queue.peek(count)))
            try:
                target.check_fits(count, nbytes)
            except ValueError as error:
                raise ValueError(f"queue {destination!r}: {error}") from None
            if target.options.overflow == "reject" and (target.parked or not target.fits(count, nbytes)):
                raise QueueFullError(f"queue {destination!r} has no room for {count} items; "
                                     f"none moved")
            expires = (self._expiry([target], None) or [None])[0]  # pushed anew: its ttl
            entered = target.options.overflow == "drop_oldest" or (
                not target.parked and target.fits(count, nbytes))
        else:
            self._open_outbox()
            expires = entered = None
        self._log(records.Move(name, destination, count, here, entered, expires))
        self._apply_move(name, queue, destination, count, here, entered, expires)
        self._admit_parked(name, queue)
        return count

    def _apply_move(self, name: str, queue: Queue, destination: str, count: int, here: bool,
                    entered: bool | None, expires: float | None) -> list:
        before = queue.nbytes
        items = queue.take(count)
        self._nbytes += queue.nbytes - before
        if here:
            target = self._queues[destination]
            before = target.nbytes
            target.enter_or_wait(items, 0 if target.kind == "priority" else None,
                                 total_size(items), expires, entered)
            self._nbytes += target.nbytes - before
        else:
            self._to_outbox(destination, items)
        return items

    # -- the outbox ---------------------------------------------------------------------

    def outgoing(self) -> tuple[Outgoing, tuple[int, int, int]] | None:
        """The outbox's first entry and the producer numbers of its push (producer id,
        sequence, floor: its own, the lowest of the entries, which are numbered in
        order), or None if the outbox is empty."""
        if not self.outbox:
            return None
        entry = next(iter(self.outbox.values()))
        return entry, (self.outbox_producer, entry.sequence, entry.sequence)

    def delivered(self, number: int) -> None:
        """Outbox entry `number` reached its queue: forget it."""
        if self.outbox.pop(number, None) is not None:
            self._log(records.Delivered(number))

    def renumber(self, number: int) -> None:
        """Outbox entry `number`, the first, was refused (its queue moved or was full):
        it and every entry after it (none was sent yet) take new numbers, in order, above
        every number the target answered, so that however often it is refused, the
        target never takes a waiting entry's number for one it answered before. The
        entries go again once this change is committed (outgoing())."""
        if number in self.outbox:
            self._log(records.Resend(number, self._outbox_numbers + 1))
            self._renumber_all(self._outbox_numbers + 1)

    def never_fits(self, number: int, reason: str) -> None:
        """Outbox entry `number` was refused as one that can never fit its queue (`reason`,
        a ValueError: the queue's maxsize or max_bytes is smaller): split it into entries
        of one item each; an entry of one item is dropped, counted and logged."""
        entry = self.outbox.get(number)
        if entry is None:
            return
        if len(entry.items) > 1:
            self._log(records.Split(number, self._outbox_numbers + 1))
            self._split(number, self._outbox_numbers + 1)
        else:
            self._log(records.Undeliverable(number, reason))
            self._drop_undeliverable(number, reason)

    def _split(self, number: int, sequence: int) -> None:
        entries = []
        for key, entry in self.outbox.items():
            if key != number:
                entries.append((key, entry))
                continue
            for item in entry.items:  # keyed above every number: never one issued before
                key = sequence + len(self.outbox) + len(entries)
                entries.append((key, entry._replace(number=key, items=[item])))
        self.outbox = dict(entries)
        self._renumber_all(sequence)
        self._outbox_numbers = max(self._outbox_numbers, max(self.outbox))

    def _drop_undeliverable(self, number: int, reason: str) -> None:
        entry = self.outbox.pop(number)
        self._undeliverable += 1
        logger.error("pype: an item for queue %r can never fit it and is dropped: %s",
                     entry.queue, reason)

    def _renumber_all(self, first: int) -> None:
        for sequence, (key, entry) in enumerate(list(self.outbox.items()), first):
            self.outbox[key] = entry._replace(sequence=sequence, position=self.position)
        self._outbox_numbers = first + len(self.outbox) - 1

    def _expire(self, name: str, queue: Queue, now: float | None = None) -> bool:
        """Give up the items of `queue` whose time to live ended (and log it); True if
        there were any."""
        if not queue.may_expire:
            return False
        now = self.wall_clock() if now is None else now
        expiry = queue.next_expiry()
        if expiry is None or expiry > now:
            return False
        before = queue.nbytes
        given_up = queue.expire(now)
        self._nbytes += queue.nbytes - before
        self._name_the_outbox(queue, given_up)
        self._log(records.Expire(name, now))
        self._send_on(name, queue, given_up)
        self._admit_parked(name, queue)
        return True

    def expire_items(self, now: float | None = None, index: int | None = None) -> list[str]:
        """Give up the items of every queue whose time to live ended; name those queues
        (the queues a resize gave away are left to their new shard, as in fall_due)."""
        now = self.wall_clock() if now is None else now
        return [name for name, queue in list(self._queues.items())
                if queue.may_expire and self._serves(name, index) and self._expire(name, queue, now)]

    def expire_leases(self, now: float | None = None, index: int | None = None) -> list[str]:
        """Return the items of every lease past its deadline to its queue (or give them up:
        max_deliveries); name those queues (as in fall_due, not those given away)."""
        now = self.wall_clock() if now is None else now
        changed, expired = [], 0
        for name, queue in self._queues.items():
            lease_ids = queue.expired_leases(now) if queue.leases else ()
            if lease_ids and self._serves(name, index):
                self._end_leases(name, queue, lease_ids, NACK)
                changed.append(name)
                expired += len(lease_ids)
        if expired:
            logger.info("pype: %d leased items were not acked in time and went back to their queues",
                        expired)
        return changed

    def _serves(self, name: str, index: int | None) -> bool:
        """Is queue `name` this shard's (shard `index`; None: no resize to mind)? A queue
        that a resize gave away waits here, unserved, until release(): its clock-driven
        changes are its new shard's to make, or an item would be given up twice."""
        return index is None or self.belongs_elsewhere(name, index) is None

    def next_lease_deadline(self) -> float | None:
        """The earliest deadline (wall_clock()) of any lease, or None."""
        deadlines = [lease.deadline for queue in self._queues.values() for lease in queue.leases.values()]
        return min(deadlines, default=None)

    # -- conditions -------------------------------------------------------------------

    def pull_ready(self, name: str, size: int) -> bool:
        """True if a blocking pull of `size` items may return: they are there (one for
        -1), or the queue is full, so that no more can come before a pull."""
        queue = self._queues.get(name)
        if queue is not None:
            self._expire(name, queue)
        return queue is not None and (queue.can_pull(size) or queue.is_full())

    def can_pull(self, name: str, batch_size: int | None) -> bool:
        """True if queue `name` holds a full pull of batch_size items."""
        queue = self._queues.get(name)
        if queue is not None:
            self._expire(name, queue)
        return queue is not None and queue.can_pull(batch_size)

    def can_push(self, name: str) -> bool:
        """True if a push of one item to `name` would be accepted without waiting."""
        queue = self._queues.get(name)
        return queue is None or queue.can_push()
