"""A replicated shard's engines, a primary and its backups, with no sockets and no Ray.

The test carries the replication messages between the engines (as the shard's
replication sender will), so it decides when a backup gets what: replies of the
primary must wait for exactly that.
"""

import os
import threading

import pytest

from pype.errors import NotEnoughReplicasError, NotPrimaryError, QueueFullError
from pype.options import QueueOptions
from pype.protocol import Add, Pull, Push, Replicate, Stats
from pype.shards.engine import ShardEngine
from pype.shards.journal import Journal
from pype.shards.replication import ReplicaSet
from pype.shards.replicator import Replicator
from pype.shards.store import QueueStore
from tests.test_engine import Answer, Clock, run


class ReplicatedShard:
    """Engines "a" (primary), "b" and "c" (backups) of one shard."""

    def __init__(self, min_insync=1):
        clock = Clock()
        self.replicas = ReplicaSet.start(["a", "b", "c"], min_insync)
        self.engines = {name: ShardEngine(QueueStore(QueueOptions(), clock=clock), 0, 0.5)
                        for name in "abc"}
        self.primary = "a"
        for name in "bc":
            with self.engines[name].lock:
                self.engines[name].follow(self.replicas.epoch)
        with self.engines["a"].lock:
            self.engines["a"].lead(self.replicas, "a")

    def carry(self, backup: str) -> bool:
        """Send `backup` the primary's next message and bring its answer back; False if
        there was nothing to send."""
        primary = self.engines[self.primary]
        with primary.lock:
            message = primary.message_for(backup)
        if message is None:
            return False
        answer = run(self.engines[backup], Replicate(message), caller="")
        with primary.lock:
            primary.answered(backup, answer.result())
        return True

    def sync(self, *backups):
        for backup in backups:
            while self.carry(backup):
                pass

    def promote(self, backup: str):
        """Fail over to `backup`, as the router does: every other replica follows the new
        epoch first."""
        promoted = self.replicas.promoted(backup)
        for name in set("abc") - {backup}:
            with self.engines[name].lock:
                self.engines[name].follow(promoted.epoch)
        self.primary, self.replicas = backup, promoted
        with self.engines[backup].lock:
            self.engines[backup].lead(promoted, backup)

    def change(self, replicas):
        self.replicas = replicas
        primary = self.engines[self.primary]
        with primary.lock:
            primary.change_replicas(replicas)


def items(engine, queue="q") -> list:
    return engine.store.pull(queue, -1, remove=False) if queue in engine.store.names() else []


def test_a_push_is_answered_once_every_in_sync_backup_holds_it():
    shard = ReplicatedShard()
    pushed = run(shard.engines["a"], Push(("q",), ["x"]))
    assert not pushed.done
    shard.sync("b")
    assert not pushed.done  # c is in sync too
    shard.sync("c")
    assert pushed.result() == 1
    assert items(shard.engines["b"]) == items(shard.engines["c"]) == ["x"]


def test_a_waiting_pull_is_answered_once_its_take_is_committed():
    shard = ReplicatedShard()
    shard.change(shard.replicas.shrunk(1, 0, "c"))
    pulled = run(shard.engines["a"], Pull("q", 1, block=True))
    assert not pulled.done  # parked: the queue is empty
    pushed = run(shard.engines["a"], Push(("q",), ["x"]))
    assert not pulled.done and not pushed.done  # the pull took x, which b does not hold
    shard.sync("b")
    assert pulled.result() == ["x"] and pushed.result() == 1
    assert items(shard.engines["b"]) == []


def test_a_backup_serves_no_client():
    shard = ReplicatedShard()
    with pytest.raises(NotPrimaryError, match="backup"):
        run(shard.engines["b"], Push(("q",), ["x"])).result()
    assert run(shard.engines["b"], Stats()).result()["queues"] == 0


def test_below_min_insync_the_primary_refuses_calls_and_changes_nothing():
    shard = ReplicatedShard(min_insync=2)
    shard.change(shard.replicas.shrunk(1, 0, "c"))
    shard.change(shard.replicas.shrunk(1, 1, "b"))
    position = shard.engines["a"].store.position
    with pytest.raises(NotEnoughReplicasError, match="min_insync=2"):
        run(shard.engines["a"], Push(("q",), ["x"])).result()
    assert shard.engines["a"].store.position == position
    assert run(shard.engines["a"], Stats()).result()["queues"] == 0  # stats still answer


def test_stats_are_answered_at_once_while_changes_wait_for_backups():
    shard = ReplicatedShard()
    run(shard.engines["a"], Push(("q",), ["x"]))
    assert run(shard.engines["a"], Stats()).done


