"""The replication protocol alone (pype.shards.replication): real QueueStores, no Ray.

Unit tests for each rule, then a hypothesis state machine of a replica set that
accepts pushes and pulls, replicates, loses messages, nodes and the primary,
promotes, and lets a primary that was cut off (a "zombie") go on serving, checked
against what its clients were told: no acknowledged push lost, no item delivered
twice, every in-sync backup a copy of the primary.
"""

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pype.errors import NotEnoughReplicasError, StaleEpochError
from pype.options import QueueOptions
from pype.shards.journal import Journal
from pype.shards.replication import (
    BackupLog,
    Batch,
    EpochHistory,
    Position,
    PrimaryLog,
    ReplicaSet,
    Snapshot,
)
from pype.shards.store import QueueStore

Q = ("q",)


def contents(store: QueueStore) -> list:
    return store.pull("q", -1, remove=False)


class TracedStore(QueueStore):
    """A QueueStore that keeps its log's records in order (`trace`), the very objects the
    primary made: the state machine compares logs record by record. Its snapshots
    carry the trace along."""

    def __init__(self):
        super().__init__(QueueOptions())
        self.trace = []

    def _log(self, record):
        self.trace.append(record)
        super()._log(record)

    def apply_replicated(self, batch):
        self.trace.extend(batch)
        super().apply_replicated(batch)

    def snapshot(self):
        return super().snapshot(), list(self.trace)

    def load_snapshot(self, snapshot):
        state, self.trace = snapshot
        super().load_snapshot(state)


class Pair:
    """A primary and one backup, wired by hand: the test says when messages travel."""

    def __init__(self, members=("a", "b"), min_insync=1, max_tail=100_000):
        self.replicas = ReplicaSet.start(members, min_insync)
        self.stores = {member: QueueStore(QueueOptions()) for member in members}
        self.primary = self.stores[members[0]]
        self.log = PrimaryLog(self.replicas, members[0], self.primary, max_tail=max_tail)
        self.primary.replicate = self.log.append
        self.primary.lead(1, members[0])
        self.backups = {member: BackupLog(self.stores[member]) for member in members[1:]}

    def exchange(self, backup="b"):
        """Send `backup` what it needs and bring back its answer; the replies released."""
        message = self.log.send_to(backup)
        if message is None:
            return []
        return self.log.acknowledged(backup, self.backups[backup].accept(message))

    def sync(self, backup="b"):
        """Exchange until `backup` has every record; the replies released."""
        released = []
        while (message := self.log.send_to(backup)) is not None:
            released += self.log.acknowledged(backup, self.backups[backup].accept(message))
        return released


def test_a_reply_is_held_until_every_in_sync_backup_holds_its_record():
    pair = Pair()
    answered = []
    pair.primary.push(Q, ["x"])
    assert not pair.log.hold(pair.primary.position, lambda: answered.append("x"))
    assert pair.exchange() == []  # the probe: where does the backup's log end?
    assert answered == []
    for release in pair.exchange():
        release()
    assert answered == ["x"]
    assert contents(pair.stores["b"]) == ["x"]


def test_with_the_backup_out_of_the_in_sync_set_the_primary_commits_alone():
    pair = Pair()
    pair.replicas = pair.replicas.shrunk(1, "b")
    pair.log.change_replicas(pair.replicas)
    pair.primary.push(Q, ["x"])
    assert pair.log.hold(pair.primary.position, lambda: None)


def test_the_in_sync_set_never_shrinks_below_min_insync():
    replicas = ReplicaSet.start(["a", "b", "c"], min_insync=2)
    two = replicas.shrunk(1, "c")
    with pytest.raises(NotEnoughReplicasError, match="min_insync=2"):
        two.shrunk(1, "b")
    with pytest.raises(ValueError, match="primary cannot leave"):
        two.shrunk(1, "a")


