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

from pype.errors import StaleEpochError
from pype.options import QueueOptions
from pype.shards import records
from pype.shards.journal import Journal
from pype.shards.queues import total_size
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
    """A primary and its backups, wired by hand: the test says when messages travel."""

    def __init__(self, members=("a", "b"), min_insync=1, max_tail=100_000, journal=None):
        """journal: the primary's (with fsync "always" it syncs apart, as a shard's does)."""
        self.replicas = ReplicaSet.start(members, min_insync)
        self.stores = {member: QueueStore(QueueOptions()) for member in members}
        if journal is not None:
            self.stores[members[0]] = QueueStore(QueueOptions(), journal=journal)
            self.stores[members[0]].restore()
        self.primary = self.stores[members[0]]
        self.log = PrimaryLog(self.replicas, members[0], self.primary, max_tail=max_tail,
                              synced_apart=self.primary.syncs_each_write)
        self.primary.replicate = self.log.append
        self.primary.lead(1, members[0])
        self.backups = {member: BackupLog(self.stores[member]) for member in members[1:]}
        self.acked = []

    def push(self, item):
        """Push `item`; it counts as acknowledged once its reply is released."""
        self.primary.push(Q, [item])
        self.log.hold(self.primary.position, lambda: self.acked.append(item), lambda: None)

    def exchange(self, backup="b"):
        """Send `backup` what it needs and bring back its answer; run the released replies."""
        message = self.log.send_to(backup)
        if message is not None:
            for release in self.log.acknowledged(backup, self.backups[backup].accept(message)):
                release()
        return message

    def sync(self, backup="b"):
        """Exchange until `backup` has every record."""
        while self.exchange(backup) is not None:
            pass

    def change(self, replicas):
        self.replicas = replicas
        for release in self.log.change_replicas(replicas):
            release()


def test_a_reply_is_held_until_every_in_sync_backup_holds_its_record():
    pair = Pair()
    pair.push("x")
    assert pair.acked == []
    pair.exchange()  # the probe: where does the backup's log end?
    assert pair.acked == []
    pair.exchange()
    assert pair.acked == ["x"]
    assert contents(pair.stores["b"]) == ["x"]


def synced(pair):
    """The primary's journal syncs what it wrote; run the released replies."""
    through = pair.primary.position
    pair.primary.sync()
    for release in pair.log.synced(through):
        release()


def test_a_primary_whose_journal_syncs_apart_holds_a_reply_until_its_own_sync(tmp_path):
    pair = Pair(journal=Journal(tmp_path / "a", fsync="always"))
    pair.push("x")
    pair.sync()
    assert pair.stores["b"].length("q") == 1
    assert pair.acked == [] and pair.log.unsynced  # the backup holds x; a's disk may not
    synced(pair)
    assert pair.acked == ["x"] and not pair.log.unsynced
    pair.push("y")
    synced(pair)
    assert pair.acked == ["x"]  # a's disk holds y; the backup does not yet
    pair.sync()
    assert pair.acked == ["x", "y"]
    assert [r.items for r in Journal(tmp_path / "a").load().records
            if type(r) is records.Push] == [["x"], ["y"]]


def test_alone_in_sync_a_primary_whose_journal_syncs_apart_waits_for_its_sync(tmp_path):
    pair = Pair(journal=Journal(tmp_path / "a", fsync="always"))
    pair.change(pair.replicas.shrunk(1, 0, "b"))
    pair.push("x")
    assert pair.acked == []
    synced(pair)
    assert pair.acked == ["x"]


def test_with_the_backup_out_of_the_in_sync_set_the_primary_commits_alone():
    pair = Pair()
    pair.change(pair.replicas.shrunk(1, 0, "b"))
    pair.push("x")
    assert pair.acked == ["x"]


def test_below_min_insync_nothing_is_committed():
    pair = Pair(members=("a", "b", "c"), min_insync=2)
    pair.change(pair.replicas.shrunk(1, 0, "c"))
    pair.change(pair.replicas.shrunk(1, 1, "b"))
    assert not pair.log.can_commit
    pair.push("x")  # the engine refuses changes first: none may be acknowledged
    pair.sync("b")
    assert pair.acked == []  # b holds x, but the in-sync set is a alone, below min_insync
    pair.log.joining("b")
    assert not pair.log.can_commit  # joining is not recorded: b could never be promoted
    pair.change(pair.replicas.grown(1, 2, "b"))
    assert pair.log.can_commit and pair.acked == ["x"]


