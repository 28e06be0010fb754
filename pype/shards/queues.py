"""Queue kinds and flow control: plain Python, no Ray, no threads.

A queue holds items in the order pulls take them. Every kind shares the same
flow control: optional bounds (maxsize items, max_bytes bytes), an overflow policy
for pushes that do not fit, and a line of parked pushes (items waiting for room), admitted strictly
in the order they parked. Overflow policies:

- reject: a push that does not fit raises QueueFullError and changes nothing.
- block: it waits in line and enters as room appears; nothing is refused or lost.
- drop_oldest: it enters at once; the items that waited longest are evicted and
  counted in `dropped`: a FIFO's head, a stack's bottom (the item it would pull last).

Independently of the policy, a producer may push with a deadline (block=True on
the API): its push waits in line and is withdrawn, unaccepted, at the deadline.

A pull may lease items instead of removing them (at-least-once delivery): a
leased item leaves the queue but is kept until it is acked (forgotten) or
returned (nack, or its lease expired), when it is pulled again before the items
it was first pulled before. Each lease counts as a delivery of its item; a queue
with max_deliveries gives up on an item returned that many times, and a reject
(nack with requeue=False) gives up on it at once: settle() hands such items back
to the caller (the store), which sends them to the dead-letter queue
(pype.dead_letters). An item may have a time to live: it is stored with the time
it expires, and expire(now) gives up the items held whose time passed (a leased
item is not taken back; it expires once it comes back). A delayed push waits
beside the queue (`delayed`) until fall_due(now), when it enters as an
acknowledged push would: at once if it fits, else in the line of parked pushes
(drop_oldest evicts). A lease may be extended, or handed back with a delay (a
retry with back-off): it comes back when that delay ends, as if its lease expired.
Time is passed in by the caller, so everything here is deterministic and can be
tested against a model.
"""

from __future__ import annotations

import heapq
import itertools
import pickle
import sys
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Any, NamedTuple

from pype.dead_letters import DELIVERIES, EXPIRED, REJECTED, DeadLetter, unwrap
from pype.errors import QueueFullError
from pype.options import QueueOptions

# -- sizes ------------------------------------------------------------------------

_FLAT = frozenset((int, float, bool, complex, str, bytes, bytearray, type(None)))
_MAX_DEPTH = 8
ACKED_REMEMBERED = 100_000  # lease ids of a queue whose ack may be sent again harmlessly


def item_size(item: Any, depth: int = 0) -> int:
    """The bytes an item counts for against max_bytes and the shard's memory budget.

    Flat values count their in-memory size, arrays (and items kept by reference,
    see pype.payloads) their data bytes, lists, tuples and dicts their own size plus
    their elements', anything else its pickled length.
    """
    kind = type(item)
    if kind in _FLAT:
        return sys.getsizeof(item)
    if kind is DeadLetter or kind is Expiring:  # the item's bytes, in its queue and out of it
        return item_size(item.item, depth)
    nbytes = getattr(item, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if depth < _MAX_DEPTH:
        if kind is list or kind is tuple:
            return sys.getsizeof(item) + sum(item_size(element, depth + 1) for element in item)
        if kind is dict:
            return sys.getsizeof(item) + sum(item_size(key, depth + 1) + item_size(value, depth + 1)
                                             for key, value in item.items())
    return len(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))


def item_sizes(items: list) -> list[int]:
    """[item_size(item) for item in items], at C speed when every item is a flat value."""
    if len(items) == 1:  # the common one-item push, kept short
        return [item_size(items[0])]
    kinds = set(map(type, items))
    if len(kinds) == 1 and (kind := next(iter(kinds))) in _FLAT:
        # Flat values are not tracked by the garbage collector: __sizeof__ is getsizeof.
        return list(map(kind.__sizeof__, items))
    if kinds <= _FLAT:
        return list(map(sys.getsizeof, items))
    return list(map(item_size, items))


def total_size(items: list) -> int:
    return sum(item_sizes(items))


# -- items with a time to live ------------------------------------------------------

class Expiring:
    """An item stored with the time (the caller's clock) after which it is never
    delivered. held: it is in its queue (not taken, leased, evicted or expired).
    arrival: its place among the queue's expiring items, which orders those of the
    same time."""

    __slots__ = ("arrival", "expires", "held", "item")

    def __init__(self, item: Any, expires: float, arrival: int):
        self.item, self.expires, self.held, self.arrival = item, expires, True, arrival

    def __eq__(self, other: object) -> bool:  # a restored queue equals the one that wrote it
        return type(other) is Expiring and (self.item, self.expires, self.held) == (
            other.item, other.expires, other.held)

    __hash__ = None  # mutable (held)

    def __repr__(self) -> str:
        return f"Expiring({self.item!r}, expires={self.expires}, held={self.held})"


