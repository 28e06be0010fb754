"""The router actor: owns a server's topology and answers discovery.

It starts the shard actors (so they live exactly as long as it does) and hands
out a Topology, from which every client computes shard_for(name) itself. After
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
from pype.errors import ShardUnavailableError
from pype.hashing import shard_for
from pype.placement import shard_options
from pype.protocol import Arrived, Expect, Export, Import, Release
from pype.shards.journal import JournalPlace, safe_dir_name
from pype.shards.shard import shard_actor
from pype.topology import Topology
from pype.transport import Keys

logger = logging.getLogger("pype")

RESIZE = "resize"  # the router's thread for resize(): topology() answers meanwhile
SHRINK_GRACE = 10.0  # seconds a shard that a shrink removed forwards stale clients
WATCH_INTERVAL = 0.5  # seconds between the router's looks at a new topology's shards


@dataclasses.dataclass(frozen=True)
class _Started:
    """A shard actor the router started: its handle, its id, the node it was pinned to."""

    shard: ray.actor.ActorHandle
    shard_id: str
    node: str


@ray.remote(num_cpus=0, concurrency_groups={RESIZE: 1})
class Router:
    """Starts the shards of one server and serves its topology."""

    def __init__(self, config: Config, label: str | None, placements: list[dict]):
        """label: "<namespace>.<name>" of a named server, None for an anonymous one; it names
        the server in metrics and its journal directory. placements: Ray options per shard."""
        server_id = uuid.uuid4().hex
        label = label or f"anonymous-{server_id[:12]}"
        self._shard_class = shard_actor(config.shard.waiter_threads, num_cpus=config.shard.num_cpus,
                                        max_restarts=config.shard.max_restarts)
        self._label = label
        keys, self._server_secret = Keys.generate()
        # Every shard alive, in index order; the topology holds the first ones.
        self._all = [self._start_shard(index, config, keys, placements[index])
                     for index in range(config.shards)]
        self._topology = Topology(server_id=server_id, shards=tuple(s.shard for s in self._all),
                                  config=config, keys=keys,
                                  shard_ids=tuple(s.shard_id for s in self._all),
                                  nodes=tuple(s.node for s in self._all))
        # Held by whatever publishes a topology: resize() and the watcher of lost shards.
        self._changing = threading.Lock()
        self._settled_shards = config.shards
        self._leaving: list = []  # (index, shard) a shrink removed, kept SHRINK_GRACE s as forwarders
        self._leaving_lock = threading.Lock()
        self._topology_requests = 0
        self._names: dict[int, frozenset] = {}  # shard -> its queue names, as last reported
        self._lost: list[dict] = []
        self._node = {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
        threading.Thread(target=self._watch, name="pype-router-watch", daemon=True).start()
        logger.info("pype router started %d shards (%s)", config.shards, config.source)

    def _start_shard(self, index: int, config: Config, keys: Keys, placement: dict,
                     fresh: bool = False) -> _Started:
        """Start shard `index`; fresh=True: a new one (a resize), whose index a shard that a
        shrink removed may have had: the shard sets that journal (which holds no queue) aside."""
        me = ray.get_runtime_context().current_actor
        journal = None
        if config.persistence.dir is not None:  # expanded on the shard's node
            journal = JournalPlace(safe_dir_name(self._label), f"shard-{index}", fresh)
        shard = self._shard_class.options(**placement).remote(
            index, config, journal, me, self._label, keys, self._server_secret)
        return _Started(shard, uuid.uuid4().hex, placement["scheduling_strategy"].node_id)

    def _publish(self, shards: int, lost: frozenset = frozenset()) -> int:
        """Make the first `shards` shards the topology, in a new epoch; return it."""
        started = self._all[:shards]
        epoch = self._topology.epoch + 1
        self._topology = dataclasses.replace(
            self._topology, shards=tuple(s.shard for s in started), epoch=epoch,
            shard_ids=tuple(s.shard_id for s in started), nodes=tuple(s.node for s in started),
            lost=lost)
        return epoch

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
        old = self._topology
        config, seed = old.config, old.config.hash_seed
        started = time.monotonic()
        if shards > len(self._all):
            self._stop_leaving()  # their indices are about to be taken again
            placements = shard_options(config.placement, shards)
            for index in range(len(self._all), shards):
                self._all.append(self._start_shard(index, config, old.keys, placements[index],
                                                   fresh=True))
        receivers = [started.shard for started in self._all[:shards]]
        # Every alive shard may hold queues: one a shrink removed, if that shrink was cut short.
        givers = [started.shard for started in self._all]
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
        leaving = [(index, started.shard) for index, started in enumerate(self._all)][shards:]
        del self._all[shards:]
        if leaving:
            with self._leaving_lock:
                self._leaving += leaving
            timer = threading.Timer(SHRINK_GRACE, self._stop_leaving)
            timer.daemon = True
            timer.start()
        logger.info("pype router: resized from %d to %d shards (epoch %d), moved %d queues in "
                    "%.3f s", len(old.shards), shards, epoch, moved, time.monotonic() - started)
        return {"epoch": epoch, "shards": shards, "moved_queues": moved,
                "seconds": time.monotonic() - started}

    def _each(self, shards: list, *requests: tuple) -> list:
        """Run a step of a move on each of `shards` (requests[i] on shards[i], or the one
        request on all) and return their answers. A shard that Ray is restarting (it died)
        is asked again once it is back: every step can be taken twice."""
        requests = requests * len(shards) if len(requests) == 1 else requests
        deadline = time.monotonic() + self._topology.config.transport.request_timeout
        while True:
            try:
                return ray.get([shard.move.remote(request)
                                for shard, request in zip(shards, requests, strict=True)])
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.ActorDiedError) as error:
                if time.monotonic() > deadline or not _restarting(error):
                    raise
                logger.warning("pype router: a shard died during a resize; asking again: %s",
                               error)
                time.sleep(0.2)

    def _stop_leaving(self) -> None:
        """Stop the shards a shrink removed (their journals stay, holding no queue)."""
        with self._leaving_lock:
            leaving, self._leaving = self._leaving, []
            shards = [shard for _, shard in leaving]
            ray.wait([shard.close.remote() for shard in shards], num_returns=len(shards), timeout=5)
            for _, shard in leaving:
                ray.kill(shard, no_restart=True)

    # -- shards lost with their node ---------------------------------------------------

    def _watch(self) -> None:
        """Keep one until_stopped() call waiting on each shard of the topology; one that
        Ray fails for good (its node died, and a pinned actor cannot start elsewhere)
        means the shard is lost. It costs no traffic while the shards live: Ray fails
        the call when the shard's process dies, and a restarted shard gets a new one."""
        watching: dict = {}  # the call's ref -> (index, shard id)
        while True:
            topology = self._topology
            watched = set(watching.values())
            for index, (shard, shard_id) in enumerate(zip(topology.shards, topology.shard_ids)):
                if index not in topology.lost and (index, shard_id) not in watched:
                    watching[shard.until_stopped.remote()] = (index, shard_id)
            if not watching:  # every shard is lost: wait for a resize
                time.sleep(WATCH_INTERVAL)
                continue
            ended, _ = ray.wait(list(watching), num_returns=1, timeout=WATCH_INTERVAL)
            for ref in ended:
                index, shard_id = watching.pop(ref)
                try:
                    ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError):
                    gone = self._gone_for_good(topology.shards[index])
                    if gone is not None:
                        self._mark_lost(index, shard_id, gone)

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
            logger.error("pype: %s; queues lost: %s", self._topology.lost_shard(index),
                         queues or "(none known)")

    def _replace_lost(self) -> None:
        """Start a new, empty shard in the place of each lost one (resize())."""
        topology = self._topology
        if not topology.lost:
            return
        placements = shard_options(topology.config.placement, len(self._all))
        for index in sorted(topology.lost):
            self._all[index] = self._start_shard(index, topology.config, topology.keys,
                                                 placements[index], fresh=True)
            logger.warning("pype: shard %d starts again, empty, on node %s", index,
                           self._all[index].node)
        self._publish(len(topology.shards))

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
        self._lost.append({"shard": index, "at": time.time(), "queues": lost})
        logger.warning("pype: shard %d restarted without persistence; queues that lost their "
                       "items: %s", index, lost or "(none known)")
        return lost

    def stats(self) -> dict:
        """Where the router runs, how often it was asked for the topology (it is on no data
        path), the queue names each shard last reported, and the shards that lost queues:
        restarted without persistence, or lost with their node."""
        return {**self._node, "topology_requests": self._topology_requests,
                "reported_queues": {index: sorted(names) for index, names in self._names.items()},
                "lost": self._lost}


def _restarting(error: Exception) -> bool:
    """Is the actor of a failed call being restarted by Ray (rather than gone for good)?"""
    return isinstance(error, ray.exceptions.ActorUnavailableError) or "restart" in str(error).lower()
