"""The thread that sends a shard's dead letters to their queues, on whichever shard.

The store keeps the items its queues gave up on in its outbox (pype.shards.store),
journaled and replicated like the queues. This thread pushes each entry to its
dead-letter queue natively, through the routing core (pype.routing), as the
outbox's producer with the entry's number, so that the target applies it once
however often it is sent: after a lost reply, a restart of this shard, or a
failover to a backup that holds the same outbox. Then it tells the engine
delivered(). A refusal (the queue moved, is full, or is the head of a partitioned
queue) is a definite answer, kept by the target for that number: the entry takes a
new number (renumber) and goes again, later. A failure that leaves the outcome open
(a lost connection, a shard that restarts) sends the same number again. An entry
that can never fit its queue (a ValueError: the queue's maxsize or max_bytes is
smaller) is split into one-item entries; one item that can never fit is dropped,
counted (stats: undeliverable) and logged.

Entries go in order, one at a time: dead letters are rare, and a queue's dead
letters keep their order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from pype.errors import PypeError, QueueNotFoundError
from pype.protocol import Push, Redirect
from pype.routing import Routes
from pype.shards.engine import ShardEngine
from pype.shards.replication import BackupLog

logger = logging.getLogger("pype")

COMMIT_WAIT = 0.05  # seconds between looks at an entry that waits for its commit
FIRST_RETRY, LAST_RETRY = 0.1, 5.0  # seconds before sending again after a failure
WARN_EVERY = 60.0  # seconds between warnings about the same entry


def refused(error: BaseException) -> bool:
    """Did the target answer, refusing the push (it keeps that answer for the push's
    number), rather than leave it unknown whether the push was applied?"""
    return isinstance(error, (PypeError, ValueError, TypeError)) and not isinstance(
        error, (ConnectionError, TimeoutError))


class DeadLetterSender:
    """Sends the engine's outbox (see the module docstring) until stop()."""

    def __init__(self, engine: ShardEngine, routes: Callable[[], Routes]):
        self._engine = engine
        self._routes = routes  # made on first use: it asks the router for the topology
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="pype-dead-letters", daemon=True)
        self._thread.start()

    def stop(self, drain: float = 0.0) -> None:
        """Stop sending, after up to `drain` seconds for the outbox to empty (a shard a
        shrink removes: what it still holds then is lost with it, and logged)."""
        engine = self._engine
        with engine.lock:
            engine.outbox_filled.wait_for(  # a backup's primary sends them
                lambda: not engine.store.outbox or type(engine.replication) is BackupLog,
                timeout=drain)
            if engine.store.outbox and type(engine.replication) is not BackupLog:
                logger.error("pype shard %d stops with %d items in its outbox, undelivered",
                             engine.index, engine.store.stats()["outbox"])
            self._stopped = True
            engine.outbox_filled.notify_all()

    def _run(self) -> None:
        retry, warned = FIRST_RETRY, 0.0
        while True:
            outgoing = self._next()
            if outgoing is None:
                return
            entry, producer = outgoing
            try:
                self._send(entry.queue, entry.items, producer)
            except Exception as error:  # noqa: BLE001 - sent again; the shard serves on
                if refused(error):
                    with self._engine.lock:
                        if type(error) is ValueError:  # too large for its queue, ever
                            self._engine.never_fits(entry.number, str(error))
                        else:
                            self._engine.renumber(entry.number)
                if time.monotonic() - warned > WARN_EVERY:
                    warned = time.monotonic()
                    logger.warning("pype shard %d: %d items for queue %r wait in its "
                                   "outbox: %s: %s; sending again", self._engine.index,
                                   len(entry.items), entry.queue, type(error).__name__, error)
                with self._engine.lock:
                    self._engine.outbox_filled.wait_for(lambda: self._stopped, timeout=retry)
                retry = min(retry * 2, LAST_RETRY)
                continue
            retry, warned = FIRST_RETRY, 0.0
            with self._engine.lock:
                self._engine.delivered(entry.number)
                self._engine.outbox_filled.notify_all()  # a stop() may wait for the outbox

    def _next(self):
        """The next entry to send, waiting for one; None once stopped."""
        engine = self._engine
        with engine.lock:
            while not self._stopped:
                outgoing = engine.outgoing()
                if outgoing is not None:
                    return outgoing
                idle = type(engine.replication) is BackupLog or not engine.store.outbox
                engine.outbox_filled.wait(None if idle else COMMIT_WAIT)
        return None

    def _send(self, queue: str, items: list, producer: tuple[int, int, int]) -> None:
        routes = self._routes()
        index, target = routes.push_target(queue)  # a partitioned queue: a partition of it
        try:
            routes.native(index, Push((target,), items, producer=producer,
                                      must_exist=target != queue))
        except Redirect as redirect:  # it became partitioned: learn its partitions
            routes.follow(redirect)
            raise
        except QueueNotFoundError:  # a partition is gone: the queue was removed
            routes.forget_layouts((queue,))
            raise
