"""Replicating a shard's log: its primary, its backups, and who may take over.

A protocol with no I/O (as h11 is): no Ray, no sockets, no threads and no clock.
The shard feeds it what happened and sends what it says to send; the router keeps
the ReplicaSet. Kafka's replication, with its rules kept whole (its data losses in
Jepsen's tests came from bending them):

- Every change a shard makes is one record of pype.shards.records, at a position:
  1, 2, 3, ... across the life of the shard, whoever is primary. The primary
  appends (PrimaryLog.append), backups apply the records in order
  (BackupLog.accept) to a store of their own and never read the clock: a lease's
  deadline, for one, is in its record.
- A record is committed when every member of the in-sync set holds it. A reply
  that depends on a change is held until its position is committed
  (PrimaryLog.hold, released by PrimaryLog.acknowledged): what a caller sees as
  acknowledged survives while one in-sync replica lives.
- The in-sync set changes only through the router (ReplicaSet.shrunk and grown,
  compare-and-sets on its version, and restarted), recorded durably before the
  primary acts on it. It is always true: a backup that restarted without its
  records leaves it at once. Below min_insync members nothing is committed, and the
  primary refuses changes (NotEnoughReplicasError) rather than go on alone.
- Only a member of the recorded in-sync set is promoted (ReplicaSet.promoted), in a
  new leader epoch. Every message carries the epoch: a replica of an older one is
  fenced (StaleEpochError) and can acknowledge nothing.
- A new primary's first record is records.Lead(epoch). Each replica's log therefore knows
  the epoch in which each of its records was written (EpochHistory), and a backup
  that rejoins keeps only what agrees with the primary's history (Kafka's
  leader-epoch truncation, KIP-101). Records cannot be taken back out of a store,
  so a backup whose log went further than the primary's in some epoch loads a
  snapshot of the primary instead, as one does that fell too far behind.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Protocol

from pype.errors import StaleEpochError
from pype.shards.records import Record

# -- the router's record of a shard's replicas --------------------------------------------

@dataclass(frozen=True)
class ReplicaSet:
    """Who holds a shard, who serves it, and who is in sync: what the router records,
    durably, before anyone acts on a change of it.

    The in-sync set is always true: its members hold every committed record. So it may
    be smaller than min_insync (a backup restarted without its records, or stopped
    answering); then nothing more is committed, and the primary refuses changes, until
    a backup caught up and was grown back. `version` grows with every change: shrunk()
    and grown() name the version they were asked on, and one asked on another version
    changes nothing (compare-and-set: a late or repeated request never undoes a newer
    change).
    """

    members: tuple[str, ...]     # replica ids, the primary among them
    primary: str
    in_sync: frozenset[str]      # members that hold every committed record; has the primary
    min_insync: int
    epoch: int = 1               # the leader epoch: grows at every promotion
    version: int = 0

    def __post_init__(self):
        if self.primary not in self.in_sync or not self.in_sync <= set(self.members):
            raise ValueError(f"the in-sync set {sorted(self.in_sync)} must hold the primary "
                             f"{self.primary!r} and only members of {list(self.members)}")
        if not 1 <= self.min_insync <= len(self.members):
            raise ValueError(f"min_insync must be between 1 and the {len(self.members)} "
                             f"replicas, got {self.min_insync}")

    @classmethod
    def start(cls, members: Iterable[str], min_insync: int, epoch: int = 1) -> ReplicaSet:
        """A new shard: the first member is primary, all are in sync (all are empty).
        `epoch` must be above the last epoch of every member's log (a named server
        started again over its journals): an epoch is never reused."""
        members = tuple(members)
        return cls(members, members[0], frozenset(members), min_insync, epoch)

    @property
    def can_commit(self) -> bool:
        """Are there min_insync members in sync, so that a change may be acknowledged?"""
        return len(self.in_sync) >= self.min_insync

    def shrunk(self, epoch: int, version: int, replica: str) -> ReplicaSet:
        """Without backup `replica` in the in-sync set, as the primary of `epoch` asked on
        `version` (another version: unchanged), in a new version. Raises StaleEpochError
        if `epoch` is over (a fenced primary asks)."""
        self._check_epoch(epoch)
        if replica == self.primary:
            raise ValueError("the primary cannot leave the in-sync set; promote another")
        if version != self.version:
            return self
        # Also for a replica out of sync: the new version fails any request to grow it
        # that is still on its way (asked on this version), so its primary may stop
        # counting it as joining.
        return replace(self, in_sync=self.in_sync - {replica}, version=self.version + 1)

    def grown(self, epoch: int, version: int, replica: str) -> ReplicaSet:
        """With `replica`, which caught up with the primary of `epoch`, back in sync, as
        asked on `version` (another version: unchanged)."""
        self._check_epoch(epoch)
        if replica not in self.members:
            raise ValueError(f"{replica!r} is not a replica of this shard")
        if version != self.version or replica in self.in_sync:
            return self
        return replace(self, in_sync=self.in_sync | {replica}, version=self.version + 1)

    def promoted(self, candidate: str) -> ReplicaSet:
        """`candidate`, a member of the in-sync set, as primary of the next epoch; the old
        primary (dead, or cut off) leaves the in-sync set unless it is the candidate (a
        primary whose process restarted with every record it held). Never an unclean
        election: a replica out of sync may lack acknowledged records."""
        if candidate not in self.in_sync:
            raise StaleEpochError(
                f"replica {candidate} is not in the in-sync set {sorted(self.in_sync)}: it may "
                f"lack acknowledged records, so it is never promoted")
        in_sync = self.in_sync if candidate == self.primary else self.in_sync - {self.primary}
        return replace(self, primary=candidate, in_sync=in_sync, epoch=self.epoch + 1,
                       version=self.version + 1)

    def restarted(self, replica: str) -> ReplicaSet:
        """Backup `replica` started again without every record it had acknowledged (no
        persistence, or fsync other than "always"): it leaves the in-sync set before it
        answers anything. A primary that did so is replaced by promoted() instead."""
        if replica == self.primary:
            raise ValueError("a primary that lost records is replaced: promote another")
        if replica not in self.in_sync:
            return self
        return replace(self, in_sync=self.in_sync - {replica}, version=self.version + 1)

    def replaced(self, gone: str, new: str) -> ReplicaSet:
        """With replica `new` (empty, out of sync) in the place of `gone`, a backup lost
        with its node and outside the in-sync set."""
        if gone == self.primary or gone in self.in_sync:
            raise ValueError(f"replica {gone} is {'the primary' if gone == self.primary else 'in sync'}"
                             f"; only an out-of-sync backup is replaced")
        members = tuple(new if member == gone else member for member in self.members)
        return replace(self, members=members, version=self.version + 1)

    @property
    def backups(self) -> tuple[str, ...]:
        return tuple(member for member in self.members if member != self.primary)

    def _check_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            raise StaleEpochError(f"leader epoch {epoch} is over; the shard is in epoch {self.epoch}")


# -- which epoch wrote which records ------------------------------------------------------

@dataclass
class EpochHistory:
    """The first position of each leader epoch in a log, oldest first (Kafka's
    leader-epoch checkpoint): what two logs that agree up to some position share."""

    starts: list[tuple[int, int]] = field(default_factory=list)  # (epoch, first position)

    def begin(self, epoch: int, position: int) -> None:
        """Epoch `epoch` writes from `position` on (the position of its Lead record)."""
        if self.starts and epoch <= self.starts[-1][0]:
            raise StaleEpochError(f"epoch {epoch} after epoch {self.starts[-1][0]}")
        self.starts.append((epoch, position))

    @property
    def last_epoch(self) -> int:
        return self.starts[-1][0] if self.starts else 0

    def end_of(self, epoch: int, log_end: int) -> int | None:
        """The last position this log holds of `epoch`'s records (`log_end`: its last
        position); None if `epoch` wrote nothing to it."""
        epochs = [e for e, _ in self.starts]
        index = bisect.bisect_left(epochs, epoch)
        if index == len(epochs) or epochs[index] != epoch:
            return None
        return self.starts[index + 1][1] - 1 if index + 1 < len(epochs) else log_end

    def copy(self) -> EpochHistory:
        return EpochHistory(list(self.starts))


# -- messages ---------------------------------------------------------------------------

class Batch(NamedTuple):
    """Records `first`, first + 1, ... of the primary of `epoch`; `committed`: the
    primary's committed position. An empty one asks the backup where its log ends.
    `sequence` numbers the primary's messages: an answer names the one it answers."""

    epoch: int
    sequence: int
    first: int
    records: list
    committed: int