def test_after_a_failover_the_old_primary_fails_what_it_held_and_catches_up_as_a_backup():
    shard = ReplicatedShard()
    shard.sync("b", "c")
    first = run(shard.engines["a"], Push(("q",), ["acked"]))
    shard.sync("b", "c")
    assert first.result() == 1
    unsure = run(shard.engines["a"], Push(("q",), ["unsure"]))  # reaches no backup
    shard.promote("b")
    with pytest.raises(NotPrimaryError, match="may or may not"):
        unsure.result()
    assert run(shard.engines["b"], Push(("q",), ["after"])).done is False
    shard.sync("c")
    assert items(shard.engines["b"]) == ["acked", "after"]
    shard.sync("a")  # its log went past b's in epoch 1 ("unsure"): it loads b's snapshot
    assert items(shard.engines["a"]) == ["acked", "after"]
    with pytest.raises(NotPrimaryError):
        run(shard.engines["a"], Pull("q")).result()


def test_a_replication_message_to_a_replica_that_is_no_backup_is_refused():
    shard = ReplicatedShard()
    with shard.engines["a"].lock:
        message = shard.engines["a"].message_for("b")
    with pytest.raises(NotPrimaryError, match="no backup"):
        run(shard.engines["a"], Replicate(message), caller="").result()


def test_an_unreplicated_engine_answers_at_once():
    engine = ShardEngine(QueueStore(QueueOptions()), 0, 0.5)
    assert run(engine, Push(("q",), ["x"])).result() == 1


@pytest.mark.parametrize("queues", [("full",), ("full", "roomy")], ids=["whole", "in part"])
def test_a_refused_push_sent_again_to_the_new_primary_is_refused_again(queues):
    """A push refused (a full queue), then a later push of the same producer applied,
    and both replies lost with the primary: the client sends the first again to the
    new primary, whose exactly-once check must not answer "applied" (silent loss)."""
    shard = ReplicatedShard()
    run(shard.engines["a"], Add("full", QueueOptions(maxsize=1)))
    run(shard.engines["a"], Push(("full",), ["in"]))
    # (producer id, number, floor): #1 is still unanswered when #2 is sent
    refused = run(shard.engines["a"], Push(queues, ["lost?"], producer=(7, 1, 1)))
    applied = run(shard.engines["a"], Push(("other",), ["later"], producer=(7, 2, 1)))
    assert not refused.done  # the refusal is a change: it waits for the backups too
    shard.sync("b", "c")
    with pytest.raises(QueueFullError):
        refused.result()
    assert applied.result() == 1
    shard.promote("b")
    again = run(shard.engines["b"], Push(queues, ["lost?"], producer=(7, 1, 1)))
    shard.sync("a", "c")
    with pytest.raises(QueueFullError, match="'full'"):
        again.result()
    assert run(shard.engines["b"], Push(("other",), ["later"], producer=(7, 2, 1))).result() == 1
    assert items(shard.engines["b"], "roomy") == (["lost?"] if "roomy" in queues else [])
    assert items(shard.engines["b"], "other") == ["later"]


class _Awaited(Answer):
    """An Answer that also sets an event, for a reply sent from another thread."""

    def __init__(self):
        super().__init__()
        self.event = threading.Event()

    def __call__(self, status, value):
        super().__call__(status, value)
        self.event.set()


def test_with_fsync_always_a_primary_answers_once_its_own_sync_thread_synced(tmp_path, monkeypatch):
    """The primary writes the record unsynced; its Replicator's sync thread syncs the log
    (held here until the test lets it go), and only then does the reply go out."""
    store = QueueStore(QueueOptions(), journal=Journal(tmp_path / "a", fsync="always"))
    store.restore()
    engine = ShardEngine(store, 0, 0.5)
    replicas = ReplicaSet.start(["a", "b"], 1)
    replicas = replicas.shrunk(replicas.epoch, replicas.version, "b")  # "a" commits alone
    with engine.lock:
        engine.lead(replicas, "a")
    real_fsync, go_on, synced = os.fsync, threading.Event(), []

    def fsync(fd):
        if threading.current_thread() is not threading.main_thread():
            assert go_on.wait(timeout=60)
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    replicator = Replicator(engine, engine.replication, {}, keys=None, node_id="n",
                            request_timeout=10, ask_router=None)
    try:
        pushed = _Awaited()
        with engine.lock:
            engine.dispatch(Push(("q",), ["x"]), "c", 0, True, pushed)
        assert not pushed.done and synced == []  # written, not synced, not answered
        go_on.set()
        assert pushed.event.wait(timeout=60)
        assert pushed.result() == 1
        log = max((tmp_path / "a").glob("wal-*.log"))
        assert log.stat().st_ino in synced
    finally:
        replicator.stop()
