"""The primary's replication sender: carries its PrimaryLog's messages to each backup.

One thread per backup takes the next message from the engine (ShardEngine.message_for,
under the engine's lock), sends it to the backup over the data plane as a Replicate
request (pype.transport: the backup's Unix socket on its own node, ZeroMQ with CURVE
across nodes), and hands the answer back (ShardEngine.answered), which sends the
replies it commits. Between messages a thread sleeps on the engine's new_records
condition, which every logged record wakes.

The in-sync set changes only through the router (change_in_sync, a compare-and-set):
a backup that does not answer within its lag timeout, or that came back with less
than it held, is asked out; one that caught up is asked back in. Commits wait for a
backup from the moment it starts to join (PrimaryLog.joining), so that under steady
load it still catches up.

With fsync "always" one more thread syncs the primary's own journal, which the
engine writes without syncing (QueueStore._log), while the backups sync theirs: a
reply waits for the slower of the two syncs, not for their sum.
"""

from __future__ import annotations

import logging
import threading
import time

import ray

from pype import protocol
from pype.errors import StaleEpochError
from pype.protocol import Replicate
from pype.shards.engine import ShardEngine
from pype.shards.replication import PrimaryLog, ReplicaSet
from pype.transport import Connection, Disconnected, Keys

logger = logging.getLogger("pype")

IDLE_WAKE = 1.0      # seconds a sender sleeps without records before it looks again
RETRY_PAUSE = 0.2    # seconds between tries to reach a backup that is not there
MAX_LAG = 10.0       # seconds a backup may take to answer before it leaves the in-sync set
NO_CALLER = ("", 0)  # replication requests wait for no earlier call


