"""A shard's request engine: its queues, the requests that wait on them, and their order.

The engine runs each request (pype.protocol) against the QueueStore, which never
waits, and answers it through a reply function: it knows nothing of sockets or
Ray. Its input and output are pype.shards.loop's (native requests from the data
sockets, replies written back) and the shard actor's (`.remote()` requests, run on
Ray's threads through submit()), as Redis keeps its networking apart from its
blocked-client handling. One lock guards it: whoever runs a request holds it.

A request that must wait (a blocking pull, a blocking push, can_pull/can_push with
a wait) is parked (a _Parked: _ParkedPull, _ParkedCondition, _ParkedPush): it costs
no thread, only an entry in the list of its queue and, with a timeout, in a heap of
deadlines. A blocking push that finds no room is, in the store, a PendingPush that
holds its place in line in each full queue (a pype.shards.queues.ParkedPush); the
engine parks it as a _ParkedPush until the store's push_outcome() settles it. Whatever changes a queue wakes the requests
parked on it, in the order they parked; expire(now) answers a parked request whose
deadline passed with what its timeout means (a partial batch, False,
QueueTimeoutError), and lets in the delayed pushes that fell due: next_deadline()
includes the first due push, so the loop sleeps until then. Time comes from the
store's clocks, which a test may drive.

The clock-driven changes of an item's life (leases running out, expiry, delayed
pushes) are made by the primary (or the one copy) alone, and journaled; the items
its queues give up wait in the store's outbox, whose sender (the shard's) asks the
engine for the next committed entry (outgoing) and reports it delivered or refused.

Read-your-writes across the two paths. Ray runs one caller's calls to the
actor's main thread in order, but not in order with its calls to the waiting
groups, nor with its native calls. So every `.remote()` call to the main thread
carries (caller id, sequence number), and every other request carries the
sequence number of its caller's last such call: the engine holds it until that
call has run. A shard that Ray restarted, or a replica promoted to primary, does
not hold requests of callers it has not seen since: their earlier calls went to its
predecessor.

Without persistence a restarted shard lost its queues: each caller's first call
to one of them raises ShardLostError once, and is not applied.

Replication (pype.shards.replication). A replicated shard's engine is its primary
(lead()) or a backup (follow()). A primary answers a request only once every record
logged before the answer is committed: each reply waits in the PrimaryLog
(_AfterCommit), and while fewer than min_insync replicas are in sync it refuses
requests with NotEnoughReplicasError before running them. A backup answers only
Replicate requests, from its primary, and every other with NotPrimaryError. Whoever
carries the messages (the shard's replication sender) asks the engine what to send
(message_for) and hands it each answer (answered), under the engine's lock; with
fsync "always" it also syncs the primary's journal beside the backups' and says how
far (synced).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
from collections.abc import Callable
from typing import Any

from pype import protocol
from pype.errors import (
    NotEnoughReplicasError,
    NotPrimaryError,
    PypeError,
    QueueNotFoundError,
    ShardLostError,
)
from pype.partitions import Partitioned
from pype.protocol import (
    Add,
    Arrived,
    AwaitPush,
    CanPull,
    CanPush,
    DeadLetters,
    Describe,
    Expect,
    Export,
    Import,
    Length,
    Move,
    Moved,
    Names,
    Pull,
    PullFailed,
    Push,
    PushPull,
    Release,
    Remove,
    Render,
    Replicate,
    Settle,
    Stats,
)
from pype.shards.replication import (
    BackupLog,
    Batch,
    Position,
    PrimaryLog,
    ReplicaSet,
    Snapshot,
)
from pype.shards.store import Outgoing, PendingPush, QueueStore

logger = logging.getLogger("pype")

Reply = Callable[[int, Any], None]  # reply(status, value)


class RayReply:
    """The answer to a request from a Ray method's thread, which waits for it."""

    __slots__ = ("_event", "status", "value")

    def __init__(self):
        self._event = threading.Event()
        self.status, self.value = None, None

    def __call__(self, status: int, value: Any) -> None:
        self.status, self.value = status, value
        self._event.set()

    def result(self) -> Any:
        self._event.wait()
        if self.status == protocol.ERROR:
            raise self.value
        return self.value


