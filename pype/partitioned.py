"""What a client does on a partitioned queue: its calls, spread over the partitions.

The layout and the names are pype.partitions'; this module is the client's side
(see that module's docstring for the rules): Routes.run hands a request for a
partitioned queue to run() here, which makes one request per partition that it
needs, and answers as the queue would.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from pype.errors import LeaseNotHeldError, QueueNotFoundError
from pype.partitions import Layout
from pype.protocol import (
    CanPull,
    CanPush,
    DeadLetters,
    Length,
    Move,
    Moved,
    Pull,
    Remove,
    Render,
    Settle,
)

if TYPE_CHECKING:
    from pype.routing import Routes

logger = logging.getLogger("pype")

WATCH_SLICE = 2.0  # seconds; see _watch


def run(routes: Routes, layout: Layout, request: tuple) -> object:
    """Run a single-queue `request` (pype.protocol) on the partitioned queue of `layout`."""
    kind = type(request)
    if kind is Pull:
        return pull(routes, layout, request.batch_size, request.block, request.timeout,
                    request.remove, request.ack)
    if kind is CanPull:
        return can_pull(routes, layout, request.batch_size, request.wait)
    if kind is CanPush:  # this producer's partition
        target = layout.target()
        return routes.native(routes.shard_of(target), CanPush(target, request.wait))
    if kind is Length:
        return length(routes, layout)
    if kind is Render:
        return render(routes, layout)
    if kind is DeadLetters:  # each partition's, one after the other
        letters = [letter for part in _each(routes, layout, lambda name: request._replace(queue=name))
                   for letter in part]
        return letters if request.batch_size == -1 else letters[:request.batch_size]
    if kind is Settle:
        return settle(routes, layout, request)
    if kind is Remove:
        return remove(routes, layout)
    if kind is Move:
        raise ValueError(f"queue {layout.queue!r} is partitioned: move() takes items from plain "
                         f"queues (to any queue)")
    raise TypeError(f"a {kind.__name__} cannot be run on a partitioned queue")


def remove(routes: Routes, layout: Layout) -> int:
    """Remove the head, then every partition; the items they held."""
    removed = routes.native(routes.shard_of(layout.queue), Remove(layout.queue, layout.partitions))
    answers = routes.each_queue([Remove(name) for name in layout.names()],
                                tolerate=(QueueNotFoundError,))  # removed meanwhile
    return removed + sum(answer for answer in answers if isinstance(answer, int))


def pull(routes: Routes, layout: Layout, batch_size: int | None, block: bool | None,
         timeout: float | None, remove: bool, ack: bool) -> list:
    """Pull from the partitions of `layout` (see the module docstring and Server.pull)."""
    options = layout.options
    is_batch = options.kind == "batch"
    size = options.pull_size if batch_size is None else batch_size
    block = is_batch if block is None else block
    if is_batch and timeout is None:
        timeout = options.batch_timeout
    deadline = None if timeout is None else time.monotonic() + timeout
    got: list = []
    while True:
        got += _take(routes, layout, -1 if size == -1 else size - len(got), remove, ack)
        if not block or not remove or (got and (size == -1 or len(got) >= size)):
            return got
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return got
        if not _watch(routes, layout, left):
            return got  # the timeout passed with nothing new


def _take(routes: Routes, layout: Layout, size: int, remove: bool, ack: bool) -> list:
    """Up to `size` items (-1: all) from the partitions, without waiting."""
    pipeline = routes.pipeline()
    order = layout.turn()
    if size == -1:  # everything: ask every partition at once
        answers = routes.each_queue([_pull(layout, j, -1, remove, ack) for j in order],
                                    tolerate=(Exception,))
        got = [item for j, answer in zip(order, answers, strict=True) if isinstance(answer, list)
               for item in _leased(layout, j, answer, ack)]
        failures = [answer for answer in answers if not isinstance(answer, list)]
        if failures and not got:
            raise failures[0]
        for failure in failures:  # the items of the others are returned, not dropped
            logger.warning("pype: a pull of %r took what %d partitions held; one failed: %r",
                           layout.queue, len(order) - len(failures), failure)
        return got
    got: list = []
    for j in order:
        request = _pull(layout, j, size - len(got), remove, ack)
        answer = routes.result(_send(routes, pipeline, layout, j, request), request)
        got += _leased(layout, j, answer, ack)
        if len(got) >= size:
            break
    return got


def _pull(layout: Layout, partition: int, size: int, remove: bool, ack: bool) -> Pull:
    """A pull of one partition, which must exist: a missing one means that the queue was
    removed since this client learned its layout (the client then forgets it)."""
    return Pull(layout.name(partition), size, False, None, remove, ack, must_exist=True)


def _send(routes: Routes, pipeline, layout: Layout, partition: int, request: tuple):
    index = routes.shard_of(layout.name(partition))
    return pipeline.send(index, routes.after(index), request)


def _leased(layout: Layout, partition: int, items: list, ack: bool) -> list:
    if not ack:
        return items
    return [(layout.lease_id(lease, partition), item, again) for lease, item, again in items]


def _watch(routes: Routes, layout: Layout, wait: float | None) -> bool:
    """Wait until some partition holds an item; False if `wait` s passed first.

    A watch without a limit lasts WATCH_SLICE seconds at most: the watches of the
    partitions that did not fire stay parked in their shards until their own
    deadline, and must not pile up there.
    """
    deadline = None if wait is None else time.monotonic() + wait
    while True:
        left = WATCH_SLICE if deadline is None else min(WATCH_SLICE, deadline - time.monotonic())
        if left <= 0:
            return False
        if _watch_once(routes, layout, left):
            return True


def _watch_once(routes: Routes, layout: Layout, wait: float) -> bool:
    pipeline = routes.pipeline()
    tickets = [_send(routes, pipeline, layout, j, CanPull(layout.name(j), 1, wait))
               for j in range(layout.partitions)]
    try:
        first = pipeline.first(tickets, wait)
        return first is not None and pipeline.result(first) is True
    except Moved as moved:  # a partition moved (a resize): look again, where it is now
        routes.follow(moved)
        return True
    finally:
        for ticket in tickets:
            pipeline.forget(ticket)


def can_pull(routes: Routes, layout: Layout, batch_size: int | None, wait: float | None) -> bool:
    """True once one partition holds a full pull of batch_size items (see Server.can_pull).

    wait: as CanPull's (None: the shards' poll_wait, math.inf: no limit). A long wait
    goes in slices of WATCH_SLICE, as _watch's, so that unanswered asks never pile up."""
    if wait is None or wait <= WATCH_SLICE:
        return _can_pull_once(routes, layout, batch_size, wait)
    deadline = time.monotonic() + wait
    while True:
        left = min(WATCH_SLICE, deadline - time.monotonic())
        if left <= 0:
            return False
        if _can_pull_once(routes, layout, batch_size, left):
            return True


