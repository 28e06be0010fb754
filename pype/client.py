"""The Server handle: the seed's API in front of the router and its shards.

A Server is a plain picklable object, not an actor. Its methods have the shape of
actor methods (server.push.remote(...) returns a ray.ObjectRef), so code written
for the original single-actor Pype keeps working: pass `server` into tasks,
ray.get what its calls return. Each handle routes by itself: it hashes the queue
name (pype.hashing.shard_for) and calls the owning shard directly.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import threading
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import ray

from pype.config import load_config
from pype.errors import QueueTimeoutError, ServerExistsError, ServerNotFoundError
from pype.hashing import shard_for
from pype.options import (
    as_items,
    as_names,
    check_batch_size,
    check_name,
    check_priority,
    check_timeout,
    resolve_capacity,
)
from pype.payloads import by_reference
from pype.placement import shard_options
from pype.router import Router, Topology
from pype.shards.store import COUNTERS
from pype.streams import Consumer, Producer

logger = logging.getLogger("pype")

DEFAULT_NAMESPACE = "pype"

# Read-your-writes (see pype.shards.store): this process numbers the calls it sends
# to each shard's main thread. The lock keeps the numbers in the order Ray sends.
_sequence_lock = threading.Lock()
_sent: dict[tuple[str, int], int] = {}
_caller = {"pid": -1, "id": ""}


def _caller_id() -> str:
    if _caller["pid"] != os.getpid():
        _caller.update(pid=os.getpid(), id=uuid.uuid4().hex)
    return _caller["id"]


@ray.remote(num_cpus=0)
def _total(*counts: int) -> int:
    return sum(counts)


class _RemoteMethod:
    """Gives a handle method the shape of an actor method: handle.method.remote(...)."""

    def __init__(self, function):
        self._function = function
        functools.update_wrapper(self, function)

    def __get__(self, handle, owner=None):
        if handle is None:
            return self
        return _BoundRemoteMethod(self._function, handle)


class _BoundRemoteMethod:
    __slots__ = ("_function", "_handle")

    def __init__(self, function, handle):
        self._function = function
        self._handle = handle

    def remote(self, *args, **kwargs) -> Any:
        return self._function(self._handle, *args, **kwargs)



class Server:
    """Handle to a Pype server: a router and the shard actors that hold its queues.

    Make one with Server.remote(...) or connect(name). Argument errors (TypeError,
    ValueError) are raised by .remote() itself; errors of the operation (a full
    queue, a timeout, ...) by ray.get of the reference it returns.
    """

    def __init__(self, router: ray.actor.ActorHandle, topology: Topology, name: str | None = None):
        self._router = router
        self._topology = topology
        self._shards = topology.shards
        self._seed = topology.config.hash_seed
        # Items kept by reference die with their pusher; a journal must hold the items.
        self._by_reference = topology.config.persistence.dir is None
        self.name = name
        self._kinds: dict[str, str] = {}  # queue name -> kind, learned on first pull
        self._companions: list = []  # actors that feed this server (video), kept alive with it

    # -- making and finding servers ----------------------------------------------------

    @classmethod
    def remote(cls, config: str | Path | None = None, *, name: str | None = None,
               namespace: str | None = None, detached: bool = False, **overrides: Any) -> Server:
        """Start a server: a router and its shards (the seed's pype.Server.remote()).

        config: a YAML file (default: configs/default.yaml); keyword arguments such as
        shards=8 override it. Without `name` the server is anonymous and lives as
        long as this handle's process; with `name` its router is registered in
        `namespace` (default "pype") so connect(name) finds it from any process.
        detached=True (named servers only) keeps it running after this process
        exits, until shutdown() (what `pype serve` does).
        """
        if detached and name is None:
            raise ValueError("a detached server needs a name, to be found and shut down later")
        resolved = load_config(config, **overrides)
        if not ray.is_initialized():
            ray.init()
        options: dict[str, Any] = {}
        label = None
        if name is not None:
            namespace = namespace or DEFAULT_NAMESPACE
            if _find_router(name, namespace) is not None:
                raise ServerExistsError(
                    f"a Pype server named {name!r} already runs in namespace {namespace!r}; "
                    f"use pype.connect({name!r}) to reach it")
            options.update(name=name, namespace=namespace)
            label = f"{namespace}.{name}"  # a named server started again finds its journals
            if detached:
                options["lifetime"] = "detached"
        try:
            router = Router.options(**options).remote(
                resolved, label, shard_options(resolved.placement, resolved.shards))
        except ValueError as error:  # lost a race for the name
            raise ServerExistsError(str(error)) from None
        return cls(router, ray.get(router.topology.remote()), name)

    def shutdown(self) -> None:
        """Stop the server's shards and router; its queues and their items are gone."""
        for shard in self._shards:
            ray.kill(shard)
        ray.kill(self._router)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_kinds"] = {}
        state["_companions"] = []
        return state

    def keep_alive(self, actor: ray.actor.ActorHandle) -> None:
        """Hold `actor` as long as this handle lives (Ray ends actors nobody holds)."""
        self._companions.append(actor)

    def __repr__(self) -> str:
        label = f"name={self.name!r}, " if self.name else ""
        return f"pype.Server({label}shards={len(self._shards)})"

    # -- routing --------------------------------------------------------------------------

    def shard_of(self, queue: str) -> int:
        """Index of the shard that owns `queue`."""
        return shard_for(queue, len(self._shards), self._seed)

    def _call(self, index: int, method: str, *args: Any) -> ray.ObjectRef:
        """Call a main-thread method of shard `index`, numbering the call."""
        key = (self._topology.server_id, index)
        with _sequence_lock:
            sequence = _sent.get(key, 0) + 1
            ref = getattr(self._shards[index], method).remote((_caller_id(), sequence), *args)
            _sent[key] = sequence  # only once sent: a number never sent would never be run
            return ref

    def _wait_call(self, index: int, method: str, *args: Any) -> ray.ObjectRef:
        """Call a waiting method of shard `index`, after this process's earlier calls."""
        after = (_caller_id(), _sent.get((self._topology.server_id, index), 0))
        return getattr(self._shards[index], method).remote(after, *args)

    def _call_each(self, method: str) -> list:
        return ray.get([self._call(index, method) for index in range(len(self._shards))])

    # -- data -------------------------------------------------------------------------------

    @_RemoteMethod
    def push(self, data: Any, queues: str | list[str] | tuple[str, ...], expand: bool = False,
             block: bool = False, timeout: float | None = None,
             priority: float | None = None) -> ray.ObjectRef:
        """Push `data` (or with expand=True, each element of a list) to one or more queues.

        The reference resolves to the number of items accepted (items x queues).
        Each queue takes all the items or none. A full queue raises QueueFullError,
        unless block=True (wait for room; QueueTimeoutError after `timeout` s) or
        its overflow policy is "block" (the push waits in line) or "drop_oldest".
        Missing queues are created. Large items (numpy arrays, bytes) travel by
        reference through Ray's object store (see pype.payloads).
        """
        names = as_names(queues)
        items = as_items(data, expand)
        if self._by_reference:
            items = by_reference(items)
        timeout = check_timeout(timeout)
        priority = check_priority(priority)
        block = bool(block)
        by_shard: dict[int, list[str]] = defaultdict(list)
        for name in names:
            by_shard[self.shard_of(name)].append(name)
        refs = []
        for index, group in by_shard.items():
            ref = self._call(index, "push", tuple(group), items, priority, block, timeout)
            if block:  # second half: waits among the shard's "pushes" threads for room
                ref = self._shards[index].await_push.remote(ref)
            refs.append(ref)
        return refs[0] if len(refs) == 1 else _total.remote(*refs)

    @_RemoteMethod
    def pull(self, queue: str, batch_size: int | None = None, block: bool | None = None,
             timeout: float | None = None, remove: bool = True, ack: bool = False) -> ray.ObjectRef:
        """Pull up to batch_size items (-1: all) from `queue`; resolves to a list.

        [] when nothing is there. batch_size None means 1 (a batch queue's batch_size
        for batch queues). block=True waits in the shard until a full batch (one item
        for -1) is there, the queue is full, or `timeout` passes; then it returns what
        is there. block None means False, except for batch queues, which wait up to
        their batch_timeout. remove=False peeks.

        ack=False (the default) removes the items: at-most-once delivery. ack=True
        leases them instead and resolves to a list of (lease_id, item, redelivered)
        triples (redelivered: the item was leased before and came back): ack() the
        ids when done, nack() to hand the items back; a lease neither acked nor
        nacked within the queue's visibility_timeout returns its items to the head
        of the queue for another consumer (at-least-once delivery).
        """
        check_name(queue)
        batch_size = check_batch_size(batch_size)
        timeout = check_timeout(timeout)
        if ack and not remove:
            raise ValueError("ack=True leases items and remove=False only looks at them; "
                             "pass one of them")
        ack = bool(ack)
        index = self.shard_of(queue)
        if block or (block is None and self._kind(index, queue) == "batch"):
            return self._wait_call(index, "pull_waiting", queue, batch_size, block, timeout, remove,
                                   ack)
        return self._call(index, "pull", queue, batch_size, False, timeout, remove, ack)

    @_RemoteMethod
    def ack(self, queue: str, lease_ids: int | list[int] | tuple[int, ...]) -> ray.ObjectRef:
        """Acknowledge leased items of `queue` (from pull(ack=True)): they are gone for good.

        Resolves to the number acked. Raises LeaseNotHeldError for ids whose lease
        expired (their items went back to the queue), were settled before, or were
        never issued; the other ids are acked.
        """
        return self._settle(queue, lease_ids, requeue=False)

    @_RemoteMethod
    def nack(self, queue: str, lease_ids: int | list[int] | tuple[int, ...]) -> ray.ObjectRef:
        """Hand leased items back: they return to the head of `queue` at once, in their
        original order, for the next pull. Resolves and raises like ack()."""
        return self._settle(queue, lease_ids, requeue=True)

    def _settle(self, queue: str, lease_ids: Any, requeue: bool) -> ray.ObjectRef:
        check_name(queue)
        ids = [lease_ids] if isinstance(lease_ids, int) else lease_ids
        if not isinstance(ids, (list, tuple)) or any(
                isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise TypeError(f"lease_ids must be an int or a list of ints, got {lease_ids!r}")
        return self._call(self.shard_of(queue), "settle", queue, list(ids), requeue)

    def _kind(self, index: int, queue: str) -> str | None:
        """The kind of `queue`, asked of its shard once (None while it does not exist)."""
        kind = self._kinds.get(queue)
        if kind is None:
            options = ray.get(self._call(index, "describe", queue))
            if options is not None:
                kind = self._kinds[queue] = options["kind"]
        return kind

    @_RemoteMethod
    def can_pull(self, queue: str, batch_size: int | None = None) -> ray.ObjectRef:
        """Resolves to True if a pull of batch_size items would be full.

        Waits in the shard up to shard.poll_wait seconds for that before answering
        False, so polling loops do not spin; sees this process's earlier calls.
        """
        return self._wait_until("can_pull", queue, check_batch_size(batch_size))

    @_RemoteMethod
    def can_push(self, queue: str) -> ray.ObjectRef:
        """Resolves to True if a push of one item would be accepted (waits like can_pull)."""
        return self._wait_until("can_push", queue)

    # -- queues -----------------------------------------------------------------------------

    @_RemoteMethod
    def add(self, queue: str, kind: str | None = None, maxsize: int | None = None,
            use_locking: bool = False, semaphore: int | None = None, batch_lock: int | None = None,
            overflow: str | None = None, batch_size: int | None = None,
            batch_timeout: float | None = None, max_bytes: int | None = None,
            visibility_timeout: float | None = None, exist_ok: bool = False) -> ray.ObjectRef:
        """Create `queue`. Options left None come from the config's queue_defaults.

        Flow control: maxsize bounds the queue; use_locking=True means maxsize 1,
        semaphore=N and batch_lock=N mean maxsize N, with overflow "block" unless
        given (the seed's producers push to locked queues without checking, so a
        push that does not fit waits in line instead of failing). max_bytes bounds
        the bytes of its items. batch_size and batch_timeout belong to kind="batch".
        visibility_timeout: seconds a pull with ack=True leases items. The queue
        exists once this returns, for every process; the reference raises
        QueueExistsError if it existed (unless exist_ok).
        """
        check_name(queue)
        kind = kind or self._topology.config.queue_defaults.kind
        if kind != "batch" and (batch_size is not None or batch_timeout is not None):
            raise ValueError(f"batch_size and batch_timeout apply to kind='batch', not {kind!r}")
        if overflow is None and (use_locking or semaphore or batch_lock):
            overflow = "block"
        given = {"kind": kind, "overflow": overflow, "batch_size": batch_size,
                 "batch_timeout": batch_timeout, "max_bytes": max_bytes,
                 "visibility_timeout": visibility_timeout,
                 "maxsize": resolve_capacity(maxsize, use_locking, semaphore, batch_lock)}
        options = dataclasses.replace(self._topology.config.queue_defaults,
                                      **{key: value for key, value in given.items() if value is not None})
        self._kinds.pop(queue, None)
        return self._settled(self._call(self.shard_of(queue), "add", queue, options, bool(exist_ok)))

    @_RemoteMethod
    def remove(self, queue: str) -> ray.ObjectRef:
        """Delete `queue` and its items; resolves to how many items it held."""
        check_name(queue)
        self._kinds.pop(queue, None)
        return self._settled(self._call(self.shard_of(queue), "remove", queue))

    @staticmethod
    def _settled(ref: ray.ObjectRef) -> ray.ObjectRef:
        """Wait until the call has run, so that calls of any other process see its effect."""
        ray.wait([ref], fetch_local=False)
        return ref

    @_RemoteMethod
    def queue_len(self, queue: str) -> ray.ObjectRef:
        """Resolves to the number of items in `queue` (0 if it does not exist)."""
        check_name(queue)
        return self._call(self.shard_of(queue), "queue_len", queue)

    @_RemoteMethod
    def print_queue(self, queue: str) -> ray.ObjectRef:
        """Print `queue` and its items from its shard (Ray shows it in the driver's output)."""
        check_name(queue)
        return self._call(self.shard_of(queue), "print_queue", queue)

    @_RemoteMethod
    def queues(self) -> ray.ObjectRef:
        """Resolves to the sorted names of all queues of the server."""
        return ray.put(sorted(name for names in self._call_each("queues") for name in names))

    @_RemoteMethod
    def stats(self) -> ray.ObjectRef:
        """Resolves to counters: {"totals": ..., "shards": [one per shard], "queues": {name: ...}}.

        Counters: queues, depth (items ready to pull), leased (items pulled with ack=True
        and not yet settled), bytes (held, see README: Limits), pushed, pulled, dropped
        (evicted by drop_oldest), acked, redelivered (leases nacked or expired); per
        queue also kind, maxsize, max_bytes, waiting_producers and shard. "lost" lists
        shard restarts that lost queues (no persistence).
        """
        shards = self._call_each("stats")
        queues = {}
        for shard in shards:
            for name, counters in shard.pop("per_queue").items():
                queues[name] = {"shard": shard["shard"], **counters}
        totals = {key: sum(shard[key] for shard in shards)
                  for key in ("queues", "depth", "leased", "bytes", *COUNTERS)}
        router = ray.get(self._router.stats.remote())
        return ray.put({"server": self.name, "router": router, "totals": totals, "shards": shards,
                        "queues": queues, "lost": router["lost"]})

    # -- batching helpers -------------------------------------------------------------------

    def consume(self, queue: str, batch_size: int = -1, timeout: float | None = None) -> Consumer:
        """Iterate over the items of `queue`, pulling batches (see pype.streams.Consumer).

        Ends when a pull waited `timeout` seconds and found nothing (None: never).
        """
        check_name(queue)
        return Consumer(self, queue, check_batch_size(batch_size, allow_none=False),
                        check_timeout(timeout))

    def producer(self, queue: str, batch_size: int = 1000, linger: float = 0.005,
                 block: bool = False) -> Producer:
        """A buffer that pushes items to `queue` in batches (see pype.streams.Producer)."""
        check_name(queue)
        return Producer(self, queue, batch_size, check_timeout(linger, "linger"), block)

    # -- waiting for conditions -----------------------------------------------------------

    def _wait_until(self, method: str, queue: str, *args: Any) -> ray.ObjectRef:
        check_name(queue)
        return self._wait_call(self.shard_of(queue), method, queue, *args)


def connect(name: str = "pype", namespace: str | None = None, address: str | None = None) -> Server:
    """Return a handle to the running server `name` (see Server.remote(name=...)).

    Starts Ray's connection first if this process has none (address "auto" by
    default: the cluster this machine belongs to). Raises ServerNotFoundError.
    """
    if not ray.is_initialized():
        ray.init(address=address or "auto")
    namespace = namespace or DEFAULT_NAMESPACE
    router = _find_router(name, namespace)
    if router is None:
        raise ServerNotFoundError(f"no Pype server named {name!r} in namespace {namespace!r}")
    return Server(router, ray.get(router.topology.remote()), name)


def _find_router(name: str, namespace: str) -> ray.actor.ActorHandle | None:
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def pull_wait(server: Server, queue: str, batch_size: int | None = None,
              timeout: float | None = 300) -> bool:
    """Block until `queue` holds a full pull of batch_size items; return True.

    Raises QueueTimeoutError if that has not happened after `timeout` seconds
    (None: wait forever), as the original Pype's helper did. The wait happens in
    the shard, without polling, and sees this process's earlier pushes.
    """
    if ray.get(server._wait_until("can_pull", queue, check_batch_size(batch_size),
                                  _wait_limit(timeout))):
        return True
    raise QueueTimeoutError(f"pull_wait: queue {queue!r} held no full pull "
                            f"(batch_size={batch_size}) within {timeout} s")


def push_wait(server: Server, queue: str, timeout: float | None = 300) -> bool:
    """Block until a push of one item to `queue` would be accepted; return True.

    Raises QueueTimeoutError if there is no room after `timeout` seconds (None:
    wait forever), as the original Pype's helper did.
    """
    if ray.get(server._wait_until("can_push", queue, _wait_limit(timeout))):
        return True
    raise QueueTimeoutError(f"push_wait: queue {queue!r} had no room within {timeout} s")


def _wait_limit(timeout: float | None) -> float:
    """The shard's `wait` for a helper's timeout: None (no limit) is sent as infinity,
    since a shard's own None means its short poll_wait."""
    timeout = check_timeout(timeout)
    return math.inf if timeout is None else timeout
