"""The Server handle: the seed's API in front of the router and its shards, on two paths.

A Server is a plain picklable object, not an actor, and a thin facade: it checks a
call's arguments, makes the typed request (pype.protocol), and hands it to its
Routes (pype.routing), which finds the queue's shard and follows redirects. Every
data method can be called two ways:

- server.push.remote(...) has the shape of an actor method, as in the original
  single-actor Pype: it returns a ray.ObjectRef at once, errors come from
  ray.get, fire-and-forget is fine, and the handle passes into tasks. These calls
  are Ray actor calls to the shard.
- server.push(...) is the native, synchronous form: it sends the same typed request
  over the shard's data socket (pype.transport) and returns the answer or raises
  the error, in about a tenth of a Ray call's time.

Both reach the same engine in the shard, so they share one set of semantics.
Ordering: one thread's calls to one queue apply in the order it made them, on
either path; a native call is held in the shard until the `.remote()` calls its
process made before it have run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import ray

from pype import partitions as partitioning
from pype.config import load_config
from pype.dead_letters import DeadLetter
from pype.errors import (
    QueueExistsError,
    QueueTimeoutError,
    ServerExistsError,
    ServerNotFoundError,
)
from pype.keeper import Keeper
from pype.options import (
    as_items,
    as_names,
    check_batch_size,
    check_delay,
    check_name,
    check_priority,
    check_timeout,
    check_ttl,
    resolve_capacity,
)
from pype.partitions import Layout
from pype.payloads import by_reference
from pype.placement import check_persistence_dir, router_options, shard_options
from pype.protocol import (
    Add,
    CanPull,
    CanPush,
    DeadLetters,
    Describe,
    Length,
    Move,
    Names,
    Pull,
    Push,
    Remove,
    Render,
    Settle,
)
from pype.router import Router
from pype.routing import PULLS, PUSHES, Routes
from pype.shards.store import COUNTERS
from pype.streams import Consumer, Producer
from pype.topology import Topology

logger = logging.getLogger("pype")

DEFAULT_NAMESPACE = "pype"


def _lease_timeout(timeout: Any) -> float:
    if timeout is None:
        raise TypeError("timeout must be a number of seconds > 0, got None")
    return check_ttl(timeout, "timeout")


@ray.remote(num_cpus=0)
def _total(*counts: int) -> int:
    return sum(counts)


@ray.remote(num_cpus=0)
def _add_in_task(server: Server, arguments: tuple) -> bool:
    return server.add(*arguments)


class _Operation:
    """A data method of the handle: called directly it runs natively, .remote() through Ray."""

    def __init__(self, native, remote):
        self._native, self._remote = native, remote
        functools.update_wrapper(self, native)

    def __get__(self, handle, owner=None):
        return self if handle is None else _BoundOperation(self, handle)


class _BoundOperation:
    __slots__ = ("_handle", "_operation")

    def __init__(self, operation: _Operation, handle: Server):
        self._operation, self._handle = operation, handle

    def __call__(self, *args, **kwargs) -> Any:
        return self._operation._native(self._handle, *args, **kwargs)

    def remote(self, *args, **kwargs) -> ray.ObjectRef:
        self._handle.routes.look_for_a_newer_topology()
        return self._operation._remote(self._handle, *args, **kwargs)

    @property
    def __doc__(self) -> str | None:
        return self._operation.__doc__


class Server:
    """Handle to a Pype server: a router and the shard actors that hold its queues.

    Make one with Server.remote(...) or connect(name). Each data method runs
    natively when called (server.push(x, q)) and through Ray with .remote()
    (server.push.remote(x, q)). Argument errors (TypeError, ValueError) are raised
    by either call itself; errors of the operation (a full queue, a timeout, ...)
    by the native call, or by ray.get of the reference .remote() returns.
    """

    def __init__(self, router: ray.actor.ActorHandle, topology: Topology, name: str | None = None):
        self.routes = Routes(router, topology)  # how this handle reaches the shards (pype.routing)
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
        options: dict[str, Any] = router_options()
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
        placements = shard_options(resolved.placement, resolved.shards, resolved.replicas)
        check_persistence_dir(resolved.persistence, placements)
        keeper = Keeper.options(**{key: value for key, value in options.items()
                                   if key not in ("name", "namespace")}).remote(resolved)
        try:
            # Ray restarts a router whose process dies; it carries on from the keeper's record.
            router = Router.options(**options, max_restarts=-1, max_task_retries=-1).remote(
                resolved, label, placements, keeper)
        except ValueError as error:  # lost a race for the name
            ray.kill(keeper)
            raise ServerExistsError(str(error)) from None
        return cls(router, ray.get(router.topology.remote()), name)

    def shutdown(self) -> None:
        """Stop the server's shards and router. Its queues and their items are gone, but
        for what persistence keeps: a named server started again restores it."""
        shards = ray.get(self.routes.router.actors.remote())  # every replica of every shard
        closing = [shard.close.remote() for shard in shards]  # removes socket files
        ray.wait(closing, num_returns=len(closing), timeout=5)
        keeper = self.routes.topology.keeper
        ray.kill(self.routes.router)  # first: it would take its stopped shards for lost ones
        for shard in shards:
            ray.kill(shard)
        ray.kill(keeper)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_kinds"] = {}  # a cache: each process learns its own
        state["_companions"] = []
        return state

    def keep_alive(self, actor: ray.actor.ActorHandle) -> None:
        """Hold `actor` as long as this handle lives (Ray ends actors nobody holds)."""
        self._companions.append(actor)

    def __repr__(self) -> str:
        label = f"name={self.name!r}, " if self.name else ""
        return f"pype.Server({label}shards={len(self.routes.shards)})"

    # -- the topology: which shards there are (resize changes it) ------------------------

    def resize(self, shards: int) -> dict:
        """Change the server's number of shards while it serves (see docs/scale-out.md).

        Only the queues whose shard changes move, each whole; their producers and
        consumers pause while it moves and go on without an error. Returns the
        router's account: epoch, shards, moved_queues, seconds.
        """
        outcome = ray.get(self.routes.router.resize.remote(shards))
        self.routes.refresh(outcome["epoch"])
        return outcome

    def shard_of(self, queue: str) -> int:
        """Index of the shard that owns `queue`."""
        return self.routes.shard_of(queue)

    def _call_each(self, request: tuple) -> list:
        return ray.get([self.routes.call(index, request) for index in range(len(self.routes.shards))])

    # -- data -------------------------------------------------------------------------------

    @staticmethod
    def _push_request(data: Any, queues: Any, expand: bool, block: bool, timeout: Any,
                      priority: Any, key: Any, ttl: Any, delay: Any) -> Push:
        """A checked Push of the arguments of push(), to every queue it names."""
        names = as_names(queues)
        if key is not None:
            partitioning.partition_for_key(key, 1)  # checks its type
        delay = check_delay(delay)
        if delay and block:
            raise ValueError("a delayed push never waits for room (block=True does not apply)")
        return Push(names, as_items(data, expand), check_priority(priority), bool(block),
                    check_timeout(timeout), key=key, ttl=check_ttl(ttl), delay=delay)

    def _push_native(self, data: Any, queues: str | list[str] | tuple[str, ...], expand: bool = False,
                     block: bool = False, timeout: float | None = None,
                     priority: float | None = None, key: Any = None,
                     ttl: float | None = None, delay: float | None = None) -> int:
        """Push `data` (or with expand=True, each element of a list) to one or more queues.

        Returns the number of items accepted (items x queues). Each queue takes all
        the items or none. A full queue raises QueueFullError, unless block=True
        (wait for room; QueueTimeoutError after `timeout` s) or its overflow policy
        is "block" (the push waits in line) or "drop_oldest". Missing queues are
        created. key (str, bytes or int): on a partitioned queue, pushes with the
        same key go to the same partition, in order; other pushes go to this
        process's partition. ttl: seconds the items live from now; an item not
        delivered by then expires (the queue's own ttl, if shorter, wins; see add()).
        delay: seconds the items wait, out of the queue, before they enter it as if
        pushed then (the push is accepted now; see docs/item-life.md).
        server.push.remote(...) does the same through Ray
        and returns a reference to the count; large items (numpy arrays, bytes)
        then travel by reference through Ray's object store (see pype.payloads);
        natively, numpy arrays of 256 KiB or more cross a node through shared memory
        (pype.segments) and other nodes by value.
        """
        return self.routes.push_to(self._push_request(data, queues, expand, block, timeout,
                                                      priority, key, ttl, delay))

    def _push_remote(self, data: Any, queues: str | list[str] | tuple[str, ...], expand: bool = False,
                     block: bool = False, timeout: float | None = None,
                     priority: float | None = None, key: Any = None,
                     ttl: float | None = None, delay: float | None = None) -> ray.ObjectRef:
        push = self._push_request(data, queues, expand, block, timeout, priority, key, ttl, delay)
        if self._by_reference:
            push = push._replace(items=by_reference(push.items))
        by_shard: dict[int, list[str]] = defaultdict(list)
        for name in push.queues:  # one Push per shard (a partitioned queue's head forwards)
            by_shard[self.routes.shard_of(name)].append(name)
        refs = []
        for index, group in by_shard.items():
            request = push._replace(queues=tuple(group))
            ref = self.routes.call(index, request)
            if request.block:  # second half: waits among the shard's "pushes" threads for room
                ref = self.routes.await_push(index, ref)
            refs.append(ref)
        return refs[0] if len(refs) == 1 else _total.remote(*refs)

    push = _Operation(_push_native, _push_remote)

    def _pull_request(self, queue: str, batch_size: int | None, block: bool | None,
                      timeout: float | None, remove: bool, ack: bool) -> tuple[int, Pull]:
        check_name(queue)
        batch_size = check_batch_size(batch_size)
        timeout = check_timeout(timeout)
        if ack and not remove:
            raise ValueError("ack=True leases items and remove=False only looks at them; "
                             "pass one of them")
        block = block if block is None else bool(block)
        return self.routes.shard_of(queue), Pull(queue, batch_size, block, timeout, bool(remove),
                                                 bool(ack))

    def _pull_native(self, queue: str, batch_size: int | None = None, block: bool | None = None,
                     timeout: float | None = None, remove: bool = True, ack: bool = False) -> list:
        """Pull up to batch_size items (-1: all) from `queue`; returns a list.

        [] when nothing is there. batch_size None means 1 (a batch queue's batch_size
        for batch queues). block=True waits in the shard until a full batch (one item
        for -1) is there, the queue is full, or `timeout` passes; then it returns what
        is there. block None means False, except for batch queues, which wait up to
        their batch_timeout. remove=False peeks.

        ack=False (the default) removes the items: at-most-once delivery. ack=True
        leases them instead and returns a list of (lease_id, item, redelivered)
        triples (redelivered: how often the item was delivered before, leased and not
        acked; 0, false, the first time): ack() the ids when done, nack() to hand the
        items back; a lease neither acked nor nacked within the queue's
        visibility_timeout returns its items to the head of the queue for another
        consumer (at-least-once delivery), unless its max_deliveries is spent.
        server.pull.remote(...) does the same through Ray.
        """
        return self.routes.run(self._pull_request(queue, batch_size, block, timeout, remove, ack)[1])

    def _pull_remote(self, queue: str, batch_size: int | None = None, block: bool | None = None,
                     timeout: float | None = None, remove: bool = True,
                     ack: bool = False) -> ray.ObjectRef:
        index, request = self._pull_request(queue, batch_size, block, timeout, remove, ack)
        if request.block or (request.block is None and self._kind(index, queue) == "batch"):
            return self.routes.wait_call(index, request, PULLS)
        return self.routes.call(index, request._replace(block=False))

    pull = _Operation(_pull_native, _pull_remote)

    def _push_pull_native(self, data: Any, queue: str, source: str, expand: bool = False,
                          batch_size: int | None = None, block: bool | None = None,
                          timeout: float | None = None, ack: bool = False) -> list:
        """Push `data` to `queue`, then pull from `source`, in one round trip: a stage's
        step (native only). Returns what pull(source, batch_size, block, timeout,
        ack=ack) returns.

        Both calls keep their guarantees: the push is numbered like any native push
        (applied once, in order), the pull leases with ack=True. When both queues live
        on one shard (give them one hash tag: "{stage}.in", "{stage}.out") they travel
        as one request; otherwise as two, written together and awaited together. A
        push that was refused (QueueFullError, ...) raises its error with
        `error.pulled`: the items the pull took, [] on one shard, where the pull does
        not run then. Any other error means that the push was applied, or, like
        ShardRestartedError for a push alone, may have been. There is no
        push_pull.remote(): through Ray, a push and a pull are two calls.
        """
        if not isinstance(queue, str):
            raise TypeError(f"push_pull pushes to one queue (a str), got {queue!r}")
        push = self._push_request(data, queue, expand, False, None, None, None, None, None)
        _, pull = self._pull_request(source, batch_size, block, timeout, True, ack)
        return self.routes.push_pull(push, pull)

    def _push_pull_remote(self, *args, **kwargs) -> ray.ObjectRef:
        raise TypeError("push_pull is native only (server.push_pull(...)); through Ray, push "
                        "with server.push.remote(...) and pull with server.pull.remote(...)")

    push_pull = _Operation(_push_pull_native, _push_pull_remote)

    def _kind(self, index: int, queue: str) -> str | None:
        """The kind of `queue`, asked of its shard once (None while it does not exist)."""
        kind = self._kinds.get(queue)
        if kind is None:
            options = ray.get(self.routes.call(index, Describe(queue)))
            if options is not None:
                kind = self._kinds[queue] = options["kind"]
        return kind

    def _settle_request(self, queue: str, lease_ids: Any, outcome: str,
                        delay: float | None = None) -> tuple[int, Settle]:
        check_name(queue)
        ids = [lease_ids] if isinstance(lease_ids, int) else lease_ids
        if not isinstance(ids, (list, tuple)) or any(
                isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise TypeError(f"lease_ids must be an int or a list of ints, got {lease_ids!r}")
        return self.routes.shard_of(queue), Settle(queue, list(ids), outcome, delay)

    @staticmethod
    def _nack_outcome(requeue: bool, delay: Any) -> tuple[str, float | None]:
        delay = check_delay(delay)
        if delay and not requeue:
            raise ValueError("delay applies to items handed back (requeue=True)")
        return ("nack" if requeue else "reject"), delay

    def _ack_native(self, queue: str, lease_ids: int | list[int] | tuple[int, ...]) -> int:
        """Acknowledge leased items of `queue` (from pull(ack=True)): they are gone for good.

        Returns the number acked now: an id acked before is no error and counts 0,
        as SQS's DeleteMessage (an ack sent again after a failover is harmless).
        Raises LeaseNotHeldError for ids whose lease expired (their items went back to
        the queue), that were nacked, or never issued; the other ids are acked.
        """
        return self._settle_native(queue, lease_ids, "ack")

    def _settle_native(self, queue: str, lease_ids: Any, outcome: str) -> int:
        return self.routes.run(self._settle_request(queue, lease_ids, outcome)[1])

    def _ack_remote(self, queue: str, lease_ids: int | list[int] | tuple[int, ...]) -> ray.ObjectRef:
        return self.routes.call(*self._settle_request(queue, lease_ids, "ack"))

    ack = _Operation(_ack_native, _ack_remote)

    def _nack_native(self, queue: str, lease_ids: int | list[int] | tuple[int, ...],
                     requeue: bool = True, delay: float | None = None) -> int:
        """Hand leased items back: they return to the head of `queue` at once, in their
        original order, for the next pull, unless the queue's max_deliveries is spent.
        delay=s: they return after s seconds, as if their lease expired then (a retry
        with back-off; the lease ids are no longer held). requeue=False gives them up
        at once: they go to the queue's dead_letter queue (or are dropped and counted
        without one). Returns and raises like ack()."""
        return self.routes.run(self._settle_request(
            queue, lease_ids, *self._nack_outcome(requeue, delay))[1])

    def _nack_remote(self, queue: str, lease_ids: int | list[int] | tuple[int, ...],
                     requeue: bool = True, delay: float | None = None) -> ray.ObjectRef:
        return self.routes.call(*self._settle_request(
            queue, lease_ids, *self._nack_outcome(requeue, delay)))

    nack = _Operation(_nack_native, _nack_remote)

    def _extend_lease_native(self, queue: str, lease_ids: int | list[int] | tuple[int, ...],
                             timeout: float) -> int:
        """Keep leased items leased `timeout` seconds from now (instead of the queue's
        visibility_timeout from the pull), as SQS's ChangeMessageVisibility. Returns the
        number extended; raises LeaseNotHeldError for ids not held, like ack()."""
        return self.routes.run(self._settle_request(queue, lease_ids, "extend",
                                                    _lease_timeout(timeout))[1])

    def _extend_lease_remote(self, queue: str, lease_ids: int | list[int] | tuple[int, ...],
                             timeout: float) -> ray.ObjectRef:
        return self.routes.call(*self._settle_request(queue, lease_ids, "extend",
                                                      _lease_timeout(timeout)))

    extend_lease = _Operation(_extend_lease_native, _extend_lease_remote)

    # -- conditions ---------------------------------------------------------------------------

    def _can_pull_native(self, queue: str, batch_size: int | None = None) -> bool:
        """True if a pull of batch_size items would be full.

        Waits in the shard up to shard.poll_wait seconds for that before answering
        False, so polling loops do not spin; sees this process's earlier calls.
        """
        check_name(queue)
        return self._can_pull_waiting(queue, check_batch_size(batch_size), None)

    def _can_pull_waiting(self, queue: str, batch_size: int | None, wait: float | None) -> bool:
        """can_pull with the shard's `wait` (None: poll_wait, math.inf: no limit)."""
        return self.routes.run(CanPull(queue, batch_size, wait))

    def _can_pull_remote(self, queue: str, batch_size: int | None = None) -> ray.ObjectRef:
        check_name(queue)
        return self.routes.wait_call(self.routes.shard_of(queue),
                                     CanPull(queue, check_batch_size(batch_size)), PULLS)

    can_pull = _Operation(_can_pull_native, _can_pull_remote)

    def _can_push_native(self, queue: str) -> bool:
        """True if a push of one item would be accepted (waits like can_pull)."""
        check_name(queue)
        return self._can_push_waiting(queue, None)

    def _can_push_waiting(self, queue: str, wait: float | None) -> bool:
        """can_push with the shard's `wait`; on a partitioned queue, this producer's partition."""
        return self.routes.run(CanPush(queue, wait))

    def _can_push_remote(self, queue: str) -> ray.ObjectRef:
        check_name(queue)
        return self.routes.wait_call(self.routes.shard_of(queue), CanPush(queue), PUSHES)

    can_push = _Operation(_can_push_native, _can_push_remote)

    # -- queues -----------------------------------------------------------------------------

    def _add_request(self, queue: str, kind: str | None = None, maxsize: int | None = None,
                     use_locking: bool = False, semaphore: int | None = None,
                     batch_lock: int | None = None, overflow: str | None = None,
                     batch_size: int | None = None, batch_timeout: float | None = None,
                     max_bytes: int | None = None, visibility_timeout: float | None = None,
                     exist_ok: bool = False, partitions: int | None = None,
                     max_deliveries: int | None = None,
                     dead_letter: str | None = None, ttl: float | None = None) -> tuple[int, Add]:
        check_name(queue)
        defaults = self.routes.topology.config.queue_defaults
        kind = kind or defaults.kind
        if kind != "batch" and (batch_size is not None or batch_timeout is not None):
            raise ValueError(f"batch_size and batch_timeout apply to kind='batch', not {kind!r}")
        if overflow is None and (use_locking or semaphore or batch_lock):
            overflow = "block"
        given = {"kind": kind, "overflow": overflow, "batch_size": batch_size,
                 "batch_timeout": batch_timeout, "max_bytes": max_bytes,
                 "visibility_timeout": visibility_timeout, "partitions": partitions,
                 "maxsize": resolve_capacity(maxsize, use_locking, semaphore, batch_lock),
                 "max_deliveries": max_deliveries, "dead_letter": dead_letter, "ttl": ttl}
        options = dataclasses.replace(defaults,
                                      **{key: value for key, value in given.items() if value is not None})
        options.check_dead_letter(queue)
        self._kinds.pop(queue, None)
        return self.routes.shard_of(queue), Add(queue, options, bool(exist_ok))

    def _add_native(self, queue: str, kind: str | None = None, maxsize: int | None = None,
                    use_locking: bool = False, semaphore: int | None = None,
                    batch_lock: int | None = None, overflow: str | None = None,
                    batch_size: int | None = None, batch_timeout: float | None = None,
                    max_bytes: int | None = None, visibility_timeout: float | None = None,
                    exist_ok: bool = False, partitions: int | None = None,
                    max_deliveries: int | None = None, dead_letter: str | None = None,
                    ttl: float | None = None) -> bool:
        """Create `queue`; True if created, False if it existed (with exist_ok).

        Options left None come from the config's queue_defaults. Flow control:
        maxsize bounds the queue; use_locking=True means maxsize 1, semaphore=N and
        batch_lock=N mean maxsize N, with overflow "block" unless given (the seed's
        producers push to locked queues without checking, so a push that does not
        fit waits in line instead of failing). max_bytes bounds the bytes of its
        items. batch_size and batch_timeout belong to kind="batch".
        visibility_timeout: seconds a pull with ack=True leases items.
        max_deliveries=K: an item leased K times and never acked (nacked, or its lease
        expired) is given up instead of returned; dead_letter names the queue that
        given-up items go to (see dead_letters()), on any shard; without one they are
        dropped and counted (stats: dead_dropped). ttl: seconds each item lives from its
        push (a push's own ttl, if shorter, wins); an item not delivered by then expires:
        it goes to the dead_letter queue, or is dropped and counted (stats: expired).
        partitions=K (K > 1) spreads the queue over K partitions on the shards (see
        pype.partitions and the README); maxsize and max_bytes then bound each
        partition. Raises QueueExistsError if it existed (unless exist_ok, which
        still refuses another number of partitions). The .remote() form returns
        once the queue exists, for every process.
        """
        index, request = self._add_request(
            queue, kind, maxsize, use_locking, semaphore, batch_lock, overflow, batch_size,
            batch_timeout, max_bytes, visibility_timeout, exist_ok, partitions, max_deliveries,
            dead_letter, ttl)
        wanted = request.options.partitions
        existing = self.routes.native(index, Describe(queue)) if wanted > 1 else None
        if existing is not None and existing.get("partitions", 1) != wanted:
            raise QueueExistsError(
                f"queue {queue!r} exists with {existing.get('partitions', 1)} partitions; the "
                f"number of partitions of a queue cannot change (remove it and add it again)")
        if wanted > 1 and existing is None:  # the partitions first: a head is never without them
            topology = self.routes.topology
            seed = partitioning.spreading_seed(queue, wanted, len(topology.shards),
                                               topology.config.hash_seed)
            request = request._replace(options=dataclasses.replace(request.options,
                                                                   partition_seed=seed))
            layout = Layout(queue, wanted, request.options, 0)
            self.routes.each_queue([Add(name, layout.partition_options(), True)
                             for name in layout.names()])
        return self.routes.native(index, request)

    def _add_remote(self, queue: str, kind: str | None = None, maxsize: int | None = None,
                    use_locking: bool = False, semaphore: int | None = None,
                    batch_lock: int | None = None, overflow: str | None = None,
                    batch_size: int | None = None, batch_timeout: float | None = None,
                    max_bytes: int | None = None, visibility_timeout: float | None = None,
                    exist_ok: bool = False, partitions: int | None = None,
                    max_deliveries: int | None = None, dead_letter: str | None = None,
                    ttl: float | None = None) -> ray.ObjectRef:
        arguments = (queue, kind, maxsize, use_locking, semaphore, batch_lock, overflow, batch_size,
                     batch_timeout, max_bytes, visibility_timeout, exist_ok, partitions,
                     max_deliveries, dead_letter, ttl)
        index, request = self._add_request(*arguments)
        if request.options.partitions > 1:  # several shards: a task makes them natively
            return self._settled(_add_in_task.remote(self, arguments))
        return self._settled(self.routes.call(index, request))

    add = _Operation(_add_native, _add_remote)

    def _remove_native(self, queue: str) -> int:
        """Delete `queue` and its items; returns how many items it held."""
        check_name(queue)
        self._kinds.pop(queue, None)
        return self.routes.run(Remove(queue))

    def _remove_remote(self, queue: str) -> ray.ObjectRef:
        check_name(queue)
        self._kinds.pop(queue, None)
        return self._settled(self.routes.call(self.routes.shard_of(queue), Remove(queue)))

    remove = _Operation(_remove_native, _remove_remote)

    @staticmethod
    def _settled(ref: ray.ObjectRef) -> ray.ObjectRef:
        """Wait until the call has run, so that calls of any other process see its effect."""
        ray.wait([ref], fetch_local=False)
        return ref

    def _queue_len_native(self, queue: str) -> int:
        """The number of items in `queue` ready to pull (0 if it does not exist)."""
        check_name(queue)
        return self.routes.run(Length(queue))

    def _queue_len_remote(self, queue: str) -> ray.ObjectRef:
        check_name(queue)
        return self.routes.call(self.routes.shard_of(queue), Length(queue))

    queue_len = _Operation(_queue_len_native, _queue_len_remote)

    def _print_queue_native(self, queue: str) -> str:
        """Print `queue` and its items from its shard (Ray shows it in the driver's output)."""
        check_name(queue)
        return self.routes.run(Render(queue))

    def _print_queue_remote(self, queue: str) -> ray.ObjectRef:
        check_name(queue)
        return self.routes.call(self.routes.shard_of(queue), Render(queue))

    print_queue = _Operation(_print_queue_native, _print_queue_remote)

    def _dead_letters_native(self, queue: str, batch_size: int = -1) -> list[DeadLetter]:
        """The dead letters among the first batch_size items of `queue` (-1: all), in pull
        order, left in the queue: DeadLetter(item, queue, reason, deliveries) says which
        queue gave the item up, why ("deliveries": max_deliveries spent; "rejected":
        nack(requeue=False)) and after how many deliveries. Pulls from the queue return
        the items themselves."""
        check_name(queue)
        return self.routes.run(DeadLetters(queue, check_batch_size(batch_size, allow_none=False)))

    def _dead_letters_remote(self, queue: str, batch_size: int = -1) -> ray.ObjectRef:
        check_name(queue)
        request = DeadLetters(queue, check_batch_size(batch_size, allow_none=False))
        return self.routes.call(self.routes.shard_of(queue), request)

    dead_letters = _Operation(_dead_letters_native, _dead_letters_remote)

    def _move_request(self, queue: str, destination: str, count: int) -> tuple[int, Move]:
        check_name(queue)
        check_name(destination)
        if destination == queue:
            raise ValueError(f"queue {queue!r}: a move needs another queue to move to")
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"count must be an int, got {count!r}")
        if count == 0 or count < -1:
            raise ValueError(f"count must be >= 1, or -1 for every item; got {count}")
        index = self.routes.shard_of(queue)
        return index, Move(queue, destination, count, index == self.routes.shard_of(destination))

    def _move_native(self, queue: str, destination: str, count: int = -1) -> int:
        """Move up to `count` items (-1: all) of `queue` to `destination`, in order: a
        redrive (as SQS's, or Redis's LMOVE). On one shard the move is atomic; across
        shards the items leave `queue` at once and reach `destination` exactly once, a
        moment later (its shard's outbox pushes them; a full destination holds them
        there until it has room). Moved items start anew: no delivery count, time to
        live or priority comes along. Returns the number moved."""
        return self.routes.run(self._move_request(queue, destination, count)[1])

    def _move_remote(self, queue: str, destination: str, count: int = -1) -> ray.ObjectRef:
        return self.routes.call(*self._move_request(queue, destination, count))

    move = _Operation(_move_native, _move_remote)

    def _queues_native(self) -> list[str]:
        """The sorted names of all queues of the server."""
        return sorted(name for names in self._call_each(Names()) for name in names
                      if partitioning.split_name(name)[1] is None)

    def _queues_remote(self) -> ray.ObjectRef:
        return ray.put(self._queues_native())

    queues = _Operation(_queues_native, _queues_remote)

    def _stats_native(self) -> dict:
        """Counters: {"totals": ..., "shards": [one per shard], "queues": {name: ...}}.

        Counters: queues, depth (items ready to pull), leased (items pulled with ack=True
        and not yet settled), bytes (held, see README: Limits), pushed, pulled, dropped
        (evicted by drop_oldest), acked, redelivered (leases nacked or expired),
        dead_lettered and dead_dropped (items given up, sent to the queue's dead_letter
        queue or dropped without one; see add()); per shard also outbox (dead letters
        on their way to their queue); per queue also kind, maxsize, max_bytes, waiting_producers and shard; per shard
        also native_requests and ray_requests (requests served on each path; of the
        native ones, tcp_requests came over TCP from other nodes) and waiting_calls
        (requests parked now). "lost" lists shard restarts that lost
        queues (no persistence). A shard that did not answer within
        transport.request_timeout (Ray restarts it, or its node is gone) is listed as
        {"shard": i, "unreachable": why}, and counted nowhere else but in
        totals["unreachable"] (the number of such shards): then the totals are partial.
        A shard lost with its node (one replica) is listed so too, with "lost": True and
        its "node_id", and "lost" (the router's record) says which queues went with it.
        Replicated shards (replicas > 1): "replicas" lists per shard its leader epoch,
        min_insync, whether it is under-replicated (not every replica in sync), and each
        replica's node, role (primary or backup), whether it is in sync, whether it is
        "gone" with its node (until a node is free for a new one), and its lag (the
        records it lacks, as its primary knows, and "lag_bytes", the bytes of the items
        in them; None while unknown); "failovers" lists the
        promotions (shard, when, from, to, epoch); "under_replicated" counts such shards.
        """
        shards = self._each_shards_stats()
        answered = [shard for shard in shards if "unreachable" not in shard]
        queues = {}
        for shard in answered:
            for name, counters in shard.pop("per_queue").items():
                queues[name] = {"shard": shard["shard"], **counters}
        partitioning.fold_stats(queues)
        totals = {key: sum(shard[key] for shard in answered)
                  for key in ("queues", "depth", "leased", "bytes", *COUNTERS, "outbox",
                              "native_requests", "tcp_requests", "ray_requests")}
        totals["unreachable"] = len(shards) - len(answered)
        router = ray.get(self.routes.router.stats.remote())
        replicas = router.pop("replicas")
        for record in replicas:  # how far each backup is behind, as its primary knows
            index = record["shard"]
            replication = shards[index].get("replication", {}) if index < len(shards) else {}
            for replica in record["replicas"]:
                for key in ("lag", "lag_bytes"):
                    replica[key] = (0 if replica["role"] == "primary"
                                    else replication.get(key, {}).get(replica["replica"]))
        return {"server": self.name, "router": router, "totals": totals, "shards": shards,
                "queues": queues, "lost": router["lost"], "replicas": replicas,
                "failovers": router["failovers"],
                "under_replicated": sum(record["under_replicated"] for record in replicas)}

    def _each_shards_stats(self) -> list[dict]:
        """Each shard's stats, in index order, waiting transport.request_timeout at most:
        stats never hang on a shard that cannot be reached (see stats())."""
        topology = self.routes.topology
        asked = {index: shard.stats.remote() for index, shard in enumerate(topology.shards)
                 if index not in topology.lost}
        deadline = time.monotonic() + topology.config.transport.request_timeout
        shards = []
        for index in range(len(topology.shards)):
            if index in topology.lost:
                shards.append({"shard": index, "unreachable": topology.lost_shard(index),
                               "lost": True, "node_id": topology.nodes[index]})
                continue
            try:
                shards.append(ray.get(asked[index], timeout=max(0.0, deadline - time.monotonic())))
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError,
                    ray.exceptions.ActorUnschedulableError) as error:
                shards.append({"shard": index, "unreachable": f"{type(error).__name__}: {error}"[:300]})
        return shards

    def _stats_remote(self) -> ray.ObjectRef:
        return ray.put(self._stats_native())

    stats = _Operation(_stats_native, _stats_remote)

    # -- batching helpers -------------------------------------------------------------------

    def consume(self, queue: str, batch_size: int = -1, timeout: float | None = None) -> Consumer:
        """Iterate over the items of `queue`, pulling batches (see pype.streams.Consumer).

        Ends when a pull waited `timeout` seconds and found nothing (None: never).
        """
        check_name(queue)
        return Consumer(self, queue, check_batch_size(batch_size, allow_none=False),
                        check_timeout(timeout))

    def producer(self, queue: str, batch_size: int = 1000, linger: float = 0.005,
                 block: bool = False, window: int = 8) -> Producer:
        """A buffer that pushes items to `queue` in batches (see pype.streams.Producer)."""
        check_name(queue)
        return Producer(self, queue, batch_size, check_timeout(linger, "linger"), block, window)


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
    check_name(queue)
    if server._can_pull_waiting(queue, check_batch_size(batch_size), _wait_limit(timeout)):
        return True
    raise QueueTimeoutError(f"pull_wait: queue {queue!r} held no full pull "
                            f"(batch_size={batch_size}) within {timeout} s")


def push_wait(server: Server, queue: str, timeout: float | None = 300) -> bool:
    """Block until a push of one item to `queue` would be accepted; return True.

    Raises QueueTimeoutError if there is no room after `timeout` seconds (None:
    wait forever), as the original Pype's helper did.
    """
    check_name(queue)
    if server._can_push_waiting(queue, _wait_limit(timeout)):
        return True
    raise QueueTimeoutError(f"push_wait: queue {queue!r} had no room within {timeout} s")


def _wait_limit(timeout: float | None) -> float:
    """The shard's `wait` for a helper's timeout: None (no limit) is sent as infinity,
    since a shard's own None means its short poll_wait."""
    timeout = check_timeout(timeout)
    return math.inf if timeout is None else timeout
