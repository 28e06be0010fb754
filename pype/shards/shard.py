"""The shard actor: a thin Ray shell around the shard's request engine (pype.shards.engine).

Ray starts, places and restarts shards, and carries `.remote()` calls. Each Ray
method hands its typed request (pype.protocol) to the engine, which owns the
queues, and returns the answer. Native calls reach the same engine through its I/O
loop (pype.shards.loop) over its data sockets, without Ray; data_address() tells
clients where.

A `.remote()` request that this shard refuses with a redirect (it names a
partitioned queue's head, or a queue that moved away in a resize) is run here,
natively, for its caller, through the routing core (pype.routing.Routes.forward):
the caller's `.remote()` call could not follow the redirect without waiting.

Methods that never wait run on the actor's main thread, where Ray keeps each
caller's calls in the order they were sent (a sync actor: an async one would
reorder them). A `.remote()` call that may wait blocks a thread of one of two
concurrency groups while its request is parked in the engine: "pulls" for
consumers' waits, "pushes" for producers' (a pile of blocked pushes must never
keep out the pulls that would make room for them). Native calls need no thread.

Restarts: Ray restarts a shard whose process died (shard.max_restarts) by running
__init__ again. With persistence the shard first restores its journal. Without
it, the shard asks the router which queues it held, logs a warning, and raises
ShardLostError once to each caller of each of them. The loop's housekeeping
returns expired leases to their queues, tells the router the shard's queue names
when they change, and exports the shard's metrics once a second (pype.metrics).
A thread of its own sends the dead letters of the shard's queues to their
dead-letter queues (pype.shards.dead_letter_sender).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import ray

from pype.config import Config
from pype.errors import StaleEpochError
from pype.metrics import ShardMetrics
from pype.payloads import keep_references_here
from pype.protocol import AwaitPush, Moved, Names, Push, Redirect, Stats
from pype.routing import Routes
from pype.shards.dead_letter_sender import DeadLetterSender
from pype.shards.engine import ShardEngine
from pype.shards.journal import Journal, JournalPlace
from pype.shards.listeners import ShardSockets
from pype.shards.loop import ShardLoop
from pype.shards.replication import BackupLog, Position, PrimaryLog, ReplicaSet
from pype.shards.replicator import Replicator
from pype.shards.store import QueueStore
from pype.transport import DataAddress, Keys

logger = logging.getLogger("pype")

PULL_WAITS = "pulls"
PUSH_WAITS = "pushes"
CONTROL = "control"  # the router's calls and data_address(): never stuck behind a data call
WATCH = "watch"  # until_stopped(): the router's one call that waits as long as the shard lives
PING = "ping"  # ping(): answered however long the router's other calls take
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
METRICS_EVERY = 10  # housekeeping rounds (of 0.1 s) between metric exports
CLOSE_DRAIN = 3.0  # seconds close() waits for the outbox to empty (the router waits 5)


def shard_actor(waiter_threads: int, **options) -> ray.actor.ActorClass:
    """The Shard actor class with `waiter_threads` threads in each waiting group.

    Ray fixes concurrency groups when the class is made, not in .options().
    """
    groups = {PULL_WAITS: waiter_threads, PUSH_WAITS: waiter_threads, CONTROL: 1, WATCH: 1,
              PING: 1}
    return ray.remote(concurrency_groups=groups, **options)(Shard)


def log_to_stderr() -> None:
    """Show Pype's warnings and errors on this process's stderr.

    A shard's process (and the router's) is Pype's own: nobody else configures logging there, and Ray
    forwards a worker's stderr to the driver and to its log files.
    """
    if not any(not isinstance(h, logging.NullHandler) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)


def _resident_mb() -> float:
    """This process's resident memory now, in MB (Linux; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def return_large_blocks_to_the_os() -> None:
    """Make glibc allocate blocks of 1 MB and more with mmap, and unmap them when freed.

    A shard holds large items (frames) only until they are pulled. By default glibc
    raises its mmap threshold to the largest block freed so far (up to 32 MB), after
    which 6 MB frames come from the heap and stay in the process when freed: measured
    here, a shard that had streamed 2,000 frames through a queue of 8 kept 61 MB.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass


def serve_at_normal_priority() -> None:
    """Run this process at nice 0, where the OS allows it.

    Ray starts its worker processes at nice 15, behind the driver and Ray's own
    daemons. A shard serves every other process of the program: niced, it loses
    the CPU to its own clients whenever the machine is busy (measured here:
    pipelined native pushes ran at half the rate). Raising a priority needs root
    or CAP_SYS_NICE; without them the shard stays where Ray put it.
    """
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
    except PermissionError:
        logger.info("pype shard: cannot leave Ray's nice level (needs CAP_SYS_NICE)")


@dataclass(frozen=True)
class _Refused:
    """A blocking `.remote()` push that this shard refused (see Shard._run_refused);
    await_push runs it natively, among the threads that may wait."""

    request: tuple
    caller_id: str
    redirect: Redirect


class Shard:
    """Holds the queues whose names hash to shard `index` (made an actor by shard_actor)."""

    def __init__(self, index: int, config: Config, journal_place: JournalPlace | None,
                 router: ray.actor.ActorHandle, server: str, keys: Keys, server_secret: bytes,
                 replica: str | None = None):
        """replica: this replica's id in a replicated shard (config.replicas > 1), which
        starts as a backup until the router makes it primary (lead()); None: the one copy."""
        keep_references_here()
        log_to_stderr()
        serve_at_normal_priority()
        return_large_blocks_to_the_os()
        self._index = index
        self._router = router
        self._routes: Routes | None = None  # how this shard reaches the others, for _run_refused
        persistence = config.persistence
        with warnings.catch_warnings():  # Ray's property uses a deprecated API of its own
            warnings.simplefilter("ignore", DeprecationWarning)
            self._restarted = ray.get_runtime_context().was_current_actor_reconstructed
        journal = journal_dir = None
        if journal_place is not None:
            journal_dir = journal_place.directory(persistence.on_this_node(), self._restarted)
            journal = Journal(journal_dir, persistence.fsync)
        store = QueueStore(config.queue_defaults, config.shard.memory_budget,
                           config.shard.max_item_bytes, journal, persistence.compact_bytes)
        lost = set()
        if journal is not None:
            replayed = store.restore()
            logger.log(logging.WARNING if self._restarted else logging.INFO,
                       "pype shard %d restored %d queues from %s (%d log records)",
                       index, len(store.names()), journal_dir, replayed)
        elif self._restarted and replica is None:  # a backup catches up from its primary
            lost = set(ray.get(router.shard_restarted.remote(index)))
            logger.warning("pype shard %d restarted without persistence: the items of queues %s "
                           "are lost", index, sorted(lost) or "(none known)")
        if self._restarted and replica is None:
            ownership = ray.get(router.ownership.remote())
            if ownership is not None and (store.owner is None or store.owner[2] < ownership[2]):
                store.owner = ownership  # resizes it missed: names it no longer owns
        self._node = {"node_id": ray.get_runtime_context().get_node_id(),
                      "node_ip": ray.util.get_node_ip_address()}
        transport = config.transport
        sockets = ShardSockets(
            self._node["node_id"], self._node["node_ip"], keys, server_secret,
            transport.socket_dir if transport.local == "unix" else None,
            transport.tcp_port + index if transport.tcp_port else 0, f"{server[:40]}-{index}")
        self._metrics = ShardMetrics(server, index)
        self._reported: frozenset | None = None
        self._rounds = 0
        self._engine = ShardEngine(store, index, config.shard.poll_wait, self._restarted, lost)
        self._replica = replica
        self._restarted_since_led = False
        self._replicator: Replicator | None = None
        self._keys = keys
        self._request_timeout = transport.request_timeout
        if replica is not None:
            with self._engine.lock:
                self._engine.follow(0)
            if self._restarted:  # out of the in-sync set before it answers anything
                # Its log may lack records it acknowledged unless its journal kept them
                # (fsync "always": each synced before it was acknowledged; or the same
                # boot of the OS: only its process died).
                self._restarted_since_led = not ray.get(
                    router.replica_restarted.remote(index=index, replica=replica)) and not (
                    journal is not None and journal.kept_every_write)
        self._loop = ShardLoop(self._engine, sockets, self._housekeeping)
        self._dead_letters = DeadLetterSender(self._engine, self._routes_to_others)
        self._stopped = threading.Event()
        logger.info("pype shard %d started (pid %d) at %s", index, os.getpid(), sockets.address)

    def _housekeeping(self, engine: ShardEngine) -> None:
        """Every 0.1 s, on the loop's thread: report new queue names, export metrics."""
        if type(engine.replication) is BackupLog:  # its primary reports for the shard
            return
        self._rounds += 1
        names = frozenset(engine.store.names())
        if names != self._reported:
            self._router.note_queues.remote(self._index, names)
            self._reported = names
        if self._rounds % METRICS_EVERY == 0:
            self._metrics.export(engine.stats())

    @ray.method(concurrency_group=PING)
    def ping(self) -> None:
        """Answer: the router takes a primary that stops answering for dead (a stopped
        process, a node cut off), which Ray may never fail."""

    @ray.method(concurrency_group=WATCH)
    def until_stopped(self) -> None:
        """Return when close() stops the shard: the router keeps one such call waiting
        on each shard, and learns of the shard's death when Ray fails it (no polling)."""
        self._stopped.wait()

    @ray.method(concurrency_group=CONTROL)
    def data_address(self) -> DataAddress:
        """Where this incarnation of the shard serves native calls, and whether it is
        the primary (a backup answers clients NotPrimaryError)."""
        primary = type(self._engine.replication) is not BackupLog
        return replace(self._loop.address, primary=primary)

    # -- replication (the router's calls to a replicated shard) ------------------------------

    @ray.method(concurrency_group=CONTROL)
    def position(self) -> Position:
        """Where this replica's log ends, and the epochs it follows and last wrote."""
        with self._engine.lock:
            replication = self._engine.replication
            if type(replication) is BackupLog:
                return replication.position()._replace(restarted=self._restarted_since_led)
            store = self._engine.store
            return Position(replication.epoch, 0, store.position, store.history.last_epoch,
                            leads=True)

    @ray.method(concurrency_group=CONTROL)
    def lead(self, replicas: ReplicaSet, backups: dict, lost: frozenset = frozenset()) -> None:
        """Serve the shard as the primary of `replicas` (its epoch, its in-sync set),
        replicating to `backups` (replica id -> shard actor). Called again with the same
        epoch when the backups change (one lost with its node was replaced). `lost`: the
        queues whose items died with every in-sync replica (no persistence): each
        caller's first call to one raises ShardLostError."""
        with self._engine.lock:
            replication = self._engine.replication
            if (type(replication) is PrimaryLog and replication.epoch == replicas.epoch
                    and replicas.version < replication.replicas.version):
                return  # a set older than the one it has: a later lead() came first
        if self._replicator is not None:
            self._replicator.stop()
        with self._engine.lock:
            replication = self._engine.replication
            if type(replication) is PrimaryLog and replication.epoch == replicas.epoch:
                self._engine.change_replicas(replicas)
                for backup in replicas.backups:  # what the old senders had in flight is void
                    replication.lost(backup)
            else:
                self._engine.lead(replicas, self._replica, lost)
            log = self._engine.replication
            self._restarted_since_led = False
        index, router = self._index, self._router
        timeout = self._request_timeout

        def ask_router(backup: str, in_sync: bool, version: int) -> ReplicaSet:
            return ray.get(router.change_in_sync.remote(
                index=index, epoch=replicas.epoch, version=version, replica=backup,
                in_sync=in_sync), timeout=timeout)

        self._replicator = Replicator(self._engine, log, backups, self._keys, self._node["node_id"],
                                      timeout, ask_router)
        logger.warning("pype shard %d: replica %s leads epoch %d (in sync: %s)", index,
                       self._replica[:8], replicas.epoch, sorted(r[:8] for r in replicas.in_sync))

    @ray.method(concurrency_group=CONTROL)
    def change_replicas(self, replicas: ReplicaSet) -> None:
        """The router recorded `replicas` (a backup it found dead left the in-sync set)."""
        with self._engine.lock:
            if type(self._engine.replication) is not PrimaryLog:
                return
            try:
                self._engine.change_replicas(replicas)
            except StaleEpochError:
                self._engine.step_down()

    # -- moving queues (the router's resize): never behind the data ------------------------

    @ray.method(concurrency_group=CONTROL)
    def move(self, request: tuple) -> object:
        """A step of a resize (pype.protocol Expect, Export, Import, Arrived): see Router.resize."""
        return self._engine.submit(request, "", may_wait=False)

    @ray.method(concurrency_group=CONTROL)
    def names(self) -> list[str]:
        return self._engine.submit(Names(), "", may_wait=False)

    # -- main thread: never waits ----------------------------------------------------

    def call(self, request: tuple, caller: tuple[str, int]) -> object:
        """Run `request` (pype.protocol) for `caller` = (caller id, number of this call)."""
        if self._is_backup(request):
            return self._run_on_primary(request, caller[0])
        try:
            return self._engine.submit(request, caller[0], sequence=caller[1], may_wait=False)
        except Redirect as redirect:
            if type(request) is Push and request.block:  # it waits: await_push runs it
                return _Refused(request, caller[0], redirect)
            return self._run_refused(request, caller[0], redirect)

    def _run_refused(self, request: tuple, caller_id: str, redirect: Redirect) -> object:
        """Run natively, where it belongs, a `.remote()` request that this shard refused: it
        named a partitioned queue's head, or a queue that moved to another shard. The
        caller could not follow the redirect itself without waiting."""
        return self._routes_to_others().forward(request, caller_id, redirect)

    def _routes_to_others(self) -> Routes:
        if self._routes is None:
            self._routes = Routes(self._router, ray.get(self._router.topology.remote()))
        return self._routes

    def _is_backup(self, request: tuple) -> bool:
        """Is this replica a backup, which runs no client's request but Stats and Names?"""
        return type(self._engine.replication) is BackupLog and type(request) not in (Stats, Names)

    def _run_on_primary(self, request: tuple, caller_id: str) -> object:
        """Run natively on the shard's primary a `.remote()` request that reached this
        backup: its caller routes by a topology from before a failover (it learns the
        new one within a second, pype.routing.TOPOLOGY_CHECK). The primary's redirects
        are followed as the primary's own would be (a partitioned queue's head)."""
        routes = self._routes_to_others()
        if type(request) is Push:
            return routes.push_to(request._replace(on_behalf=request.on_behalf or caller_id))
        try:
            return routes.native(self._index, request)
        except Redirect as redirect:
            return routes.forward(request, caller_id, redirect)

    def _submit_waiting(self, request: tuple, caller: tuple[str, int]) -> object:
        caller_id, after = caller
        if self._is_backup(request):
            return self._run_on_primary(request, caller_id)
        try:
            return self._engine.submit(request, caller_id, after=after)
        except Redirect as redirect:
            return self._run_refused(request, caller_id, redirect)

    def stats(self) -> dict:
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return {"shard": self._index, "pid": os.getpid(), **self._node, "peak_rss_mb": peak_rss_mb,
                "rss_mb": _resident_mb(), "shared_segments": len(self._loop.segments),
                "restarted": self._restarted, "address": self.data_address(),
                **self._engine.submit(Stats(), "", may_wait=False)}

    def close(self) -> None:
        """Stop serving: close the data sockets (and remove the Unix socket file)."""
        self._stopped.set()
        self._dead_letters.stop(drain=CLOSE_DRAIN)
        if self._replicator is not None:
            self._replicator.stop()
        self._loop.stop()

    # -- waiting groups ("pulls", "pushes"): may block ----------------------------------

    @ray.method(concurrency_group=PULL_WAITS)
    def wait_pull(self, request: tuple, caller: tuple[str, int]) -> object:
        """A request of a consumer that may wait; caller: (caller id, the number of its last
        main-thread call, which must run first)."""
        return self._submit_waiting(request, caller)

    @ray.method(concurrency_group=PUSH_WAITS)
    def await_push(self, pending: object, caller: tuple[str, int]) -> object:
        """The second half of a blocking `.remote()` push: wait for its parts that wait in line.

        `pending` is the first half's answer (Ray passes it once that call ran); caller:
        as for wait_pull.
        """
        caller_id, after = caller
        if isinstance(pending, _Refused):
            return self._run_refused(pending.request, pending.caller_id, pending.redirect)
        if isinstance(pending, int):  # the first half ran all of it (on the primary, for one)
            return pending
        try:
            return self._engine.submit(AwaitPush(pending), caller_id, after=after)
        except Moved as moved:  # its queue moved while the push waited for room there
            rest = pending.request._replace(queues=moved.queues)
            return moved.accepted + self._run_refused(rest, caller_id, moved)

    @ray.method(concurrency_group=PUSH_WAITS)
    def wait_push(self, request: tuple, caller: tuple[str, int]) -> object:
        """A request of a producer that may wait; caller: as for wait_pull."""
        return self._submit_waiting(request, caller)
