"""The shard actor: a thin Ray shell around a QueueStore.

Methods that never wait run on the actor's main thread, where Ray keeps each
caller's calls in the order they were sent (a sync actor; an async one would
reorder them). Methods that may wait run on threads of two concurrency groups,
where they may block without holding up pushes and pulls: "pulls" for waits of
consumers (for items), "pushes" for waits of producers (for room). Keeping them
apart matters: a pile of blocked pushes must never keep out the pulls that would
make room for them. No call waits on another actor (only __init__ of a restarted
shard asks the router once).

Main-thread methods take the caller's (id, sequence) first and record it;
waiting methods take the (id, sequence) of the caller's last main-thread call
and first wait for it to have run (see QueueStore.catch_up).

Restarts: Ray restarts a shard whose process died (shard.max_restarts) by running
__init__ again. With persistence the shard first restores its journal. Without
it, the shard asks the router which queues it held, logs a warning, and raises
ShardLostError once to each caller of each of them. A housekeeping thread
returns expired leases to their queues, tells the router the shard's queue
names when they change (it looks ten times a second), and exports the shard's
metrics once a second (pype.metrics).
"""

from __future__ import annotations

import logging
import math
import os
import resource
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import ray

from pype.config import Config
from pype.errors import ShardLostError
from pype.metrics import ShardMetrics
from pype.options import QueueOptions
from pype.payloads import keep_references_here
from pype.shards.journal import Journal
from pype.shards.store import Caller, PendingPush, QueueStore

logger = logging.getLogger("pype")

PULL_WAITS = "pulls"
PUSH_WAITS = "pushes"
HOUSEKEEPING_INTERVAL = 0.1  # seconds between checks for expired leases and new queue names
METRICS_EVERY = 10           # export metrics every this many checks (once a second)


def shard_actor(waiter_threads: int, **options) -> ray.actor.ActorClass:
    """The Shard actor class with `waiter_threads` threads in each waiting group.

    Ray fixes concurrency groups when the class is made, not in .options().
    """
    groups = {PULL_WAITS: waiter_threads, PUSH_WAITS: waiter_threads}
    return ray.remote(concurrency_groups=groups, **options)(Shard)


def log_to_stderr() -> None:
    """Show Pype's warnings and errors on this process's stderr.

    A shard process is Pype's own: nobody else configures logging there, and Ray
    forwards a worker's stderr to the driver and to its log files.
    """
    if not any(not isinstance(h, logging.NullHandler) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)


