"""One-item-at-a-time code at batched speed: Consumer and Producer.

    for item in server.consume("in"):             # pulls batches, yields items
        ...
    with server.producer("out") as out:           # buffers items, pushes batches
        out.push(item)

Both use the native path (pype.routing), each with a pipeline of its own, so
that a request can be in flight while the code works: a Consumer's next pull
(prefetch), a Producer's last `window` batches (a PushWindow, which the video
actor uses too).

Delivery: both are at-most-once, like a plain pull. A Consumer has taken from the
queue the items of the batch it is yielding and the next batch (it prefetches):
if its process dies they are gone. Items it took but never yielded (the loop broke
out early) are handed back by close() and, if nobody asks, logged as a warning.
A Producer holds items for at most `linger` seconds or `batch_size` items before
it pushes them, and waits for a batch's answer only when `window` later batches
are out; if its process dies, what it holds is gone. A failed batch is raised by
the next push(), flush() or close(); close() (and leaving the with-block) pushes
what is left and waits for every answer.
"""

from __future__ import annotations

import logging
import operator
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Self

from pype.protocol import MAX_UNANSWERED_PUSHES, Moved, Pull, Push
from pype.routing import Routes
from pype.transport import Pipeline

if TYPE_CHECKING:
    from pype.client import Server

logger = logging.getLogger("pype")

PULL_WAIT = 1.0  # seconds one pull of a Consumer waits in the shard


class Consumer(Iterable):
    """Iterates over the items of one queue, pulling them in batches.

    Each pull waits in the shard for at least one item and takes everything there
    (up to batch_size). Iteration ends when a pull waited `timeout` seconds and
    found nothing; with timeout None it never ends.
    """

    def __init__(self, server: Server, queue: str, batch_size: int = -1,
                 timeout: float | None = None):
        # Each pull waits at most PULL_WAIT in the shard, so close() never waits long
        # for the prefetched one; the iterator adds up idle time against `timeout`.
        self._wait = PULL_WAIT if timeout is None else min(PULL_WAIT, timeout)
        self._server = server
        self._request = Pull(queue, batch_size, True, self._wait)
        self._routes = server.routes
        self._pipeline = self._routes.new_pipeline()
        self._partitioned = self._routes.layout(queue) is not None  # pulled by server.pull, unprefetched
        self._queue = queue
        self._timeout = timeout
        self._idle = 0.0
        self._batch: Iterator = iter(())  # the batch being yielded: what it holds, it did not yet
        self._next: tuple | None = self._pull()
        self._closed = False

    def _pull(self) -> tuple:
        if self._partitioned:
            return ()
        return self._routes.send(self._request, self._pipeline)  # to its shard now (resizes)

    def _result(self) -> list:
        if self._partitioned:
            request = self._request
            return self._server.pull(self._queue, request.batch_size, request.block, request.timeout)
        return self._routes.result(self._next, self._request, self._wait, self._pipeline)

    def __iter__(self) -> Iterator:
        """The items, a batch at a time handed to Python's own iteration (no call per item).

        Every iterator over the Consumer, and next(), share one position: each goes on
        with the batch the others left (self._batch), and only the one that finds it
        empty pulls the next."""
        while True:
            batch = self._batch
            yield from batch
            if self._batch is batch and not self._next_batch():
                return

    def __next__(self) -> Any:
        while True:
            for item in self._batch:
                return item
            if not self._next_batch():
                raise StopIteration

    def batches(self) -> Iterator[list]:
        """The items as the pulls bring them: one list per pull (none empty), for code
        that hands a batch over whole (Producer.extend)."""
        while True:
            rest = list(self._batch)  # what the batch still holds (next() may have begun it)
            if rest:
                yield rest
            elif not self._next_batch():
                return

    def _next_batch(self) -> bool:
        """Wait for the prefetched pull and make it the batch to yield; False at the end."""
        while self._next is not None:
            items = self._result()
            self._idle = 0.0 if items else self._idle + self._wait
            if self._timeout is not None and self._idle >= self._timeout:
                self._next = None
                return False
            self._next = self._pull()  # prefetch: on its way while this batch is consumed
            if items:
                self._batch = iter(items)
                return True
        return False

    def close(self) -> list:
        """Stop; return the items taken from the queue but not yielded, in order."""
        if self._closed:
            return []
        self._closed = True
        left = list(self._batch)
        if self._next is not None and not self._partitioned:
            left += self._routes.result(self._next, self._request, self._wait, self._pipeline)
        self._next = None
        self._pipeline.close()
        return left

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self._warn_if_left(self.close())

    def __del__(self) -> None:
        # no calls here: the process may be shutting down
        if not self._closed and self._next is not None:
            logger.warning("consume(%r) was dropped unclosed: %d items taken but not yielded, "
                           "and a prefetched batch, are discarded", self._queue,
                           operator.length_hint(self._batch))

    def _warn_if_left(self, left: list) -> None:
        if left:
            logger.warning("consume(%r) took %d items it never yielded; they are discarded "
                           "(call close() to get them back)", self._queue, len(left))