def test_shrink_and_grow_are_compare_and_sets_on_the_version():
    """A late or repeated request never undoes a newer change."""
    replicas = ReplicaSet.start(["a", "b", "c"], min_insync=1)
    shrunk = replicas.shrunk(1, 0, "c")
    regrown = shrunk.grown(1, 1, "c")
    again = regrown.shrunk(1, 2, "c")
    assert again.grown(1, 1, "c") is again  # the first grow, repeated: refused
    assert again.in_sync == {"a", "b"}
    fenced = again.shrunk(1, 3, "c")  # c is out of sync already: only the version grows
    assert fenced.in_sync == again.in_sync and fenced.grown(1, 3, "c") is fenced
    with pytest.raises(ValueError, match="primary cannot leave"):
        replicas.shrunk(1, 0, "a")


def test_the_primary_never_takes_an_older_replica_set():
    pair = Pair(members=("a", "b", "c"))
    newer = pair.replicas.shrunk(1, 0, "c")
    pair.change(newer)
    assert pair.log.change_replicas(pair.replicas.__class__.start(["a", "b", "c"], 1)) == []
    assert pair.log.replicas is newer


def test_only_an_in_sync_replica_is_promoted_and_the_epoch_grows():
    replicas = ReplicaSet.start(["a", "b", "c"], min_insync=1).shrunk(1, 0, "c")
    with pytest.raises(StaleEpochError, match="never promoted"):
        replicas.promoted("c")
    promoted = replicas.promoted("b")
    assert (promoted.primary, promoted.epoch, promoted.in_sync) == ("b", 2, frozenset({"b"}))


def test_a_backup_that_restarted_without_its_records_leaves_the_in_sync_set_and_is_never_promoted():
    replicas = ReplicaSet.start(["a", "b", "c"], min_insync=2)
    restarted = replicas.restarted("b")
    assert restarted.in_sync == {"a", "c"} and not restarted.shrunk(1, 1, "c").can_commit
    with pytest.raises(StaleEpochError):
        restarted.promoted("b")
    with pytest.raises(ValueError, match="promote another"):
        replicas.restarted("a")


def test_a_backup_that_restarted_empty_is_not_counted_at_what_it_held_before():
    pair = Pair(members=("a", "b", "c"))
    pair.push("x")
    pair.sync("b")
    pair.sync("c")
    assert pair.acked == ["x"] and pair.log.caught_up("b")
    pair.stores["b"] = QueueStore(QueueOptions())  # its process restarted, without a journal
    pair.backups["b"] = BackupLog(pair.stores["b"])
    pair.log.lost("b")
    assert not pair.log.caught_up("b")
    pair.exchange("b")  # the probe: it holds nothing
    assert pair.log.held("b") == 0 and pair.log.behind() == ["b"]
    pair.sync("b")
    assert contents(pair.stores["b"]) == ["x"] and pair.log.behind() == []


def test_a_stale_primary_is_fenced_by_the_router_and_by_its_backups():
    replicas = ReplicaSet.start(["a", "b", "c"], min_insync=1)
    newer = replicas.promoted("b")
    with pytest.raises(StaleEpochError):
        newer.shrunk(1, newer.version, "c")  # the old primary, of epoch 1, asks
    backup = BackupLog(QueueStore(QueueOptions()), epoch=2)
    with pytest.raises(StaleEpochError, match="epoch 1"):
        backup.accept(Batch(1, 1, 1, [], 0))


def test_a_backup_restarted_from_its_journal_still_fences_the_old_primary(tmp_path):
    """It follows at least the epoch of the last Lead in its log, also after a restart."""
    store = QueueStore(QueueOptions(), journal=Journal(tmp_path / "c"))
    store.restore()
    store.apply_replicated([records.Lead(1, "a"), records.Lead(2, "b")])
    store.close()
    again = QueueStore(QueueOptions(), journal=Journal(tmp_path / "c"))
    again.restore()
    with pytest.raises(StaleEpochError):
        BackupLog(again).accept(Batch(1, 1, 3, [], 0))