class Shard:
    """Holds the queues whose names hash to shard `index` (made an actor by shard_actor)."""

    def __init__(self, index: int, config: Config, journal_dir: Path | None,
                 router: ray.actor.ActorHandle, server: str):
        keep_references_here()
        log_to_stderr()
        self._index = index
        self._router = router
        self._poll_wait = config.shard.poll_wait
        self._waiter_threads = config.shard.waiter_threads
        self._busy = {PULL_WAITS: 0, PUSH_WAITS: 0}
        self._busy_lock = threading.Lock()
        persistence = config.persistence
        journal = None if journal_dir is None else Journal(journal_dir, persistence.fsync)
        self._store = QueueStore(config.queue_defaults, config.shard.memory_budget,
                                 config.shard.max_item_bytes, journal, persistence.compact_bytes)
        with warnings.catch_warnings():  # Ray's property uses a deprecated API of its own
            warnings.simplefilter("ignore", DeprecationWarning)
            self._restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self._store.restarted = self._restarted
        self._lost: dict[str, set[str]] = {}  # queue lost in a restart -> callers told of it
        self._lost_at: float | None = None
        if journal is not None:
            replayed = self._store.restore()
            logger.log(logging.WARNING if self._restarted else logging.INFO,
                       "pype shard %d restored %d queues from %s (%d log records)",
                       index, len(self._store.names()), journal_dir, replayed)
        elif self._restarted:
            self._lost = {name: set() for name in ray.get(router.shard_restarted.remote(index))}
            self._lost_at = time.time()
            logger.warning("pype shard %d restarted without persistence: the items of queues %s "
                           "are lost", index, sorted(self._lost) or "(none known)")
        self._metrics = ShardMetrics(server, index)
        self._node = {"node_id": ray.get_runtime_context().get_node_id(),
                      "node_ip": ray.util.get_node_ip_address()}
        threading.Thread(target=self._housekeeping, name="pype-housekeeping", daemon=True).start()
        logger.info("pype shard %d started (pid %d)", index, os.getpid())

    def _housekeeping(self) -> None:
        reported, ticks = None, 0
        while True:
            time.sleep(HOUSEKEEPING_INTERVAL)
            ticks += 1
            try:
                self._store.expire_leases()
                if ticks % METRICS_EVERY == 0:
                    self._metrics.export(self._store.stats())
                names = frozenset(self._store.names())
                if names != reported:
                    self._router.note_queues.remote(self._index, names)
                    reported = names
            except Exception:
                logger.exception("pype shard %d: housekeeping failed; it goes on", self._index)

    def _check_lost(self, caller: Caller, names) -> None:
        """Raise ShardLostError if `caller` has not been told that a queue of `names` was lost."""
        if not self._lost:
            return
        for name in names:
            told = self._lost.get(name)
            if told is not None and caller[0] not in told:
                told.add(caller[0])
                raise ShardLostError(
                    f"queue {name!r} lost its items: shard {self._index} restarted at "
                    f"{time.strftime('%H:%M:%S', time.localtime(self._lost_at))} without persistence. "
                    f"This call was not applied; the next one works on the new, empty queue")

    @contextmanager
    def _waiting(self, group: str):
        """Count the threads of `group` in use; warn when none is left."""
        with self._busy_lock:
            self._busy[group] += 1
            if self._busy[group] == self._waiter_threads:
                logger.warning(
                    "pype shard %d: all %d threads for waiting %s are in use; further waiting "
                    "calls queue in Ray until one returns (raise shard.waiter_threads)",
                    self._index, self._waiter_threads, group)
        try:
            yield
        finally:
            with self._busy_lock:
                self._busy[group] -= 1

    @contextmanager
    def _recorded(self, caller: Caller):
        try:
            yield
        finally:
            self._store.record(caller)

    # -- main thread: never waits --------------------------------------------------

    def push(self, caller: Caller, names, items, priority, block, timeout) -> int | PendingPush:
        with self._recorded(caller):
            self._check_lost(caller, names)
            return self._store.push(names, items, priority, block, timeout)

    def pull(self, caller: Caller, name, batch_size, block, timeout, remove, ack) -> list:
        with self._recorded(caller):
            self._check_lost(caller, (name,))
            return self._store.pull(name, batch_size, block, timeout, remove, False, ack)

    def settle(self, caller: Caller, name: str, lease_ids: list[int], requeue: bool) -> int:
        with self._recorded(caller):
            return self._store.settle(name, lease_ids, requeue)

    def add(self, caller: Caller, name: str, options: QueueOptions, exist_ok: bool) -> bool:
        with self._recorded(caller):
            return self._store.add(name, options, exist_ok)

    def remove(self, caller: Caller, name: str) -> int:
        with self._recorded(caller):
            return self._store.remove(name)

    def queue_len(self, caller: Caller, name: str) -> int:
        with self._recorded(caller):
            return self._store.length(name)

    def print_queue(self, caller: Caller, name: str) -> str:
        with self._recorded(caller):
            text = self._store.render(name)
            print(text, flush=True)  # the seed's debugging habit: Ray shows it in the driver
            return text

    def describe(self, caller: Caller, name: str) -> dict | None:
        with self._recorded(caller):
            return self._store.describe(name)

    def queues(self, caller: Caller) -> list[str]:
        with self._recorded(caller):
            return self._store.names()

    def stats(self, caller: Caller) -> dict:
        with self._recorded(caller):
            peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
            return {"shard": self._index, "pid": os.getpid(), **self._node, "peak_rss_mb": peak_rss_mb,
                    "restarted": self._restarted, "lost_queues": sorted(self._lost),
                    **self._store.stats()}

    # -- waiting groups ("pulls", "pushes"): may block ---------------------------------

    @ray.method(concurrency_group=PUSH_WAITS)
    def await_push(self, pending: int | PendingPush) -> int:
        with self._waiting(PUSH_WAITS):
            return self._store.await_push(pending)

    @ray.method(concurrency_group=PUSH_WAITS)
    def can_push(self, after: Caller, name: str, wait: float | None = None) -> bool:
        """wait: seconds to wait for room (math.inf: no limit); None = the configured poll_wait."""
        with self._waiting(PUSH_WAITS):
            self._store.catch_up(after)
            return self._store.can_push(name, self._wait_limit(wait))

    @ray.method(concurrency_group=PULL_WAITS)
    def pull_waiting(self, after: Caller, name, batch_size, block, timeout, remove, ack) -> list:
        with self._waiting(PULL_WAITS):
            self._store.catch_up(after)
            self._check_lost(after, (name,))
            return self._store.pull(name, batch_size, block, timeout, remove, True, ack)

    @ray.method(concurrency_group=PULL_WAITS)
    def can_pull(self, after: Caller, name: str, batch_size: int | None,
                 wait: float | None = None) -> bool:
        """wait: seconds to wait for a full pull (math.inf: no limit); None = the configured poll_wait."""
        with self._waiting(PULL_WAITS):
            self._store.catch_up(after)
            return self._store.can_pull(name, batch_size, self._wait_limit(wait))

    def _wait_limit(self, wait: float | None) -> float | None:
        """The store's wait (None: no limit) for a caller's (None: poll_wait; inf: no limit)."""
        if wait is None:
            return self._poll_wait
        return None if wait == math.inf else wait
