"""The queues of one shard, safe to call from many threads: plain Python, no Ray.

The shard actor runs two kinds of calls on different threads: calls that never
wait (push, pull, add, ...) on its single main thread, in the order each caller
sent them, and calls that may wait (blocking pulls, can_pull, the second half of a
blocking push, can_push) on two pools of waiter threads, one for consumers and one
for producers (see pype.shards.shard). One lock guards all state; a waiting
call sleeps on the condition of the queue it waits for and is woken by the push
or pull that may satisfy it.

Read-your-writes across the two kinds: Ray orders one caller's calls only within
a thread pool, so a waiting call could overtake that caller's earlier push. Every
main-thread call therefore carries the caller's (id, sequence number) and
record() notes it; a waiting call carries the sequence number of the caller's
last main-thread call and catch_up() waits until that call has run.

Durability: with a Journal (pype.shards.journal), every change is logged, under
the lock and in the order it happened, before the call that made it returns:
("add", name, options), ("remove", name), ("insert", name, items, priority, nbytes),
("park", ...) and ("admit", name) for acknowledged pushes that wait for room,
("take", name, count), ("lease", name, count, first_id, deadline) and
("settle", name, lease_ids, requeue). restore() replays them onto a snapshot;
replay calls the same Queue methods, which are deterministic.

Limits: a push of an item larger than max_item_bytes is a ValueError; a push that
would take the bytes the shard holds (see item_size) past memory_budget is a
QueueFullError. Neither changes anything.
"""

from __future__ import annotations

import logging
import reprlib
import threading
import time
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from pype.errors import (
    LeaseNotHeldError,
    QueueExistsError,
    QueueFullError,
    QueueNotFoundError,
    QueueTimeoutError,
    ShardLostError,
)
from pype.options import QueueOptions
from pype.shards.journal import Journal
from pype.shards.queues import ParkedPush, Queue, item_sizes, make_queue

Caller = tuple[str, int]  # (caller id, sequence number of one of its calls)

COUNTERS = ("pushed", "pulled", "dropped", "acked", "redelivered")
CATCH_UP_LIMIT = 10.0  # seconds a waiting call waits for the caller's earlier calls

logger = logging.getLogger("pype")


@dataclass
class PendingPush:
    """What a blocking push returns when some of its items had to wait for room.

    Its second half, QueueStore.await_push, waits for the tickets.
    """

    accepted: int
    tickets: dict[str, int] = field(default_factory=dict)  # queue name -> ticket id


class _Waiters(threading.Condition):
    """A condition on the store's lock, with a count of the threads waiting on it."""

    def __init__(self, lock: threading.Lock):
        super().__init__(lock)
        self.count = 0