def test_only_an_in_sync_replica_is_promoted_and_the_epoch_grows():
    replicas = ReplicaSet.start(["a", "b", "c"], min_insync=1).shrunk(1, "c")
    with pytest.raises(StaleEpochError, match="never promoted"):
        replicas.promoted("c")
    promoted = replicas.promoted("b")
    assert (promoted.primary, promoted.epoch, promoted.in_sync) == ("b", 2, frozenset({"b"}))


def test_promotion_keeps_the_old_primary_in_sync_rather_than_fall_below_min_insync():
    replicas = ReplicaSet.start(["a", "b", "c"], min_insync=2).shrunk(1, "c")
    promoted = replicas.promoted("b")
    assert promoted.in_sync == {"a", "b"}  # b commits nothing until c caught up or a is back


def test_a_stale_primary_is_fenced_by_the_router_and_by_its_backups():
    replicas = ReplicaSet.start(["a", "b", "c"], min_insync=1)
    newer = replicas.promoted("b")
    with pytest.raises(StaleEpochError):
        newer.shrunk(1, "c")  # the old primary, of epoch 1, asks
    backup = BackupLog(QueueStore(QueueOptions()), epoch=2)
    with pytest.raises(StaleEpochError, match="epoch 1"):
        backup.accept(Batch(1, 1, [], 0))


def test_bad_replica_sets_are_refused():
    with pytest.raises(ValueError, match="min_insync must be between 1 and the 2"):
        ReplicaSet.start(["a", "b"], min_insync=3)
    with pytest.raises(ValueError, match="must hold the primary"):
        ReplicaSet(("a", "b"), "a", frozenset({"b"}), 1)


def test_a_backup_that_missed_records_catches_up_from_the_log():
    pair = Pair()
    pair.exchange()
    pair.primary.push(Q, [1])
    pair.exchange()
    pair.log.send_to("b")  # this message is lost on the way
    pair.primary.push(Q, [2])
    pair.log.lost("b")
    pair.primary.push(Q, [3])
    pair.exchange()  # a probe: the backup says where it ends
    pair.exchange()
    assert contents(pair.stores["b"]) == [1, 2, 3]
    assert pair.log.caught_up("b")


def test_a_backup_too_far_behind_loads_a_snapshot():
    pair = Pair(max_tail=2)
    pair.replicas = pair.replicas.shrunk(1, "b")  # out of sync: the primary keeps 2 records
    pair.log.change_replicas(pair.replicas)
    for item in range(5):
        pair.primary.push(Q, [item])
    pair.primary.pull("q", 1)
    assert isinstance(pair.log.send_to("b"), Batch)  # the probe
    pair.log.acknowledged("b", pair.backups["b"].accept(Batch(1, 9, [], 0)))
    message = pair.log.send_to("b")
    assert isinstance(message, Snapshot)
    pair.log.acknowledged("b", pair.backups["b"].accept(message))
    assert contents(pair.stores["b"]) == [1, 2, 3, 4]
    assert pair.log.caught_up("b")


def test_a_backup_with_records_of_an_old_epoch_that_the_new_primary_lacks_loads_a_snapshot():
    """a (epoch 1) gave x to c but not to b; b is promoted (epoch 2) and takes y: c must
    not keep x, which no client was told of, and must not put y on top of it."""
    members = ("a", "b", "c")
    stores = {member: QueueStore(QueueOptions()) for member in members}
    replicas = ReplicaSet.start(members, 1)
    old = PrimaryLog(replicas, "a", stores["a"])
    stores["a"].replicate = old.append
    stores["a"].lead(1, "a")
    backups = {member: BackupLog(stores[member]) for member in ("b", "c")}
    for member in ("b", "c"):  # probe, then the Lead record
        old.acknowledged(member, backups[member].accept(old.send_to(member)))
        old.acknowledged(member, backups[member].accept(old.send_to(member)))
    stores["a"].push(Q, ["x"])
    backups["c"].accept(old.send_to("c"))  # only c gets x
    promoted = replicas.promoted("b")
    new = PrimaryLog(promoted, "b", stores["b"])
    stores["b"].replicate = new.append
    stores["b"].lead(2, "b")
    stores["b"].push(Q, ["y"])
    # c's log is shorter than b's: by position alone, c would take b's last record (y)
    # on top of x. By epochs, c's records after position 1 are not b's.
    assert stores["c"].position < stores["b"].position
    kinds = []
    while (message := new.send_to("c")) is not None:
        kinds.append(type(message).__name__)
        new.acknowledged("c", backups["c"].accept(message))
    assert kinds == ["Batch", "Snapshot"]  # the probe, then all of b
    assert contents(stores["c"]) == ["y"]
    with pytest.raises(StaleEpochError):
        backups["c"].accept(Batch(1, stores["c"].position + 1, [], 0))  # a is fenced