class PushWindow:
    """Pushes of one sender to one queue, with up to `window` of them unanswered.

    send(items) pushes them to `queue` (or to this process's partition of it) and
    returns at once; the answer of each push is handed to on_answer(items, accepted,
    error) once `window` later pushes are out, or on drain(), oldest first (a push
    that is sent again after a move is answered after the later ones that were not).
    Pushes of one window keep their order in the queue: one connection carries them,
    and a push that met a moved queue (a resize) is sent again to its new shard
    together with every later one in flight, in order, before anything new.
    Producer and the video actor push through one each. Not thread-safe.
    """

    def __init__(self, routes: Routes, queue: str, window: int, block: bool,
                 on_answer: Callable[[list, int, Exception | None], None],
                 pipeline: Pipeline | None = None):
        self._routes = routes
        self._queue = queue
        self._window = window
        self._block = block
        self._on_answer = on_answer
        self._pipeline = pipeline or routes.new_pipeline()
        self._index, self._target = routes.push_target(queue)
        self._sent: deque[tuple] = deque()  # (ticket, request), oldest first
        self.sent = 0  # pushes sent so far

    def send(self, items: list) -> None:
        """Push `items` (one push); answer the oldest beyond the window."""
        self._send(Push((self._target,), items, block=self._block,
                        must_exist=self._target != self._queue))
        while len(self._sent) > self._window:
            self._answer_oldest()

    def drain(self) -> None:
        """Wait for the answer of every push sent."""
        while self._sent:
            self._answer_oldest()

    def close(self) -> None:
        self._pipeline.close()

    def _send(self, request: Push) -> None:
        # By the shard this window knows, even if its process learned of a resize meanwhile:
        # a push must not reach the new shard before those in flight to the old one.
        ticket = self._pipeline.send(self._index, self._routes.after(self._index), request)
        self._sent.append((ticket, request))
        self.sent += 1

    def _answer_oldest(self) -> None:
        ticket, request = self._sent.popleft()
        try:
            accepted = self._pipeline.result(ticket, None if self._block else 0.0)
        except Moved as moved:
            self._send_again(request, moved)
        except Exception as error:  # noqa: BLE001 - the push's own error, for on_answer
            self._on_answer(request.items, 0, error)
        else:
            self._on_answer(request.items, accepted, None)

    def _send_again(self, request: Push, moved: Moved) -> None:
        """The queue moved (a resize): this push and every later one in flight went to
        its old shard, which applied none of them. Send them all again, in order."""
        self._routes.follow(moved)
        self._index, self._target = self._routes.push_target(self._queue)
        again = [request]
        for ticket, later in list(self._sent):
            try:
                accepted = self._pipeline.result(ticket, None if self._block else 0.0)
            except Moved:
                again.append(later)
            except Exception as error:  # noqa: BLE001 - as in _answer_oldest
                self._on_answer(later.items, 0, error)
            else:
                self._on_answer(later.items, accepted, None)
        self._sent.clear()
        for push in again:
            self._send(push._replace(queues=(self._target,), must_exist=self._target != self._queue))


