"""The router actor: owns a server's topology and answers discovery.

It starts the shard actors (made by the server's Keeper, so that they outlive a
restart of the router's process, from which the router carries on with its record
in the keeper) and hands out a Topology, from which every client computes shard_for(name) itself. After
that first call no data operation touches the router. The topology also carries
the CURVE keys of the native data path (pype.transport): only processes that can
call the router, members of the Ray cluster, get them. Where each shard listens
a client asks the shard itself (Shard.data_address), again after a restart.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid

import ray

from pype.config import Config
from pype.errors import (
    ConfigError,
    NotPrimaryError,
    ShardUnavailableError,
    StaleEpochError,
)
from pype.hashing import shard_for
from pype.keeper import RouterRecord
from pype.metrics import RouterMetrics
from pype.placement import eligible_nodes, pinned_to, shard_options
from pype.protocol import Arrived, Expect, Export, Import, Release
from pype.shards.journal import JournalPlace, safe_dir_name
from pype.shards.replication import ReplicaSet
from pype.shards.replicator import MAX_LAG
from pype.shards.shard import log_to_stderr
from pype.topology import Topology
from pype.transport import Keys

logger = logging.getLogger("pype")

RESIZE = "resize"  # the router's thread for resize(): topology() answers meanwhile
SHRINK_GRACE = 10.0  # seconds a shard that a shrink removed forwards stale clients
WATCH_INTERVAL = 0.5  # seconds between the router's looks at a new topology's shards
ELECTIONS = 3  # tries at electing a new shard's primary while its replicas' nodes die
REFILL_INTERVAL = 5.0  # seconds between looks for a free node for replicas lost with theirs


@dataclasses.dataclass(frozen=True)
class _Replica:
    """A shard actor the router started: its handle, its id, the node it was pinned to,
    and its slot among its shard's replicas (which names its journal)."""

    actor: ray.actor.ActorHandle
    id: str
    node: str
    slot: int = 0


@dataclasses.dataclass
class _Shard:
    """One shard: its replicas and, when replicated, who leads and who is in sync (the
    router's record; pype.shards.replication.ReplicaSet)."""

    replicas: list[_Replica]
    replica_set: ReplicaSet | None = None

    @property
    def primary(self) -> _Replica:
        if self.replica_set is None:
            return self.replicas[0]
        return self.replica(self.replica_set.primary)

    @property
    def shard(self) -> ray.actor.ActorHandle:
        return self.primary.actor

    def replica(self, replica_id: str) -> _Replica | None:
        return next((r for r in self.replicas if r.id == replica_id), None)


