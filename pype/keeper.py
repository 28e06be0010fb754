"""The keeper: what must outlive a restart of the router's process.

Ray ends an actor when the process that made it dies, so shards that the router
made would die with the router. The keeper makes them instead and holds the
router's record (its topology, every shard's replicas, leader epochs and in-sync
sets), so Ray can restart the router and the new process carries on with the same
shards. It does nothing else, which is why it is less likely to die than the
router; if it does die, its shards die with it, as all of them once died with the
router.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ray

from pype.config import Config
from pype.shards.shard import shard_actor


@dataclasses.dataclass
class RouterRecord:
    """What a restarted router needs to carry on: written before every change it makes
    visible, so that it never acts on less than it told anyone."""

    topology: Any  # pype.topology.Topology
    label: str
    server_secret: bytes
    shards: list  # of router._Shard, every one alive, in index order
    names: dict  # shard index -> the queue names it last reported (as of the last save)
    settled_shards: int  # the shard count of the last resize that finished
    leaving: list  # (index, router._Shard) a shrink removed, still forwarding
    lost: list[dict]
    failovers: list[dict]
    gone: set[str]  # replicas gone for good with their node


@ray.remote(num_cpus=0)
class Keeper:
    """Makes a server's shard actors, so they live as long as it does, and holds the
    router's last record."""

    def __init__(self, config: Config):
        self._shard_class = shard_actor(config.shard.waiter_threads, num_cpus=config.shard.num_cpus,
                                        max_restarts=config.shard.max_restarts)
        self._record: RouterRecord | None = None
        self._generation = 0  # of the router process that may save
        self._made: dict[str, ray.actor.ActorHandle] = {}  # replica id -> shard actor

    def make(self, replica_id: str, options: dict, *args) -> ray.actor.ActorHandle:
        """Start a shard actor with Ray `options`; its __init__ takes `args`."""
        actor = self._shard_class.options(**options).remote(*args)
        self._made[replica_id] = actor
        return actor

    def load(self) -> tuple[int, RouterRecord | None]:
        """A new generation for the router process that asks, and the last record (None
        before any: it starts anew). From now on saves of older generations, a dead
        router's that were still on their way, are ignored: it told nobody of them."""
        self._generation += 1
        return self._generation, self._record

    def save(self, generation: int, record: RouterRecord) -> None:
        if generation == self._generation:
            self._record = record

    def keep_only(self, replica_ids: set[str]) -> None:
        """Stop the shard actors made for replicas other than `replica_ids`, and wait
        until they are gone: a router that died between making one and recording it
        never knew it, and one started anew reopens the same journals."""
        stopping = [self._made.pop(replica_id) for replica_id in set(self._made) - replica_ids]
        for actor in stopping:
            ray.kill(actor, no_restart=True)
        ray.wait([actor.until_stopped.remote() for actor in stopping],
                 num_returns=len(stopping), timeout=30)