class Snapshot(NamedTuple):
    """The primary's whole state (Log.snapshot) at `position`, for a backup that
    cannot catch up from the log: too far behind, or past the primary's log in an
    older epoch."""

    epoch: int
    sequence: int
    position: int
    state: bytes
    committed: int


class Position(NamedTuple):
    """A backup's answer to message `sequence`: it holds every record up to `end`, the
    last one written in leader epoch `last_epoch`, and follows leader epoch `epoch`.
    To the router also: whether it `leads` epoch `epoch`, and whether it `restarted`
    without every record it acknowledged (its process started again without a journal
    that kept every write, and the router has neither recorded it out of the in-sync
    set since nor made it lead)."""

    epoch: int
    sequence: int
    end: int
    last_epoch: int
    leads: bool = False
    restarted: bool = False


class Log(Protocol):
    """A replica's log and the state it makes: pype.shards.store.QueueStore."""

    position: int          # the position of its last record
    history: EpochHistory  # which epoch wrote which of its records

    def snapshot(self) -> bytes: ...
    def apply_replicated(self, batch: list) -> None: ...
    def load_snapshot(self, snapshot: bytes) -> None: ...


# -- the primary ---------------------------------------------------------------------------

class PrimaryLog:
    """The primary's side: what each backup still needs, and when a record is committed.

    One thread calls it (the shard's engine holds its lock). Each backup has at most
    one message in flight: send_to(backup) says what to send next (None while one is
    in flight or the backup has everything), acknowledged(backup, answer) takes its
    answer, and lost(backup) says that the connection broke (the next message asks the
    backup where its log ends: it may have restarted). A backup's first message is an
    empty Batch, a probe: only its answer says which of its records agree with this log.

    A record is committed once every member of the in-sync set (and every backup that
    is joining it) holds it, and only while they are min_insync or more. The primary
    is one of them: with synced_apart, its own log holds a record once synced(its
    position) says so (its journal syncs beside the backups'), else once appended.
    """

    def __init__(self, replicas: ReplicaSet, me: str, log: Log, committed: int = 0,
                 max_tail: int = 100_000, synced_apart: bool = False):
        if replicas.primary != me:
            raise StaleEpochError(f"replica {me} is not the primary of epoch {replicas.epoch}")
        self.replicas = replicas
        self.me = me
        self.log = log
        self.max_tail = max_tail
        self.committed = min(committed, log.position)  # held by the whole in-sync set
        self._last = log.position           # the position of the last record appended
        self._tail: deque = deque()         # (position, record, item bytes through it) not yet held by all
        self._bytes = 0                     # item bytes of the records appended, in all
        self._next: dict[str, int | None] = {}  # backup -> next position it needs; None: a snapshot
        self._in_flight: dict[str, int] = {}    # backup -> sequence of its unanswered message
        self._sequences = itertools.count(1)
        self._held: dict[str, int] = {}     # backup -> last position it holds, as it answered
        self._waiting: deque = deque()      # (position, release, fail) of replies held
        # backup -> version of the set the router was asked to add it to (None: not yet)
        self._joining: dict[str, int | None] = {}
        self._sent_end: dict[str, int] = {}  # backup -> the log's end when its last message left
        # What the primary's own journal has synced, where that is apart from writing
        # (None: each record as appended). Not the log's end: it may hold records that
        # only the backups synced (a primary of an earlier epoch).
        self._synced: int | None = self.committed if synced_apart else None
        self._commit()

    @property
    def epoch(self) -> int:
        return self.replicas.epoch

    @property
    def end(self) -> int:
        """The position of the log's last record."""
        return self.log.position

    @property
    def can_commit(self) -> bool:
        """May a change be acknowledged at all (min_insync members recorded in sync)? The
        engine refuses changes while not (NotEnoughReplicasError), before it applies
        them. A joining backup does not count: until the router recorded it, it could
        never be promoted, so what only it holds besides the primary could be lost."""
        return len(self.replicas.in_sync) >= self.replicas.min_insync

    def append(self, position: int, record: Record) -> None:
        """The log took `record` at `position`, the next one: keep it for the backups."""
        if position != self._last + 1:
            raise ValueError(f"record at position {position} after position {self._last}")
        self._last = position
        self._bytes += getattr(record, "nbytes", 0)
        self._tail.append((position, record, self._bytes))
        self._commit_alone()

    @property
    def unsynced(self) -> bool:
        """Has the log records that the primary's own journal has not synced yet?"""
        return self._synced is not None and self._synced < self.end

    def synced(self, position: int) -> list[Callable[[], None]]:
        """The primary's own journal synced every record through `position`: return the
        callbacks of the held replies this releases."""
        if self._synced is None or position <= self._synced:
            return []
        self._synced = min(position, self.end)
        return self._commit()

    def hold(self, position: int, release: Callable[[], None], fail: Callable[[], None]) -> None:
        """Call release() once `position` is committed: now, or later, as one of the
        callbacks acknowledged() and change_replicas() return; fail() if this replica
        stops being primary first (abandon())."""
        if position <= self.committed:
            release()
        else:
            self._waiting.append((position, release, fail))

    def send_to(self, backup: str) -> Batch | Snapshot | None:
        """The next message for `backup`, or None while one is in flight or it has every
        record."""
        if backup in self._in_flight:
            return None
        sequence = next(self._sequences)
        if backup not in self._next:  # where is it? a probe
            message = Batch(self.epoch, sequence, self.end + 1, [], self.committed)
        else:
            first = self._next[backup]
            oldest = self._tail[0][0] if self._tail else self.end + 1
            if first is None or first < oldest:  # what it needs is no longer kept here
                message = Snapshot(self.epoch, sequence, self.end, self.log.snapshot(),
                                   self.committed)
            elif first > self.end:
                return None
            else:
                records = [record for _, record, _ in itertools.islice(
                    self._tail, first - oldest, None)]
                message = Batch(self.epoch, sequence, first, records, self.committed)
        self._in_flight[backup] = sequence
        self._sent_end[backup] = self.end
        return message

    def acknowledged(self, backup: str, answer: Position) -> list[Callable[[], None]]:
        """`backup` answered; return the callbacks of the held replies this releases.

        An answer to another message than the one in flight (late, repeated) is passed
        over. A backup whose log went past this one in some epoch is sent a snapshot
        next. Raises StaleEpochError if the backup follows a newer epoch than this
        primary's, or holds records of one: this primary is fenced.
        """
        if max(answer.epoch, answer.last_epoch) > self.epoch:
            raise StaleEpochError(f"a backup follows leader epoch {answer.epoch}, past this "
                                  f"primary's {self.epoch}: another replica was promoted")
        if self._in_flight.get(backup) != answer.sequence:
            return []
        del self._in_flight[backup]
        agreed = self._agreed_end(answer)
        if agreed is None:
            self._next[backup] = None
            self._held.pop(backup, None)
            return []
        self._next[backup] = agreed + 1
        self._held[backup] = agreed  # also lower than before: it restarted with less
        return self._commit()

    def lost(self, backup: str) -> None:
        """The connection to `backup` broke: what was in flight may or may not be there,
        and the backup may come back with less than it held."""
        self._in_flight.pop(backup, None)
        self._next.pop(backup, None)
        self._held.pop(backup, None)
        if backup in self._joining and self._joining[backup] is None:  # the router never heard
            del self._joining[backup]
        self._sent_end.pop(backup, None)

    def caught_up(self, backup: str) -> bool:
        """Does `backup` hold every committed record (so the router may record it in
        sync)? Under steady load one that is not joining never is: commits go on
        without it. So it joins first (may_join), and commits wait for it."""
        return self._held.get(backup, -1) >= self.committed

    def may_join(self, backup: str) -> bool:
        """Is `backup` one message behind at most: did it hold the whole log as it was
        when its last message was sent?"""
        return backup in self._held and self._held[backup] >= self._sent_end.get(backup, 0)

    def held(self, backup: str) -> int:
        """The last position `backup` holds, as far as this primary knows."""
        return self._held.get(backup, 0)

    def lag_bytes(self, backup: str) -> int:
        """The item bytes of the records `backup` lacks, as far as this primary knows (the
        bytes of the records still kept, if it lacks older ones too: a snapshot's worth)."""
        if not self._tail:
            return 0
        oldest = self._tail[0][0]
        held = self.held(backup)
        if held < oldest:  # it lacks the whole tail
            _, record, through = self._tail[0]
            return self._bytes - through + getattr(record, "nbytes", 0)
        if held - oldest >= len(self._tail):
            return 0
        return self._bytes - self._tail[held - oldest][2]

    def behind(self) -> list[str]:
        """In-sync backups that do not hold every committed record (they restarted with
        less): the router must shrink them out of the in-sync set."""
        return [member for member in self.replicas.in_sync if member != self.me
                and member in self._held and self._held[member] < self.committed]

    def joining(self, backup: str) -> None:
        """`backup` (may_join) is to join the in-sync set: from now on commits wait for it
        as well, as if it were in the set, and once it is caught_up the primary asks the
        router to record it. Once recorded, a promotion may pick it, also before the
        router's answer reaches the primary (Kafka's "maximal ISR")."""
        if not self.may_join(backup):
            raise ValueError(f"backup {backup} has not caught up: it cannot join the in-sync set")
        self._joining.setdefault(backup, None)

    def ask_to_join(self, backup: str) -> int:
        """The primary asks the router now to add `backup`, joining and caught_up, to the
        in-sync set: return the version of the set to ask on."""
        if self._joining.get(backup, 0) is not None or not self.caught_up(backup):
            raise ValueError(f"backup {backup} is not joining, or has not caught up")
        self._joining[backup] = self.replicas.version
        return self.replicas.version

    def asked_to_join(self, backup: str) -> bool:
        return self._joining.get(backup) is not None

    def change_replicas(self, replicas: ReplicaSet) -> list[Callable[[], None]]:
        """The router answered with `replicas` (it recorded a change, or refused one and
        says what it has): take it unless it is older than the set held, and return the
        callbacks of the held replies this releases."""
        if replicas.epoch != self.epoch or replicas.primary != self.me:
            raise StaleEpochError(f"replica {self.me} is no longer primary (epoch "
                                  f"{replicas.epoch}, primary {replicas.primary})")
        if replicas.version < self.replicas.version:
            return []
        self.replicas = replicas
        self._joining = {backup: asked for backup, asked in self._joining.items()
                         if backup not in replicas.in_sync and  # else answered: not recorded
                         (asked is None or asked >= replicas.version)}
        return self._commit()

    def abandon(self) -> list[Callable[[], None]]:
        """This replica is primary no more: the replies it holds can never be released as
        acknowledged. Return their fail() callbacks (answer NotPrimaryError: their
        changes may or may not be in the new primary)."""
        waiting, self._waiting = self._waiting, deque()
        return [fail for _, _, fail in waiting]

    def _agreed_end(self, answer: Position) -> int | None:
        """The last position where the backup's log and this one agree; None when its
        log holds records this one does not (it must load a snapshot)."""
        if answer.end == 0:
            return 0
        if answer.end > self.end:
            return None
        history = self.log.history
        if answer.last_epoch == 0:  # a log that no primary opened with a Lead record
            return answer.end if not history.starts else None
        end_of_its_epoch = history.end_of(answer.last_epoch, self.end)
        if end_of_its_epoch is None or answer.end > end_of_its_epoch:
            return None  # it holds records of that epoch that this log does not
        return answer.end

    @property
    def _own_end(self) -> int:
        """The last position the primary's own log holds (synced, where that waits)."""
        return self.end if self._synced is None else self._synced

    def _commit_alone(self) -> None:
        if len(self.replicas.in_sync) == 1 and not self._joining and self.can_commit:
            self.committed = max(self.committed, self._own_end)

    def _commit(self) -> list[Callable[[], None]]:
        if self.can_commit:
            members = self.replicas.in_sync | set(self._joining)
            held = [self._held.get(member, 0) for member in members if member != self.me]
            self.committed = max(self.committed, min([self._own_end, *held]))
        everyone = min([self.committed] + [self._held.get(member, 0)
                                          for member in self.replicas.backups])
        while self._tail and (self._tail[0][0] <= everyone or len(self._tail) > self.max_tail):
            self._tail.popleft()
        released = []
        while self._waiting and self._waiting[0][0] <= self.committed:
            released.append(self._waiting.popleft()[1])
        return released