def item_of(stored: Any) -> Any:
    """The item a queue hands out for what it stores (see Queue)."""
    if type(stored) is Expiring:
        stored = stored.item
    return unwrap(stored)


# -- parked pushes ----------------------------------------------------------------

class ParkedPush:
    """Items of a push that did not fit yet and wait in line for room.

    Either the producer waits for them (a push with block=True), or, in a queue with
    overflow="block", it was told they are accepted (acknowledged) and goes on.

    state is 'waiting' until the queue admits the items ('admitted') or the
    deadline passes first ('expired'; nothing of it was accepted). A queue that is
    removed meanwhile leaves it 'removed'.
    """

    __slots__ = ("acknowledged", "deadline", "expires", "items", "nbytes", "priority", "state")

    def __init__(self, items: list, priority: Any, deadline: float | None, nbytes: int,
                 acknowledged: bool = False, expires: float | None = None):
        self.items = items
        self.priority = priority
        self.deadline = deadline
        self.nbytes = nbytes
        self.acknowledged = acknowledged  # the producer was told it is accepted (overflow=block)
        self.expires = expires  # when its items expire (counted from the push), or None
        self.state = "waiting"

    def __setstate__(self, state):
        _, slots = state
        self.expires = None  # a snapshot of before 2026-12-05
        for key, value in slots.items():
            setattr(self, key, value)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


class Lease(NamedTuple):
    """One leased item: where it goes back (key), the item as stored, when the lease
    ends, and its deliveries, this one included."""

    key: Any
    item: Any
    deadline: float
    deliveries: int = 1  # leases of a snapshot of before 2026-12-05 had no count
    handed_back: bool = False  # nacked with a delay: it comes back at the deadline


class DelayedPush(NamedTuple):
    """A delayed push's items, waiting beside their queue until `due`."""

    items: list
    priority: Any
    nbytes: int
    expires: float | None


# How a lease ends (settle's `outcome`), or goes on (EXTEND: Queue.extend).
ACK = "ack"        # done: the item is gone for good
NACK = "nack"      # returned: back to the head of the queue, unless max_deliveries is spent
REJECT = "reject"  # given up: to the dead-letter queue (nack with requeue=False)
EXTEND = "extend"  # still leased, until a later deadline


class GivenUp(NamedTuple):
    """An item that settle() gave up on: the store sends it on as a DeadLetter."""

    item: Any  # as the queue handed it out (a dead letter's own item)
    reason: str
    deliveries: int


# -- queue kinds ------------------------------------------------------------------

