"""The routing core: how a client reaches the shard of a queue, on either path.

Everything that talks to shards routes through a Routes: the Server handle
(pype.client), its streams, pype.Queue, the video actor, and a shard that runs a
`.remote()` call for its caller elsewhere (pype.shards.shard). A Routes holds:

- the topology it routes by, and how it learns a newer one (adopt, refresh, and for
  `.remote()` callers, which never wait, look_for_a_newer_topology);
- the `.remote()` path: call() numbers each call to a shard's main thread for
  read-your-writes (pype.topology.ProcessState), after() is the number a request on
  any other path waits for;
- the native path: this thread's Pipeline, where each shard listens (locate), and
  send/result/native for requests to one shard;
- redirects: a shard answers a request that belongs elsewhere with a
  pype.protocol.Redirect. follow() is the one place that knows what each kind means
  (Moved: fetch the newer topology; Partitioned: learn the queue's layout). run()
  and push_to() follow redirects for requests in general, result() follows Moved
  for a request already in flight; each follows MAX_REDIRECTS in a row at most and
  then raises RedirectLimitError. Streams, partitioned watches and the shard catch
  Moved where they must resend a window of requests in order, and call follow();
  push_pull() does too, because a redirect there may come after its push was applied
  (protocol.PullFailed), and then only its pull is sent again.

A shard that cannot be reached makes the client fetch the topology again: if a newer
one names another shard, the requests go there (see locate() and native()); the
pipeline resends those in flight that are safe to resend with their producer
sequence numbers (pype.transport.Pipeline), and call numbering for read-your-writes
starts afresh with a new actor at an index (pype.topology.Topology.shard_key).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from typing import Any

import ray

from pype import partitioned, protocol
from pype.errors import (
    NotPrimaryError,
    QueueNotFoundError,
    RedirectLimitError,
    ShardRestartedError,
    ShardUnavailableError,
)
from pype.hashing import shard_for
from pype.partitions import Layout, Partitioned
from pype.protocol import Add, Length, Moved, Push, Redirect
from pype.topology import Topology, this_process
from pype.transport import DataAddress, Pipeline

logger = logging.getLogger("pype")

PULLS, PUSHES = "pulls", "pushes"  # the shard's groups of threads for `.remote()` calls that wait
MAX_REMEMBERED = 100_000  # queue names whose shard (or layout) a Routes remembers
MAX_REDIRECTS = 3  # redirects a request follows before RedirectLimitError
# Errors after which a push may have been applied (its answer never came back).
_UNCERTAIN = (ShardRestartedError, ShardUnavailableError, NotPrimaryError)


class _NotSent(ShardUnavailableError):
    """push_pull found a shard unreachable before it sent anything to it."""
RESTART_POLL = 0.1  # seconds between asks for the address of a shard Ray is restarting
TOPOLOGY_CHECK = 1.0  # seconds between a `.remote()` caller's looks for a newer topology

_this_thread = threading.local()  # pid, and server id -> this thread's Pipeline


class Routes:
    """How one handle reaches its server's queues (see the module docstring).

    Picklable: a copy in another process starts with empty caches and learns its own.
    """

    def __init__(self, router: ray.actor.ActorHandle, topology: Topology):
        self.router = router
        self.topology = topology
        self._newer: ray.ObjectRef | None = None  # a topology asked of the router, not yet seen
        self._next_look = 0.0
        self._sent_by_old: dict[int, ray.ObjectRef] = {}  # shard -> the last `.remote()` call to it
        self._owners: dict[str, int] = {}  # queue name -> shard index
        # queue -> its layout if partitioned, None if known to be plain
        self._layouts: dict[str, Layout | None] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_owners={}, _layouts={}, _sent_by_old={}, _next_look=0.0,
                     _newer=None)  # an ObjectRef must not be pickled out of band
        return state

    @property
    def shards(self) -> tuple:
        return self.topology.shards

    # -- the topology ----------------------------------------------------------------------

    def adopt(self, topology: Topology) -> None:
        """Route by `topology` from now on if it is newer than this one's."""
        this_process().saw(topology)
        if topology.epoch > self.topology.epoch:
            self.topology = topology
            self._owners.clear()
            self._sent_by_old.clear()
            logger.info("pype: server %s now has %d shards (topology epoch %d)",
                        topology.server_id[:12], len(topology.shards), topology.epoch)

    def fetch_topology(self, timeout: float | None = None) -> bool:
        """Ask the router for its topology; True if it was newer than this one's (False
        if the router, restarting, did not answer within `timeout` seconds)."""
        epoch = self.topology.epoch
        try:
            self.adopt(ray.get(self.router.topology.remote(), timeout=timeout))
        except ray.exceptions.GetTimeoutError:
            return False
        return self.topology.epoch > epoch

    def newer_topology_since(self, epoch: int) -> bool:
        """Is there a topology newer than `epoch`, asked of the router now or adopted since
        (locate() adopts one when it finds a shard gone)?"""
        self.fetch_topology()
        return self.topology.epoch > epoch

    def refresh(self, epoch: int) -> None:
        """Route by a topology of at least `epoch` (a shard said Moved(epoch))."""
        newest = this_process().newest(self.topology.server_id)
        if newest is not None:
            self.adopt(newest)
        timeout = self.topology.config.transport.request_timeout
        deadline = time.monotonic() + timeout
        while self.topology.epoch < epoch:
            self.fetch_topology()
            if self.topology.epoch < epoch:
                if time.monotonic() > deadline:
                    raise ShardUnavailableError(
                        f"the router did not publish topology epoch {epoch} within {timeout:g} s")
                time.sleep(RESTART_POLL)

    def look_for_a_newer_topology(self) -> None:
        """Let `.remote()` callers, which never wait, learn of a resize: at most once a
        TOPOLOGY_CHECK, ask the router, and adopt its answer on a later call once it came
        and every call sent by the old topology has run. Until then a shard that gave a
        queue away runs the calls for it on the caller's behalf, in the caller's order,
        so that a call sent to the new shard never overtakes one still on its way there."""
        now = time.monotonic()
        if now < self._next_look:
            return
        asked = self._newer  # once: threads that share this handle look at the same time
        if asked is None:
            self._newer = self.router.topology.remote()
            return
        ready, _ = ray.wait([asked], timeout=0)
        if not ready:
            return
        newer = ray.get(asked)
        if newer.epoch > self.topology.epoch and self._sent_by_old:
            calls = list(self._sent_by_old.values())
            done, _ = ray.wait(calls, num_returns=len(calls), timeout=0, fetch_local=False)
            if len(done) < len(calls):
                self._next_look = now + RESTART_POLL / 10
                return
        self.adopt(newer)
        self._newer = None
        self._next_look = now + TOPOLOGY_CHECK

    def shard_of(self, queue: str) -> int:
        """Index of the shard that owns `queue` (remembered: hashing costs microseconds)."""
        index = self._owners.get(queue)
        if index is None:
            topology = self.topology
            index = self._owners[queue] = shard_for(queue, len(topology.shards),
                                                    topology.config.hash_seed)
            if len(self._owners) > MAX_REMEMBERED:
                self._owners.clear()
        return index

    # -- the `.remote()` path ------------------------------------------------------------------

    def call(self, index: int, request: tuple) -> ray.ObjectRef:
        """Send `request` to the main thread of shard `index` through Ray, numbering the call."""
        if index in self.topology.lost:
            return self.router.unavailable.remote(index)
        state = this_process()
        shard = self.shards[index]
        caller = state.caller_id
        ref = state.send_numbered(self.topology.shard_key(index),
                                  lambda sequence: shard.call.remote(request, (caller, sequence)))
        self._sent_by_old[index] = ref
        return ref

    def after(self, index: int) -> tuple[str, int]:
        """(this process, its last `.remote()` call to shard `index`), which must run first."""
        return this_process().after(self.topology.shard_key(index))

    def wait_call(self, index: int, request: tuple, group: str) -> ray.ObjectRef:
        """Send a request that may wait to shard `index` through Ray (a thread of `group`)."""
        if index in self.topology.lost:
            return self.router.unavailable.remote(index)
        shard = self.shards[index]
        method = shard.wait_pull if group == PULLS else shard.wait_push
        return method.remote(request, self.after(index))

    def await_push(self, index: int, first_half: ray.ObjectRef) -> ray.ObjectRef:
        """The second half of a blocking `.remote()` push (see Shard.await_push)."""
        if index in self.topology.lost:
            return self.router.unavailable.remote(index)
        ref = self.shards[index].await_push.remote(first_half, self.after(index))
        self._sent_by_old[-1 - index] = ref  # it may be run for the caller elsewhere
        return ref

    # -- the native path ---------------------------------------------------------------------

    def pipeline(self) -> Pipeline:
        """This thread's pipeline of native requests to the server's shards (pype.transport)."""
        pipelines = getattr(_this_thread, "pipelines", None)
        if pipelines is None or _this_thread.pid != os.getpid():
            pipelines = _this_thread.pipelines = {}
            _this_thread.pid = os.getpid()
        pipeline = pipelines.get(self.topology.server_id)
        if pipeline is None:
            pipeline = pipelines[self.topology.server_id] = self.new_pipeline()
        return pipeline

    def new_pipeline(self) -> Pipeline:
        """A pipeline of native requests of its own (a Producer's or a Consumer's)."""
        if not ray.is_initialized():
            ray.init()
        config = self.topology.config
        return Pipeline(self.topology.keys, self.locate, ray.get_runtime_context().get_node_id(),
                        config.transport.request_timeout, replicated=config.replicas > 1)

    def locate(self, index: int, fresh: bool = False) -> DataAddress:
        """Where shard `index` listens; fresh=True asks it again (after a restart)."""
        state = this_process()
        newest = state.newest(self.topology.server_id)  # pipelines are shared by handles
        if newest is not None:
            self.adopt(newest)
        if index >= len(self.shards):
            raise ShardUnavailableError(f"shard {index} was removed by a resize")
        if index in self.topology.lost:
            raise ShardUnavailableError(self.topology.lost_shard(index))
        key = self.topology.shard_key(index)
        address = state.address(key)
        if address is not None and not fresh:
            return address
        timeout = self.topology.config.transport.request_timeout
        deadline = time.monotonic() + timeout
        replicated = self.topology.config.replicas > 1
        while True:
            left = max(0.0, deadline - time.monotonic())
            try:
                # Replicated, a primary that stopped answering is replaced: look for that.
                address = ray.get(self.shards[index].data_address.remote(),
                                  timeout=min(left, RESTART_POLL * 10) if replicated else left)
                if address.primary:
                    break
            except ray.exceptions.GetTimeoutError:
                if replicated and time.monotonic() < deadline:
                    if self.fetch_topology(timeout=max(0.0, deadline - time.monotonic())):
                        key = self.topology.shard_key(index)
                    continue
                raise ShardUnavailableError(
                    f"shard {index} did not answer within {timeout:g} s "
                    f"(transport.request_timeout); Ray may still be restarting it") from None
            except ray.exceptions.ActorUnavailableError:  # Ray is restarting it: ask again
                pass
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError) as error:
                if not replicated:
                    # Gone for good (its node too, for an unschedulable one). A newer topology
                    # may name another shard at this index (a resize): the requests in flight
                    # go there, and a shard that does not own their queues answers Moved,
                    # which result() follows.
                    node = self.topology.nodes[index]
                    if not (self.fetch_topology() and index < len(self.shards)):
                        self.adopt(ray.get(self.router.shard_gone.remote(index)))  # recorded
                        if index in self.topology.lost:
                            raise ShardUnavailableError(self.topology.lost_shard(index)) from None
                        raise ShardUnavailableError(
                            f"shard {index} on node {node} is gone for good: {error}") from None
                    if index in self.topology.lost:
                        raise ShardUnavailableError(self.topology.lost_shard(index)) from None
                    key = self.topology.shard_key(index)
                    continue
            # Restarting, gone, or a backup: replicated, the router promotes another
            # replica and publishes a topology that names it.
            if time.monotonic() >= deadline:
                raise ShardUnavailableError(
                    f"shard {index} had no primary for {timeout:g} s "
                    f"(transport.request_timeout)") from None
            if replicated and self.fetch_topology():
                key = self.topology.shard_key(index)
                continue
            time.sleep(RESTART_POLL)
        state.remember_address(key, address)
        return address

    def send(self, request: tuple, pipeline: Pipeline | None = None,
             index: int | None = None) -> tuple[int, int]:
        """Send `request` natively to shard `index` (default: its queue's); a ticket."""
        if index is None:
            index = self.shard_of(request.queue)
        return (pipeline or self.pipeline()).send(index, self.after(index), request)

    def result(self, ticket: tuple[int, int], request: tuple, wait: float | None = 0.0,
               pipeline: Pipeline | None = None) -> Any:
        """The answer to `request`, sent as `ticket`: sent again to its queue's new shard
        while it meets Moved (a resize). `wait`: seconds it may wait in the shard."""
        pipeline = pipeline or self.pipeline()
        for redirects in range(MAX_REDIRECTS + 1):
            try:
                return pipeline.result(ticket, wait)
            except Moved as moved:
                if redirects == MAX_REDIRECTS:
                    raise RedirectLimitError(f"{type(request).__name__} for queue {moved.queue!r}: "
                                             f"the queue kept moving") from None
                self.follow(moved)
                ticket = self.send(request, pipeline, self.shard_of(moved.queue))

    def native(self, index: int, request: tuple) -> Any:
        """Run `request` natively on shard `index` and return its answer (or raise its
        error), waiting as long as the request may wait there (pype.protocol.wait_of).
        A queue that moved (a resize) is followed; a shard that cannot be reached is
        sought again in the router's topology."""
        wait, pipeline = protocol.wait_of(request), self.pipeline()
        for _ in range(MAX_REDIRECTS):
            sent, epoch = False, self.topology.epoch
            try:
                ticket = self.send(request, pipeline, index)
                sent = True
                return self.result(ticket, request, wait, pipeline)
            except ShardUnavailableError:  # a shrink may have stopped it: a newer topology?
                # Sent again only where it cannot run twice: it never left, or it is safe
                # to resend (a plain pull that ran before its queue moved took items).
                queue = getattr(request, "queue", None)
                if (queue is None or (sent and not protocol.retriable(request))
                        or not self.newer_topology_since(epoch) or self.shard_of(queue) == index):
                    raise
                index = self.shard_of(queue)
        raise RedirectLimitError(f"{type(request).__name__}: the topology kept changing")

    def each_queue(self, requests: list[tuple], tolerate: tuple = ()) -> list:
        """Send single-queue `requests` at once, each to its queue's shard, and return
        their answers (an error of a `tolerate` class in its place). Moved queues are
        followed; the first other error is raised once every request was answered."""
        pipeline = self.pipeline()
        tickets = [self.send(request, pipeline) for request in requests]
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

    # -- redirects ------------------------------------------------------------------------------

    def follow(self, redirect: Redirect, remember: bool = True) -> Layout | None:
        """Take in what a shard's redirect says, so that the request can be sent again
        where it now goes: Moved, a newer topology; Partitioned, the queue's layout (kept
        unless remember=False: another caller's pin), which it returns."""
        if isinstance(redirect, Moved):
            self.refresh(redirect.epoch)
            return None
        if isinstance(redirect, Partitioned):
            return self._learn(redirect, remember)
        raise TypeError(f"a redirect this client does not know: {redirect!r}")

    def run(self, request: tuple) -> Any:
        """Run a single-queue `request` (pype.protocol) natively wherever its queue lives:
        on its shard, or on its partitions (pype.partitioned) once it is known to be
        partitioned. Follows redirects and forgets layouts that went stale."""
        queue = request.queue
        for _ in range(MAX_REDIRECTS):
            layout = self._layouts.get(queue)
            try:
                if layout is None:
                    return self.native(self.shard_of(queue), request)
                if type(request) is protocol.Remove:
                    self._layouts.pop(queue, None)
                return partitioned.run(self, layout, request)
            except Redirect as redirect:
                self.follow(redirect)
            except QueueNotFoundError:  # a partition was missing: the queue was removed
                if layout is None or not self.forget_layouts((queue,)):
                    raise
        raise RedirectLimitError(f"pype: the layout of queue {queue!r} kept changing")

    def push_to(self, push: Push, pins: dict[str, Layout] | None = None) -> int:
        """The native push of a checked Push to its queues; the items accepted.

        One Push per shard for plain queues, one per partition for partitioned ones;
        redirects are followed and the queues they name sent again. push.on_behalf:
        the caller a shard runs a `.remote()` push for; then only `pins` (layouts with
        that caller's partitions) are used, never this Routes', and heads pin new ones
        for that caller."""
        pipeline, accepted, failure = self.pipeline(), 0, None
        pins = dict(pins or {})
        names, on_behalf = push.queues, push.on_behalf
        wait = push.timeout if push.block else 0.0
        for _ in range(MAX_REDIRECTS + 1):
            sent, unsent, epoch = [], (), self.topology.epoch
            for targets, index, request in self._native_pushes(push, names, pins):
                try:
                    sent.append((targets, request, pipeline.send(index, self.after(index), request)))
                except ShardUnavailableError as error:  # never sent: did a shrink remove its shard?
                    unsent += targets
                    unreachable = error
            names = ()
            if unsent:
                if not self.newer_topology_since(epoch):
                    failure = failure or unreachable
                else:
                    names += unsent
            for targets, request, ticket in sent:
                try:
                    accepted += pipeline.result(ticket, wait)
                except Redirect as redirect:
                    layout = self.follow(redirect, remember=on_behalf is None)
                    if isinstance(redirect, Moved):  # applied to none of moved.queues
                        accepted += redirect.accepted
                        targets = tuple(name for name, target in zip(targets, request.queues,
                                                                     strict=True)
                                        if target in redirect.queues)
                    elif on_behalf is not None:
                        pins[redirect.queue] = layout
                    names += targets
                except QueueNotFoundError as error:
                    if self.forget_layouts(targets):
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
            raise RedirectLimitError(f"pype: the layout of queues {names} kept changing")
        return accepted

    def push_pull(self, push: Push, pull: protocol.Pull) -> list:
        """Push, then pull, as a stage does; the pull's answer. One PushPull request when
        both queues are plain and live on one shard (hash tags place them so); else the
        two requests, sent together, each to its shard; one after the other for a
        partitioned queue. A push that was refused (not applied) raises its error with
        `pulled`, the items the pull took ([] where it did not run). Any other error
        means that the push was applied, or may have been (ShardRestartedError,
        ShardUnavailableError: as for a push alone)."""
        queue, source = push.queues[0], pull.queue
        pipeline = self.pipeline()
        for _ in range(MAX_REDIRECTS):
            index, epoch = self.shard_of(queue), self.topology.epoch
            try:
                if (self._layouts.get(queue) is not None or self._layouts.get(source) is not None
                        or self.shard_of(source) != index):
                    return self._push_and_pull(push, pull, pipeline)
                ticket = self._send_first(pipeline, index, protocol.PushPull(push, pull))
            except _NotSent as not_sent:  # a shard a resize removed? Placed again by a newer topology
                if not self.newer_topology_since(epoch):
                    raise ShardUnavailableError(*not_sent.args) from None
                continue
            try:
                return pipeline.result(ticket, protocol.wait_of(pull))
            except protocol.PullFailed as failed:  # the push was applied
                if not isinstance(failed.error, Redirect):
                    raise failed.error from None
                self.follow(failed.error)
                return self.run(pull)
            except Redirect as redirect:  # nothing was applied: place both again
                self.follow(redirect)
            except _UNCERTAIN:
                raise
            except Exception as error:  # the shard refused the push: the pull did not run
                error.pulled = []
                raise
        raise RedirectLimitError(f"pype: push_pull to {queue!r} from {source!r}: the queues kept moving")

    def _push_and_pull(self, push: Push, pull: protocol.Pull, pipeline: Pipeline) -> list:
        """push_pull for queues on two shards, or partitioned ones."""
        queue, source = push.queues[0], pull.queue
        if self._layouts.get(queue) is not None or self._layouts.get(source) is not None:
            self._push_then(push, [])
            return self.run(pull)
        push_index, pull_index = self.shard_of(queue), self.shard_of(source)
        pushed = self._send_first(pipeline, push_index, push)
        try:
            pulled = pipeline.send(pull_index, self.after(pull_index), pull)
        except ShardUnavailableError:  # not sent: once the push answered, sent where it now goes
            pulled = None
        failure = None
        try:
            self.result(pushed, push, 0.0, pipeline)  # follows Moved
        except Exception as error:  # noqa: BLE001 - raised once the pull answered
            failure = error
        try:
            try:
                if pulled is None:
                    items = self.run(pull)
                else:
                    items = self.result(pulled, pull, protocol.wait_of(pull), pipeline)
            except Redirect as redirect:  # partitioned: not pulled
                self.follow(redirect)
                items = self.run(pull)
        except Exception as pull_failure:
            if failure is None or isinstance(failure, _UNCERTAIN):
                raise
            failure.pulled = []  # refused, and the pull took nothing it could hand over
            raise failure from pull_failure
        if isinstance(failure, Redirect):  # partitioned: not pushed
            self.follow(failure)
            self._push_then(push, items)
        elif failure is not None:
            if not isinstance(failure, _UNCERTAIN):
                failure.pulled = items
            raise failure
        return items

    def _send_first(self, pipeline: Pipeline, index: int, request: tuple) -> tuple[int, int]:
        """Send push_pull's first request; _NotSent if the shard cannot be reached."""
        try:
            return pipeline.send(index, self.after(index), request)
        except ShardUnavailableError as unavailable:
            raise _NotSent(*unavailable.args) from None

    def _push_then(self, push: Push, pulled: list) -> None:
        """push_to(push), whose refusal carries `pulled`: what the pull took (or will)."""
        try:
            self.push_to(push)
        except _UNCERTAIN:
            raise
        except Exception as error:
            error.pulled = pulled
            raise

    def _native_pushes(self, push: Push, names: tuple[str, ...], pins: dict[str, Layout]):
        """(queue names, shard, Push) of `push` to `names`: one per shard for plain queues,
        one per partition (which must exist: a stale layout then shows) for partitioned."""
        by_shard: dict[int, list[str]] = defaultdict(list)
        for name in names:
            layout = pins.get(name) or (self._layouts.get(name) if push.on_behalf is None else None)
            if layout is None:
                by_shard[self.shard_of(name)].append(name)
            else:
                target = layout.target(push.key)
                yield (name,), self.shard_of(target), push._replace(
                    queues=(target,), must_exist=True, key=None, on_behalf=None)
        for index, group in by_shard.items():
            yield tuple(group), index, push._replace(queues=tuple(group))

    # -- partitioned queues ---------------------------------------------------------------

    def _learn(self, redirect: Partitioned, remember: bool = True) -> Layout:
        """A partitioned queue's layout, remembered unless remember=False (another caller's
        pin); make its partitions if a first push made only its head (queue_defaults)."""
        layout = Layout.of(redirect)
        if remember:
            self._layouts[redirect.queue] = layout
        self.each_queue([Add(name, layout.partition_options(), True) for name in layout.names()])
        return layout

    def forget_layouts(self, names: tuple[str, ...]) -> bool:
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
                self.native(self.shard_of(queue), Length(queue))
                self._layouts[queue] = None  # plain (a head would have said Partitioned)
            except Partitioned as redirect:
                self.follow(redirect)
        return self._layouts[queue]

    def know_layout(self, layout: Layout) -> None:
        """Take `layout` as its queue's (the head's word in a redirect is the newest)."""
        self._layouts[layout.queue] = layout

    def push_target(self, queue: str) -> tuple[int, str]:
        """(shard, queue or partition name) where this process's pushes to `queue` go."""
        layout = self.layout(queue)
        target = queue if layout is None else layout.target()
        return self.shard_of(target), target

    # -- calls a shard runs for its caller ------------------------------------------------

    def forward(self, request: tuple, caller: str, redirect: Redirect) -> Any:
        """Run natively, for `caller`, a `.remote()` request that a shard refused with
        `redirect`: it named a partitioned queue's head (the redirect carries the
        caller's pin), or a queue that moved to another shard. The shard calls this: a
        `.remote()` caller could not follow the redirect itself without waiting."""
        pins = {}
        if isinstance(redirect, Moved):
            self.follow(redirect)
        else:
            layout = Layout.of(redirect)
            pins[redirect.queue] = layout
            if type(request) is not Push:
                self.know_layout(layout)
        if type(request) is Push:
            return self.push_to(request._replace(on_behalf=request.on_behalf or caller), pins)
        if type(request) in (protocol.Add, protocol.Describe):
            return self.native(self.shard_of(request.queue), request)
        return self.run(request)