class Producer:
    """Buffers pushes of one process to one queue and sends them in batches.

    A batch goes out when it holds batch_size items, when its first item has
    waited `linger` seconds (a background thread sees to that), on flush(), and on
    close(). Batches keep the order of push() calls. At most `window` batches are
    unanswered at a time (a PushWindow). block=True makes every batch a blocking
    push (see Server.push). push() only appends to a deque (no lock: a lock per item
    cost as much as the rest of the push); whoever sends, the caller's thread or the
    linger thread, takes items from its front under the Producer's lock, so batches
    leave in order and the two threads take turns on the socket. One thread pushes and
    closes (the linger thread aside): a push() racing close() on another thread may
    be left unsent.
    """

    def __init__(self, server: Server, queue: str, batch_size: int = 1000,
                 linger: float = 0.005, block: bool = False, window: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 1 <= window <= MAX_UNANSWERED_PUSHES:
            raise ValueError(f"window must be between 1 and {MAX_UNANSWERED_PUSHES:,} (the "
                             f"answers a shard keeps per producer), got {window}")
        self._queue = queue
        self._batch_size = batch_size
        self._linger = linger
        self._pushes = PushWindow(server.routes, queue, window, block, self._answered)
        self._lock = threading.Lock()
        self._items: deque = deque()
        self._first_at = 0.0
        self._accepted = 0
        self._failure: Exception | None = None
        self._closing = False
        self._closed = threading.Event()
        self._timer = threading.Thread(target=self._flush_when_stale, daemon=True,
                                       name=f"pype-producer-{queue}")
        self._timer.start()

    def push(self, item: Any) -> None:
        """Add `item` to the current batch (sent at once if that fills it)."""
        if self._failure is not None or self._closing:
            self._refuse()
        items = self._items
        items.append(item)
        if len(items) >= self._batch_size:
            with self._lock:
                self._send(whole_batches=True)
        elif len(items) == 1:
            self._first_at = time.monotonic()

    def extend(self, items: list) -> None:
        """push() each of `items`, handed over whole (one call for a batch)."""
        if self._failure is not None or self._closing:
            self._refuse()
        was_empty = not self._items
        self._items.extend(items)
        if len(self._items) >= self._batch_size:
            with self._lock:
                self._send(whole_batches=True)
        elif was_empty and self._items:
            self._first_at = time.monotonic()

    def _refuse(self) -> None:
        if self._closing:
            raise RuntimeError("push() on a closed Producer")
        with self._lock:
            self._raise_failure()

    def flush(self) -> None:
        """Send the current batch now."""
        with self._lock:
            self._send()
            self._raise_failure()

    def close(self) -> int:
        """Send what is left, wait for every batch's answer; return the items accepted.

        Raises the first error a batch met (QueueFullError, ...).
        """
        self._closing = True
        with self._lock:
            self._send()
            self._closed.set()
        self._timer.join()
        with self._lock:
            self._send()  # what a push() added while the linger thread sent
            self._pushes.drain()
            self._pushes.close()
            self._raise_failure()
        return self._accepted

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, whole_batches: bool = False) -> None:
        """Send what push() added, in batches of batch_size at most (lock held); with
        whole_batches, leave a last batch that is not full. A batch that could not be
        sent (an item that cannot be pickled) goes back to the front; its error is raised."""
        items, popleft, size = self._items, self._items.popleft, self._batch_size
        while len(items) >= (size if whole_batches else 1):
            batch = [popleft() for _ in range(min(len(items), size))]
            sent = self._pushes.sent
            try:
                self._pushes.send(batch)
            except BaseException:
                if self._pushes.sent == sent:
                    items.extendleft(reversed(batch))
                raise

    def _answered(self, items: list, accepted: int, error: Exception | None) -> None:
        self._accepted += accepted
        if error is not None and self._failure is None:  # kept and raised, first one first
            self._failure = error

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def _flush_when_stale(self) -> None:
        while not self._closed.wait(self._linger):
            with self._lock:
                if self._items and time.monotonic() - self._first_at >= self._linger:
                    try:
                        self._send()
                    except Exception as error:  # noqa: BLE001 - raised by the next push()
                        if self._failure is None:
                            self._failure = error