class Queue:
    """Base class: storage of one kind plus the shared flow control and leases.

    Subclasses implement the storage primitives _append, _pop_keyed, _pop_oldest,
    _peek, _restore and _stored. Every item taken has a key that orders it against the
    others; a leased item that comes back is restored by its key, so it is pulled
    again before everything it was pulled before, in its original order, and its
    deliveries so far are kept by that key.
    Counters: pushed and pulled count items, dropped counts items evicted by
    overflow='drop_oldest', acked and redelivered count settled leases; the store
    counts the items settle() gave up on (GivenUp) in dead_lettered (sent to the
    dead-letter queue) or dead_dropped (the queue has none).

    Items with a time to live: each gets an arrival number among them, and expire()
    gives them up in the order of (time, arrival). A FIFO, stack or batch queue keeps
    its items as pushed and their times per push, in spans (see FifoQueue); a
    priority queue stores each as an Expiring, and so does every kind for an item
    that comes back from a lease. Once a queue holds an Expiring or a DeadLetter (a
    push whose first item is one: `wrapped`), it hands out the items inside them
    (item_of). `_expiries` is a heap of the Expiring items by (time, arrival): an item
    that comes back from a lease goes in again (its old entry may still be there: the
    first one that comes up gives it up), and entries of items no longer held are
    dropped as they come up, so the order in which items expire does not depend on
    when that happens.
    """

    kind = ""

    def __init__(self, options: QueueOptions):
        self.options = options
        self.parked: deque[ParkedPush] = deque()
        self.leases: dict[int, Lease] = {}
        self.nbytes = 0  # of the items held, leased ones included
        self.pushed = self.pulled = self.dropped = self.acked = self.redelivered = 0
        self.dead_lettered = self.dead_dropped = self.expired = 0
        self.wrapped = False  # does it store DeadLetters or Expiring items (class docstring)
        self._expiries: list = []  # heap of (expires, arrival, entry number, Expiring)
        self._expiry_arrivals = 0
        self._expiry_entries = 0
        self._spans: deque = deque()  # FifoQueue's spans of items, by push
        self._span_expiries: list = []  # heap of (expires, first arrival, entry number, span)
        self.delayed: list = []  # heap of (due, number, DelayedPush)
        self.delayed_items = self._delays = 0
        self._returned: list = []  # heap of (key, item) come back from leases
        self._deliveries: dict = {}  # key of an item that came back -> its deliveries so far
        self._acked_ids: OrderedDict[int, None] = OrderedDict()  # the last ACKED_REMEMBERED

    def __getstate__(self) -> dict:
        """A snapshot keeps the parked pushes the producer was told are accepted, no others."""
        state = dict(self.__dict__)
        state["parked"] = deque(ticket for ticket in self.parked if ticket.acknowledged)
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("_acked_ids", OrderedDict())  # a snapshot of before 2026-12-03
        # A snapshot of before 2026-12-05 kept the keys of items that came back, uncounted.
        state.setdefault("_deliveries", dict.fromkeys(state.pop("_returned_keys", ()), 1))
        state.setdefault("dead_lettered", 0)
        state.setdefault("dead_dropped", 0)
        state.setdefault("expired", 0)
        state.setdefault("wrapped", False)
        state.setdefault("_expiries", [])
        state.setdefault("_expiry_arrivals", 0)
        state.setdefault("_expiry_entries", 0)
        state.setdefault("_spans", deque())
        state.setdefault("_span_expiries", [])
        state.setdefault("delayed", [])
        state.setdefault("delayed_items", 0)
        state.setdefault("_delays", 0)
        self.__dict__.update(state)

    def __len__(self) -> int:
        """Items ready to pull (leased items are not counted)."""
        return self._stored() + len(self._returned)

    # flow control

    @property
    def queued_bytes(self) -> int:
        """The bytes of the items in the queue and leased: those max_bytes bounds (nbytes
        also counts delayed pushes, which wait beside the queue)."""
        return self.nbytes - sum(entry[2].nbytes for entry in self.delayed) if self.delayed else self.nbytes

    def fits(self, count: int, nbytes: int) -> bool:
        """True if `count` items of `nbytes` fit now beside what the queue holds."""
        maxsize, max_bytes = self.options.maxsize, self.options.max_bytes
        return ((not maxsize or len(self) + count <= maxsize)
                and (not max_bytes or self.queued_bytes + nbytes <= max_bytes))

    def is_full(self) -> bool:
        """True if a pull can never be followed by more pushes before room is made."""
        return not self.fits(1, 0)

    def can_push(self) -> bool:
        """True if a push of one (small) item would be accepted without dropping anything."""
        return not self.parked and self.fits(1, 0)

    def check_fits(self, count: int, nbytes: int) -> None:
        """Raise ValueError if `count` items of `nbytes` can never fit, even in the empty queue."""
        if self.options.overflow == "drop_oldest":
            return
        maxsize, max_bytes = self.options.maxsize, self.options.max_bytes
        if maxsize and count > maxsize:
            raise ValueError(f"{count} items can never fit in a queue of maxsize {maxsize}")
        if max_bytes and nbytes > max_bytes:
            raise ValueError(f"{nbytes} bytes of items can never fit in a queue of max_bytes {max_bytes}")

    def put(self, items: list, priority: Any = None, nbytes: int | None = None,
            expires: float | None = None) -> bool:
        """Push all of `items` (of `nbytes` in all) or none of them, as the overflow policy says.

        reject: QueueFullError if they do not all fit, or if pushes are parked
        (nobody jumps their line). block: park them, without deadline, if they do
        not fit. drop_oldest: evict the items that have waited longest. `nbytes`
        is total_size(items), computed here if not given; `expires`: when the items
        expire (None: never). Returns True if the items entered now, False if they
        were parked.
        """
        nbytes = total_size(items) if nbytes is None else nbytes
        if self.options.overflow == "block":
            ticket = self.offer(items, priority, None, nbytes, expires)
            ticket.acknowledged = True
            return ticket.state == "admitted"
        if self.options.overflow == "reject":
            self.check_fits(len(items), nbytes)
            if self.parked or not self.fits(len(items), nbytes):
                waiting = ", pushes waiting" if self.parked else ""
                raise QueueFullError(f"is full ({self._fullness()}{waiting})")
        self.insert(items, priority, nbytes, expires)
        return True

    def _fullness(self) -> str:
        parts = []
        if self.options.maxsize:
            parts.append(f"{len(self)} of {self.options.maxsize} items")
        if self.options.max_bytes:
            parts.append(f"{self.queued_bytes} of {self.options.max_bytes} bytes")
        return ", ".join(parts)

    def offer(self, items: list, priority: Any, deadline: float | None,
              nbytes: int | None = None, expires: float | None = None) -> ParkedPush:
        """Push now if the items fit, else park them in line; return the push's ticket."""
        nbytes = total_size(items) if nbytes is None else nbytes
        self.check_fits(len(items), nbytes)
        ticket = ParkedPush(items, priority, deadline, nbytes, expires=expires)
        if self.options.overflow == "drop_oldest" or (
                not self.parked and self.fits(len(items), nbytes)):
            self.insert(items, priority, nbytes, expires)
            ticket.state = "admitted"
        else:
            self.parked.append(ticket)
        return ticket

    def admit_parked(self, now: float) -> list[ParkedPush]:
        """Admit parked pushes, oldest first, while they fit; expire late ones.

        Returns the pushes that changed state.
        """
        changed = []
        while self.parked:
            head = self.parked[0]
            late = head.expired(now)
            if not late and not self.fits(len(head.items), head.nbytes):
                break
            self.parked.popleft()
            if late:
                head.state = "expired"
            else:
                self.insert(head.items, head.priority, head.nbytes, head.expires)
                head.state = "admitted"
            changed.append(head)
        return changed

    def delay(self, items: list, priority: Any, nbytes: int, due: float,
              expires: float | None = None) -> None:
        """Keep `items` (of `nbytes`) beside the queue until `due` (see fall_due)."""
        self._delays += 1
        heapq.heappush(self.delayed, (due, self._delays, DelayedPush(items, priority, nbytes, expires)))
        self.delayed_items += len(items)
        self.nbytes += nbytes

    def next_due(self) -> float | None:
        """When the first delayed push falls due, or None."""
        return self.delayed[0][0] if self.delayed else None

    def fall_due(self, now: float, entered: list[bool] | None = None) -> list[bool]:
        """Let in the delayed pushes due at `now` or before, in the order of their times
        (then of their pushes), each as an acknowledged push (enter_or_wait); return
        whether each entered at once. `entered`: those answers, as a journal recorded
        them (the line may hold blocking pushes that no journal has)."""
        answers = []
        while self.delayed and self.delayed[0][0] <= now:
            push = heapq.heappop(self.delayed)[2]
            self.delayed_items -= len(push.items)
            self.nbytes -= push.nbytes  # they enter, or wait in line uncounted, as pushes do
            now_in = None if entered is None else entered[len(answers)]
            answers.append(self.enter_or_wait(push.items, push.priority, push.nbytes,
                                              push.expires, now_in))
        return answers

    def enter_or_wait(self, items: list, priority: Any, nbytes: int, expires: float | None,
                      entered: bool | None = None) -> bool:
        """Items accepted before (a delayed push, a move): in at once if they fit and no
        push waits in line (drop_oldest: always), else in line, acknowledged. Returns
        True if they entered. `entered`: the answer, as a journal recorded it."""
        if entered is None:
            entered = self.options.overflow == "drop_oldest" or (
                not self.parked and self.fits(len(items), nbytes))
        if entered:
            self.insert(items, priority, nbytes, expires)
        else:
            self.parked.append(ParkedPush(items, priority, None, nbytes, acknowledged=True,
                                          expires=expires))
        return entered

    def withdraw(self, ticket: ParkedPush) -> None:
        """Take a parked push out of the line (its deadline passed)."""
        if ticket.state == "waiting":
            self.parked.remove(ticket)
            ticket.state = "expired"

    def insert(self, items: list, priority: Any, nbytes: int | None = None,
               expires: float | None = None) -> None:
        """Add `items` (of `nbytes` in all) past flow control, evicting the oldest if full;
        they expire at `expires` (None: never)."""
        nbytes = total_size(items) if nbytes is None else nbytes
        maxsize, max_bytes = self.options.maxsize, self.options.max_bytes
        self.nbytes += nbytes
        self.pushed += len(items)
        if items and type(items[0]) is DeadLetter:
            self.wrapped = True
        if expires is not None or self._spans:
            items = self._timed(items, expires)
        if self.options.overflow != "drop_oldest":
            self._extend(items, priority)
            return
        for item in items:
            while len(self) and ((maxsize and len(self) >= maxsize)
                                 or (max_bytes and self.queued_bytes > max_bytes)):
                evicted = self._pop_oldest()
                if type(evicted) is Expiring:
                    evicted.held = False
                self.nbytes -= item_size(evicted)
                self.dropped += 1
            self._append(item, priority)

    # pulls

    def can_pull(self, batch_size: int | None = None) -> bool:
        """True if a pull of `batch_size` items (-1: at least one) would be full."""
        wanted = self.options.pull_size if batch_size is None else batch_size
        return len(self) >= max(1, wanted)

    def take(self, batch_size: int) -> list:
        """Remove and return up to `batch_size` items (-1: all), in pull order."""
        if self._returned or self._deliveries:
            taken = self._take_keyed(batch_size)
            for key, _ in taken:
                self._deliveries.pop(key, None)
            items = [item for _, item in taken]
        else:  # the common case, without keys
            count = len(self) if batch_size == -1 else min(batch_size, len(self))
            items = self._pop_items(count)
            self.pulled += count
        if self.wrapped:
            items = self._hand_out(items)  # sized as their items: flat ones at C speed
        self.nbytes -= total_size(items)
        return items

    def _hand_out(self, stored: list) -> list:
        """The items of what `stored` holds, which leave the queue (taken or leased)."""
        items, left = [], 0
        for item in stored:
            if type(item) is Expiring:
                item.held = False
                left += 1
                item = item.item
            items.append(unwrap(item))
        if left and len(self._expiries) > 64 and len(self._expiries) > 2 * self._held_expiring():
            # Most entries are of items gone: keep the heap the size of what it holds.
            self._expiries = [entry for entry in self._expiries if entry[3].held]
            heapq.heapify(self._expiries)
        return items

    def _held_expiring(self) -> int:
        return sum(1 for entry in self._expiries if entry[3].held)

    def lease(self, batch_size: int, first_id: int,
              deadline: float) -> list[tuple[int, Any, int]]:
        """Lease up to `batch_size` items (-1: all) until `deadline`, with ids from first_id.

        Returns (lease_id, item, deliveries) triples; deliveries counts the earlier
        deliveries of the item (leases that ended without an ack): 0, a false value,
        for an item delivered for the first time. The items leave the queue but stay
        held (and counted in nbytes) until settled.
        """
        taken = self._take_keyed(batch_size)
        items = self._hand_out([item for _, item in taken]) if self.wrapped else None
        leased = []
        for index, (key, stored) in enumerate(taken):
            earlier = self._deliveries.pop(key, 0)
            self.leases[first_id + index] = Lease(key, stored, deadline, earlier + 1)
            leased.append((first_id + index, stored if items is None else items[index], earlier))
        return leased

    def settle(self, lease_ids: Iterable[int], outcome: str) -> tuple[list[int], list[GivenUp]]:
        """End leases: ACK (forget their items), NACK (return them) or REJECT (give them up).

        A returned item goes back by its key, unless the queue's max_deliveries is
        spent: then it is given up. Returns the ids that are not held (never issued,
        returned, or expired) and the items given up, in the order of `lease_ids`.
        Acking an id acked before (one of the last ACKED_REMEMBERED) is no error and
        changes nothing, as SQS's DeleteMessage: a client that sends an ack again
        (after a failover) cannot tell whether the first one arrived.
        """
        missing, given_up = [], []
        limit = self.options.max_deliveries
        for lease_id in lease_ids:
            lease = self.leases.pop(lease_id, None)
            if lease is not None and lease.handed_back and outcome != NACK:
                self.leases[lease_id] = lease  # only its deadline ends it (extend)
                lease = None
            if lease is None:
                if outcome != ACK or lease_id not in self._acked_ids:
                    missing.append(lease_id)
            elif outcome == ACK:
                self.nbytes -= item_size(lease.item)
                self.acked += 1
                self._acked_ids[lease_id] = None
                if len(self._acked_ids) > ACKED_REMEMBERED:
                    self._acked_ids.popitem(last=False)
            elif outcome == NACK and not (limit and lease.deliveries >= limit):
                self._restore(lease.key, lease.item)
                self._deliveries[lease.key] = lease.deliveries
                self.redelivered += 1
                if type(lease.item) is Expiring:  # held again: it may expire now
                    lease.item.held = True
                    self._await_expiry(lease.item)
            else:
                self.nbytes -= item_size(lease.item)
                reason = REJECTED if outcome == REJECT else DELIVERIES
                given_up.append(GivenUp(item_of(lease.item), reason, lease.deliveries))
        return missing, given_up

    def _timed(self, items: list, expires: float | None) -> list:
        """What to store for `items`, which expire at `expires` (None: never): each as
        an Expiring, on the heap of expiries."""
        if expires is None:
            return items
        self.wrapped = True
        first = self._expiry_arrivals + 1
        self._expiry_arrivals += len(items)
        items = [Expiring(item, expires, arrival) for arrival, item in enumerate(items, first)]
        for envelope in items:
            self._await_expiry(envelope)
        return items

    def _await_expiry(self, envelope: Expiring) -> None:
        self._expiry_entries += 1  # two entries of one item never compare the items
        heapq.heappush(self._expiries, (envelope.expires, envelope.arrival,
                                        self._expiry_entries, envelope))

    @property
    def may_expire(self) -> bool:
        """Does it hold, or did it hold, items with a time to live (see next_expiry)?"""
        return bool(self._expiries or self._span_expiries)

    def next_expiry(self) -> float | None:
        """When the first item held expires, or None."""
        heap = self._expiries
        while heap and not heap[0][3].held:
            heapq.heappop(heap)
        spans = self._span_expiries
        while spans and not spans[0][3][0]:  # a span whose items all left
            heapq.heappop(spans)
        return min((entries[0][0] for entries in (heap, spans) if entries), default=None)

    def expire(self, now: float) -> list[GivenUp]:
        """Give up every item held whose time to live ended at `now` or before, in the
        order of (time, arrival); return them."""
        heap, doomed = self._expiries, []
        while heap and heap[0][0] <= now:
            envelope = heapq.heappop(heap)[3]
            if envelope.held:
                envelope.held = False
                doomed.append(envelope)
        expired = self._expire_spans(now) if self._span_expiries else []
        if doomed:
            ids = {id(envelope) for envelope in doomed}
            deliveries = {}
            if self._returned:  # items back from leases, with their keys and counts
                kept = []
                for key, stored in self._returned:
                    if id(stored) in ids:
                        deliveries[id(stored)] = self._deliveries.pop(key, 0)
                    else:
                        kept.append((key, stored))
                if len(kept) < len(self._returned):
                    heapq.heapify(kept)
                    self._returned = kept
            for envelope_id, key in self._discard(ids, len(ids) - len(deliveries)).items():
                deliveries[envelope_id] = self._deliveries.pop(key, 0)
            expired += [(envelope.expires, envelope.arrival, envelope.item,
                         deliveries.get(id(envelope), 0)) for envelope in doomed]
            expired.sort(key=lambda entry: entry[:2])
        if not expired:
            return []
        self.nbytes -= total_size([item for _, _, item, _ in expired])
        self.expired += len(expired)
        return [GivenUp(unwrap(item), EXPIRED, deliveries) for _, _, item, deliveries in expired]

    def _expire_spans(self, now: float) -> list[tuple]:
        """Remove the stored items whose span expired at `now` or before: (time, arrival,
        item, 0) of each (see FifoQueue)."""
        return []

    def extend(self, lease_ids: Iterable[int], deadline: float, hand_back: bool) -> list[int]:
        """Move the deadline of leases to `deadline`; hand_back=True: the consumer hands
        the items back (a nack with a delay), and they come back at the deadline. Returns
        the ids that are not held (handed back before, expired, settled, never issued)."""
        missing = []
        for lease_id in lease_ids:
            lease = self.leases.get(lease_id)
            if lease is None or lease.handed_back:
                missing.append(lease_id)
            else:
                self.leases[lease_id] = lease._replace(deadline=deadline, handed_back=hand_back)
        return missing

    def expired_leases(self, now: float) -> list[int]:
        """The ids of leases whose deadline has passed."""
        return [lease_id for lease_id, lease in self.leases.items() if lease.deadline <= now]

    def _take_keyed(self, batch_size: int) -> list[tuple[Any, Any]]:
        count = len(self) if batch_size == -1 else min(batch_size, len(self))
        taken = [heapq.heappop(self._returned) for _ in range(min(count, len(self._returned)))]
        taken.extend(self._pop_keyed(count - len(taken)))
        self.pulled += count
        return taken

    def peek(self, batch_size: int) -> list:
        """Return up to `batch_size` items (-1: all) in pull order, leaving them."""
        stored = self._peek_stored(batch_size)
        return list(map(item_of, stored)) if self.wrapped else stored

    def peek_letters(self, batch_size: int) -> list[DeadLetter]:
        """The DeadLetters among the first `batch_size` items (-1: all), in pull order."""
        stored = self._peek_stored(batch_size)
        inside = (item.item if type(item) is Expiring else item for item in stored)
        return [item for item in inside if type(item) is DeadLetter]

    def _peek_stored(self, batch_size: int) -> list:
        count = len(self) if batch_size == -1 else min(batch_size, len(self))
        returned = [item for _, item in sorted(self._returned)[:count]]
        return returned + self._peek(count - len(returned))

    def clear(self) -> int:
        """Remove every item, lease and parked push; return the number of items removed."""
        count = len(self) + len(self.leases) + self.delayed_items
        self._take_keyed(-1)
        self.leases.clear()
        self._expiries.clear()
        self._spans.clear()
        self._span_expiries.clear()
        self.delayed.clear()
        self.delayed_items = 0
        self.nbytes = 0
        for ticket in self.parked:
            ticket.state = "removed"
        self.parked.clear()
        return count

    # storage primitives

    def _stored(self) -> int:
        raise NotImplementedError

    def _append(self, item: Any, priority: Any) -> None:
        raise NotImplementedError

    def _extend(self, items: list, priority: Any) -> None:
        for item in items:
            self._append(item, priority)

    def _pop_keyed(self, count: int) -> list[tuple[Any, Any]]:
        """Remove `count` items in pull order, each with its key."""
        raise NotImplementedError

    def _pop_items(self, count: int) -> list:
        """Remove `count` items in pull order."""
        return [item for _, item in self._pop_keyed(count)]

    def _pop_oldest(self) -> Any:
        raise NotImplementedError

    def _peek(self, count: int) -> list:
        raise NotImplementedError

    def _discard(self, ids: set[int], count: int) -> dict:
        """Remove the `count` stored items whose id() is in `ids`; return {id: key} of
        those whose key may have a delivery count (items back from a lease)."""
        raise NotImplementedError

    def _restore(self, key: Any, item: Any) -> None:
        heapq.heappush(self._returned, (key, item))