def test_an_answer_naming_a_newer_epoch_fences_the_primary():
    pair = Pair()
    message = pair.log.send_to("b")
    with pytest.raises(StaleEpochError):
        pair.log.acknowledged("b", Position(1, message.sequence, 5, 2))


def test_bad_replica_sets_are_refused():
    with pytest.raises(ValueError, match="min_insync must be between 1 and the 2"):
        ReplicaSet.start(["a", "b"], min_insync=3)
    with pytest.raises(ValueError, match="must hold the primary"):
        ReplicaSet(("a", "b"), "a", frozenset({"b"}), 1)


def test_a_backup_that_missed_records_catches_up_from_the_log():
    pair = Pair()
    pair.exchange()
    pair.push(1)
    pair.exchange()
    pair.log.send_to("b")  # this message is lost on the way
    pair.push(2)
    pair.log.lost("b")
    pair.push(3)
    pair.sync()
    assert contents(pair.stores["b"]) == [1, 2, 3] and pair.acked == [1, 2, 3]
    assert pair.log.caught_up("b")


def test_a_backup_too_far_behind_loads_a_snapshot():
    pair = Pair(max_tail=2)
    pair.change(pair.replicas.shrunk(1, 0, "b"))  # out of sync: the primary keeps 2 records
    for item in range(5):
        pair.push(item)
    pair.primary.pull("q", 1)
    kinds = []
    while (message := pair.exchange()) is not None:
        kinds.append(type(message).__name__)
    assert kinds == ["Batch", "Snapshot"]
    assert contents(pair.stores["b"]) == [1, 2, 3, 4]
    assert pair.log.caught_up("b")


def test_lag_counts_the_item_bytes_a_backup_lacks():
    pair = Pair(max_tail=2)
    pair.change(pair.replicas.shrunk(1, 0, "b"))  # out of sync: the primary keeps 2 records
    pair.sync()
    items = [b"x" * 1_000, b"y" * 5_000]
    for item in items:
        pair.push(item)
    assert pair.log.lag_bytes("b") == total_size(items)
    pair.primary.pull("q", 1)  # a record without items adds no bytes
    assert pair.log.lag_bytes("b") == total_size(items)
    pair.push(b"z" * 7_000)
    assert pair.log.lag_bytes("b") == total_size([*items, b"z" * 7_000])
    pair.change(pair.replicas)  # a commit trims what the primary keeps to 2 records
    assert pair.log.lag_bytes("b") == total_size([b"z" * 7_000])  # at least: all it keeps
    pair.sync()
    assert pair.log.lag_bytes("b") == 0


def test_a_late_or_repeated_message_changes_nothing():
    """A snapshot still on the wire when the connection broke arrives after newer records:
    it must not take the backup back, nor may its answer count."""
    pair = Pair(max_tail=1)
    for item in range(3):
        pair.push(item)
    pair.exchange()  # the probe
    late = pair.log.send_to("b")  # a snapshot, which is late
    assert isinstance(late, Snapshot)
    pair.log.lost("b")
    pair.sync()
    pair.push("x")
    pair.sync()
    held = pair.stores["b"].position
    answer = pair.backups["b"].accept(late)
    assert pair.stores["b"].position == held and contents(pair.stores["b"]) == [0, 1, 2, "x"]
    assert pair.log.acknowledged("b", answer) == [] and pair.log.held("b") == held


def test_a_new_primary_never_counts_a_commit_past_its_own_log():
    store = QueueStore(QueueOptions())
    log = PrimaryLog(ReplicaSet.start(["b", "c"], 2), "b", store, committed=7)
    assert log.committed == 0


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
        backups["c"].accept(Batch(1, 99, stores["c"].position + 1, [], 0))  # a is fenced