# -- a backup -------------------------------------------------------------------------

class BackupLog:
    """A backup's side: takes the primary's batches in order, or a snapshot, into `log`.

    It follows the newest leader epoch it has heard of, and never one older than the
    last that wrote to its log (also after a restart). The first message of a newer
    epoch changes nothing: the answer to it tells the new primary where this log
    ends, and the primary decides what of it may stay. Within an epoch, a message
    older than one already taken (late, repeated) changes nothing.
    """

    def __init__(self, log: Log, epoch: int = 0, diverged: bool = False):
        self.log = log
        self.epoch = max(epoch, log.history.last_epoch)  # the newest epoch it follows
        self.committed = 0  # the primary's committed position, as far as this log holds
        self._sequence = 0  # the newest message of this epoch's primary taken
        # A primary that stepped down may hold records, and requests it answered alone,
        # that no other replica has: it takes nothing but a snapshot until it had one.
        self.diverged = diverged

    def position(self, sequence: int = 0) -> Position:
        last_epoch = 0 if self.diverged else self.log.history.last_epoch  # 0: "send a snapshot"
        return Position(self.epoch, sequence, self.log.position, last_epoch)

    def accept(self, message: Batch | Snapshot) -> Position:
        """Apply a Batch that continues this log, or load a Snapshot; return where the
        log now ends. A batch that does not continue it changes nothing: the answer
        tells the primary where to resume. Raises StaleEpochError for a message of an
        epoch older than one this backup follows: its sender is fenced."""
        if message.epoch < self.epoch:
            raise StaleEpochError(f"a message of leader epoch {message.epoch}; this backup "
                                  f"follows epoch {self.epoch}")
        if message.epoch > self.epoch:  # a new primary: it decides what of this log stays
            self.epoch, self._sequence = message.epoch, message.sequence
            return self.position(message.sequence)
        if message.sequence <= self._sequence:
            return self.position(message.sequence)
        self._sequence = message.sequence
        if type(message) is Snapshot:
            self.log.load_snapshot(message.state)
            self.committed = min(message.committed, self.log.position)
            self.diverged = False
        elif self.diverged:
            pass  # its answer asks for a snapshot
        else:
            if message.first == self.log.position + 1 and message.records:
                self.log.apply_replicated(message.records)
            self.committed = max(self.committed, min(message.committed, self.log.position))
        return self.position(message.sequence)