class Replicator:
    """The sender threads of the primary of `log`'s epoch; stop() ends them.

    backups: replica id -> its shard actor (where it listens, asked again after a
    restart). ask_router(replica, in_sync, version) -> the ReplicaSet the router
    recorded: the router's change_in_sync for this shard and epoch.
    """

    def __init__(self, engine: ShardEngine, log: PrimaryLog, backups: dict, keys: Keys,
                 node_id: str, request_timeout: float, ask_router):
        self._engine = engine
        self._log = log
        self._keys = keys
        self._node_id = node_id
        self._timeout = request_timeout
        self._lag = min(MAX_LAG, request_timeout / 2)
        self._ask_router = ask_router
        self._stopped = False
        self._threads = [threading.Thread(target=self._serve, args=(backup, actor), daemon=True,
                                          name=f"pype-replicate-{engine.index}-{backup[:8]}")
                         for backup, actor in backups.items()]
        if engine.store.syncs_each_write:
            self._threads.append(threading.Thread(target=self._sync_own_journal, daemon=True,
                                                  name=f"pype-sync-{engine.index}"))
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """End the threads (this replica stopped being primary, or the backups changed)."""
        with self._engine.lock:
            self._stopped = True
            self._engine.new_records.notify_all()

    def _current(self) -> bool:
        """Is this still the sender of the engine's primary log (lock held)?"""
        return not self._stopped and self._engine.replication is self._log

    def _serve(self, backup: str, actor: ray.actor.ActorHandle) -> None:
        connection = None
        while True:
            try:
                if connection is None:
                    connection = self._connect(actor)
                    if connection is None:
                        return
                message = self._next_message(backup)
                if message is None:
                    return
                request_id = connection.send(NO_CALLER, Replicate(message))
                reply = connection.receive(request_id, self._lag)
                if reply is None:
                    raise Disconnected(f"no answer within {self._lag:g} s")
                status, answer = reply
                if status == protocol.ERROR and isinstance(answer, StaleEpochError):
                    self._fenced(answer)  # another replica was promoted
                    return
                if status == protocol.ERROR:
                    raise Disconnected(f"it refused replication: {answer!r}")
            except Disconnected as why:
                logger.warning("pype shard %d: backup %s unreachable: %s", self._engine.index,
                               backup[:8], why)
                if connection is not None:
                    connection.close()
                    connection = None
                if not self._lost(backup):
                    return
                time.sleep(RETRY_PAUSE)
                continue
            if not self._answered(backup, answer):
                return

    def _sync_own_journal(self) -> None:
        """Sync the records the engine wrote since the last sync; tell it how far."""
        engine, log = self._engine, self._log
        while True:
            with engine.lock:
                while self._current() and not log.unsynced:
                    engine.new_records.wait(IDLE_WAKE)
                if not self._current():
                    return
                through = log.end
            engine.store.sync()
            with engine.lock:
                if not self._current():
                    return
                engine.synced(through)

    def _connect(self, actor) -> Connection | None:
        """A connection to the backup's current incarnation; None once stopped."""
        while True:
            with self._engine.lock:
                if not self._current():
                    return None
            try:
                address = ray.get(actor.data_address.remote(), timeout=self._timeout)
                return Connection.to(address, self._keys, address.node_id == self._node_id)
            except (ray.exceptions.RayError, Disconnected) as error:
                logger.info("pype shard %d: a backup is not reachable yet: %s",
                            self._engine.index, error)
                time.sleep(RETRY_PAUSE)

    def _next_message(self, backup: str):
        """The next message for `backup`, once there is one; None once stopped."""
        with self._engine.lock:
            while self._current():
                message = self._engine.message_for(backup)
                if message is not None:
                    return message
                self._engine.new_records.wait(IDLE_WAKE)
        return None

    def _answered(self, backup: str, answer) -> bool:
        """Take the backup's answer; ask the router to change the in-sync set if it must.
        False once stopped."""
        with self._engine.lock:
            if not self._current():
                return False
            try:
                self._engine.answered(backup, answer)
            except StaleEpochError as error:
                self._fenced(error, locked=True)
                return False
            log = self._log
            change = None
            if backup in log.behind():  # it came back with less than it held
                change = (False, log.replicas.version)
            elif backup not in log.replicas.in_sync and log.may_join(backup):
                log.joining(backup)
                if log.caught_up(backup) and not log.asked_to_join(backup):
                    change = (True, log.ask_to_join(backup))
        if change is not None:
            return self._change(backup, *change)
        return True

    def _lost(self, backup: str) -> bool:
        """The backup did not answer: forget what was in flight; if it is in sync, ask
        the router to record it out of sync. False once stopped."""
        with self._engine.lock:
            if not self._current():
                return False
            log = self._log
            log.lost(backup)
            # Commits wait for a backup in sync, or one the router may have recorded so
            # (asked to join): until the router records it out, nothing more commits.
            if backup not in log.replicas.in_sync and not log.asked_to_join(backup):
                return True
            version = log.replicas.version
        return self._change(backup, False, version)

    def _change(self, backup: str, in_sync: bool, version: int) -> bool:
        """Ask the router to record `backup` in sync or out of it, until it answers; take
        the set it recorded. False once stopped."""
        while True:
            try:
                replicas: ReplicaSet = self._ask_router(backup, in_sync, version)
                break
            except ray.exceptions.RayError as error:
                logger.warning("pype shard %d: the router did not answer: %s",
                               self._engine.index, error)
                time.sleep(RETRY_PAUSE)
                with self._engine.lock:
                    if not self._current():
                        return False
        with self._engine.lock:
            if not self._current():
                return False
            try:
                self._engine.change_replicas(replicas)
            except StaleEpochError as error:
                self._fenced(error, locked=True)
                return False
        return True

    def _fenced(self, error: StaleEpochError, locked: bool = False) -> None:
        """Another replica leads a newer epoch: this one follows, failing what it held."""
        logger.warning("pype shard %d: this replica is no longer primary: %s",
                       self._engine.index, error)
        if locked:
            self._engine.step_down()
        else:
            with self._engine.lock:
                if self._current():
                    self._engine.step_down()
