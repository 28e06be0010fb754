"""The shard actor: a thin Ray shell around a QueueStore.

Methods that never wait run on the actor's main thread, where Ray keeps each
caller's calls in the order they were sent (a sync actor; an async one would
reorder them). Methods that may wait run in the "wait" concurrency group, whose
threads may block without holding up pushes and pulls. No method calls another
actor.

Main-thread methods take the caller's (id, sequence) first and record it;
waiting methods take the (id, sequence) of the caller's last main-thread call
and first wait for it to have run (see QueueStore.catch_up).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import ray

from pype.shards.queues import QueueOptions
from pype.shards.store import Caller, PendingPush, QueueStore

logger = logging.getLogger("pype")

WAIT_GROUP = "wait"


def shard_actor(waiter_threads: int, **options) -> ray.actor.ActorClass:
    """The Shard actor class with `waiter_threads` threads in its wait group.

    Ray fixes concurrency groups when the class is made, not in .options().
    """
    return ray.remote(concurrency_groups={WAIT_GROUP: waiter_threads}, **options)(Shard)


class Shard:
    """Holds the queues whose names hash to shard `index` (made an actor by shard_actor)."""

    def __init__(self, index: int, queue_defaults: QueueOptions, poll_wait: float):
        self._index = index
        self._poll_wait = poll_wait
        self._store = QueueStore(queue_defaults)
        logger.info("pype shard %d started", index)

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
            return {"shard": self._index, **self._store.stats()}

    # -- wait group: may block ------------------------------------------------------

    @ray.method(concurrency_group=WAIT_GROUP)
    def await_push(self, pending: int | PendingPush) -> int:
        return self._store.await_push(pending)

    @ray.method(concurrency_group=WAIT_GROUP)
    def pull_waiting(self, after: Caller, name, batch_size, block, timeout, remove) -> list:
        self._store.catch_up(after)
        return self._store.pull(name, batch_size, block, timeout, remove, may_wait=True)

    @ray.method(concurrency_group=WAIT_GROUP)
    def can_pull(self, after: Caller, name: str, batch_size: int | None,
                 wait: float | None = None) -> bool:
        """wait: seconds to wait for the condition; None = the configured poll_wait."""
        self._store.catch_up(after)
        return self._store.can_pull(name, batch_size, self._poll_wait if wait is None else wait)

    @ray.method(concurrency_group=WAIT_GROUP)
    def can_push(self, after: Caller, name: str, wait: float | None = None) -> bool:
        self._store.catch_up(after)
        return self._store.can_push(name, self._poll_wait if wait is None else wait)