def _queue_names(request) -> tuple[str, ...]:
    """The queues a request names (none for AwaitPush, Names, Stats, ...)."""
    kind = type(request)
    if kind is Push:
        return request.queues
    if kind in _ONE_QUEUE:
        return (request.queue,)
    if kind is PushPull:
        return (*request.push.queues, request.pull.queue)
    return ()


_ONE_QUEUE = (Pull, Settle, CanPull, CanPush, Add, Remove, Length, Describe, Render, DeadLetters,
              Move)
_ANY_REPLICA = (Stats, Names, Replicate)  # what every replica answers, primary or not


class _AfterCommit:
    """A reply that goes out once everything logged before it is committed: what the
    caller sees has reached every in-sync replica. If the engine stops being primary
    first, the caller gets NotPrimaryError: the change may or may not survive."""

    __slots__ = ("engine", "reply")

    def __init__(self, engine: ShardEngine, reply: Reply):
        self.engine, self.reply = engine, reply

    def __call__(self, status: int, value: Any) -> None:
        primary = self.engine.replication
        if type(primary) is not PrimaryLog:
            self.reply(status, value)
            return
        reply = self.reply
        primary.hold(self.engine.store.position, lambda: reply(status, value),
                     lambda: reply(protocol.ERROR, NotPrimaryError(
                         f"shard {self.engine.index}: this replica stopped being primary "
                         f"before the call was acknowledged; it may or may not have been "
                         f"applied")))


# -- parked requests ----------------------------------------------------------------------

class _Parked:
    """A request waiting in the shard on queues `names`; poll() answers it once it can.

    A handler returns one instead of an answer; the engine attaches the reply.
    """

    __slots__ = ("deadline", "done", "names", "reply")

    def __init__(self, names: tuple[str, ...], deadline: float | None):
        self.names, self.deadline, self.done = names, deadline, False
        self.reply: Reply | None = None

    def finish(self, status: int, value: Any) -> None:
        self.done = True
        self.reply(status, value)


class _ParkedPull(_Parked):
    """after_push: the pull of a PushPull, whose push was applied: an error that ends it
    (its queue moved or was removed) is a PullFailed, so that the client does not send
    the push again. A NotPrimaryError stays bare: the client's pipeline sends the
    numbered push again alone (pype.transport)."""

    __slots__ = ("ack", "after_push", "must_exist", "name", "remove", "size")

    def __init__(self, deadline, name, size, remove, ack, must_exist):
        super().__init__((name,), deadline)
        self.name, self.size, self.remove, self.ack = name, size, remove, ack
        self.must_exist = must_exist
        self.after_push = False

    def finish(self, status: int, value: Any) -> None:
        if self.after_push and status == protocol.ERROR and type(value) is not NotPrimaryError:
            value = PullFailed(value)
        super().finish(status, value)

    def poll(self, engine: ShardEngine, late: bool) -> bool:
        if not (late or engine.store.pull_ready(self.name, self.size)):
            return False
        items = engine.store.pull(self.name, self.size, self.remove, self.ack)
        if items:
            engine.changed(self.name)
        self.finish(protocol.RESULT, items)
        return True


class _ParkedCondition(_Parked):
    """can_pull / can_push with a wait: True once the condition holds, False at the deadline."""

    __slots__ = ("condition",)

    def __init__(self, name, deadline, condition: Callable[[], bool]):
        super().__init__((name,), deadline)
        self.condition = condition

    def poll(self, engine: ShardEngine, late: bool) -> bool:
        if self.condition():
            self.finish(protocol.RESULT, True)
        elif late:
            self.finish(protocol.RESULT, False)
        else:
            return False
        return True


class _ParkedPush(_Parked):
    """The parts of a blocking push that wait in their queues' lines for room."""

    __slots__ = ("pending",)

    def __init__(self, pending: PendingPush):
        super().__init__(tuple(pending.tickets), pending.deadline)
        self.pending = pending

    def poll(self, engine: ShardEngine, late: bool) -> bool:
        try:
            outcome = engine.store.push_outcome(self.pending, engine.clock())
        except Exception as error:  # noqa: BLE001 - the push's own error, for its caller
            self.finish(protocol.ERROR, error)
            return True
        if outcome is None:
            return False
        self.finish(protocol.RESULT, outcome)
        return True