class QueueStore:
    """Named queues with blocking operations; all public methods are thread-safe."""

    def __init__(self, queue_defaults: QueueOptions, memory_budget: int = 0,
                 max_item_bytes: int = 0, journal: Journal | None = None,
                 compact_bytes: int = 64 << 20):
        self.queue_defaults = queue_defaults
        self.memory_budget = memory_budget      # bytes; 0 = unbounded
        self.max_item_bytes = max_item_bytes    # bytes; 0 = unbounded
        self.restarted = False  # set by a shard that Ray restarted: callers it never saw
        self._journal = journal
        self._compact_bytes = compact_bytes
        self._lock = threading.Lock()
        self._queues: dict[str, Queue] = {}
        # queue name, or ("caller", id) -> condition, only while anyone waits on it
        self._waiters: dict[Hashable, _Waiters] = {}
        self._tickets: dict[int, ParkedPush] = {}
        self._ticket_ids = iter(range(1, 1 << 62))
        # Lease ids grow with time, so that ids from before a restart are never reissued.
        self._next_lease_id = time.time_ns()
        self._nbytes = 0                           # held by all queues
        self._done: dict[str, int] = {}            # caller id -> last sequence number run
        self._retired: Counter = Counter()         # counters of removed queues
        self._repr = reprlib.Repr()
        self._repr.maxlist, self._repr.maxother = 50, 80

    # -- durability -------------------------------------------------------------------

    def restore(self) -> int:
        """Load the journal's snapshot and replay its log; return the records replayed."""
        state, records = self._journal.load()
        self.replay(state, records)
        return len(records)

    def replay(self, state: dict | None, records: list, observe=None) -> None:
        """Load a snapshot's `state`, then apply the journal `records` logged after it.

        observe(record, moved), if given, sees each record and the items it moved:
        the items pushed, parked, admitted or taken, (lease_id, item, redelivered)
        for a lease, (lease_id, item) of the leases a settle found held. Tools that
        trace items through a journal use it (pype bench soak).
        """
        with self._lock:
            if state is not None:
                self._queues = state["queues"]
                self._retired = state["retired"]
                self._next_lease_id = max(self._next_lease_id, state["next_lease_id"])
            for record in records:
                moved = self._replay(*record)
                if observe is not None:
                    observe(record, moved)
            self._nbytes = sum(queue.nbytes for queue in self._queues.values())

    def _replay(self, operation: str, name: str, *args: Any) -> list:
        queue = self._queues.get(name)
        if operation == "add":
            self._queues[name] = make_queue(args[0])
        elif operation == "remove":
            self._retire(name)
        elif operation == "insert":
            queue.insert(*args)
            return args[0]
        elif operation == "park":
            items, priority, nbytes = args
            queue.parked.append(ParkedPush(items, priority, None, nbytes, acknowledged=True))
            return items
        elif operation == "admit":
            ticket = queue.parked.popleft()
            queue.insert(ticket.items, ticket.priority, ticket.nbytes)
            return ticket.items
        elif operation == "take":
            return queue.take(*args)
        elif operation == "lease":
            count, first_id, deadline = args
            self._next_lease_id = max(self._next_lease_id, first_id + count)
            return queue.lease(count, first_id, deadline)
        elif operation == "settle":
            lease_ids, requeue = args
            held = [(lease_id, queue.leases[lease_id].item) for lease_id in lease_ids
                    if lease_id in queue.leases]
            queue.settle(lease_ids, requeue)
            return held
        return []

    def _log(self, *record: Any) -> None:
        """Journal one change (lock held); compact when the log has grown large."""
        if self._journal is None:
            return
        self._journal.append(record)
        if self._journal.log_bytes >= self._compact_bytes:
            self._journal.compact({"queues": self._queues, "retired": self._retired,
                                   "next_lease_id": self._next_lease_id})

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()

    # -- read-your-writes -------------------------------------------------------------

    def record(self, caller: Caller | None) -> None:
        """Note that the main-thread call `caller` has run."""
        if caller is None:
            return
        caller_id, sequence = caller
        with self._lock:
            if sequence > self._done.get(caller_id, 0):
                self._done[caller_id] = sequence
            self._notify(("caller", caller_id))

    def catch_up(self, after: Caller | None, limit: float = CATCH_UP_LIMIT) -> bool:
        """Wait until the caller's main-thread call numbered `after` has run.

        Gives up after `limit` seconds with a warning, and returns False: a shard
        that restarted has lost the calls it had not run, and a waiting call must
        not hang for them.
        """
        if after is None or after[1] == 0:
            return True
        caller_id, sequence = after
        with self._lock:
            if self.restarted and caller_id not in self._done:
                return True  # its earlier calls went to the shard before the restart
            if self._wait_for(("caller", caller_id),
                              lambda: self._done.get(caller_id, 0) >= sequence, limit):
                return True
        logger.warning("pype: call %d of caller %s did not run within %.0f s; a waiting call "
                       "goes on without it", sequence, caller_id, limit)
        return False

    # -- admin ------------------------------------------------------------------------

    def add(self, name: str, options: QueueOptions, exist_ok: bool = False) -> bool:
        """Create queue `name`; return False if it existed and exist_ok is set."""
        with self._lock:
            if name in self._queues:
                if exist_ok:
                    return False
                raise QueueExistsError(f"queue {name!r} already exists")
            self._create(name, options)
            return True

    def _create(self, name: str, options: QueueOptions) -> Queue:
        queue = self._queues[name] = make_queue(options)
        self._log("add", name, options)
        return queue

    def remove(self, name: str) -> int:
        """Delete queue `name` and return how many items it still held (leased ones included).

        Producers parked on it get QueueNotFoundError; waiting pulls go on waiting
        for a queue of that name to have items.
        """
        with self._lock:
            if name not in self._queues:
                raise QueueNotFoundError(f"queue {name!r} does not exist")
            discarded = self._retire(name)
            self._log("remove", name)
            self._notify(name)
            return discarded

    def _retire(self, name: str) -> int:
        queue = self._queues.pop(name)
        self._retired.update(pushed=queue.pushed, pulled=queue.pulled, dropped=queue.dropped,
                             acked=queue.acked, redelivered=queue.redelivered)
        self._nbytes -= queue.nbytes
        discarded = queue.clear()
        self._retired.update(discarded=discarded)
        return discarded

    def names(self) -> list[str]:
        with self._lock:
            return list(self._queues)

    def length(self, name: str) -> int:
        """Items in queue `name` ready to pull (0 for a queue that does not exist)."""
        with self._lock:
            queue = self._queues.get(name)
            return len(queue) if queue is not None else 0

    def describe(self, name: str) -> dict | None:
        """The options of queue `name` as a dict, or None if it does not exist."""
        with self._lock:
            queue = self._queues.get(name)
            return None if queue is None else dict(vars(queue.options))

    def render(self, name: str) -> str:
        """A one-line picture of queue `name` and its items in pull order."""
        with self._lock:
            queue = self._queues.get(name)
            if queue is None:
                raise QueueNotFoundError(f"queue {name!r} does not exist")
            bound = f" of {queue.options.maxsize}" if queue.options.maxsize else ""
            items = self._repr.repr(queue.peek(-1))
            leased = f", {len(queue.leases)} leased" if queue.leases else ""
            return f"queue {name!r} ({queue.kind}, {len(queue)}{bound} items{leased}): {items}"

    def stats(self) -> dict:
        """Counters of the whole store and of each queue."""
        with self._lock:
            queues = {
                name: {"kind": q.kind, "depth": len(q), "maxsize": q.options.maxsize,
                       "bytes": q.nbytes, "max_bytes": q.options.max_bytes,
                       "leased": len(q.leases), "pushed": q.pushed, "pulled": q.pulled,
                       "dropped": q.dropped, "acked": q.acked, "redelivered": q.redelivered,
                       "waiting_producers": len(q.parked)}
                for name, q in self._queues.items()}
            totals = {key: sum(q[key] for q in queues.values()) + self._retired[key]
                      for key in COUNTERS}
            return {"queues": len(queues), "depth": sum(q["depth"] for q in queues.values()),
                    "leased": sum(q["leased"] for q in queues.values()),
                    "bytes": self._nbytes, "memory_budget": self.memory_budget,
                    **totals, "discarded": self._retired["discarded"],
                    "waiting_calls": sum(w.count for w in self._waiters.values()),
                    "per_queue": queues}

    # -- push ---------------------------------------------------------------------

    def push(self, names: tuple[str, ...], items: list, priority: Any = None,
             block: bool = False, timeout: float | None = None) -> int | PendingPush:
        """Push `items` to each queue in `names`, creating missing queues.

        Each queue takes all the items or none, by its overflow policy; a queue that
        refuses them raises QueueFullError, naming it and how many queues took them.
        With block=True, items that do not fit wait in the queue's line until
        `timeout`, and a PendingPush is returned for await_push(); nothing ever
        waits here. Returns the number of items accepted (items x queues).
        """
        with self._lock:
            nbytes = self._check_limits(items, len(names))
            queues = [self._queue_for_push(name, len(items), nbytes, priority) for name in names]
            if block:
                return self._offer(names, queues, items, priority, nbytes, timeout)
            full = []
            for name, queue in zip(names, queues, strict=True):
                before = queue.nbytes
                try:
                    entered = queue.put(items, priority, nbytes)
                except QueueFullError as error:
                    full.append(f"{name!r} {error}")
                    continue
                self._nbytes += queue.nbytes - before
                self._log("insert" if entered else "park", name, items, priority, nbytes)
                self._notify(name)
            if full:
                others = len(names) - len(full)
                took = f"; the other {others} queues of this push took it" if len(names) > 1 else ""
                raise QueueFullError(f"queue {'; queue '.join(full)}{took}")
            return len(items) * len(names)

    def _check_limits(self, items: list, copies: int) -> int:
        """Return the bytes of `items`; raise if one is too large or the budget is spent."""
        sizes = item_sizes(items)
        largest = max(sizes, default=0)
        if self.max_item_bytes and largest > self.max_item_bytes:
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

    def _offer(self, names, queues, items, priority, nbytes, timeout) -> int | PendingPush:
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = PendingPush(accepted=0)
        for name, queue in zip(names, queues, strict=True):
            before = queue.nbytes
            ticket = queue.offer(items, priority, deadline, nbytes)
            if ticket.state == "admitted":
                self._nbytes += queue.nbytes - before
                self._log("insert", name, items, priority, nbytes)
                pending.accepted += len(items)
                self._notify(name)
            else:
                ticket_id = next(self._ticket_ids)
                self._tickets[ticket_id] = ticket
                pending.tickets[name] = ticket_id
        return pending if pending.tickets else pending.accepted

    def await_push(self, pending: int | PendingPush) -> int:
        """Wait until every parked part of a blocking push is admitted or late.

        Returns the number of items accepted. Raises QueueTimeoutError if a part
        found no room before its deadline (that part was not accepted),
        QueueNotFoundError if its queue was removed meanwhile, or ShardLostError if
        the shard restarted since the push (its waiting parts were not accepted).
        """
        if not isinstance(pending, PendingPush):
            return pending
        accepted, failures = pending.accepted, []
        with self._lock:
            if any(ticket_id not in self._tickets for ticket_id in pending.tickets.values()):
                raise ShardLostError(
                    f"the shard restarted while this push waited for room in queue "
                    f"{', '.join(map(repr, pending.tickets))}; those parts were not accepted "
                    f"({pending.accepted} items were); push them again")
            for name, ticket_id in pending.tickets.items():
                ticket = self._tickets.pop(ticket_id)
                if ticket.state == "waiting":
                    remaining = None if ticket.deadline is None else ticket.deadline - time.monotonic()
                    self._wait_for(name, lambda t=ticket: t.state != "waiting", remaining)
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
        if any(state == "removed" for _, state in failures):
            raise QueueNotFoundError(f"queue {names} was removed while the push waited; {summary}")
        raise QueueTimeoutError(f"no room in queue {names} before the timeout; {summary}")

    # -- pull ---------------------------------------------------------------------

    def pull(self, name: str, batch_size: int | None = None, block: bool | None = None,
             timeout: float | None = None, remove: bool = True, may_wait: bool = False,
             ack: bool = False) -> list:
        """Take (or with remove=False, peek at) up to batch_size items of queue `name`.

        batch_size None is the queue's pull size (1, or batch_size of a batch
        queue); -1 is everything. block None is the queue's default (True for batch
        queues, whose timeout None means their batch_timeout). A blocking pull
        waits until the queue holds batch_size items (at least one for -1), or is
        full (more can never come), or the timeout passes; then it returns what is
        there. Only with may_wait does a pull wait at all: calls on the shard's main
        thread pass False. With ack=True the items are leased, not removed, and
        returned as (lease_id, item, redelivered) triples; see settle().
        """
        with self._lock:
            queue = self._queues.get(name)
            options = queue.options if queue is not None else self.queue_defaults
            is_batch = options.kind == "batch"
            size = options.pull_size if batch_size is None else batch_size
            if block is None:
                block = is_batch
            if is_batch and timeout is None:
                timeout = options.batch_timeout
            if may_wait and block and not self._pull_ready(name, size):
                self._wait_for(name, lambda: self._pull_ready(name, size), timeout)
                queue = self._queues.get(name)
            if queue is None:
                return []
            if not remove:
                return queue.peek(size)
            if ack:
                first_id = self._next_lease_id
                deadline = time.time() + queue.options.visibility_timeout
                items = queue.lease(size, first_id, deadline)
                self._next_lease_id += len(items)
                if items:
                    self._log("lease", name, len(items), first_id, deadline)
            else:
                before = queue.nbytes
                items = queue.take(size)
                self._nbytes += queue.nbytes - before
                if items:
                    self._log("take", name, len(items))
            if items:
                self._admit_parked(name, queue)
            return items

    def _admit_parked(self, name: str, queue: Queue) -> None:
        """Let parked pushes in now that a pull made room, and wake who waits for room."""
        before = queue.nbytes
        for ticket in queue.admit_parked(time.monotonic()) if queue.parked else ():
            if ticket.state != "admitted":
                continue
            if ticket.acknowledged:
                self._log("admit", name)
            else:
                self._log("insert", name, ticket.items, ticket.priority, ticket.nbytes)
        self._nbytes += queue.nbytes - before
        if queue.options.maxsize or queue.options.max_bytes:
            self._notify(name)  # wakes blocked pushes and can_push waiters

    # -- leases -----------------------------------------------------------------------

    def settle(self, name: str, lease_ids: list[int], requeue: bool) -> int:
        """Ack (requeue=False) or nack (requeue=True) leased items of queue `name`.

        Acked items are gone for good; nacked ones go back to the head of the queue
        in their original order. Returns the number settled. Raises
        LeaseNotHeldError naming the ids that are not held (expired and returned,
        settled before, or never issued) after settling the others.
        """
        with self._lock:
            queue = self._queues.get(name)
            if queue is None:
                missing = list(lease_ids)
            else:
                before = queue.nbytes
                missing = queue.settle(lease_ids, requeue)
                self._nbytes += queue.nbytes - before
                if len(missing) < len(lease_ids):
                    self._log("settle", name, lease_ids, requeue)
                    if requeue:
                        self._notify(name)
                    else:
                        self._admit_parked(name, queue)
        if missing:
            verb = "returned" if requeue else "acked"
            raise LeaseNotHeldError(
                f"queue {name!r}: {len(missing)} of {len(lease_ids)} lease ids are not held "
                f"(their lease expired and the items went back to the queue, they were settled "
                f"before, or they were never issued): {missing[:10]}; the other "
                f"{len(lease_ids) - len(missing)} were {verb}", missing)
        return len(lease_ids)

    def expire_leases(self, now: float | None = None) -> int:
        """Return the items of every lease past its deadline to its queue; count them."""
        now = time.time() if now is None else now
        expired = 0
        with self._lock:
            for name, queue in self._queues.items():
                lease_ids = queue.expired_leases(now) if queue.leases else ()
                if lease_ids:
                    queue.settle(lease_ids, requeue=True)
                    self._log("settle", name, lease_ids, True)
                    self._notify(name)
                    expired += len(lease_ids)
        if expired:
            logger.info("pype: %d leased items were not acked in time and went back to their queues",
                        expired)
        return expired

    # -- conditions -------------------------------------------------------------------

    def can_pull(self, name: str, batch_size: int | None = None, wait: float | None = 0.0) -> bool:
        """True if queue `name` holds a full pull; waits up to `wait` s (None: forever)."""
        with self._lock:
            return self._holds(name, lambda: self._can_pull(name, batch_size), wait)

    def can_push(self, name: str, wait: float | None = 0.0) -> bool:
        """True if a push of one item to `name` would be accepted; waits up to `wait` s."""
        with self._lock:
            return self._holds(name, lambda: self._can_push(name), wait)

    def _holds(self, name: str, predicate, wait: float | None) -> bool:
        return predicate() or (wait != 0 and self._wait_for(name, predicate, wait))

    def _can_pull(self, name: str, batch_size: int | None) -> bool:
        queue = self._queues.get(name)
        return queue is not None and queue.can_pull(batch_size)

    def _pull_ready(self, name: str, batch_size: int) -> bool:
        queue = self._queues.get(name)
        return queue is not None and (queue.can_pull(batch_size) or queue.is_full())

    def _can_push(self, name: str) -> bool:
        queue = self._queues.get(name)
        return queue is None or queue.can_push()

    def _wait_for(self, key: Hashable, predicate, timeout: float | None) -> bool:
        """Wait (lock held) on the condition of `key` until predicate() or timeout."""
        waiters = self._waiters.get(key)
        if waiters is None:
            waiters = self._waiters[key] = _Waiters(self._lock)
        waiters.count += 1
        try:
            return waiters.wait_for(predicate, timeout)
        finally:
            waiters.count -= 1
            if not waiters.count:
                del self._waiters[key]

    def _notify(self, key: Hashable) -> None:
        waiters = self._waiters.get(key)
        if waiters is not None:
            waiters.notify_all()