def test_a_backup_joining_the_in_sync_set_counts_before_the_router_answers():
    """If the router records b back in sync but its answer is lost, b may be promoted:
    the primary must not commit without b from the moment it asks."""
    pair = Pair(members=("a", "b", "c"))
    pair.replicas = pair.replicas.shrunk(1, "c")
    pair.log.change_replicas(pair.replicas)
    pair.sync("c")
    assert pair.log.caught_up("c")
    pair.log.joining("c")
    pair.replicas = pair.replicas.grown(1, "c")  # recorded; the answer does not arrive
    pair.primary.push(Q, ["x"])
    released = []
    pair.log.hold(pair.primary.position, lambda: released.append("x"))
    pair.sync("b")
    assert released == []  # b holds x, c does not: c could be promoted
    for release in pair.sync("c"):
        release()
    assert released == ["x"]


def test_a_backup_applies_nothing_from_the_first_message_of_a_newer_epoch():
    store = QueueStore(QueueOptions())
    backup = BackupLog(store, epoch=1)
    answer = backup.accept(Batch(2, 1, [("not", "a", "record")], 0))
    assert answer == Position(2, 0, 0) and store.position == 0


def test_epoch_history_says_where_each_epoch_ends():
    history = EpochHistory()
    history.begin(1, 1)
    history.begin(3, 10)
    assert history.end_of(1, 20) == 9
    assert history.end_of(3, 20) == 20
    assert history.end_of(2, 20) is None
    with pytest.raises(StaleEpochError):
        history.begin(2, 30)


def test_a_backup_journals_what_it_applies_and_restores_it(tmp_path):
    pair = Pair()
    backup_store = QueueStore(QueueOptions(), journal=Journal(tmp_path / "b"))
    backup_store.restore()  # opens the journal, as a starting shard does
    pair.backups["b"] = BackupLog(backup_store)
    pair.primary.push(Q, [1, 2])
    pair.primary.pull("q", 1, ack=True)
    pair.exchange()
    pair.exchange()
    backup_store.close()
    again = QueueStore(QueueOptions(), journal=Journal(tmp_path / "b"))
    again.restore()
    assert again.position == pair.primary.position
    assert again.history.starts == [(1, 1)]
    assert contents(again) == [2] and again.stats()["leased"] == 1
    assert BackupLog(again).position() == Position(0, pair.primary.position, 1)


# -- a replica set, against what its clients were told ----------------------------------