def test_a_primary_that_stepped_down_takes_only_a_snapshot():
    """A deposed primary may hold records no other replica has (here y, never
    committed): it must not keep them, nor go on from them, when it follows."""
    pair = Pair()
    pair.push("x")
    pair.sync("b")
    pair.primary.push(Q, ["y"])  # taken by a alone, then a is cut off
    promoted = pair.replicas.promoted("b")
    new = PrimaryLog(promoted, "b", pair.stores["b"], committed=pair.backups["b"].committed)
    pair.stores["b"].replicate = new.append
    pair.stores["b"].lead(promoted.epoch, "b")
    old = BackupLog(pair.stores["a"], promoted.epoch - 1, diverged=True)
    kinds = []
    while (message := new.send_to("a")) is not None:
        kinds.append(type(message).__name__)
        new.acknowledged("a", old.accept(message))
    assert kinds[-1] == "Snapshot" and not old.diverged
    assert contents(pair.stores["a"]) == ["x"] == contents(pair.stores["b"])


def test_a_backup_out_of_sync_rejoins_under_steady_load():
    """Out of sync, a backup is one message behind whenever a push comes between its
    messages: commits wait for it from the moment it joins, so it catches up."""
    pair = Pair()
    pair.change(pair.replicas.shrunk(1, 0, "b"))
    pair.push("x")
    for item in ("y", "z"):  # a push arrives while each message is on its way
        message = pair.log.send_to("b")
        pair.push(item)
        pair.log.acknowledged("b", pair.backups["b"].accept(message))
        assert not pair.log.caught_up("b")
    assert pair.log.may_join("b")
    pair.log.joining("b")
    pair.push("w")
    assert pair.acked == ["x", "y", "z"]  # w waits for b now
    pair.sync("b")
    assert pair.acked == ["x", "y", "z", "w"] and pair.log.caught_up("b")
    pair.change(pair.replicas.grown(1, pair.log.ask_to_join("b"), "b"))
    assert pair.replicas.in_sync == {"a", "b"}


def test_a_backup_joining_the_in_sync_set_counts_before_the_router_answers():
    """If the router records c back in sync but its answer is lost, c may be promoted:
    the primary must not commit without c from the moment it asks."""
    pair = Pair(members=("a", "b", "c"))
    pair.change(pair.replicas.shrunk(1, 0, "c"))
    pair.sync("c")
    with pytest.raises(ValueError, match="not caught up"):
        pair.log.joining("b")  # never asked for: b has not answered yet
    pair.log.joining("c")
    pair.replicas = pair.replicas.grown(1, pair.log.ask_to_join("c"), "c")  # recorded; the answer does not arrive
    pair.push("x")
    pair.sync("b")
    assert pair.acked == []  # b holds x, c does not: c could be promoted
    pair.sync("c")
    assert pair.acked == ["x"]


def test_a_backup_applies_nothing_from_the_first_message_of_a_newer_epoch():
    store = QueueStore(QueueOptions())
    backup = BackupLog(store, epoch=1)
    answer = backup.accept(Batch(2, 1, 1, [("not", "a", "record")], 0))
    assert answer == Position(2, 1, 0, 0) and store.position == 0


def test_a_lead_of_an_epoch_that_is_not_newer_changes_nothing():
    pair = Pair()
    position = pair.primary.position
    with pytest.raises(StaleEpochError):
        pair.primary.lead(1, "a")
    assert pair.primary.position == position
    pair.push("x")  # the log goes on at the next position
    pair.sync()
    assert contents(pair.stores["b"]) == ["x"]


def test_abandoned_replies_fail_and_are_never_released():
    pair = Pair()
    failed = []
    pair.primary.push(Q, ["x"])
    pair.log.hold(pair.primary.position, lambda: pair.acked.append("x"), lambda: failed.append("x"))
    for fail in pair.log.abandon():
        fail()
    pair.sync()
    assert failed == ["x"] and pair.acked == []


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
    pair.push(1)
    pair.push(2)
    pair.primary.pull("q", 1, ack=True)
    pair.sync()
    backup_store.close()
    again = QueueStore(QueueOptions(), journal=Journal(tmp_path / "b"))
    again.restore()
    assert again.position == pair.primary.position
    assert again.history.starts == [(1, 1)]
    assert contents(again) == [2] and again.stats()["leased"] == 1
    assert BackupLog(again).position() == Position(1, 0, pair.primary.position, 1)


# -- a replica set, against what its clients were told ----------------------------------

def taken_in(trace: list) -> set:
    """The items that the Take records of a log (a TracedStore's trace) took."""
    taken = set()

    def observe(record, moved):
        if type(record) is records.Take:
            taken.update(moved)
    QueueStore(QueueOptions()).replay(None, trace, observe)
    return taken


