"""The router actor: owns a server's topology and answers discovery.

It starts the shard actors (so they live exactly as long as it does) and hands
out a Topology, from which every client computes shard_for(name) itself. After
that first call no data operation touches the router.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import ray

from pype.config import Config
from pype.shards.shard import shard_actor

logger = logging.getLogger("pype")


@dataclass(frozen=True)
class Topology:
    """What a client needs to route: the shards in hash order, the seed, the config."""

    server_id: str
    shards: tuple  # of Shard actor handles; index i serves the names shard_for() maps to i
    config: Config


@ray.remote(num_cpus=0)
class Router:
    """Starts the shards of one server and serves its topology."""

    def __init__(self, config: Config):
        shard_class = shard_actor(config.shard.waiter_threads, num_cpus=config.shard.num_cpus,
                                  max_restarts=config.shard.max_restarts)
        shards = tuple(
            shard_class.remote(index, config.queue_defaults, config.shard.poll_wait,
                               config.shard.waiter_threads)
            for index in range(config.shards))
        self._topology = Topology(server_id=uuid.uuid4().hex, shards=shards, config=config)
        self._topology_requests = 0
        logger.info("pype router started %d shards (%s)", config.shards, config.source)

    def topology(self) -> Topology:
        """The topology; each client asks once, when it is made or connects."""
        self._topology_requests += 1
        return self._topology

    def stats(self) -> dict:
        """How often the router was asked for the topology: it is on no data path."""
        return {"topology_requests": self._topology_requests}