class FifoQueue(Queue):
    """First in, first out. An item's key is its place in the order of pulls.

    Items with a time to live are stored as pushed, and the time is kept per push: once
    a queue holds one, `_spans` covers its deque from left to right with spans
    [count, expires or None, arrival of the first], one per push (untimed ones merged),
    and `_span_expiries` is a heap of the timed spans. Pulls take items off the spans'
    counts (a stack at the right end); a queue's own ttl expires whole spans at the
    left end; a push's shorter ttl costs one pass over the deque when it expires. An
    item leased from a timed span becomes an Expiring (it may come back).
    """

    kind = "fifo"

    def __init__(self, options: QueueOptions):
        super().__init__(options)
        self._items: deque = deque()
        self._taken = 0

    def _stored(self) -> int:
        return len(self._items)

    def _append(self, item, priority):
        self._items.append(item)

    def _extend(self, items, priority):
        self._items.extend(items)

    def _pop_keyed(self, count):
        first, pop = self._taken, self._pop_one
        self._taken += count
        taken = [(first + index, pop()) for index in range(count)]
        if self._spans:
            times = self._spend(count, self.kind != "lifo", describe=True)
            for index, (expires, arrival) in enumerate(times):
                if expires is not None:
                    self.wrapped = True
                    key, item = taken[index]
                    taken[index] = (key, Expiring(item, expires, arrival))
        return taken

    def _pop_items(self, count):
        self._taken += count
        if self._spans:
            self._spend(count, self.kind != "lifo")
        if count == len(self._items):
            items = list(self._items) if self.kind != "lifo" else list(reversed(self._items))
            self._items.clear()
            return items
        pop = self._pop_one
        return [pop() for _ in range(count)]

    def _timed(self, items, expires):
        spans, count = self._spans, len(items)
        if not spans and self._items:  # the items from before the first timed push
            spans.append([len(self._items), None, 0])
        if expires is None:
            if spans and spans[-1][1] is None:
                spans[-1][0] += count
            else:
                spans.append([count, None, 0])
            return items
        span = [count, expires, self._expiry_arrivals + 1]
        self._expiry_arrivals += count
        spans.append(span)
        self._expiry_entries += 1
        heapq.heappush(self._span_expiries, (expires, span[2], self._expiry_entries, span))
        return items

    def _spend(self, count: int, left: bool, describe: bool = False) -> list | None:
        """Take `count` items off the spans, at the deque's left end (else its right);
        with describe, the (expires, arrival) of each, in the order taken."""
        spans, described = self._spans, [] if describe else None
        while count and spans:
            span = spans[0] if left else spans[-1]
            taken = min(count, span[0])
            if describe:
                described += [(span[1], span[2] + i) if left else
                              (span[1], span[2] + span[0] - 1 - i) for i in range(taken)]
            span[0] -= taken
            if left:
                span[2] += taken
            count -= taken
            if not span[0]:
                spans.popleft() if left else spans.pop()
        heap = self._span_expiries
        if len(heap) > 64 and len(heap) > 2 * len(spans):  # most entries are of spans gone
            self._span_expiries = [entry for entry in heap if entry[3][0]]
            heapq.heapify(self._span_expiries)
        return described

    def _expire_spans(self, now):
        heap, doomed = self._span_expiries, []
        while heap and heap[0][0] <= now:
            span = heapq.heappop(heap)[3]
            if span[0]:
                doomed.append(span)
        if not doomed:
            return []
        ids = {id(span) for span in doomed}
        spans, items, removed = self._spans, self._items, {}
        while spans and id(spans[0]) in ids:  # the oldest: a queue's own ttl
            span = spans.popleft()
            removed[id(span)] = [items.popleft() for _ in range(span[0])]
        if len(removed) < len(doomed):  # a push's ttl ended before those of earlier pushes
            kept_items, kept_spans, rest = deque(), deque(), iter(items)
            for span in spans:
                chunk = list(itertools.islice(rest, span[0]))
                if id(span) in ids:
                    removed[id(span)] = chunk
                else:
                    kept_items.extend(chunk)
                    kept_spans.append(span)
            self._items, self._spans = kept_items, kept_spans
        expired = []
        for span in doomed:
            expired += [(span[1], span[2] + i, item, 0) for i, item in enumerate(removed[id(span)])]
            span[0] = 0
        return expired

    def _pop_one(self):
        return self._items.popleft()

    def _pop_oldest(self):
        if self._returned:  # they were pulled before everything still stored
            key, item = heapq.heappop(self._returned)
            self._deliveries.pop(key, None)
            return item
        if self._spans:
            self._spend(1, left=True)
        return self._items.popleft()

    def _peek(self, count):
        return list(itertools.islice(self._items, count))

    def _discard(self, ids, count):  # its deque holds no Expiring (see the class docstring)
        return {}