class ReplicaSetMachine(RuleBasedStateMachine):
    """Three replicas of one FIFO queue, min_insync 2 or 1, driven by hypothesis."""

    def __init__(self):
        super().__init__()
        self.next_item = 0
        self.next_replica = 3
        self.acked_pushes: set[int] = set()  # pushes whose callers were told "accepted"
        self.delivered: list[int] = []       # items of pulls whose callers got them
        self.taken: set[int] = set()         # items any pull took, told or not
        self.network: dict[str, list] = {}   # backup -> [(sender PrimaryLog, message)]
        self.zombie: PrimaryLog | None = None  # a primary cut off from the router

    @rule(min_insync=st.sampled_from([1, 2]))
    @precondition(lambda self: not hasattr(self, "router"))
    def start(self, min_insync):
        members = ("r0", "r1", "r2")
        self.router = ReplicaSet.start(members, min_insync)
        self.stores = {member: TracedStore() for member in members}
        self.alive = set(members)
        self._become_primary("r0", committed=0)
        self.backups = {member: BackupLog(self.stores[member]) for member in members[1:]}

    def _become_primary(self, member, committed):
        self.log = PrimaryLog(self.router, member, self.stores[member], committed=committed)
        self.stores[member].replicate = self.log.append
        self.stores[member].lead(self.router.epoch, member)

    def _serving(self):
        return [log for log in (self.log, self.zombie) if log is not None]

    # -- clients ---------------------------------------------------------------------

    @rule(to_zombie=st.booleans())
    @precondition(lambda self: hasattr(self, "router"))
    def push(self, to_zombie):
        log = self.zombie if to_zombie and self.zombie else self.log
        item, self.next_item = self.next_item, self.next_item + 1
        log.log.push(Q, [item])
        log.hold(log.log.position, lambda: self.acked_pushes.add(item))

    @rule(to_zombie=st.booleans())
    @precondition(lambda self: hasattr(self, "router"))
    def pull(self, to_zombie):
        log = self.zombie if to_zombie and self.zombie else self.log
        items = log.log.pull("q", 1)
        self.taken.update(items)
        if items:
            log.hold(log.log.position, lambda: self.delivered.extend(items))

    # -- the network --------------------------------------------------------------------

    @rule(data=st.data())
    @precondition(lambda self: hasattr(self, "router"))
    def send(self, data):
        log = data.draw(st.sampled_from(self._serving()))
        backup = data.draw(st.sampled_from([m for m in log.replicas.members if m != log.me]))
        message = log.send_to(backup)
        if message is not None:
            self.network.setdefault(backup, []).append((log, message))

    @rule(data=st.data())
    @precondition(lambda self: hasattr(self, "router") and any(self.network.values()))
    def deliver(self, data):
        backup = data.draw(st.sampled_from([b for b, queue in self.network.items() if queue]))
        sender, message = self.network[backup].pop(0)
        if backup not in self.alive or backup not in self.backups:
            sender.lost(backup)
            return
        if self.zombie is not None and backup == self.zombie.me and message.epoch > self.zombie.epoch:
            self._fence(self.zombie)  # it hears of the new primary: it serves no more
        try:
            answer = self.backups[backup].accept(message)
        except StaleEpochError:
            self._fence(sender)
            return
        try:
            released = sender.acknowledged(backup, answer)
        except StaleEpochError:
            self._fence(sender)
            return
        for release in released:
            release()

    @rule(data=st.data())
    @precondition(lambda self: hasattr(self, "router") and any(self.network.values()))
    def drop(self, data):
        backup = data.draw(st.sampled_from([b for b, queue in self.network.items() if queue]))
        sender, _ = self.network[backup].pop(0)
        sender.lost(backup)

    def _fence(self, log):
        log.abandon()  # its held replies are answered NotPrimaryError: nobody is told "done"
        if log is self.zombie:
            self.zombie = None

    # -- the router --------------------------------------------------------------------

    @rule(data=st.data())
    @precondition(lambda self: hasattr(self, "router"))
    def shrink(self, data):
        backup = data.draw(st.sampled_from(self.router.backups))
        try:
            self.router = self.router.shrunk(self.log.epoch, backup)
        except (NotEnoughReplicasError, StaleEpochError):
            return
        for release in self.log.change_replicas(self.router):
            release()

    @rule(data=st.data(), told=st.booleans())
    @precondition(lambda self: hasattr(self, "router"))
    def grow(self, data, told):
        backup = data.draw(st.sampled_from(self.router.backups))
        if backup in self.router.in_sync or not self.log.caught_up(backup):
            return
        self.log.joining(backup)
        self.router = self.router.grown(self.log.epoch, backup)
        if told:  # else the answer is lost: the primary keeps counting the backup in
            for release in self.log.change_replicas(self.router):
                release()

    @rule(data=st.data(), cut_off=st.booleans())
    @precondition(lambda self: hasattr(self, "router") and self.zombie is None)
    def promote(self, data, cut_off):
        """The router decides that the primary is dead: its node is gone, or (cut_off) it
        is alive but cut off from the router, and goes on serving until fenced."""
        candidates = sorted((self.router.in_sync - {self.log.me}) & self.alive)
        if not candidates:
            return
        old = self.log
        if cut_off:
            self.zombie = old
        else:
            self.alive.discard(old.me)
            self._fence(old)
        candidate = data.draw(st.sampled_from(candidates))
        committed = self.backups.pop(candidate).committed
        self.router = self.router.promoted(candidate)
        self._become_primary(candidate, committed)
        if cut_off:  # also a backup of the new epoch, once it hears of it
            self.backups[old.me] = BackupLog(self.stores[old.me], epoch=old.epoch)

    @rule(data=st.data())
    @precondition(lambda self: hasattr(self, "router"))
    def lose_backup_node(self, data):
        backup = data.draw(st.sampled_from(self.router.backups))
        if self.zombie is not None and backup == self.zombie.me:
            return
        self.alive.discard(backup)
        self.log.lost(backup)

    @rule()
    @precondition(lambda self: hasattr(self, "router"))
    def replace_lost_backup(self):
        gone = [b for b in self.router.backups if b not in self.alive and b not in self.router.in_sync]
        if not gone:
            return
        new = f"r{self.next_replica}"
        self.next_replica += 1
        self.router = self.router.replaced(gone[0], new)
        self.stores[new] = TracedStore()
        self.backups[new] = BackupLog(self.stores[new])
        self.alive.add(new)
        for release in self.log.change_replicas(self.router):
            release()

    # -- what the clients were told ------------------------------------------------------

    @invariant()
    def no_acknowledged_push_is_lost(self):
        if not hasattr(self, "router"):
            return
        held = set(contents(self.log.log))
        missing = self.acked_pushes - held - self.taken
        assert not missing, f"acknowledged pushes lost: {sorted(missing)}"

    @invariant()
    def backups_hold_what_the_primary_counts_on(self):
        """The first held(b) records of backup b are the primary's: what commits rest on."""
        if not hasattr(self, "router"):
            return
        for log in self._serving():
            for backup in log.replicas.backups:
                held = log.held(backup)
                theirs, ours = self.stores[backup].trace[:held], log.log.trace[:held]
                assert len(theirs) == held and all(a is b for a, b in zip(theirs, ours)), (
                    f"{backup} does not hold the first {held} records of {log.me}")

    @invariant()
    def no_item_is_delivered_twice(self):
        assert len(self.delivered) == len(set(self.delivered))

    @invariant()
    def the_primary_holds_each_item_once(self):
        if hasattr(self, "router"):
            items = contents(self.log.log)
            assert len(items) == len(set(items))

    def teardown(self):
        """Let the network settle with the live primary alone: every live in-sync backup
        then holds what the primary holds."""
        if not hasattr(self, "router"):
            return
        self.zombie = None
        self.network.clear()
        for backup in self.router.backups:
            self.log.lost(backup)
        for _ in range(4):
            for backup in self.router.backups:
                if backup not in self.alive:
                    continue
                message = self.log.send_to(backup)
                if message is not None:
                    for release in self.log.acknowledged(backup, self.backups[backup].accept(message)):
                        release()
        expected = contents(self.log.log)
        for backup in self.router.in_sync - {self.log.me}:
            if backup in self.alive:
                assert contents(self.stores[backup]) == expected, backup


ReplicaSetMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_a_replica_set_keeps_what_it_acknowledged = ReplicaSetMachine.TestCase
