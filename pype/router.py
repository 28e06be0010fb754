"""The router actor: owns a server's topology and answers discovery.

It starts the shard actors (so they live exactly as long as it does) and hands
out a Topology, from which every client computes shard_for(name) itself. After
that first call no data operation touches the router. The topology also carries
the CURVE keys of the native data path (pype.transport): only processes that can
call the router, members of the Ray cluster, get them. Where each shard listens
a client asks the shard itself (Shard.data_address), again after a restart.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import ray

from pype.config import Config
from pype.shards.journal import safe_dir_name
from pype.shards.shard import shard_actor
from pype.transport import Keys

logger = logging.getLogger("pype")


@dataclass(frozen=True)
class Topology:
    """What a client needs to route: the shards in hash order, the seed, the config."""

    server_id: str
    shards: tuple  # of Shard actor handles; index i serves the names shard_for() maps to i
    config: Config
    keys: Keys     # for native calls over TCP


@ray.remote(num_cpus=0)
class Router:
    """Starts the shards of one server and serves its topology."""

    def __init__(self, config: Config, label: str | None, placements: list[dict]):
        """label: "<namespace>.<name>" of a named server, None for an anonymous one; it names
        the server in metrics and its journal directory. placements: Ray options per shard."""
        server_id = uuid.uuid4().hex
        label = label or f"anonymous-{server_id[:12]}"
        journals = None
        if config.persistence.dir is not None:
            journals = config.persistence.dir / safe_dir_name(label)
        shard_class = shard_actor(config.shard.waiter_threads, num_cpus=config.shard.num_cpus,
                                  max_restarts=config.shard.max_restarts)
        me = ray.get_runtime_context().current_actor
        keys, server_secret = Keys.generate()
        shards = tuple(
            shard_class.options(**placements[index]).remote(
                index, config, None if journals is None else journals / f"shard-{index}", me, label,
                keys, server_secret)
            for index in range(config.shards))
        self._topology = Topology(server_id=server_id, shards=shards, config=config, keys=keys)
        self._topology_requests = 0
        self._names: dict[int, frozenset] = {}  # shard -> its queue names, as last reported
        self._lost: list[dict] = []
        logger.info("pype router started %d shards (%s)", config.shards, config.source)

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
        """How often the router was asked for the topology (it is on no data path), the
        queue names each shard last reported, and the restarts of shards that lost queues."""
        return {"topology_requests": self._topology_requests,
                "reported_queues": {index: sorted(names) for index, names in self._names.items()},
                "lost": self._lost}