class ReplicaSetMachine(RuleBasedStateMachine):
    """Three replicas of one FIFO queue, min_insync 1 or 2, driven by hypothesis.

    Faults: messages lost, late or repeated; router answers lost and requests repeated;
    backups that restart with their journal or empty; nodes lost; a primary that dies or
    is cut off from the router and goes on serving (a zombie) until fenced.
    """

    def __init__(self):
        super().__init__()
        self.next_item = 0
        self.next_replica = 3
        self.acked_pushes: set[int] = set()  # pushes whose callers were told "accepted"
        self.delivered: list[int] = []       # items of pulls whose callers got them
        self.network: dict[str, list] = {}   # backup -> [(sender PrimaryLog, message)]
        self.sent: list = []                 # every (sender, backup, message), to replay
        self.requests: list = []             # every (kind, epoch, version, backup) asked
        self.zombie: PrimaryLog | None = None  # a primary cut off from the router

    @rule(min_insync=st.sampled_from([1, 2]))
    @precondition(lambda self: not hasattr(self, "router"))
    def start(self, min_insync):
        members = ("r0", "r1", "r2")
        self.router = ReplicaSet.start(members, min_insync)
        self.stores = {member: TracedStore() for member in members}
        self.alive = set(members)
        self.backups = {member: BackupLog(self.stores[member]) for member in members[1:]}
        self._become_primary("r0", committed=0)

    def _become_primary(self, member, committed):
        self.log = PrimaryLog(self.router, member, self.stores[member], committed=committed)
        self.stores[member].replicate = self.log.append
        self.stores[member].lead(self.router.epoch, member)

    def _serving(self):
        return [log for log in (self.log, self.zombie) if log is not None]

    def _run(self, callbacks):
        for callback in callbacks:
            callback()

    # -- clients ---------------------------------------------------------------------

    @rule(to_zombie=st.booleans())
    @precondition(lambda self: hasattr(self, "router"))
    def push(self, to_zombie):
        log = self.zombie if to_zombie and self.zombie else self.log
        if not log.can_commit:
            return  # the engine refuses changes: NotEnoughReplicasError
        item, self.next_item = self.next_item, self.next_item + 1
        log.log.push(Q, [item])
        log.hold(log.log.position, lambda: self.acked_pushes.add(item), lambda: None)

    @rule(to_zombie=st.booleans())
    @precondition(lambda self: hasattr(self, "router"))
    def pull(self, to_zombie):
        log = self.zombie if to_zombie and self.zombie else self.log
        if not log.can_commit:
            return
        items = log.log.pull("q", 1)
        if items:
            log.hold(log.log.position, lambda: self.delivered.extend(items), lambda: None)

    # -- the network --------------------------------------------------------------------

    @rule(data=st.data())
    @precondition(lambda self: hasattr(self, "router"))
    def send(self, data):
        log = data.draw(st.sampled_from(self._serving()))
        backup = data.draw(st.sampled_from([m for m in log.replicas.members if m != log.me]))
        message = log.send_to(backup)
        if message is not None:
            self.network.setdefault(backup, []).append((log, message))
            self.sent.append((log, backup, message))

    @rule(data=st.data())
    @precondition(lambda self: hasattr(self, "router") and any(self.network.values()))
    def deliver(self, data):
        backup = data.draw(st.sampled_from([b for b, queue in self.network.items() if queue]))
        sender, message = self.network[backup].pop(0)
        self._deliver(sender, backup, message)

    @rule(data=st.data())
    @precondition(lambda self: hasattr(self, "router") and self.sent)
    def deliver_again(self, data):
        """A message delivered late, or twice."""
        sender, backup, message = data.draw(st.sampled_from(self.sent))
        self._deliver(sender, backup, message)

    def _deliver(self, sender, backup, message):
        if backup not in self.alive or backup not in self.backups:
            return
        if self.zombie is not None and backup == self.zombie.me and message.epoch > self.zombie.epoch:
            self._fence(self.zombie)  # it hears of the new primary: it serves no more
        try:
            answer = self.backups[backup].accept(message)
        except StaleEpochError:
            if sender in self._serving():
                self._fence(sender)
            return
        if sender not in self._serving():
            return
        try:
            self._run(sender.acknowledged(backup, answer))
        except StaleEpochError:
            self._fence(sender)

    @rule(data=st.data())
    @precondition(lambda self: hasattr(self, "router") and any(self.network.values()))
    def drop(self, data):
        backup = data.draw(st.sampled_from([b for b, queue in self.network.items() if queue]))
        sender, _ = self.network[backup].pop(0)
        sender.lost(backup)

    def _fence(self, log):
        self._run(log.abandon())  # its held replies fail: nobody is told "done"
        if log is self.zombie:
            self.zombie = None

    # -- the router --------------------------------------------------------------------

    def _ask(self, kind, epoch, version, backup):
        self.requests.append((kind, epoch, version, backup))
        change = self.router.shrunk if kind == "shrink" else self.router.grown
        try:
            self.router = change(epoch, version, backup)
        except StaleEpochError:
            pass

    @rule(data=st.data())
    @precondition(lambda self: hasattr(self, "router"))
    def shrink(self, data):
        backup = data.draw(st.sampled_from(self.router.backups))
        self._ask("shrink", self.log.epoch, self.log.replicas.version, backup)
        self._run(self.log.change_replicas(self.router))

    @rule(data=st.data(), told=st.booleans())
    @precondition(lambda self: hasattr(self, "router"))
    def grow(self, data, told):
        backup = data.draw(st.sampled_from(self.router.backups))
        if backup in self.log.replicas.in_sync or not self.log.may_join(backup):
            return
        self.log.joining(backup)  # commits wait for it from now on
        if not self.log.caught_up(backup):
            return
        try:
            version = self.log.ask_to_join(backup)
        except ValueError:  # asked already
            return
        self._ask("grow", self.log.epoch, version, backup)
        if told:  # else the answer is lost: the primary keeps counting the backup in
            self._run(self.log.change_replicas(self.router))

    @rule(data=st.data())
    @precondition(lambda self: hasattr(self, "router") and self.requests)
    def repeat_request(self, data):
        """A request to the router that arrives late, or twice."""
        self._ask(*data.draw(st.sampled_from(self.requests)))

    @rule()
    @precondition(lambda self: hasattr(self, "router"))
    def shrink_those_behind(self):
        for backup in self.log.behind():
            self._ask("shrink", self.log.epoch, self.log.replicas.version, backup)
            self._run(self.log.change_replicas(self.router))

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

    @rule(data=st.data(), with_journal=st.booleans())
    @precondition(lambda self: hasattr(self, "router"))
    def restart_backup(self, data, with_journal):
        """A backup's process restarts: from its journal (fsync "always": every record
        it answered for), or empty; the router hears of it before it answers anything."""
        backup = data.draw(st.sampled_from(self.router.backups))
        if backup not in self.alive or backup not in self.backups or (
                self.zombie is not None and backup == self.zombie.me):
            return
        if not with_journal:
            self.stores[backup] = TracedStore()
            self.router = self.router.restarted(backup)
        self.backups[backup] = BackupLog(self.stores[backup])
        # Messages to the old process died with its connections.
        self.network[backup] = []
        self.sent = [entry for entry in self.sent if entry[1] != backup]
        for log in self._serving():
            log.lost(backup)

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
        self._run(self.log.change_replicas(self.router))

    # -- what the clients were told ------------------------------------------------------

    @invariant()
    def no_acknowledged_push_is_lost(self):
        """Each acknowledged push is in the primary's queue, or a pull of the primary's own
        history took it."""
        if not hasattr(self, "router"):
            return
        trace = self.log.log.trace
        missing = self.acked_pushes - set(contents(self.log.log)) - taken_in(trace)
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
        for backup in self.router.backups:
            self.log.lost(backup)
        for _ in range(4):
            for backup in self.router.backups:
                if backup in self.alive and backup in self.backups:
                    message = self.log.send_to(backup)
                    if message is not None:
                        self._run(self.log.acknowledged(backup, self.backups[backup].accept(message)))
        expected = contents(self.log.log)
        for backup in self.router.in_sync - {self.log.me}:
            if backup in self.alive:
                assert contents(self.stores[backup]) == expected, backup


ReplicaSetMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_a_replica_set_keeps_what_it_acknowledged = ReplicaSetMachine.TestCase
