"""What a client routes by: a server's Topology, and what one process knows of its servers.

The router hands out a Topology; every handle routes by one (pype.routing). This
module also keeps what all the handles of one process share, and what a forked
child must not inherit (ProcessState): the caller id that numbers this process's
`.remote()` calls for read-your-writes, those numbers, the newest topology of
each server seen here, and where each shard incarnation listens.
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass

from pype.config import Config
from pype.transport import DataAddress, Keys


@dataclass(frozen=True)
class Topology:
    """What a client needs to route: the shards in hash order, the seed, the config.

    epoch grows with every resize; a shard that gave a queue away answers requests
    for it with Moved(epoch), and a client then fetches a topology at least that new.
    shard_ids name each shard actor, so that a client never mistakes a new shard at
    an index for the one that was there before a shrink. nodes: the Ray node id of
    each shard. lost: the shards gone with their node (one replica each), which
    every call fails for (ShardUnavailableError) until a resize brings them back.
    keeper: the server's Keeper, which made the shards; Ray keeps an actor only while
    some process holds its handle, and every client holds this one.
    """

    server_id: str
    shards: tuple  # of Shard actor handles; index i serves the names shard_for() maps to i
    config: Config
    keys: Keys     # for native calls over TCP
    epoch: int = 0
    shard_ids: tuple = ()
    nodes: tuple = ()
    lost: frozenset = frozenset()
    keeper: object = None

    def shard_key(self, index: int) -> tuple[str, str]:
        """(server, shard actor) of shard `index`: what this process's call numbers and
        address cache are kept by. A new actor at an index (a shrink and a grow, or
        another shard promoted there) is another key, so its numbering starts afresh."""
        return self.server_id, self.shard_ids[index]

    def lost_shard(self, index: int) -> str:
        """Why shard `index` cannot be reached: what ShardUnavailableError says of a lost one."""
        return (f"shard {index} is lost with its node {self.nodes[index]}: its queues and their "
                f"items are gone (a resize brings the shard back, empty)")


class ProcessState:
    """What the handles of one process share about its servers (see this_process()).

    Read-your-writes (see pype.shards.engine): this process numbers the `.remote()`
    calls it sends to each shard's main thread; a request on any other path carries
    the number of the last one, and the shard holds it until that call has run.
    """

    def __init__(self):
        self.pid = os.getpid()
        self.caller_id = uuid.uuid4().hex
        self._lock = threading.Lock()  # keeps call numbers in the order Ray sends the calls
        self._sent: dict[tuple[str, str], int] = {}
        self._topologies: dict[str, Topology] = {}
        self._addresses: dict[tuple[str, str], DataAddress] = {}

    # -- read-your-writes numbering ----------------------------------------------------

    def send_numbered(self, key: tuple[str, str], send):
        """Call send(sequence) with the next call number of shard `key` and return what it
        returns; the number counts as sent only once send() returned (a number never
        sent would never be run, and later requests would wait for it forever)."""
        with self._lock:
            sequence = self._sent.get(key, 0) + 1
            sent = send(sequence)
            self._sent[key] = sequence
            return sent

    def after(self, key: tuple[str, str]) -> tuple[str, int]:
        """(this process, its last `.remote()` call to shard `key`): what must run first."""
        return self.caller_id, self._sent.get(key, 0)

    # -- topologies and addresses ------------------------------------------------------

    def newest(self, server_id: str) -> Topology | None:
        return self._topologies.get(server_id)

    def saw(self, topology: Topology) -> None:
        """Remember `topology` if it is the newest of its server seen in this process."""
        newest = self._topologies.get(topology.server_id)
        if newest is None or newest.epoch < topology.epoch:
            self._topologies[topology.server_id] = topology

    def address(self, key: tuple[str, str]) -> DataAddress | None:
        return self._addresses.get(key)

    def remember_address(self, key: tuple[str, str], address: DataAddress) -> None:
        self._addresses[key] = address


_state: ProcessState | None = None
_state_lock = threading.Lock()


def this_process() -> ProcessState:
    """This process's ProcessState, new after a fork (a child is another caller)."""
    global _state
    state = _state
    if state is None or state.pid != os.getpid():
        with _state_lock:
            if _state is None or _state.pid != os.getpid():
                _state = ProcessState()
            state = _state
    return state
