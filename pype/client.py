"""The Server handle: the seed's API in front of the router and its shards, on two paths.

A Server is a plain picklable object, not an actor. Each handle routes by itself:
it hashes the queue name (pype.hashing.shard_for) and talks to the owning shard
directly. Every data method can be called two ways:

- server.push.remote(...) has the shape of an actor method, as in the original
  single-actor Pype: it returns a ray.ObjectRef at once, errors come from
  ray.get, fire-and-forget is fine, and the handle passes into tasks. These calls
  are Ray actor calls to the shard.
- server.push(...) is the native, synchronous form: it sends the same typed request
  (pype.protocol) over the shard's ZeroMQ socket (pype.transport) and returns the
  answer or raises the error, in about a tenth of a Ray call's time.

Both reach the same loop in the shard (pype.shards.loop), so they share one set of
semantics. Ordering: one thread's calls to one queue apply in the order it made
them, on either path; a native call is held in the shard until the `.remote()`
calls its process made before it have run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import ray

from pype import partitions as partitioning
from pype.config import load_config
from pype.errors import (
    QueueExistsError,
    QueueNotFoundError,
    QueueTimeoutError,
    ServerExistsError,
    ServerNotFoundError,
    ShardUnavailableError,
)
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
from pype.partitions import Layout, Partitioned
from pype.payloads import by_reference
from pype.placement import shard_options
from pype.protocol import (
    Add,
    CanPull,
    CanPush,
    Describe,
    Length,
    Moved,
    Names,
    Pull,
    Push,
    Remove,
    Render,
    Settle,
)
from pype.router import Router, Topology
from pype.shards.store import COUNTERS
from pype.streams import Consumer, Producer
from pype.transport import DataAddress, Pipeline

logger = logging.getLogger("pype")

DEFAULT_NAMESPACE = "pype"
PULLS, PUSHES = "pulls", "pushes"  # the shard's groups of threads for `.remote()` calls that wait
MAX_REMEMBERED = 100_000  # queue names whose shard a handle remembers
REDIRECTS = 3  # times a call follows Partitioned or a stale layout before it gives up
RESTART_POLL = 0.1  # seconds between asks for the address of a shard Ray is restarting
TOPOLOGY_CHECK = 1.0  # seconds between a `.remote()` caller's looks for a newer topology

# Read-your-writes (see pype.shards.loop): this process numbers the `.remote()` calls it
# sends to each shard's main thread. The lock keeps the numbers in the order Ray sends.
_sequence_lock = threading.Lock()
_sent: dict[tuple[str, int], int] = {}
_caller = {"pid": -1, "id": ""}
# Where each shard's current incarnation listens, learned from the shard (per process).
_addresses: dict[tuple[str, str], DataAddress] = {}
# The newest topology of each server this process has seen (server id -> Topology).
_topologies: dict[str, Topology] = {}
_this_thread = threading.local()  # pid, and server id -> this thread's Pipeline


def _caller_id() -> str:
    if _caller["pid"] != os.getpid():
        _caller.update(pid=os.getpid(), id=uuid.uuid4().hex)
        _sent.clear()
        _addresses.clear()
    return _caller["id"]


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
        self._handle._look_for_a_newer_topology()
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
        self._router = router
        self._topology = topology
        self._shards = topology.shards
        self._seed = topology.config.hash_seed
        self._newer: ray.ObjectRef | None = None  # a topology asked of the router, not yet seen
        self._next_look = 0.0
        self._sent_by_old: dict[int, ray.ObjectRef] = {}  # shard -> the last `.remote()` call to it
        # Items kept by reference die with their pusher; a journal must hold the items.
        self._by_reference = topology.config.persistence.dir is None
        self.name = name
        self._kinds: dict[str, str] = {}  # queue name -> kind, learned on first pull
        self._owners: dict[str, int] = {}  # queue name -> shard index
        # queue -> its layout (pype.partitions) if partitioned, None if known to be plain
        self._layouts: dict[str, Layout | None] = {}
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
        closing = [shard.close.remote() for shard in self._shards]  # removes socket files
        ray.wait(closing, num_returns=len(closing), timeout=5)
        for shard in self._shards:
            ray.kill(shard)
        ray.kill(self._router)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_kinds"] = {}
        state["_owners"] = {}  # caches: each process learns its own
        state["_layouts"] = {}
        state["_companions"] = []
        state["_newer"] = None  # an ObjectRef must not be pickled out of band
        state["_sent_by_old"] = {}
        return state

    def keep_alive(self, actor: ray.actor.ActorHandle) -> None:
        """Hold `actor` as long as this handle lives (Ray ends actors nobody holds)."""
        self._companions.append(actor)

    def __repr__(self) -> str:
        label = f"name={self.name!r}, " if self.name else ""
        return f"pype.Server({label}shards={len(self._shards)})"

    # -- the topology: which shards there are (resize changes it) ------------------------

    def resize(self, shards: int) -> dict:
        """Change the server's number of shards while it serves (see README, Resizing).

        Only the queues whose shard changes move, each whole; their producers and
        consumers pause while it moves and go on without an error. Returns the
        router's account: epoch, shards, moved_queues, seconds.
        """
        outcome = ray.get(self._router.resize.remote(shards))
        self._refresh(outcome["epoch"])
        return outcome

    def _adopt(self, topology: Topology) -> None:
        """Route by `topology` from now on if it is newer than this handle's."""
        newest = _topologies.get(topology.server_id)
        if newest is None or newest.epoch < topology.epoch:
            _topologies[topology.server_id] = topology
        if topology.epoch > self._topology.epoch:
            self._topology, self._shards = topology, topology.shards
            self._owners.clear()
            self._sent_by_old.clear()
            logger.info("pype: server %s now has %d shards (topology epoch %d)",
                        self.name or topology.server_id[:12], len(topology.shards), topology.epoch)

    def _refresh(self, epoch: int) -> None:
        """Fetch a topology of at least `epoch` (a shard said Moved(epoch))."""
        newest = _topologies.get(self._topology.server_id)
        if newest is not None:
            self._adopt(newest)
        deadline = time.monotonic() + self._topology.config.transport.request_timeout
        while self._topology.epoch < epoch:
            self._adopt(ray.get(self._router.topology.remote()))
            if self._topology.epoch < epoch:
                if time.monotonic() > deadline:
                    raise ShardUnavailableError(
                        f"the router did not publish topology epoch {epoch} within "
                        f"{self._topology.config.transport.request_timeout:g} s")
                time.sleep(RESTART_POLL)

    def _look_for_a_newer_topology(self) -> None:
        """Let `.remote()` callers, which never wait, learn of a resize: at most once a
        TOPOLOGY_CHECK, ask the router, and adopt its answer on a later call once it came
        and every call sent by the old topology has run. Until then a shard that gave a
        queue away runs the calls for it on the caller's behalf, in the caller's order,
        so that a call sent to the new shard never overtakes one still on its way there."""
        now = time.monotonic()
        if now < self._next_look:
            return
        if self._newer is None:
            self._newer = self._router.topology.remote()
            return
        ready, _ = ray.wait([self._newer], timeout=0)
        if not ready:
            return
        newer = ray.get(self._newer)
        if newer.epoch > self._topology.epoch and self._sent_by_old:
            calls = list(self._sent_by_old.values())
            done, _ = ray.wait(calls, num_returns=len(calls), timeout=0, fetch_local=False)
            if len(done) < len(calls):
                self._next_look = now + RESTART_POLL / 10
                return
        self._adopt(newer)
        self._newer = None
        self._next_look = now + TOPOLOGY_CHECK

    # -- routing and the two paths -----------------------------------------------------------

    def shard_of(self, queue: str) -> int:
        """Index of the shard that owns `queue` (remembered: hashing costs microseconds)."""
        index = self._owners.get(queue)
        if index is None:
            index = self._owners[queue] = shard_for(queue, len(self._shards), self._seed)
            if len(self._owners) > MAX_REMEMBERED:
                self._owners.clear()
        return index

    def _call(self, index: int, request: tuple) -> ray.ObjectRef:
        """Send `request` to the main thread of shard `index` through Ray, numbering the call."""
        key = self._shard_key(index)
        caller = _caller_id()
        with _sequence_lock:
            sequence = _sent.get(key, 0) + 1
            ref = self._shards[index].call.remote(request, (caller, sequence))
            _sent[key] = sequence  # only once sent: a number never sent would never be run
            self._sent_by_old[index] = ref
            return ref

    def _after(self, index: int) -> tuple[str, int]:
        """(this process, its last `.remote()` call to shard `index`), which must run first."""
        caller = _caller_id()
        return caller, _sent.get(self._shard_key(index), 0)

    def _shard_key(self, index: int) -> tuple[str, str]:
        """(server, shard actor): a shard started at an index that another had before a
        shrink is another shard."""
        return self._topology.server_id, self._topology.shard_ids[index]

    def _wait_call(self, index: int, request: tuple, group: str) -> ray.ObjectRef:
        """Send a request that may wait to shard `index` through Ray (a thread of `group`)."""
        shard = self._shards[index]
        method = shard.wait_pull if group == PULLS else shard.wait_push
        return method.remote(request, self._after(index))

    def _call_each(self, request: tuple) -> list:
        return ray.get([self._call(index, request) for index in range(len(self._shards))])

    def pipeline(self) -> Pipeline:
        """This thread's pipeline of native requests to the server's shards (pype.transport)."""
        pipelines = getattr(_this_thread, "pipelines", None)
        if pipelines is None or _this_thread.pid != os.getpid():
            pipelines = _this_thread.pipelines = {}
            _this_thread.pid = os.getpid()
        pipeline = pipelines.get(self._topology.server_id)
        if pipeline is None:
            pipeline = pipelines[self._topology.server_id] = self.new_pipeline()
        return pipeline

    def new_pipeline(self) -> Pipeline:
        """A pipeline of native requests of its own (a Producer's or a Consumer's)."""
        if not ray.is_initialized():
            ray.init()
        return Pipeline(self._topology.keys, self._locate, ray.get_runtime_context().get_node_id(),
                        self._topology.config.transport.request_timeout)

    def _native(self, index: int, request: tuple, wait: float | None = 0.0) -> Any:
        """Run `request` natively on shard `index`; `wait`: seconds it may wait there.

        If the queue moved to another shard (a resize), send it there."""
        for _ in range(REDIRECTS):
            try:
                return self.pipeline().call(index, self._after(index), request, wait)
            except Moved as moved:
                self._refresh(moved.epoch)
                index = self.shard_of(moved.queue)
            except ShardUnavailableError:  # a shrink may have stopped it: is there a newer topology?
                epoch = self._topology.epoch
                self._adopt(ray.get(self._router.topology.remote()))
                queue = getattr(request, "queue", None)
                if self._topology.epoch == epoch or queue is None:
                    raise
                index = self.shard_of(queue)
        raise RuntimeError(f"pype: {type(request).__name__} kept meeting moved queues")

    def result(self, ticket: tuple[int, int], request: tuple, wait: float | None = 0.0,
               pipeline: Pipeline | None = None) -> Any:
        """pipeline.result(ticket) (default: this thread's pipeline), sending `request` (a
        single queue's) to the queue's new shard if it moved (partitions, consume())."""
        pipeline = pipeline or self.pipeline()
        for _ in range(REDIRECTS):
            try:
                return pipeline.result(ticket, wait)
            except Moved as moved:
                self._refresh(moved.epoch)
                index = self.shard_of(moved.queue)
                ticket = pipeline.send(index, self._after(index), request)
        return pipeline.result(ticket, wait)

    def _locate(self, index: int, fresh: bool = False) -> DataAddress:
        """Where shard `index` listens; fresh=True asks it again (after a restart)."""
        newest = _topologies.get(self._topology.server_id)  # pipelines are shared by handles
        if newest is not None:
            self._adopt(newest)
        if index >= len(self._shards):
            raise ShardUnavailableError(f"shard {index} was removed by a resize")
        key = self._shard_key(index)
        _caller_id()  # forgets the addresses of a parent process
        address = _addresses.get(key)
        if address is not None and not fresh:
            return address
        timeout = self._topology.config.transport.request_timeout
        deadline = time.monotonic() + timeout
        while True:
            try:
                address = ray.get(self._shards[index].data_address.remote(),
                                  timeout=max(0.0, deadline - time.monotonic()))
                break
            except ray.exceptions.GetTimeoutError:
                raise ShardUnavailableError(
                    f"shard {index} did not answer within {timeout:g} s "
                    f"(transport.request_timeout); Ray may still be restarting it") from None
            except ray.exceptions.ActorUnavailableError:  # Ray is restarting it: ask again
                if time.monotonic() >= deadline:
                    raise ShardUnavailableError(
                        f"shard {index} did not come back within {timeout:g} s "
                        f"(transport.request_timeout)") from None
                time.sleep(RESTART_POLL)
            except ray.exceptions.RayActorError as error:
                raise ShardUnavailableError(f"shard {index} is gone for good: {error}") from None
        _addresses[key] = address
        return address

    # -- data -------------------------------------------------------------------------------

    def _push_requests(self, data: Any, queues: Any, expand: bool, block: bool, timeout: Any,
                       priority: Any, by_reference_: bool = False, key: Any = None) -> dict[int, Push]:
        """The `.remote()` push: one Push per shard (a partitioned queue's head forwards)."""
        names = as_names(queues)
        if key is not None:
            partitioning.partition_for_key(key, 1)  # checks its type
        items = as_items(data, expand)
        if by_reference_:
            items = by_reference(items)
        timeout, priority = check_timeout(timeout), check_priority(priority)
        by_shard: dict[int, list[str]] = defaultdict(list)
        for name in names:
            by_shard[self.shard_of(name)].append(name)
        return {index: Push(tuple(group), items, priority, bool(block), timeout, key=key)
                for index, group in by_shard.items()}

    def _push_native(self, data: Any, queues: str | list[str] | tuple[str, ...], expand: bool = False,
                     block: bool = False, timeout: float | None = None,
                     priority: float | None = None, key: Any = None) -> int:
        """Push `data` (or with expand=True, each element of a list) to one or more queues.

        Returns the number of items accepted (items x queues). Each queue takes all
        the items or none. A full queue raises QueueFullError, unless block=True
        (wait for room; QueueTimeoutError after `timeout` s) or its overflow policy
        is "block" (the push waits in line) or "drop_oldest". Missing queues are
        created. key (str, bytes or int): on a partitioned queue, pushes with the
        same key go to the same partition, in order; other pushes go to this
        process's partition. server.push.remote(...) does the same through Ray
        and returns a reference to the count; large items (numpy arrays, bytes)
        then travel by reference through Ray's object store (see pype.payloads),
        natively by value.
        """
        names = as_names(queues)
        if key is not None:
            partitioning.partition_for_key(key, 1)  # checks its type
        return self.push_to(names, as_items(data, expand), bool(block), check_timeout(timeout),
                            check_priority(priority), key)

    def push_to(self, names: tuple[str, ...], items: list, block: bool, timeout: float | None,
                priority: float | None, key: Any = None, pins: dict[str, Layout] | None = None,
                on_behalf: str | None = None) -> int:
        """The native push of checked arguments. on_behalf: the caller a shard runs a
        `.remote()` push for; then only `pins` (layouts with that caller's partitions) are
        used, never this handle's, and heads pin new ones for that caller."""
        pipeline, accepted, failure = self.pipeline(), 0, None
        pins = dict(pins or {})
        wait = timeout if block else 0.0
        for _ in range(REDIRECTS + 1):
            sent = []
            for targets, index, request in self._native_pushes(names, items, block, timeout,
                                                               priority, key, pins, on_behalf):
                sent.append((targets, request, pipeline.send(index, self._after(index), request)))
            names = ()
            for targets, request, ticket in sent:
                try:
                    accepted += pipeline.result(ticket, wait)
                except Partitioned as redirect:
                    layout = self._learn(redirect, remember=on_behalf is None)
                    if on_behalf is not None:
                        pins[redirect.queue] = layout
                    names += targets
                except Moved as moved:  # applied to none of moved.queues: send them again
                    self._refresh(moved.epoch)
                    accepted += moved.accepted
                    names += tuple(name for name, target in zip(targets, request.queues, strict=True)
                                   if target in moved.queues)
                except QueueNotFoundError as error:
                    if self._forget_layouts(targets):
                        names += targets
                    else:
                        failure = failure or error
                except Exception as error:  # noqa: BLE001 - raised once every part answered
                    failure = failure or error
            if not names:
                break
        if failure is not None:
            raise failure
        if names:
            raise RuntimeError(f"pype: the layout of queues {names} kept changing")
        return accepted

    def _native_pushes(self, names, items, block, timeout, priority, key, pins, on_behalf):
        """(queue names, shard, Push) of a native push: one per shard for plain queues,
        one per partition (which must exist: a stale layout then shows) for partitioned."""
        by_shard: dict[int, list[str]] = defaultdict(list)
        for name in names:
            layout = pins.get(name) or (self._layouts.get(name) if on_behalf is None else None)
            if layout is None:
                by_shard[self.shard_of(name)].append(name)
            else:
                target = layout.target(key)
                yield (name,), self.shard_of(target), Push((target,), items, priority, block,
                                                           timeout, must_exist=True)
        for index, group in by_shard.items():
            yield tuple(group), index, Push(tuple(group), items, priority, block, timeout,
                                            key=key, on_behalf=on_behalf)

    def _learn(self, redirect: Partitioned, remember: bool = True) -> Layout:
        """A partitioned queue's layout, remembered unless remember=False (another caller's
        pin); make its partitions if a first push made only its head (queue_defaults)."""
        layout = Layout.of(redirect)
        if remember:
            self._layouts[redirect.queue] = layout
        self.each_queue([Add(name, layout.partition_options(), True) for name in layout.names()])
        return layout

    def each_queue(self, requests: list[tuple], tolerate: tuple = ()) -> list:
        """Send single-queue `requests` at once, each to its queue's shard, and return
        their answers (an error of a `tolerate` class in its place). Moved queues are
        followed; the first other error is raised once every request was answered."""
        pipeline = self.pipeline()
        tickets = []
        for request in requests:
            index = self.shard_of(request.queue)
            tickets.append(pipeline.send(index, self._after(index), request))
        answers, failure = [], None
        for ticket, request in zip(tickets, requests, strict=True):
            try:
                answers.append(self.result(ticket, request))
            except tolerate as error:
                answers.append(error)
            except Exception as error:  # noqa: BLE001 - raised once all were answered
                failure = failure or error
        if failure is not None:
            raise failure
        return answers

    def _forget_layouts(self, names: tuple[str, ...]) -> bool:
        """A partition was missing: the queue was removed. Forget the layouts of `names`;
        True if there was one (the call is then sent again, to the queue itself)."""
        forgotten = [self._layouts.pop(name, None) for name in names]  # all of them
        return any(layout is not None for layout in forgotten)

    def layout(self, queue: str) -> Layout | None:
        """The layout of `queue` if it is partitioned, else None (asks its shard once)."""
        if queue not in self._layouts:
            if len(self._layouts) > MAX_REMEMBERED:
                self._layouts.clear()
            try:
                self._native(self.shard_of(queue), Length(queue))
                self._layouts[queue] = None  # plain (a head would have said Partitioned)
            except Partitioned as redirect:
                self._learn(redirect)
        return self._layouts[queue]

    def push_target(self, queue: str) -> tuple[int, str]:
        """(shard, queue or partition name) where this process's pushes to `queue` go."""
        layout = self.layout(queue)
        target = queue if layout is None else layout.target()
        return self.shard_of(target), target

    def _routed(self, queue: str, plain, partitioned) -> Any:
        """plain(): the call to `queue` itself; partitioned(layout): the call to its
        partitions, once this handle knows `queue` is partitioned."""
        for _ in range(REDIRECTS):
            layout = self._layouts.get(queue)
            try:
                return plain() if layout is None else partitioned(layout)
            except Partitioned as redirect:
                self._learn(redirect)
            except QueueNotFoundError:
                if layout is None or not self._forget_layouts((queue,)):
                    raise
        raise RuntimeError(f"pype: the layout of queue {queue!r} kept changing")

    def run_refused(self, request: tuple, caller: str, redirect: Partitioned | Moved) -> Any:
        """Run natively a `.remote()` request that a shard refused, for `caller`: the
        head of a partitioned queue (the redirect carries the caller's pin), or a shard
        that gave the queue away (Moved); that shard calls this."""
        if isinstance(redirect, Moved):
            self._refresh(redirect.epoch)
            if type(request) is Push:
                return self.push_to(request.queues, request.items, request.block,
                                    request.timeout, request.priority, request.key,
                                    on_behalf=request.on_behalf or caller)
            if type(request) in (Add, Describe):
                return self._native(self.shard_of(request.queue), request)
            redirect, layout = None, None
        else:
            layout = Layout.of(redirect)
        if type(request) is Push:
            return self.push_to(request.queues, request.items, request.block, request.timeout,
                                request.priority, request.key, pins={redirect.queue: layout},
                                on_behalf=request.on_behalf or caller)
        operation = {Pull: self._pull_native, CanPull: self._can_pull_native,
                     CanPush: self._can_push_native, Length: self._queue_len_native,
                     Render: self._print_queue_native, Remove: self._remove_native}.get(type(request))
        if type(request) is Settle:
            operation = self._nack_native if request.requeue else self._ack_native
            return operation(request.queue, request.lease_ids)
        if operation is None:
            raise TypeError(f"a {type(request).__name__} cannot be run on partitions")
        if layout is not None:
            self._layouts.setdefault(redirect.queue, layout)
        fields = {Pull: ("batch_size", "block", "timeout", "remove", "ack"),
                  CanPull: ("batch_size",)}.get(type(request), ())
        return operation(request.queue, *(getattr(request, name) for name in fields))

    def _push_remote(self, data: Any, queues: str | list[str] | tuple[str, ...], expand: bool = False,
                     block: bool = False, timeout: float | None = None,
                     priority: float | None = None, key: Any = None) -> ray.ObjectRef:
        requests = self._push_requests(data, queues, expand, block, timeout, priority,
                                       self._by_reference, key)
        refs = []
        for index, request in requests.items():
            ref = self._call(index, request)
            if request.block:  # second half: waits among the shard's "pushes" threads for room
                ref = self._shards[index].await_push.remote(ref, self._after(index))
                self._sent_by_old[-1 - index] = ref  # it may be run for the caller elsewhere
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
        return self.shard_of(queue), Pull(queue, batch_size, block, timeout, bool(remove), bool(ack))

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
        triples (redelivered: the item was leased before and came back): ack() the
        ids when done, nack() to hand the items back; a lease neither acked nor
        nacked within the queue's visibility_timeout returns its items to the head
        of the queue for another consumer (at-least-once delivery).
        server.pull.remote(...) does the same through Ray.
        """
        index, request = self._pull_request(queue, batch_size, block, timeout, remove, ack)
        wait = request.timeout if request.block is not False else 0.0
        return self._routed(queue, lambda: self._native(index, request, wait),
                            lambda layout: partitioning.pull(self, layout, *request[1:6]))

    def _pull_remote(self, queue: str, batch_size: int | None = None, block: bool | None = None,
                     timeout: float | None = None, remove: bool = True,
                     ack: bool = False) -> ray.ObjectRef:
        index, request = self._pull_request(queue, batch_size, block, timeout, remove, ack)
        if request.block or (request.block is None and self._kind(index, queue) == "batch"):
            return self._wait_call(index, request, PULLS)
        return self._call(index, request._replace(block=False))

    pull = _Operation(_pull_native, _pull_remote)

    def _kind(self, index: int, queue: str) -> str | None:
        """The kind of `queue`, asked of its shard once (None while it does not exist)."""
        kind = self._kinds.get(queue)
        if kind is None:
            options = ray.get(self._call(index, Describe(queue)))
            if options is not None:
                kind = self._kinds[queue] = options["kind"]
        return kind

    def _settle_request(self, queue: str, lease_ids: Any, requeue: bool) -> tuple[int, Settle]:
        check_name(queue)
        ids = [lease_ids] if isinstance(lease_ids, int) else lease_ids
        if not isinstance(ids, (list, tuple)) or any(
                isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise TypeError(f"lease_ids must be an int or a list of ints, got {lease_ids!r}")
        return self.shard_of(queue), Settle(queue, list(ids), requeue)

    def _ack_native(self, queue: str, lease_ids: int | list[int] | tuple[int, ...]) -> int:
        """Acknowledge leased items of `queue` (from pull(ack=True)): they are gone for good.

        Returns the number acked. Raises LeaseNotHeldError for ids whose lease
        expired (their items went back to the queue), were settled before, or were
        never issued; the other ids are acked.
        """
        return self._settle_native(queue, lease_ids, requeue=False)

    def _settle_native(self, queue: str, lease_ids: Any, requeue: bool) -> int:
        index, request = self._settle_request(queue, lease_ids, requeue)
        return self._routed(queue, lambda: self._native(index, request),
                            lambda layout: partitioning.settle(self, layout, request.lease_ids, requeue))

    def _ack_remote(self, queue: str, lease_ids: int | list[int] | tuple[int, ...]) -> ray.ObjectRef:
        return self._call(*self._settle_request(queue, lease_ids, requeue=False))

    ack = _Operation(_ack_native, _ack_remote)

    def _nack_native(self, queue: str, lease_ids: int | list[int] | tuple[int, ...]) -> int:
        """Hand leased items back: they return to the head of `queue` at once, in their
        original order, for the next pull. Returns and raises like ack()."""
        return self._settle_native(queue, lease_ids, requeue=True)

    def _nack_remote(self, queue: str, lease_ids: int | list[int] | tuple[int, ...]) -> ray.ObjectRef:
        return self._call(*self._settle_request(queue, lease_ids, requeue=True))

    nack = _Operation(_nack_native, _nack_remote)

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
        request = CanPull(queue, batch_size, wait)
        return self._routed(
            queue, lambda: self._native(self.shard_of(queue), request, None if wait == math.inf else wait),
            lambda layout: partitioning.can_pull(self, layout, batch_size, wait))

    def _can_pull_remote(self, queue: str, batch_size: int | None = None) -> ray.ObjectRef:
        check_name(queue)
        return self._wait_call(self.shard_of(queue), CanPull(queue, check_batch_size(batch_size)),
                               PULLS)

    can_pull = _Operation(_can_pull_native, _can_pull_remote)

    def _can_push_native(self, queue: str) -> bool:
        """True if a push of one item would be accepted (waits like can_pull)."""
        check_name(queue)
        return self._can_push_waiting(queue, None)

    def _can_push_waiting(self, queue: str, wait: float | None) -> bool:
        """can_push with the shard's `wait`; on a partitioned queue, this producer's partition."""
        def partitioned(layout: Layout) -> bool:
            target = layout.target()
            return self._native(self.shard_of(target), CanPush(target, wait),
                                None if wait == math.inf else wait)
        return self._routed(queue, lambda: self._native(self.shard_of(queue), CanPush(queue, wait),
                                                        None if wait == math.inf else wait),
                            partitioned)

    def _can_push_remote(self, queue: str) -> ray.ObjectRef:
        check_name(queue)
        return self._wait_call(self.shard_of(queue), CanPush(queue), PUSHES)

    can_push = _Operation(_can_push_native, _can_push_remote)

    # -- queues -----------------------------------------------------------------------------

    def _add_request(self, queue: str, kind: str | None = None, maxsize: int | None = None,
                     use_locking: bool = False, semaphore: int | None = None,
                     batch_lock: int | None = None, overflow: str | None = None,
                     batch_size: int | None = None, batch_timeout: float | None = None,
                     max_bytes: int | None = None, visibility_timeout: float | None = None,
                     exist_ok: bool = False, partitions: int | None = None) -> tuple[int, Add]:
        check_name(queue)
        kind = kind or self._topology.config.queue_defaults.kind
        if kind != "batch" and (batch_size is not None or batch_timeout is not None):
            raise ValueError(f"batch_size and batch_timeout apply to kind='batch', not {kind!r}")
        if overflow is None and (use_locking or semaphore or batch_lock):
            overflow = "block"
        given = {"kind": kind, "overflow": overflow, "batch_size": batch_size,
                 "batch_timeout": batch_timeout, "max_bytes": max_bytes,
                 "visibility_timeout": visibility_timeout, "partitions": partitions,
                 "maxsize": resolve_capacity(maxsize, use_locking, semaphore, batch_lock)}
        options = dataclasses.replace(self._topology.config.queue_defaults,
                                      **{key: value for key, value in given.items() if value is not None})
        self._kinds.pop(queue, None)
        return self.shard_of(queue), Add(queue, options, bool(exist_ok))

    def _add_native(self, queue: str, kind: str | None = None, maxsize: int | None = None,
                    use_locking: bool = False, semaphore: int | None = None,
                    batch_lock: int | None = None, overflow: str | None = None,
                    batch_size: int | None = None, batch_timeout: float | None = None,
                    max_bytes: int | None = None, visibility_timeout: float | None = None,
                    exist_ok: bool = False, partitions: int | None = None) -> bool:
        """Create `queue`; True if created, False if it existed (with exist_ok).

        Options left None come from the config's queue_defaults. Flow control:
        maxsize bounds the queue; use_locking=True means maxsize 1, semaphore=N and
        batch_lock=N mean maxsize N, with overflow "block" unless given (the seed's
        producers push to locked queues without checking, so a push that does not
        fit waits in line instead of failing). max_bytes bounds the bytes of its
        items. batch_size and batch_timeout belong to kind="batch".
        visibility_timeout: seconds a pull with ack=True leases items.
        partitions=K (K > 1) spreads the queue over K partitions on the shards (see
        pype.partitions and the README); maxsize and max_bytes then bound each
        partition. Raises QueueExistsError if it existed (unless exist_ok, which
        still refuses another number of partitions). The .remote() form returns
        once the queue exists, for every process.
        """
        index, request = self._add_request(
            queue, kind, maxsize, use_locking, semaphore, batch_lock, overflow, batch_size,
            batch_timeout, max_bytes, visibility_timeout, exist_ok, partitions)
        wanted = request.options.partitions
        existing = self._native(index, Describe(queue)) if wanted > 1 else None
        if existing is not None and existing.get("partitions", 1) != wanted:
            raise QueueExistsError(
                f"queue {queue!r} exists with {existing.get('partitions', 1)} partitions; the "
                f"number of partitions of a queue cannot change (remove it and add it again)")
        if wanted > 1 and existing is None:  # the partitions first: a head is never without them
            seed = partitioning.spreading_seed(queue, wanted, len(self._shards), self._seed)
            request = request._replace(options=dataclasses.replace(request.options,
                                                                   partition_seed=seed))
            layout = Layout(queue, wanted, request.options, 0)
            self.each_queue([Add(name, layout.partition_options(), True)
                             for name in layout.names()])
        return self._native(index, request)

    def _add_remote(self, queue: str, kind: str | None = None, maxsize: int | None = None,
                    use_locking: bool = False, semaphore: int | None = None,
                    batch_lock: int | None = None, overflow: str | None = None,
                    batch_size: int | None = None, batch_timeout: float | None = None,
                    max_bytes: int | None = None, visibility_timeout: float | None = None,
                    exist_ok: bool = False, partitions: int | None = None) -> ray.ObjectRef:
        arguments = (queue, kind, maxsize, use_locking, semaphore, batch_lock, overflow, batch_size,
                     batch_timeout, max_bytes, visibility_timeout, exist_ok, partitions)
        index, request = self._add_request(*arguments)
        if request.options.partitions > 1:  # several shards: a task makes them natively
            return self._settled(_add_in_task.remote(self, arguments))
        return self._settled(self._call(index, request))

    add = _Operation(_add_native, _add_remote)

    def _remove_native(self, queue: str) -> int:
        """Delete `queue` and its items; returns how many items it held."""
        check_name(queue)
        self._kinds.pop(queue, None)

        def partitioned(layout: Layout) -> int:
            self._layouts.pop(queue, None)
            removed = self._native(self.shard_of(queue), Remove(queue, layout.partitions))
            answers = self.each_queue([Remove(name) for name in layout.names()],
                                      tolerate=(QueueNotFoundError,))  # removed meanwhile
            return removed + sum(answer for answer in answers if isinstance(answer, int))
        return self._routed(queue, lambda: self._native(self.shard_of(queue), Remove(queue)),
                            partitioned)

    def _remove_remote(self, queue: str) -> ray.ObjectRef:
        check_name(queue)
        self._kinds.pop(queue, None)
        return self._settled(self._call(self.shard_of(queue), Remove(queue)))

    remove = _Operation(_remove_native, _remove_remote)

    @staticmethod
    def _settled(ref: ray.ObjectRef) -> ray.ObjectRef:
        """Wait until the call has run, so that calls of any other process see its effect."""
        ray.wait([ref], fetch_local=False)
        return ref

    def _queue_len_native(self, queue: str) -> int:
        """The number of items in `queue` ready to pull (0 if it does not exist)."""
        check_name(queue)
        return self._routed(queue, lambda: self._native(self.shard_of(queue), Length(queue)),
                            lambda layout: partitioning.length(self, layout))

    def _queue_len_remote(self, queue: str) -> ray.ObjectRef:
        check_name(queue)
        return self._call(self.shard_of(queue), Length(queue))

    queue_len = _Operation(_queue_len_native, _queue_len_remote)

    def _print_queue_native(self, queue: str) -> str:
        """Print `queue` and its items from its shard (Ray shows it in the driver's output)."""
        check_name(queue)
        return self._routed(queue, lambda: self._native(self.shard_of(queue), Render(queue)),
                            lambda layout: partitioning.render(self, layout))

    def _print_queue_remote(self, queue: str) -> ray.ObjectRef:
        check_name(queue)
        return self._call(self.shard_of(queue), Render(queue))

    print_queue = _Operation(_print_queue_native, _print_queue_remote)

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
        (evicted by drop_oldest), acked, redelivered (leases nacked or expired); per
        queue also kind, maxsize, max_bytes, waiting_producers and shard; per shard
        also native_requests and ray_requests (requests served on each path; of the
        native ones, tcp_requests came over TCP from other nodes) and waiting_calls
        (requests parked now). "lost" lists shard restarts that lost
        queues (no persistence).
        """
        shards = ray.get([shard.stats.remote() for shard in self._shards])
        queues = {}
        for shard in shards:
            for name, counters in shard.pop("per_queue").items():
                queues[name] = {"shard": shard["shard"], **counters}
        partitioning.fold_stats(queues)
        totals = {key: sum(shard[key] for shard in shards)
                  for key in ("queues", "depth", "leased", "bytes", *COUNTERS,
                              "native_requests", "tcp_requests", "ray_requests")}
        router = ray.get(self._router.stats.remote())
        return {"server": self.name, "router": router, "totals": totals, "shards": shards,
                "queues": queues, "lost": router["lost"]}

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