def _can_pull_once(routes: Routes, layout: Layout, batch_size: int | None,
                   wait: float | None) -> bool:
    pipeline = routes.pipeline()
    tickets = [_send(routes, pipeline, layout, j, CanPull(name, batch_size, wait))
               for j, name in enumerate(layout.names())]
    try:
        while tickets:  # each answers by its own deadline
            first = pipeline.first(tickets, None)
            tickets.remove(first)
            if pipeline.result(first):
                return True
        return False
    except Moved as moved:  # a partition moved (a resize): ask again, where it is now
        routes.follow(moved)
        return _can_pull_once(routes, layout, batch_size, wait)
    finally:
        for ticket in tickets:
            pipeline.forget(ticket)


def length(routes: Routes, layout: Layout) -> int:
    """Items ready to pull in all partitions."""
    return sum(_each(routes, layout, lambda name: Length(name, must_exist=True)))


def settle(routes: Routes, layout: Layout, request: Settle) -> int:
    """End (or extend) leases that pull() returned, in each partition that holds them."""
    lease_ids = request.lease_ids
    by_partition: dict[int, list[int]] = {}
    for lease_id in lease_ids:
        partition, lease = layout.split_lease_id(lease_id)
        by_partition.setdefault(partition, []).append(lease)
    pipeline = routes.pipeline()
    requests = {j: request._replace(queue=layout.name(j), lease_ids=leases)
                for j, leases in by_partition.items()}
    tickets = {j: _send(routes, pipeline, layout, j, request) for j, request in requests.items()}
    settled, missing = 0, []
    for j, ticket in tickets.items():
        try:
            settled += routes.result(ticket, requests[j])
        except LeaseNotHeldError as error:
            missing += [layout.lease_id(lease, j) for lease in error.lease_ids]
            settled += len(by_partition[j]) - len(error.lease_ids)
    if missing:
        raise LeaseNotHeldError.of(layout.queue, missing, len(lease_ids), request.outcome != "ack")
    return settled


def _each(routes: Routes, layout: Layout, request_for) -> list:
    """The answers of every partition to request_for(partition name), asked at once."""
    return routes.each_queue([request_for(name) for name in layout.names()])




def render(routes: Routes, layout: Layout) -> str:
    """print_queue of a partitioned queue: one line per partition under one heading."""
    texts = _each(routes, layout, lambda name: Render(name, show=False))
    heading = (f"queue {layout.queue!r} ({layout.options.kind}, {length(routes, layout)} items "
               f"in {layout.partitions} partitions):")
    lines = [heading]
    lines += [f"  {j}: {text.split(': ', 1)[1]}" for j, text in enumerate(texts)]
    text = "\n".join(lines)
    print(text, flush=True)  # print_queue's job, as the shard does for a plain queue
    return text