class BatchQueue(FifoQueue):
    """A FIFO whose plain pull waits up to batch_timeout for batch_size items."""

    kind = "batch"


class LifoQueue(FifoQueue):
    """Last in, first out: the seed's stack."""

    kind = "lifo"

    def _pop_one(self):
        return self._items.pop()

    def _pop_oldest(self):
        if self._items:
            if self._spans:
                self._spend(1, left=True)
            return self._items.popleft()
        # Only items back from leases are left: they sit on top in pull order, so the
        # bottom of the stack is the one that would be pulled last.
        bottom = max(self._returned)
        self._returned.remove(bottom)
        heapq.heapify(self._returned)
        self._deliveries.pop(bottom[0], None)
        return bottom[1]

    def _peek(self, count):
        return list(itertools.islice(reversed(self._items), count))


class PriorityQueue(Queue):
    """Lowest priority first; first in, first out among equal priorities.

    A push without priority gets priority 0. An item's key is (priority, arrival).
    """

    kind = "priority"

    def __init__(self, options: QueueOptions):
        super().__init__(options)
        self._heap: list = []
        self._arrivals = 0

    def _stored(self) -> int:
        return len(self._heap)

    def _append(self, item, priority):
        self._arrivals += 1
        heapq.heappush(self._heap, (0 if priority is None else priority, self._arrivals, item))

    def _pop_keyed(self, count):
        popped = [heapq.heappop(self._heap) for _ in range(count)]
        return [((priority, arrival), item) for priority, arrival, item in popped]

    def _restore(self, key, item):
        heapq.heappush(self._heap, (*key, item))

    def _peek(self, count):
        return [entry[2] for entry in heapq.nsmallest(count, self._heap)]

    def _discard(self, ids, count):
        if not count:
            return {}
        keys = {id(entry[2]): entry[:2] for entry in self._heap if id(entry[2]) in ids}
        self._heap = [entry for entry in self._heap if id(entry[2]) not in ids]
        heapq.heapify(self._heap)
        return keys


_CLASSES = {cls.kind: cls for cls in (FifoQueue, LifoQueue, PriorityQueue, BatchQueue)}


def make_queue(options: QueueOptions) -> Queue:
    """Return an empty queue of the kind `options` name."""
    return _CLASSES[options.kind](options)