# -- the engine --------------------------------------------------------------------------------

class ShardEngine:
    """Runs one shard's requests; see the module docstring.

    new_deadline: called (lock held) when a request parks with a deadline, so that the
    I/O loop, which sleeps until the next deadline, can wake to see it.
    """

    def __init__(self, store: QueueStore, index: int, poll_wait: float,
                 restarted: bool = False, lost: set[str] = frozenset()):
        self.store = store
        self.index = index
        self.clock = store.clock  # one clock for the store's waits and the engine's deadlines
        self.lock = threading.Lock()
        self.counts = {"native_requests": 0, "tcp_requests": 0, "ray_requests": 0}
        self.new_deadline: Callable[[], None] = lambda: None
        self._poll_wait = poll_wait
        self._restarted = restarted
        self._lost = {name: set() for name in lost}  # queue lost in a restart -> callers told
        self._parked: dict[str, list[_Parked]] = {}
        self._deadlines: list = []
        self._tiebreak = itertools.count()
        self._changed: list[str] = []
        self._applied: dict[str, int] = {}           # caller id -> last main-thread call run
        self._behind: dict[str, list[tuple]] = {}    # caller id -> requests waiting for it
        self._held: list[tuple] = []  # requests for queues on their way here
        self.replication: PrimaryLog | BackupLog | None = None  # None: not replicated
        self.new_records = threading.Condition(self.lock)  # a primary logged a record
        self.outbox_filled = threading.Condition(self.lock)  # dead letters wait to be sent
        self._handlers = {
            Push: self._push, Pull: self._pull, PushPull: self._push_pull, Settle: self._settle,
            AwaitPush: self._await_push,
            CanPull: self._can_pull, CanPush: self._can_push, Add: self._add, Remove: self._remove,
            Length: self._length,
            Describe: lambda _, r, __: self.store.describe(r.queue),
            DeadLetters: self._dead_letters, Move: self._move,
            Render: self._render, Names: lambda *_: self.store.names(), Stats: self._stats,
            Expect: self._expect, Export: self._export, Import: self._import,
            Arrived: self._arrived, Release: self._release, Replicate: self._replicate,
        }

    def submit(self, request: tuple, caller_id: str, sequence: int | None = None,
               after: int = 0, may_wait: bool = True) -> Any:
        """Run `request` on a Ray method's thread and return its answer (or raise its error).

        The request runs here, under the lock, as it would on the I/O loop's thread: a
        hand-off to that thread and back cost the `.remote()` path a third of its
        speed (two thread wake-ups per call on 2 cores). A request that must wait
        parks like any other, and this thread waits for its answer outside the lock.
        sequence: the number of a main-thread call (recorded once it ran); after:
        the caller's last main-thread call, which must run first; may_wait=False
        (the main thread) answers at once, never parking the request.
        """
        reply = RayReply()
        with self.lock:
            self.counts["ray_requests"] += 1
            self.dispatch(request, caller_id, after, may_wait, reply)
            if sequence is not None:
                self._record(caller_id, sequence)
        return reply.result()

    def next_deadline(self) -> float | None:
        """The earliest deadline of a parked request or of a delayed push, if any, on
        clock() (lock held)."""
        deadline = self._deadlines[0][0] if self._deadlines else None
        due = self.store.next_due() if type(self.replication) is not BackupLog else None
        if due is not None:  # kept on the wall clock (journaled): on this clock, now
            due = self.clock() + (due - self.store.wall_clock())
            deadline = due if deadline is None else min(deadline, due)
        return deadline

    def housekeep(self) -> None:
        """Return expired leases to their queues, give up items whose time to live ended,
        and answer what that wakes (lock held)."""
        if type(self.replication) is BackupLog:  # a backup never reads the clock
            return
        for name in self.store.expire_leases(index=self.index):  # wall-clock time (journaled)
            self.changed(name)
        for name in self.store.expire_items(index=self.index):
            self.changed(name)
        self._wake()

    def stats(self) -> dict:
        """The store's counters, requests served per path, requests parked now, lost queues.

        Call it with the lock held (housekeeping does), or send a Stats request.
        """
        waiting = sum(not parked.done for parked_on in self._parked.values() for parked in parked_on)
        stats = {**self.store.stats(), **self.counts, "waiting_calls": waiting,
                 "lost_queues": sorted(self._lost)}
        replication = self.replication
        if replication is not None:
            stats["replication"] = {
                "role": "backup" if type(replication) is BackupLog else "primary",
                "epoch": replication.epoch, "position": self.store.position,
                "committed": replication.committed}
            if type(replication) is PrimaryLog:  # records and item bytes each backup lacks
                backups = replication.replicas.backups
                stats["replication"]["in_sync"] = len(replication.replicas.in_sync)
                stats["replication"]["lag"] = {
                    backup: replication.end - replication.held(backup) for backup in backups}
                stats["replication"]["lag_bytes"] = {
                    backup: replication.lag_bytes(backup) for backup in backups}
        return stats

    # -- running requests -------------------------------------------------------------------

    def dispatch(self, request: tuple, caller_id: str, after: int, may_wait: bool,
                 reply: Reply) -> None:
        """Run `request` for `caller_id` (lock held) and answer it through reply(status,
        value), now or, parked, later. after: the caller's last main-thread call, which
        must run first; may_wait=False answers at once, never parking the request."""
        if self.replication is not None and self._refused_by_replication(request, reply):
            return
        if (type(self.replication) is PrimaryLog and type(reply) is not _AfterCommit
                and type(request) not in _ANY_REPLICA):
            reply = _AfterCommit(self, reply)
        if after and self._applied.get(caller_id, 0) < after and not (
                self._restarted and caller_id not in self._applied):
            self._behind.setdefault(caller_id, []).append((after, request, may_wait, reply))
            return
        if (self.store.owner or self.store.expecting) and self._elsewhere(
                request, caller_id, may_wait, reply):
            return
        try:
            answer = self._handlers[type(request)](caller_id, request, may_wait)
        except Exception as error:  # noqa: BLE001 - the request's own error, for its caller
            reply(protocol.ERROR, error)
        else:
            if isinstance(answer, _Parked):
                answer.reply = reply
                self._park(answer)
            else:
                reply(protocol.RESULT, answer)
        self._wake()

    def _refused_by_replication(self, request, reply: Reply) -> bool:
        """Answer NotPrimaryError (a backup) or NotEnoughReplicasError (a primary that
        cannot commit) for a request it must not run; True if it was answered so."""
        if type(request) in _ANY_REPLICA:
            return False
        if type(self.replication) is BackupLog:
            reply(protocol.ERROR, NotPrimaryError(
                f"shard {self.index}: this replica is a backup (leader epoch "
                f"{self.replication.epoch}); the primary serves the shard"))
            return True
        if not self.replication.can_commit:
            replicas = self.replication.replicas
            reply(protocol.ERROR, NotEnoughReplicasError(
                f"shard {self.index}: {len(replicas.in_sync)} of its replicas are in sync, "
                f"fewer than min_insync={replicas.min_insync}; it takes no calls until a "
                f"backup has caught up (retry)"))
            return True
        return False

    # -- replication roles (lock held) --------------------------------------------------

    def lead(self, replicas: ReplicaSet, me: str, lost: frozenset = frozenset()) -> None:
        """Serve the shard as its primary in `replicas`' epoch (a promoted backup keeps
        what it knew to be committed). `lost`: queues whose items died with every
        replica in sync (no persistence), as a restart without persistence loses them."""
        if type(self.replication) is PrimaryLog:  # it led an earlier epoch: what it held fails
            self._fail_waiting()
        committed = self.replication.committed if type(self.replication) is BackupLog else 0
        self.replication = PrimaryLog(replicas, me, self.store, committed,
                                      synced_apart=self.store.syncs_each_write)
        # Callers numbered their `.remote()` calls to the old primary, which this one never
        # saw run: like a restarted shard, it holds nobody's requests for them.
        self._restarted = True
        self._applied.clear()
        self._lost.update((name, set()) for name in lost if name not in self._lost)
        self.store.replicate = self._logged
        self.store.lead(replicas.epoch, me)
        self.outbox_filled.notify_all()  # the outbox it holds is its to send now

    def _logged(self, position: int, record) -> None:
        self.replication.append(position, record)
        self.new_records.notify_all()

    def follow(self, epoch: int) -> None:
        """Be a backup, following leader epoch `epoch` or newer. A primary that was
        replaced fails every request it still holds (NotPrimaryError: a reply waiting for
        its commit may or may not survive, a parked one was not applied) and takes only a
        snapshot from the new primary: it may hold records no other replica has."""
        stepped_down = type(self.replication) is PrimaryLog
        if stepped_down:
            self._fail_waiting()
        self.store.replicate = None
        self.replication = BackupLog(self.store, epoch, diverged=stepped_down)
        self.new_records.notify_all()  # the primary's senders stop

    def _fail_waiting(self) -> None:
        """Answer NotPrimaryError to every request this primary holds: replies waiting for
        their commit, parked requests, and requests held behind others or for queues on
        their way here."""
        not_primary = NotPrimaryError(f"shard {self.index}: this replica stopped being primary "
                                      f"before the call was answered; a change it made may "
                                      f"or may not have been applied")
        for fail in self.replication.abandon():
            fail()
        for parked_on in self._parked.values():
            for parked in parked_on:
                if not parked.done:
                    parked.finish(protocol.ERROR, not_primary)
        self._parked.clear()
        self._deadlines.clear()
        held = [entry[3] for behind in self._behind.values() for entry in behind]
        held += [entry[3] for entry in self._held]
        self._behind.clear()
        self._held.clear()
        for reply in held:
            reply(protocol.ERROR, not_primary)

    def step_down(self) -> None:
        """A primary learned that another replica leads a newer epoch: follow."""
        self.follow(self.replication.epoch)

    def message_for(self, backup: str) -> Batch | Snapshot | None:
        """What the primary sends backup `backup` next (see PrimaryLog.send_to)."""
        return self.replication.send_to(backup)

    def answered(self, backup: str, answer: Position) -> None:
        """Backup `backup` answered: send the replies this commits."""
        for release in self.replication.acknowledged(backup, answer):
            release()

    def synced(self, position: int) -> None:
        """The primary's journal synced every record through `position` (see
        QueueStore._log): send the replies this commits."""
        for release in self.replication.synced(position):
            release()

    # -- the outbox (lock held): its sender is the shard's (pype.shards.shard) ---------------

    def outgoing(self) -> tuple[Outgoing, tuple[int, int, int]] | None:
        """The dead letters to send next and their push's producer numbers (see
        QueueStore.outgoing), or None: none wait, they are not committed yet, or this
        replica is a backup (its primary sends them)."""
        if type(self.replication) is BackupLog:
            return None
        outgoing = self.store.outgoing()
        if outgoing is None:
            return None
        if type(self.replication) is PrimaryLog and self.replication.committed < outgoing[0].position:
            return None  # a failover may yet undo what gave them up
        return outgoing

    def delivered(self, number: int) -> None:
        """Outbox entry `number` reached its queue."""
        if type(self.replication) is not BackupLog:
            self.store.delivered(number)

    def renumber(self, number: int) -> None:
        """Outbox entry `number` was refused: send it again under a new number."""
        if type(self.replication) is not BackupLog:
            self.store.renumber(number)

    def never_fits(self, number: int, reason: str) -> None:
        """Outbox entry `number` can never fit its queue: see QueueStore.never_fits."""
        if type(self.replication) is not BackupLog:
            self.store.never_fits(number, reason)

    def change_replicas(self, replicas: ReplicaSet) -> None:
        """The router recorded `replicas`: send the replies this commits."""
        for release in self.replication.change_replicas(replicas):
            release()

    def _replicate(self, caller_id, request: Replicate, may_wait: bool) -> Position:
        if type(self.replication) is not BackupLog:
            raise NotPrimaryError(f"shard {self.index}: this replica is no backup; replication "
                                  f"messages go to backups")
        return self.replication.accept(request.message)

    def _elsewhere(self, request, caller_id: str, may_wait: bool, reply: Reply) -> bool:
        """Answer a request for a queue that moved away with Moved, and hold one for a
        queue that may be on its way here until it arrived; True if it was handled so."""
        names = _queue_names(request)
        if type(request) is Push and self.store.answered(request.producer):
            return False  # a push sent again: _push gives its first answer, wherever it went
        pushed_before = type(request) is PushPull and self.store.applied(request.push.producer)
        if pushed_before:  # sent again whole (its pull leases): where its pull goes is all that is left
            names = (request.pull.queue,)
        for name in names:
            epoch = self.store.belongs_elsewhere(name, self.index)
            if epoch is not None:
                moved = Moved(name, epoch, names)
                if type(request) is Push:
                    self.store.refuse(request.producer, moved)
                reply(protocol.ERROR, PullFailed(moved) if pushed_before else moved)
                return True
        if any(self.store.on_its_way(name, self.index) for name in names):
            self._held.append((request, caller_id, may_wait, reply))
            return True
        return False

    def _record(self, caller_id: str, sequence: int) -> None:
        """The caller's main-thread call `sequence` has run: release what waited for it."""
        if sequence > self._applied.get(caller_id, 0):
            self._applied[caller_id] = sequence
        behind = self._behind.get(caller_id)
        if behind:
            ready = [entry for entry in behind if entry[0] <= sequence]
            self._behind[caller_id] = [entry for entry in behind if entry[0] > sequence]
            for _, request, may_wait, reply in ready:
                self.dispatch(request, caller_id, 0, may_wait, reply)

    def _park(self, parked: _Parked) -> None:
        for name in parked.names:
            self._parked.setdefault(name, []).append(parked)
        if parked.deadline is not None:
            heapq.heappush(self._deadlines, (parked.deadline, next(self._tiebreak), parked))
            self.new_deadline()  # the I/O loop may sleep past it: tell it

    def changed(self, name: str) -> None:
        """Queue `name` changed: its parked requests get another look."""
        self._changed.append(name)

    def _wake(self) -> None:
        """Answer the parked requests of changed queues that can be answered now, in order;
        wake the outbox's sender (pype.shards.shard) if dead letters wait."""
        if self.store.outbox:
            self.outbox_filled.notify_all()
        while self._changed:
            name = self._changed.pop()
            waiting = self._parked.get(name)
            if not waiting:
                continue
            still = [parked for parked in waiting if not parked.done and not parked.poll(self, False)]
            if still:
                self._parked[name] = still
            else:
                del self._parked[name]

    def expire(self, now: float) -> None:
        """Let in the delayed pushes that fell due, and answer the parked requests whose
        deadline is `now` or earlier (lock held)."""
        if type(self.replication) is not BackupLog:  # a backup never reads the clock
            for name in self.store.fall_due(index=self.index):
                self.changed(name)
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            parked = heapq.heappop(deadlines)[2]
            if not parked.done:
                parked.poll(self, True)
                for name in parked.names:  # _wake() also drops it from its queues' lists
                    self.changed(name)
        self._wake()

    def _check_lost(self, caller_id: str, names) -> None:
        """Raise ShardLostError if `caller_id` has not been told that a queue of `names` was lost."""
        if not self._lost:
            return
        for name in names:
            told = self._lost.get(name)
            if told is not None and caller_id not in told:
                told.add(caller_id)
                raise ShardLostError(
                    f"queue {name!r} lost its items: shard {self.index} restarted without "
                    f"persistence. This call was not applied; the next one works on the new, "
                    f"empty queue")

    def _refuse_heads(self, caller_id: str, names, partitions: int = 1, create: bool = False,
                      push: bool = False) -> None:
        """Raise Partitioned if a queue of `names` is the head of a partitioned queue (of
        other than `partitions` partitions): the caller must use its partitions. The head
        pins each producer (a caller that pushes) to a partition, round robin, so that
        producers spread."""
        for name in names:
            options = self.store.partitions(name, create)
            if options is None or options.partitions == partitions:
                continue
            pin = self.store.pin(name, caller_id, push)
            raise Partitioned(name, options.partitions, options, pin)

    def _deadline(self, timeout: float | None) -> float | None:
        return None if timeout is None else self.clock() + timeout

    # -- handlers: (caller id, request, may_wait) -> answer or PARKED -------------------------

    def _push(self, caller_id, request: Push, may_wait: bool):
        again = self.store.answer_again(request.producer, len(request.items) * len(request.queues))
        if again is not None:  # sent again after its reply was lost: the same answer
            return again
        try:
            self._check_lost(caller_id, request.queues)
            self._refuse_heads(request.on_behalf or caller_id, request.queues,
                               create=not request.must_exist, push=True)
            if request.must_exist:
                self.store.require(request.queues)
            result = self.store.push(request.queues, request.items, request.priority, request.block,
                                     request.timeout, request.producer, request.ttl, request.delay)
        except (PypeError, ValueError) as error:  # an answer, not a failure of the shard's own
            self.store.refuse(request.producer, error)
            raise
        finally:
            for name in request.queues:
                self.changed(name)
        if isinstance(result, PendingPush):
            result.request = request  # to send again to a new shard, should its queue move
            if may_wait:
                return self._await_push(caller_id, AwaitPush(result), True)
        return result

    def _push_pull(self, caller_id, request: PushPull, may_wait: bool):
        if request.push.block:
            raise ValueError("the push of a push_pull never waits for room (block=True does not apply)")
        self._push(caller_id, request.push, False)  # its error is the answer: nothing else ran
        try:
            pulled = self._pull(caller_id, request.pull, may_wait)
        except Exception as error:  # noqa: BLE001 - the push stays applied: say so
            raise PullFailed(error) from None
        if type(pulled) is _ParkedPull:
            pulled.after_push = True
        return pulled

    def _await_push(self, caller_id, request: AwaitPush, may_wait: bool):
        outcome = self.store.push_outcome(request.pending, self.clock())
        return _ParkedPush(request.pending) if outcome is None else outcome

    def _pull(self, caller_id, request: Pull, may_wait: bool):
        name = request.queue
        self._check_lost(caller_id, (name,))
        self._refuse_heads(caller_id, (name,), create=not request.must_exist)
        if request.must_exist:
            self.store.require((name,))
        options = self.store.options(name)
        is_batch = options.kind == "batch"
        size = options.pull_size if request.batch_size is None else request.batch_size
        block = is_batch if request.block is None else request.block
        timeout = options.batch_timeout if is_batch and request.timeout is None else request.timeout
        if may_wait and block and not self.store.pull_ready(name, size):
            if request.exactly:
                raise ValueError("exactly applies to pulls that do not wait (block=False)")
            return _ParkedPull(self._deadline(timeout), name, size, request.remove, request.ack,
                             request.must_exist)
        if request.exactly and self.store.length(name) < size:
            return []
        items = self.store.pull(name, size, request.remove, request.ack)
        if items:
            self.changed(name)
        return items

    def _settle(self, caller_id, request: Settle, may_wait: bool):
        self._refuse_heads(caller_id, (request.queue,))
        try:
            return self.store.settle(request.queue, request.lease_ids, request.outcome,
                                     request.delay)
        finally:
            self.changed(request.queue)

    def _move(self, caller_id, request: Move, may_wait: bool) -> int:
        self._refuse_heads(caller_id, (request.queue,))
        destination = request.destination
        here = (request.here and self.store.belongs_elsewhere(destination, self.index) is None
                and not self.store.on_its_way(destination, self.index)  # it comes as it is
                and self.store.partitions(destination) is None)  # a head: its partitions take them
        try:
            return self.store.move(request.queue, request.destination, request.count, here)
        finally:
            self.changed(request.queue)
            self.changed(request.destination)

    def _dead_letters(self, caller_id, request: DeadLetters, may_wait: bool) -> list:
        self._refuse_heads(caller_id, (request.queue,))
        return self.store.dead_letters(request.queue, request.batch_size)

    def _wait_limit(self, wait: float | None) -> float | None:
        """Seconds a condition may wait: None is the shard's poll_wait, math.inf no limit."""
        if wait is None:
            return self._poll_wait
        return None if wait == math.inf else wait

    def _can_pull(self, caller_id, request: CanPull, may_wait: bool):
        self._refuse_heads(caller_id, (request.queue,), create=True)
        condition = lambda: self.store.can_pull(request.queue, request.batch_size)
        return self._condition(request.queue, condition, request.wait, may_wait)

    def _can_push(self, caller_id, request: CanPush, may_wait: bool):
        self._refuse_heads(caller_id, (request.queue,))
        condition = lambda: self.store.can_push(request.queue)
        return self._condition(request.queue, condition, request.wait, may_wait)

    def _condition(self, name, condition, wait, may_wait):
        if condition():
            return True
        wait = self._wait_limit(wait)
        if not may_wait or wait == 0:
            return False
        return _ParkedCondition(name, self._deadline(wait), condition)

    def _add(self, caller_id, request: Add, may_wait: bool):
        created = self.store.add(request.queue, request.options, request.exist_ok)
        self._lost.pop(request.queue, None)
        partitions = request.options.partitions
        if created and partitions > 1:  # what waits on the name must go to the partitions
            moved = Partitioned(request.queue, partitions, request.options, 0)
            for parked in self._parked.pop(request.queue, ()):
                if not parked.done:
                    parked.finish(protocol.ERROR, moved)
        return created

    def _remove(self, caller_id, request: Remove, may_wait: bool):
        self._refuse_heads(caller_id, (request.queue,), request.partitions)
        try:
            removed = self.store.remove(request.queue)
        finally:
            self.changed(request.queue)  # its parked pushes end with QueueNotFoundError
        # So do blocking pulls that need the queue to exist (a plain one waits on: a
        # push makes the queue again).
        gone = QueueNotFoundError(f"queue {request.queue!r} was removed while this pull waited")
        for parked in self._parked.get(request.queue, ()):
            if isinstance(parked, _ParkedPull) and parked.must_exist and not parked.done:
                parked.finish(protocol.ERROR, gone)
        return removed

    def _length(self, caller_id, request: Length, may_wait: bool) -> int:
        self._refuse_heads(caller_id, (request.queue,))
        if request.must_exist:
            self.store.require((request.queue,))
        return self.store.length(request.queue)

    def _render(self, caller_id, request: Render, may_wait: bool) -> str:
        self._refuse_heads(caller_id, (request.queue,))
        text = self.store.render(request.queue)
        if request.show:
            print(text, flush=True)  # the seed's debugging habit: Ray shows it in the driver
        return text

    def _stats(self, caller_id, request: Stats, may_wait: bool) -> dict:
        return self.stats()

    # -- moving queues (the router's resize) ---------------------------------------------

    def _expect(self, caller_id, request: Expect, may_wait: bool) -> None:
        self.store.expect(request.shards, request.seed)

    def _export(self, caller_id, request: Export, may_wait: bool) -> dict:
        exported = self.store.export(self.index, request.shards, request.seed, request.epoch)
        for name in exported:  # what waits here for these queues must go there
            moved = Moved(name, request.epoch)
            for parked in self._parked.get(name, ()):
                if not parked.done and not isinstance(parked, _ParkedPush):
                    parked.finish(protocol.ERROR, moved)
            self.changed(name)  # parked pushes: push_outcome raises Moved
        return exported

    def _import(self, caller_id, request: Import, may_wait: bool) -> None:
        self.store.import_(request.queues)

    def _release(self, caller_id, request: Release, may_wait: bool) -> None:
        self.store.release(self.index)

    def _arrived(self, caller_id, request: Arrived, may_wait: bool) -> None:
        self.store.arrived()
        held, self._held = self._held, []
        for request_, caller, may_wait_, reply in held:  # in the order they came
            self.dispatch(request_, caller, 0, may_wait_, reply)