@ray.remote(num_cpus=0, concurrency_groups={RESIZE: 1})
class Router:
    """Starts the shards of one server and serves its topology."""

    def __init__(self, config: Config, label: str | None, placements: list[dict],
                 keeper: ray.actor.ActorHandle):
        """label: "<namespace>.<name>" of a named server, None for an anonymous one; it names
        the server in metrics and its journal directory. placements: Ray options per shard.
        keeper: the server's Keeper, which makes the shards and holds this router's record,
        so that a router that Ray restarts carries on with the same shards."""
        log_to_stderr()
        self._keeper = keeper
        self._config = config
        self._publishing = threading.Lock()  # one topology published at a time
        self._replicas_lock = threading.Lock()  # guards each _Shard's replicas and replica_set
        self._saving = threading.Lock()  # one record written at a time, the newest last
        # Held by what changes the shards: resize() and the watcher of lost shards.
        self._changing = threading.Lock()
        self._leaving_lock = threading.Lock()
        self._topology_requests = 0
        self._names: dict[int, frozenset] = {}  # shard -> its queue names, as last reported
        # Shards whose primary died with no backup in sync: none leads until it comes back
        # (_lead_again); meanwhile nothing else may tell it to lead (_replace_replica).
        self._leaderless: set[int] = set()
        self._node = {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
        self._generation, record = ray.get(keeper.load.remote())
        restored = record is not None and record.topology.epoch >= 0
        if restored:
            self._restore(record)
        else:  # new, or its first process died before it published a topology
            ray.get(keeper.keep_only.remote(set()))
            self._start(config, label, placements)
        self._metrics = RouterMetrics(self._label)
        threading.Thread(target=self._watch, name="pype-router-watch", daemon=True).start()
        if restored and config.replicas > 1:
            threading.Thread(target=self._elect_again, name="pype-router-elect",
                             daemon=True).start()

    def _start(self, config: Config, label: str | None, placements: list[dict]) -> None:
        """Start the shards of a new server and publish its first topology."""
        server_id = uuid.uuid4().hex
        self._label = label or f"anonymous-{server_id[:12]}"
        keys, self._server_secret = Keys.generate()
        self._topology = self._recorded_topology = Topology(
            server_id=server_id, shards=(), config=config, keys=keys, epoch=-1,
            keeper=self._keeper)
        self._settled_shards = config.shards
        self._leaving: list = []  # (index, _Shard) a shrink removed, kept SHRINK_GRACE s as forwarders
        self._lost: list[dict] = []
        self._failovers: list[dict] = []
        self._gone: set[str] = set()  # replicas gone for good with their node
        # Every shard alive, in index order; the topology holds the first ones.
        self._all = [self._start_shard(index, placements[index]) for index in range(config.shards)]
        self._wait_until_started(range(config.shards))
        if config.replicas > 1:
            for index in range(config.shards):
                self._elect(index)
        self._publish(config.shards)
        logger.info("pype router started %d shards of %d replicas (%s)", config.shards,
                    config.replicas, config.source)

    def _save(self, topology: Topology | None = None) -> None:
        """Write the record a restarted router carries on from (with `topology` as the one
        about to be published), before the change it holds is told to anyone."""
        with self._saving:
            if topology is not None:
                self._recorded_topology = topology
            with self._leaving_lock:
                leaving = list(self._leaving)
            with self._replicas_lock:
                shards = [dataclasses.replace(shard, replicas=list(shard.replicas))
                          for shard in self._all]
            record = RouterRecord(  # without the keeper's own handle, which it needs not
                topology=dataclasses.replace(self._recorded_topology, keeper=None),
                label=self._label,
                server_secret=self._server_secret, shards=shards, names=dict(self._names),
                settled_shards=self._settled_shards, leaving=leaving, lost=list(self._lost),
                failovers=list(self._failovers), gone=set(self._gone))
            ray.get(self._keeper.save.remote(self._generation, record))

    def _restore(self, record: RouterRecord) -> None:
        """Carry on from `record`: Ray restarted this router's process. Shard actors made
        but never recorded (it died in between) are stopped; the topology is published
        again in a newer epoch than any a client may have seen."""
        self._label = record.label
        self._server_secret = record.server_secret
        self._topology = self._recorded_topology = dataclasses.replace(record.topology,
                                                                       keeper=self._keeper)
        self._names = record.names
        self._all = record.shards
        self._settled_shards = record.settled_shards
        self._leaving = record.leaving
        self._lost, self._failovers, self._gone = record.lost, record.failovers, record.gone
        known = {replica.id for shard in [*self._all, *(s for _, s in self._leaving)]
                 for replica in shard.replicas}
        ray.get(self._keeper.keep_only.remote(known))
        if self._leaving:
            self._stop_leaving_later()
        epoch = self._publish()
        logger.warning("pype router restarted: carries on with %d shards (topology epoch %d)",
                       len(self._all), epoch)

    def _start_shard(self, index: int, placement: list[dict], fresh: bool = False) -> _Shard:
        """Start shard `index`, a replica on each node of `placement`; fresh=True: a new one
        (a resize), whose index a shard that a shrink removed may have had: the shard sets
        that journal (which holds no queue) aside."""
        return _Shard([self._start_replica(index, slot, options, fresh)
                       for slot, options in enumerate(placement)])

    def _wait_until_started(self, indices: range, fresh: bool = False) -> None:
        """Wait until every replica of the shards at `indices` answers, however long Ray
        takes to start their processes (a loaded machine, a resource not yet free), so
        that a slow start is charged to starting the server and not to a first call's
        transport.request_timeout. Warns each request_timeout while some are starting.

        fresh=True: new shards, which hold nothing yet; a replica that Ray cannot start
        (its node died, or it died and Ray gave up on it) starts again, on an eligible
        node that holds none of the shard's other replicas. Otherwise a replica that
        fails to start raises Ray's error."""
        waiting = {replica.actor.data_address.remote(): (index, replica)
                   for index in indices for replica in self._all[index].replicas}
        every = self._config.transport.request_timeout
        started = time.monotonic()
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=every)
            for ref in ready:
                index, replica = waiting.pop(ref)
                try:
                    ray.get(ref)
                except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnschedulableError):
                    if not fresh:
                        raise
                    new = self._start_again(index, replica)
                    waiting[new.actor.data_address.remote()] = (index, new)
            if waiting:
                logger.warning("pype router: shard replicas %s still starting after %.0f s (a "
                               "missing resource keeps them pending: see Ray's warnings)",
                               sorted(f"{index}/{replica.slot}" for index, replica
                                      in waiting.values()), time.monotonic() - started)

    def _elect_new(self, index: int) -> None:
        """Elect the primary of new shard `index` once its replicas answer. One that dies
        before the election (its node, say) starts again (_wait_until_started), and the
        election runs again."""
        for attempt in range(ELECTIONS):
            self._wait_until_started(range(index, index + 1), fresh=True)
            try:
                self._elect(index)  # elected: a primary that dies now fails over (_watch)
                return
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError,
                    ray.exceptions.GetTimeoutError):
                if attempt + 1 == ELECTIONS:
                    raise

    def _start_again(self, index: int, dead: _Replica) -> _Replica:
        """Start again, on an eligible node that holds none of the shard's other
        replicas, a replica of a new shard that Ray could not start (it held nothing)."""
        with self._replicas_lock:
            shard = self._all[index]
            taken = {replica.node for replica in shard.replicas if replica is not dead}
            free = [node for node in eligible_nodes(self._config.placement) if node not in taken]
            if not free:
                raise ConfigError(f"shard {index}: replica {dead.id[:8]} could not start on "
                                  f"node {dead.node}, and no other eligible node is free for it")
            new = self._start_replica(index, dead.slot, pinned_to(free[0]), fresh=True)
            shard.replicas[shard.replicas.index(dead)] = new
        self._save()
        logger.warning("pype router: shard %d: replica %s could not start on node %s; replica "
                       "%s starts on node %s", index, dead.id[:8], dead.node, new.id[:8], new.node)
        return new

    def _start_replica(self, index: int, slot: int, placement: dict, fresh: bool) -> _Replica:
        config = self._config
        me = ray.get_runtime_context().current_actor
        replicated = config.replicas > 1
        replica_id = uuid.uuid4().hex
        journal = None
        if config.persistence.dir is not None:  # expanded on the shard's node
            name = f"shard-{index}-replica-{slot}" if replicated else f"shard-{index}"
            journal = JournalPlace(safe_dir_name(self._label), name, fresh)
        actor = ray.get(self._keeper.make.remote(
            replica_id, placement, index, config, journal, me, self._label, self._topology.keys,
            self._server_secret, replica_id if replicated else None))
        return _Replica(actor, replica_id, placement["scheduling_strategy"].node_id, slot)

    def _publish(self, shards: int | None = None, lost: frozenset | None = None) -> int:
        """Make the first `shards` shards (default: as many as now) the topology, each
        served by its primary, in a new epoch; return it."""
        with self._publishing:
            old = self._topology
            shards = len(old.shards) if shards is None else shards
            started = self._all[:shards]
            new = dataclasses.replace(
                old, shards=tuple(s.shard for s in started), epoch=old.epoch + 1,
                shard_ids=tuple(s.primary.id for s in started),
                nodes=tuple(s.primary.node for s in started),
                lost=old.lost if lost is None else lost)
            self._save(new)
            self._topology = new
            return new.epoch

    @ray.method(concurrency_group=RESIZE)
    def resize(self, shards: int) -> dict:
        """Change the number of shards to `shards` while they serve; see README, Resizing.

        1. Grow: start the new shards (their journals, if any, under shard-<i>).
        2. Every shard that may receive queues holds requests for names that the old
           topology gave other shards (Expect), so nothing runs on a queue before it came.
        3. Publish the new topology (epoch + 1): clients that fetch it go to the new owners.
        4. Every old shard gives up the queues the new topology gives others (Export)
           and from then on answers requests for them with Moved(epoch); each queue goes
           whole, in one piece, to its new shard (Import).
        5. The receiving shards serve what they held (Arrived). Shards a shrink removed
           stay SHRINK_GRACE seconds, answering Moved, then stop.

        First, a shard lost with its node (replicas: 1) starts again, empty, and a replica
        lost with its node that found no free node then gets one now, if a node joined:
        the router also looks for one every REFILL_INTERVAL seconds by itself.

        Jump hash moves only the queues whose shard changes: growing from S to S + 1
        moves about 1/(S + 1) of them, all to the new shard. A shard killed during a
        move comes back from its journal (persistence) in the middle of it; calling
        resize again with the same count finishes it. Returns what moved.
        """
        if isinstance(shards, bool) or not isinstance(shards, int):
            raise TypeError(f"shards must be an int, got {shards!r}")
        if shards < 1:
            raise ValueError(f"a server needs at least 1 shard, got {shards}")
        with self._changing:
            return self._resize(shards)

    def _resize(self, shards: int) -> dict:
        self._replace_lost()
        self._replace_gone_replicas(shards)
        old = self._topology
        config, seed = old.config, old.config.hash_seed
        started = time.monotonic()
        if shards > len(self._all):
            self._stop_leaving()  # their indices are about to be taken again
            placements = shard_options(config.placement, shards, config.replicas)
            added = range(len(self._all), shards)
            self._all += [self._start_shard(index, placements[index], fresh=True) for index in added]
            self._save()
            self._wait_until_started(added, fresh=True)
        if config.replicas > 1:  # also those of a resize cut short before it elected them
            for index, shard in enumerate(self._all):
                if shard.replica_set is None:
                    self._elect_new(index)
        receivers = self._all[:shards]
        # Every alive shard may hold queues: one a shrink removed, if that shrink was cut short.
        givers = list(self._all)
        # The topology the queues come from: that of the last resize that finished (one
        # cut short already published the next).
        self._each(receivers, Expect(self._settled_shards, seed))
        epoch = self._publish(shards)
        by_target: dict[int, dict] = {}
        for exported in self._each(givers, Export(shards, seed, epoch)):
            for name, queue in exported.items():
                by_target.setdefault(shard_for(name, shards, seed), {})[name] = queue
        self._each([receivers[target] for target in by_target],
                   *[Import(queues) for queues in by_target.values()])
        self._each(receivers, Arrived())
        self._each(givers, Release())
        self._settled_shards = shards
        moved = sum(len(queues) for queues in by_target.values())
        leaving = list(enumerate(self._all))[shards:]
        del self._all[shards:]
        if leaving:
            with self._leaving_lock:
                self._leaving += leaving
            self._stop_leaving_later()
        self._save()
        logger.info("pype router: resized from %d to %d shards (epoch %d), moved %d queues in "
                    "%.3f s", len(old.shards), shards, epoch, moved, time.monotonic() - started)
        return {"epoch": epoch, "shards": shards, "moved_queues": moved,
                "seconds": time.monotonic() - started}

    def _each(self, shards: list[_Shard], *requests: tuple) -> list:
        """Run a step of a move on each of `shards` (requests[i] on shards[i], or the one
        request on all) and return their answers. A shard that Ray is restarting (it died),
        or whose primary failed over, is asked again once it is back: every step can be
        taken twice."""
        requests = requests * len(shards) if len(requests) == 1 else requests
        deadline = time.monotonic() + self._topology.config.transport.request_timeout
        replicated = self._config.replicas > 1
        while True:
            try:
                return ray.get([shard.shard.move.remote(request)
                                for shard, request in zip(shards, requests, strict=True)])
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.ActorDiedError,
                    NotPrimaryError) as error:
                if time.monotonic() > deadline or not (replicated or _restarting(error)):
                    raise
                logger.warning("pype router: a shard died during a resize; asking again: %s",
                               error)
                time.sleep(0.2)

    def _stop_leaving_later(self) -> None:
        timer = threading.Timer(SHRINK_GRACE, self._stop_leaving)
        timer.daemon = True
        timer.start()

    def _stop_leaving(self) -> None:
        """Stop the shards a shrink removed (their journals stay, holding no queue)."""
        with self._leaving_lock:
            leaving, self._leaving = self._leaving, []
            actors = [replica.actor for _, shard in leaving for replica in shard.replicas]
            ray.wait([actor.close.remote() for actor in actors], num_returns=len(actors), timeout=5)
            for actor in actors:
                ray.kill(actor, no_restart=True)
        self._save()

    # -- shards lost with their node ---------------------------------------------------

    def _watch(self) -> None:
        """Keep one until_stopped() call waiting on each replica of each shard; Ray fails
        it when the replica's process dies. Unreplicated, a shard that Ray fails for good
        (its node died, and a pinned actor cannot start elsewhere) is lost; replicated,
        a primary's death starts a failover at once (_replica_died). It costs no traffic
        while the shards live, and a restarted replica gets a new call."""
        watching: dict = {}  # the call's ref -> (index, _Replica)
        pings: dict = {}  # shard index -> (primary's id, ping's ref, when sent)
        refill_at = 0.0
        while True:
            if self._config.replicas > 1:
                self._ping_primaries(pings)
                if time.monotonic() >= refill_at:
                    refill_at = time.monotonic() + REFILL_INTERVAL
                    threading.Thread(target=self._refill, name="pype-router-refill",
                                     daemon=True).start()
            watched = set(watching.values())
            lost = self._topology.lost
            for index, shard in enumerate(list(self._all)):
                if self._config.replicas > 1 and shard.replica_set is None:
                    continue  # a new shard, not elected: the resize starting it watches it
                for replica in shard.replicas:
                    if (index not in lost and (index, replica) not in watched
                            and replica.id not in self._gone):
                        watching[replica.actor.until_stopped.remote()] = (index, replica)
            if not watching:  # every shard is lost: wait for a resize
                time.sleep(WATCH_INTERVAL)
                continue
            if self._config.replicas > 1:
                self._metrics.export(len(self._failovers), sum(
                    len(shard.replica_set.in_sync) < len(shard.replicas) for shard in self._all
                    if shard.replica_set is not None))
            ended, _ = ray.wait(list(watching), num_returns=1, timeout=WATCH_INTERVAL)
            for ref in ended:
                index, replica = watching.pop(ref)
                try:
                    ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError):
                    if self._config.replicas > 1:
                        threading.Thread(target=self._replica_died, args=(index, replica),
                                         name="pype-router-failover", daemon=True).start()
                        continue
                    gone = self._gone_for_good(replica.actor)
                    if gone is not None:
                        self._mark_lost(index, replica.id, gone)

    def _ping_primaries(self, pings: dict) -> None:
        """Ping each replicated shard's primary (Shard.ping, a thread of its own, each
        WATCH_INTERVAL). One silent for min(MAX_LAG, request_timeout / 2), as long as a
        backup may lag, is taken for dead: a process that stopped, or a node cut off,
        which Ray may never fail. Its shard fails over (_replica_died); if it comes
        back, the newer replica set tells it that it leads no more."""
        silence = min(MAX_LAG, self._config.transport.request_timeout / 2)
        now = time.monotonic()
        for index, shard in enumerate(list(self._all)):
            if shard.replica_set is None:
                continue
            primary = shard.primary
            sent = pings.get(index)
            waiting = (sent is not None and sent[0] == primary.id
                       and not ray.wait([sent[1]], timeout=0)[0])
            if not waiting:  # answered, failed (the watcher sees deaths), or a new primary
                pings[index] = (primary.id, primary.actor.ping.remote(), now)
            elif now - sent[2] > silence:
                logger.error("pype: shard %d: primary %s did not answer for %.0f s: taken for "
                             "dead", index, primary.id[:8], now - sent[2])
                pings[index] = (primary.id, sent[1], float("inf"))  # once
                threading.Thread(target=self._replica_died, args=(index, primary, True),
                                 name="pype-router-failover", daemon=True).start()

    def _gone_for_good(self, shard: ray.actor.ActorHandle) -> Exception | None:
        """Why `shard`, whose until_stopped() call Ray failed, is gone for good; None if
        Ray restarts it (or may yet). A new call tells, not the old call's error: Ray
        holds new calls to an actor it restarts and fails them for one that is dead."""
        try:
            ray.get(shard.data_address.remote(),
                    timeout=self._topology.config.transport.request_timeout)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
            return None
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError) as error:
            return error
        return None

    def _mark_lost(self, index: int, shard_id: str, error: Exception) -> None:
        """Publish shard `index` as lost if it is still the one (shard_id) the topology
        names there: one a resize removed or replaced is no loss."""
        with self._changing:
            topology = self._topology
            if (index >= len(topology.shard_ids) or topology.shard_ids[index] != shard_id
                    or index in topology.lost):
                return
            self._publish(len(topology.shards), topology.lost | {index})
            queues = sorted(self._names.pop(index, ()))
            self._lost.append({"shard": index, "at": time.time(), "node": topology.nodes[index],
                               "queues": queues, "why": f"{type(error).__name__}: {error}"[:300]})
            self._save()
            logger.error("pype: %s; queues lost: %s", self._topology.lost_shard(index),
                         queues or "(none known)")

    def _replace_lost(self) -> None:
        """Start a new, empty shard in the place of each lost one (resize())."""
        topology = self._topology
        if not topology.lost:
            return
        placements = shard_options(topology.config.placement, len(self._all))
        for index in sorted(topology.lost):
            self._all[index] = self._start_shard(index, placements[index], fresh=True)
            logger.warning("pype: shard %d starts again, empty, on node %s", index,
                           self._all[index].primary.node)
        self._publish(len(topology.shards), lost=frozenset())

    # -- replicated shards: the router as their controller ------------------------------

    def _elect(self, index: int, again: bool = False) -> bool:
        """Make the replica of shard `index` whose log goes furthest its primary, in an
        epoch above any its replicas or the record have seen; the replicas whose logs
        end at the same place are in sync. A new server elects among all its replicas
        (a named server started again over its journals finds which went furthest).

        again=True: a restarted router's election, which its predecessor may have died
        in the middle of (recorded, not yet told). A recorded primary that still leads
        the recorded epoch is told the record again, and nothing changes for its
        clients; else it is among the replicas of the recorded in-sync set that answer
        and kept every record they acknowledged (not `restarted`). False if none did."""
        shard = self._all[index]
        timeout = self._config.transport.request_timeout
        while True:
            with self._replicas_lock:
                before = shard.replica_set
            voters = [replica for replica in shard.replicas
                      if not again or before is None or replica.id in before.in_sync]
            asked = [(replica, replica.actor.position.remote()) for replica in voters]
            answers = []
            for replica, position in asked:
                try:
                    answers.append((replica, ray.get(position, timeout=timeout)))
                except ray.exceptions.RayError as error:
                    if not again:
                        raise
                    logger.warning("pype: shard %d: replica %s did not answer: %s", index,
                                   replica.id[:8], error)
            if again and before is not None and any(
                    replica.id == before.primary and position.leads
                    and position.epoch == before.epoch for replica, position in answers):
                return self._lead(index)  # the record, again: same epoch, nothing changes
            if again:
                answers = [(replica, position) for replica, position in answers
                           if not position.restarted]
            if not answers:
                logger.error("pype: shard %d: no replica of its in-sync set answered with "
                             "every record it acknowledged: none can lead without losing "
                             "items", index)
                return False
            ends = [(position.last_epoch, position.end) for _, position in answers]
            best = max(ends)
            in_sync = frozenset(replica.id for (replica, _), end in zip(answers, ends, strict=True)
                                if end == best)
            primary = answers[ends.index(best)][0].id
            seen = max(max(position.epoch, position.last_epoch) for _, position in answers)
            with self._replicas_lock:
                if shard.replica_set is not before:
                    continue  # changed while it asked (a failover, an in-sync change): again
                recorded = before.epoch if before is not None else 0
                shard.replica_set = ReplicaSet(tuple(r.id for r in shard.replicas), primary,
                                               in_sync, self._config.min_insync,
                                               1 + max(seen, recorded))
                if before is not None and primary != before.primary:
                    self._failovers.append({"shard": index, "at": time.time(),
                                            "from": before.primary, "to": primary,
                                            "epoch": shard.replica_set.epoch})
            self._save()
            return self._lead(index)

    def _elect_again(self) -> None:
        """A restarted router elects each replicated shard's primary again (_elect), until
        it succeeds or request_timeout has passed three times (then the shard waits for a
        replica's death or restart to move it on), and publishes who leads."""
        deadline = time.monotonic() + 3 * self._config.transport.request_timeout
        pending = list(range(len(self._all)))
        while pending:
            pending = [index for index in pending if not self._elect(index, again=True)]
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        self._publish()

    def _lead(self, index: int, lost: frozenset = frozenset()) -> bool:
        """Tell shard `index`'s primary to lead its replica set (`lost`: the queues whose
        items died with every in-sync replica); False if it did not answer (it died too:
        its own death starts the next failover)."""
        shard = self._all[index]
        with self._replicas_lock:
            replicas = shard.replica_set
            primary = shard.primary
            backups = {r.id: r.actor for r in shard.replicas if r.id != replicas.primary}
        try:
            ray.get(primary.actor.lead.remote(replicas, backups, lost=lost),
                    timeout=self._config.transport.request_timeout)
            return True
        except ray.exceptions.RayError as error:
            logger.error("pype: shard %d: replica %s did not take the lead: %s", index,
                         primary.id[:8], error)
            return False

    def _lead_until_answered(self, index: int, replicas: ReplicaSet) -> None:
        """Tell the primary of `replicas` to lead until it answers, or dies (its death
        starts the next failover), or the set changed meanwhile."""
        deadline = time.monotonic() + 3 * self._config.transport.request_timeout
        while not self._lead(index) and time.monotonic() < deadline:
            with self._replicas_lock:
                if self._all[index].replica_set is not replicas:
                    return
            time.sleep(0.2)

    def replica_restarted(self, *, index: int, replica: str) -> bool:
        """Replica `replica` of shard `index` started again (Ray restarted its process): a
        backup leaves the in-sync set before it answers anything, as it may lack records
        it had acknowledged (ReplicaSet.restarted). A primary's restart is its death
        (_replica_died), recorded before this returns (the watcher may see it too: the
        second changes nothing that matters). True if it is recorded out of the in-sync
        set: its log counts again only once it caught up."""
        with self._replicas_lock:
            shard = self._shard_holding(index, replica)
            if shard is None:
                return False
            before = shard.replica_set
            if before is None:
                return True  # of a new shard not elected yet: it holds nothing
            if before.primary != replica:
                shard.replica_set = before.restarted(replica)
            changed = shard.replica_set
        if before.primary == replica:
            death = self._record_death(index, shard.replica(replica))
            if death is None:
                return False
            threading.Thread(target=self._act_on_death, args=(index, shard.replica(replica), *death),
                             name="pype-router-failover", daemon=True).start()
            changed = death[1]
        elif changed is not before:
            self._save()
            shard.primary.actor.change_replicas.remote(changed)
        return changed.primary != replica and replica not in changed.in_sync

    def change_in_sync(self, *, index: int, epoch: int, version: int, replica: str,
                       in_sync: bool) -> ReplicaSet:
        """The primary of `epoch` asks to record `replica` in sync (it caught up) or out of
        it (it stopped answering), on the replica set's `version`; return the set recorded
        now (unchanged if the version or the epoch was not the current one: the primary
        then learns that it was replaced, or asks again)."""
        with self._replicas_lock:
            shard = self._all[index]
            replicas = shard.replica_set
            try:
                if in_sync:
                    shard.replica_set = replicas.grown(epoch, version, replica)
                else:
                    shard.replica_set = replicas.shrunk(epoch, version, replica)
            except (StaleEpochError, ValueError) as refused:
                logger.info("pype: shard %d: in-sync change refused: %s", index, refused)
            changed = shard.replica_set
        if changed is not replicas:
            self._save()  # before the primary acts on it
            logger.warning("pype: shard %d: replica %s %s the in-sync set (now %d of %d)",
                           index, replica[:8], "joined" if in_sync else "left",
                           len(changed.in_sync), len(shard.replicas))
        return changed

    def _replica_died(self, index: int, replica: _Replica, silent: bool = False) -> None:
        """Replica `replica` of shard `index` died (silent: a primary stopped answering
        pings). Its primary's death promotes an in-sync backup (at once, also if Ray
        restarts the old one: it comes back a backup); a backup's takes it out of the
        in-sync set. One gone for good with its node is replaced by a new, empty backup
        on an eligible node that holds no replica of the shard, which catches up from
        the primary. A silent primary with no backup in sync is left as it is: nothing
        else could lead, and leading again in a new epoch would fail what it holds."""
        with self._replicas_lock:
            shard = self._shard_holding(index, replica.id)
            if shard is None or shard.replica_set is None:
                return  # not elected yet: the resize starting it starts it elsewhere
            replicas = shard.replica_set
            backup = replicas.primary != replica.id
        if backup and self._answers(replica):
            return  # a new incarnation, which said so itself (replica_restarted)
        if silent and not (replicas.in_sync - {replica.id}):
            logger.error("pype: shard %d: its primary is silent and no backup is in sync: it "
                         "waits for the primary", index)
            return
        death = self._record_death(index, replica)
        if death is not None:
            self._act_on_death(index, replica, *death)

    def _answers(self, replica: _Replica) -> bool:
        """Does `replica` answer a ping within request_timeout? A death notice for one
        that does is of an earlier incarnation (Ray may fail a call made after the
        restart to the old one; the new one said it restarted before it answers
        anything): taken again, it would take out a backup that caught up. Meanwhile
        its primary takes out a backup that does not answer it."""
        try:
            ray.get(replica.actor.ping.remote(), timeout=self._config.transport.request_timeout)
            return True
        except ray.exceptions.RayError:
            return False

    def _record_death(self, index: int, replica: _Replica) -> tuple | None:
        """Record what the death of `replica` changes (_replica_died); return the sets
        before and after, and whether a backup was promoted (None: not of this shard)."""
        with self._replicas_lock:
            shard = self._shard_holding(index, replica.id)
            if shard is None:
                return None
            replicas = shard.replica_set
            promote = replica.id == replicas.primary
            if promote:
                candidates = [m for m in replicas.members
                              if m in replicas.in_sync and m != replica.id]
                if not candidates:
                    logger.error("pype: shard %d lost its primary and no other replica is in "
                                 "sync: it serves again only if the primary comes back", index)
                    promote = False
                    self._leaderless.add(index)
                else:
                    self._leaderless.discard(index)
                    shard.replica_set = replicas.promoted(candidates[0])
                    self._failovers.append({"shard": index, "at": time.time(),
                                            "from": replica.id, "to": candidates[0],
                                            "epoch": shard.replica_set.epoch})
            else:  # in sync or not: a new version fails requests to grow the dead one
                shard.replica_set = replicas.shrunk(replicas.epoch, replicas.version, replica.id)
            changed = shard.replica_set
        self._save()
        return replicas, changed, promote

    def _act_on_death(self, index: int, replica: _Replica, replicas: ReplicaSet,
                      changed: ReplicaSet, promote: bool) -> None:
        """Tell the shard and the clients what _record_death recorded, and replace a
        replica gone with its node."""
        shard = self._all[index]
        if promote:
            logger.warning("pype: shard %d fails over from replica %s to %s (leader epoch %d)",
                           index, replica.id[:8], changed.primary[:8], changed.epoch)
            self._lead_until_answered(index, changed)
            self._publish()  # clients wait for the new primary to say it leads
            replica.actor.change_replicas.remote(changed)  # if it only stopped: it follows
        elif changed is not replicas:
            shard.primary.actor.change_replicas.remote(changed)
        gone = self._gone_for_good(replica.actor)
        if gone is not None:
            self._gone.add(replica.id)  # watched no more
            self._replace_replica(index, replica)
        elif changed.primary == replica.id:
            self._lead_again(index, replica)

    def _lead_again(self, index: int, replica: _Replica) -> None:
        """The primary of shard `index`, the one replica in sync, came back (Ray restarted
        its process, which starts as a backup). It leads again, in a new epoch, if its
        journal kept every record it acknowledged (fsync "always", or any mode if its
        operating system did not restart: Position.restarted is False). Else, with
        persistence, nothing may lead without losing acknowledged records (its journal
        may come back with them): the shard stays unavailable. Without persistence they
        died with every in-sync replica's process, if the primary alone could commit
        (min_insync 1; else a backup that left the in-sync set last holds them, and the
        shard waits as with persistence): it leads again empty, and each caller's first
        call to a queue it held raises ShardLostError, as when a shard of one replica
        restarts."""
        with self._replicas_lock:
            shard = self._shard_holding(index, replica.id)
            if shard is None or shard.replica_set.primary != replica.id:
                return
            epoch = shard.replica_set.epoch
            could_commit = shard.replica_set.can_commit
        try:
            position = ray.get(replica.actor.position.remote(),
                               timeout=self._config.transport.request_timeout)
        except ray.exceptions.RayError:
            return  # died again: its next start brings it here again
        if position.restarted and (self._config.persistence.dir is not None or not could_commit):
            logger.error("pype: shard %d: its primary restarted without every record it "
                         "acknowledged and no backup is in sync: no replica can lead without "
                         "losing acknowledged items", index)
            return
        with self._replicas_lock:
            if (self._shard_holding(index, replica.id) is not shard
                    or shard.replica_set.primary != replica.id or shard.replica_set.epoch != epoch):
                return  # another report of this death (Ray's, the watcher's) led it first
            shard.replica_set = shard.replica_set.promoted(replica.id)
        # Told to the callers once it leads; kept until then, should it die again first.
        lost = self._names.get(index, frozenset()) if position.restarted else frozenset()
        self._save()
        if self._lead(index, lost):
            self._leaderless.discard(index)
            if lost:
                self._record_lost(index, lost)
            self._publish()

    def _refill(self) -> None:
        """Replace the replicas gone with their node that found no free eligible node
        then, once one is free (a node joined), as resize() does; a resize running now
        does it itself. Quiet while no node is free (the loss was logged)."""
        if not any(replica.id in self._gone for shard in self._all for replica in shard.replicas):
            return
        if not self._changing.acquire(blocking=False):
            return
        try:
            nodes = set(eligible_nodes(self._config.placement))
            self._replace_gone_replicas(len(self._all), only_where_free=nodes)
        except (ConfigError, ray.exceptions.RayError):
            logger.exception("pype router: replacing replicas lost with their node failed")
        finally:
            self._changing.release()

    def _replace_gone_replicas(self, shards: int, only_where_free: set | None = None) -> None:
        """Replace each replica of the first `shards` shards gone with its node that found
        no free eligible node then (resize() calls it: a node may have joined since). One
        that cannot be replaced is logged; the resize goes on. only_where_free: the
        eligible nodes; shards with none free of their replicas are left alone, unlogged."""
        for index, shard in enumerate(self._all[:shards]):
            if shard.replica_set is None:
                continue
            if only_where_free is not None and not only_where_free - {
                    replica.node for replica in shard.replicas}:
                continue
            for replica in list(shard.replicas):
                if replica.id in self._gone and replica.id not in shard.replica_set.in_sync:
                    try:
                        self._replace_replica(index, replica)
                    except (ConfigError, ValueError, ray.exceptions.RayError):
                        logger.exception("pype: shard %d: replica %s, gone with its node, "
                                         "could not be replaced", index, replica.id[:8])

    def _replace_replica(self, index: int, gone: _Replica) -> None:
        with self._replicas_lock:
            shard = self._shard_holding(index, gone.id)
            if shard is None or gone.id == shard.replica_set.primary:
                return
            taken = {replica.node for replica in shard.replicas}
            free = [node for node in eligible_nodes(self._config.placement) if node not in taken]
            if not free:
                logger.error("pype: shard %d lost a replica with node %s and no other eligible "
                             "node is free: it runs with %d replicas", index, gone.node,
                             len(shard.replicas) - 1)
                return
            new = self._start_replica(index, gone.slot, pinned_to(free[0]), fresh=True)
            shard.replicas[shard.replicas.index(gone)] = new
            shard.replica_set = shard.replica_set.replaced(gone.id, new.id)
        self._save()
        logger.warning("pype: shard %d: a new replica %s on node %s replaces %s, lost with "
                       "node %s", index, new.id[:8], new.node, gone.id[:8], gone.node)
        if index not in self._leaderless:  # else its primary learns of it when it leads
            self._lead(index)

    def _shard_holding(self, index: int, replica_id: str) -> _Shard | None:
        shard = self._all[index] if index < len(self._all) else None
        return shard if shard is not None and shard.replica(replica_id) is not None else None

    def shard_gone(self, index: int) -> Topology:
        """A client found unreplicated shard `index` gone for good: check it, record it
        lost if so (as _watch would, a moment later), and return the topology, so that
        the client's next `.remote()` calls to it raise ShardUnavailableError too."""
        topology = self._topology
        if (self._config.replicas == 1 and index < len(self._all)
                and index not in topology.lost):
            replica = self._all[index].primary
            gone = self._gone_for_good(replica.actor)
            if gone is not None:
                self._mark_lost(index, replica.id, gone)
        return self._topology

    def unavailable(self, index: int) -> None:
        """Raise what every `.remote()` call to lost shard `index` raises (the client sends
        them here: an actor that is gone can only raise Ray's own errors)."""
        raise ShardUnavailableError(self._topology.lost_shard(index))

    def ownership(self) -> tuple[int, int, int] | None:
        """(shards, hash seed, epoch) of the topology after a resize (None before any): a
        shard that restarts without its journal learns from it which names are no longer
        its own, so that stale clients are sent on instead of making queues nobody reads."""
        topology = self._topology
        if topology.epoch == 0:
            return None
        return len(topology.shards), topology.config.hash_seed, topology.epoch

    def topology(self) -> Topology:
        """The topology; each client asks once, when it is made or connects."""
        self._topology_requests += 1
        return self._topology

    def note_queues(self, index: int, names: frozenset) -> None:
        """Shard `index` holds queues `names` (it reports changes within 0.1 s)."""
        self._names[index] = names

    def shard_restarted(self, index: int) -> list[str]:
        """Shard `index` restarted empty: record and return the queues it held."""
        lost = sorted(self._names.pop(index, ()))
        self._record_lost(index, lost)
        return lost

    def _record_lost(self, index: int, queues) -> None:
        self._lost.append({"shard": index, "at": time.time(), "queues": sorted(queues)})
        self._save()
        logger.warning("pype: shard %d restarted without persistence; queues that lost their "
                       "items: %s", index, sorted(queues) or "(none known)")

    def stats(self) -> dict:
        """Where the router runs, how often it was asked for the topology (it is on no data
        path), the queue names each shard last reported, and the shards that lost queues:
        restarted without persistence, or lost with their node."""
        return {**self._node, "topology_requests": self._topology_requests,
                "reported_queues": {index: sorted(names) for index, names in self._names.items()},
                "lost": self._lost, "replicas": self._replica_stats(),
                "failovers": list(self._failovers)}

    def _replica_stats(self) -> list[dict]:
        """Per replicated shard: its leader epoch and each replica's node, role, whether
        it is in sync, and whether it is gone with its node (not yet replaced: no free
        eligible node), as the router recorded them."""
        with self._replicas_lock:
            return [{"shard": index, "epoch": shard.replica_set.epoch,
                     "min_insync": shard.replica_set.min_insync,
                     "under_replicated": len(shard.replica_set.in_sync) < len(shard.replicas),
                     "replicas": [{"replica": replica.id, "node": replica.node,
                                   "role": "primary" if replica.id == shard.replica_set.primary
                                   else "backup",
                                   "in_sync": replica.id in shard.replica_set.in_sync,
                                   "gone": replica.id in self._gone}
                                  for replica in shard.replicas]}
                    for index, shard in enumerate(self._all) if shard.replica_set is not None]

    def actors(self) -> list[ray.actor.ActorHandle]:
        """Every shard actor this router started and still runs: each replica of each
        shard (Server.shutdown closes them all)."""
        with self._leaving_lock:
            leaving = [shard for _, shard in self._leaving]
        return [replica.actor for shard in [*self._all, *leaving] for replica in shard.replicas]


def _restarting(error: Exception) -> bool:
    """Is the actor of a failed call being restarted by Ray (rather than gone for good)?"""
    return isinstance(error, ray.exceptions.ActorUnavailableError) or "restart" in str(error).lower()
