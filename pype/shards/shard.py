"""The shard actor: a thin Ray shell around a QueueStore.

Methods that never wait run on the actor's main thread, where Ray keeps each
caller's calls in the order they were sent (a sync actor; an async one would
reorder them). Methods that may wait run on threads of two concurrency groups,
where they may block without holding up pushes and pulls: "pulls" for waits of
consumers (for items), "pushes" for waits of producers (for room). Keeping them
apart matters: a pile of blocked pushes must never keep out the pulls that would
make room for them. No method calls another actor.

Main-thread methods take the caller's (id, sequence) first and record it;
waiting methods take the (id, sequence) of the caller's last main-thread call
and first wait for it to have run (see QueueStore.catch_up).
"""

from __future__ import annotations

import logging
import resource
import threading
from contextlib import contextmanager

import ray

from pype.payloads import keep_references_here
from pype.shards.queues import QueueOptions
from pype.shards.store import Caller, PendingPush, QueueStore

logger = logging.getLogger("pype")

PULL_WAITS = "pulls"
PUSH_WAITS = "pushes"


def shard_actor(waiter_threads: int, **options) -> ray.actor.ActorClass:
    """The Shard actor class with `waiter_threads` threads in each waiting group.

    Ray fixes concurrency groups when the class is made, not in .options().
    """
    groups = {PULL_WAITS: waiter_threads, PUSH_WAITS: waiter_threads}
    return ray.remote(concurrency_groups=groups, **options)(Shard)


class Shard:
    """Holds the queues whose names hash to shard `index` (made an actor by shard_actor)."""

    def __init__(self, index: int, queue_defaults: QueueOptions, poll_wait: float,
                 waiter_threads: int):
        keep_references_here()
        self._index = index
        self._poll_wait = poll_wait
        self._store = QueueStore(queue_defaults)
        self._waiter_threads = waiter_threads
        self._busy = {PULL_WAITS: 0, PUSH_WAITS: 0}
        self._busy_lock = threading.Lock()
        logger.info("pype shard %d started", index)

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
            return self._store.push(names, items, priority, block, timeout)

    def pull(self, caller: Caller, name, batch_size, block, timeout, remove) -> list:
        with self._recorded(caller):
            return self._store.pull(name, batch_size, block, timeout, remove, may_wait=False)

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
            return {"shard": self._index, "peak_rss_mb": peak_rss_mb, **self._store.stats()}

    # -- waiting groups ("pulls", "pushes"): may block ---------------------------------

    @ray.method(concurrency_group=PUSH_WAITS)
    def await_push(self, pending: int | PendingPush) -> int:
        with self._waiting(PUSH_WAITS):
            return self._store.await_push(pending)

    @ray.method(concurrency_group=PUSH_WAITS)
    def can_push(self, after: Caller, name: str, wait: float | None = None) -> bool:
        """wait: seconds to wait for room; None = the configured poll_wait."""
        with self._waiting(PUSH_WAITS):
            self._store.catch_up(after)
            return self._store.can_push(name, self._poll_wait if wait is None else wait)

    @ray.method(concurrency_group=PULL_WAITS)
    def pull_waiting(self, after: Caller, name, batch_size, block, timeout, remove) -> list:
        with self._waiting(PULL_WAITS):
            self._store.catch_up(after)
            return self._store.pull(name, batch_size, block, timeout, remove, may_wait=True)

    @ray.method(concurrency_group=PULL_WAITS)
    def can_pull(self, after: Caller, name: str, batch_size: int | None,
                 wait: float | None = None) -> bool:
        """wait: seconds to wait for a full pull; None = the configured poll_wait."""
        with self._waiting(PULL_WAITS):
            self._store.catch_up(after)
            return self._store.can_pull(name, batch_size, self._poll_wait if wait is None else wait)
