"""pype.Queue: ray.util.queue.Queue's class and contract, on Pype's native path.

A Ray user switches with one import (`from pype import Queue, Empty, Full`). Where
ray.util.queue starts one actor per queue and makes one actor call per item, a
pype.Queue is a FIFO queue of a Pype server, and every call is a native request
to its shard (a Unix socket on the shard's node, authenticated TCP across nodes).

Where the queue lives: in `server` when one is given; otherwise in this Ray job's
default server, a named Pype server ("queues-<job id>" in namespace "pype") that
the first Queue of the job starts and later ones, in any process of the job,
connect to. Like any Ray actor that is not detached, it lives as long as the
process that started it: make Queues in the driver, or in a process that outlives
their use, as with ray.util.queue, whose actor is owned by its creator too.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

import ray

from pype.client import Server, connect
from pype.errors import (
    Empty,
    Full,
    QueueExistsError,
    QueueFullError,
    QueueNotFoundError,
    QueueTimeoutError,
    ServerExistsError,
    ServerNotFoundError,
)
from pype.options import check_timeout
from pype.protocol import Describe, Length, Pull, Push, Remove
from pype.routing import PULLS, PUSHES

logger = logging.getLogger("pype")

TASK_NATIVE_WAIT = 0.02  # seconds a blocking call of a task waits natively (see Queue._wait)
# ray.util.queue's actor_options that mean something for the shards of a default server.
SHARD_OPTIONS = ("num_cpus", "max_restarts")

_defaults: dict[str, Server] = {}  # this process's handle to its job's default server
_defaults_lock = threading.Lock()


def default_server(actor_options: dict | None = None) -> Server:
    """This Ray job's default server, started on first use (see the module docstring).

    actor_options (num_cpus, max_restarts) apply to each of its shards when this call
    starts it; a default server that runs already keeps the options it was started
    with (a warning says so).
    """
    shard = _shard_options(actor_options)
    if not ray.is_initialized():
        ray.init()
    name = f"queues-{ray.get_runtime_context().get_job_id()}"
    with _defaults_lock:
        server = _defaults.get(name)
        if server is None:
            try:
                server = connect(name)
            except ServerNotFoundError:
                try:
                    return _defaults.setdefault(name, Server.remote(name=name, shard=shard))
                except ServerExistsError:  # another process of the job started it meanwhile
                    server = connect(name)
            _defaults[name] = server
    if shard:
        logger.warning("pype.Queue: actor_options %s are ignored: this job's default server "
                       "runs already, with the options it was started with", shard)
    return server


def _shard_options(actor_options: dict | None) -> dict:
    options = dict(actor_options or {})
    unknown = sorted(set(options) - set(SHARD_OPTIONS))
    if unknown:
        raise ValueError(
            f"actor_options {unknown} do not apply to pype.Queue: its items live in the shards of "
            f"a shared Pype server, which take {list(SHARD_OPTIONS)}; pass server= for more control")
    return options


@contextlib.contextmanager
def _full_when_no_room(name: str):
    """Raise Full where the shard said there was no room (at once, or by the timeout)."""
    try:
        yield
    except (QueueFullError, QueueTimeoutError):
        raise Full(f"queue {name!r} is full") from None


def _in_task() -> bool:
    """Does this thread run a Ray task (not the driver, not an actor)?"""
    context = ray.get_runtime_context()
    return context.worker.mode == ray.WORKER_MODE and context.get_actor_id() is None


class Queue:
    """A first-in, first-out queue for the processes of a Ray program.

    The contract of ray.util.queue.Queue: put and get block until there is room or
    an item (or the timeout passes: Full, Empty), put_nowait/get_nowait do not
    wait, the batch variants take all their items or none, put_async/get_async
    are awaitable. One thread's puts arrive in the order it made them. A Queue is
    picklable into tasks and actors; every copy is the same queue.

    maxsize: at most this many items (0 or less: unbounded). actor_options: see
    default_server(). server: the Pype server that holds the queue (default: the
    job's default server). name: the queue's name in that server (default: a
    fresh one); a Queue named like an existing queue attaches to it, and raises
    QueueExistsError if that queue was made otherwise (another kind, maxsize,
    overflow policy or byte bound).
    """

    def __init__(self, maxsize: int = 0, actor_options: dict | None = None, *,
                 server: Server | None = None, name: str | None = None) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int):
            raise TypeError(f"maxsize must be an int, got {maxsize!r}")
        if server is not None and actor_options:
            raise ValueError("actor_options configure the default server; a Queue given "
                             "server= has its shards already")
        self.maxsize = maxsize
        self.name = name or f"queue-{uuid.uuid4().hex}"
        self.server = server if server is not None else default_server(actor_options)
        bound = max(0, maxsize)
        if not self.server.add(self.name, kind="fifo", maxsize=bound, overflow="reject",
                               max_bytes=0, exist_ok=True):
            existing = self._call(Describe(self.name))
            made = None if existing is None else (existing["kind"], existing["maxsize"],
                                                  existing["overflow"], existing["max_bytes"])
            if made != ("fifo", bound, "reject", 0):
                raise QueueExistsError(f"queue {self.name!r} exists with options {existing}, "
                                       f"not a FIFO of maxsize {bound} that rejects what "
                                       f"does not fit")

    def _call(self, request: tuple) -> Any:
        """Run `request` natively; it may wait in the shard as long as it asks (its timeout)."""
        routes = self.server.routes
        return routes.native(routes.shard_of(self.name), request)

    def _wait(self, request: Pull | Push, timeout: float | None, group: str) -> Any:
        """Run `request`, which may wait `timeout` seconds in the shard (None: no limit).

        In a Ray task it waits natively for TASK_NATIVE_WAIT at most, then through a
        Ray call: a task blocked in ray.get lends its CPU slot to other tasks (every
        call of ray.util.queue is a ray.get), where one blocked on a socket keeps it,
        and tasks that wait for each other could then hold every slot forever.
        """
        if (timeout is not None and timeout <= TASK_NATIVE_WAIT) or not _in_task():
            return self._call(request)
        started = time.monotonic()
        answer = self._attempt(request)
        if answer:
            return answer
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        self.server.routes.look_for_a_newer_topology()
        return ray.get(self._wait_call(request._replace(timeout=left), group))

    def _wait_call(self, request: Pull | Push, group: str) -> ray.ObjectRef:
        """`request` through a Ray call to a thread of the shard's `group` that may wait."""
        routes = self.server.routes
        return routes.wait_call(routes.shard_of(self.name), request, group)

    def _attempt(self, request: Pull | Push, wait: float = TASK_NATIVE_WAIT) -> Any:
        """The request with a short wait, natively: its answer, or None if it found
        no item (a pull) or no room (a push, which was then not accepted)."""
        try:
            return self._call(request._replace(timeout=wait)) or None
        except QueueTimeoutError:
            return None

    def __repr__(self) -> str:
        return f"pype.Queue(maxsize={self.maxsize}, name={self.name!r})"

    # -- size -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.size()

    def size(self) -> int:
        """The number of items in the queue."""
        return self._call(Length(self.name, must_exist=True))

    qsize = size

    def empty(self) -> bool:
        """Whether the queue holds no item."""
        return self.size() == 0

    def full(self) -> bool:
        """Whether the queue holds maxsize items (never, when unbounded)."""
        return self.maxsize > 0 and self.size() >= self.maxsize

    # -- put ---------------------------------------------------------------------------

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Add `item` at the tail.

        block=True waits for room up to `timeout` seconds (None or inf: without
        limit); block=False does not wait. Raises Full if there was no room,
        ValueError for a negative timeout.
        """
        request = self._push_request([item], block, timeout)
        with _full_when_no_room(self.name):
            if block:
                self._wait(request, request.timeout, PUSHES)
            else:
                self._call(request)

    def put_nowait(self, item: Any) -> None:
        """put(item, block=False)."""
        self.put(item, block=False)

    def put_nowait_batch(self, items: Iterable) -> None:
        """Add `items` at the tail, in order, all of them or (Full) none."""
        if not isinstance(items, Iterable):
            raise TypeError("Argument 'items' must be an Iterable")
        items = list(items)
        if self.maxsize > 0 and len(items) > self.maxsize:
            raise Full(f"cannot put {len(items)} items in queue {self.name!r} of maxsize "
                       f"{self.maxsize}")
        with _full_when_no_room(self.name):
            self._call(self._push_request(items, False, None))

    def _push_request(self, items: list, block: bool, timeout: float | None) -> Push:
        timeout = check_timeout(timeout) if block else None
        return Push((self.name,), items, block=bool(block), timeout=timeout, must_exist=True)

    async def put_async(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """put() as an awaitable: a put that must wait for room waits in the shard
        through a Ray call, which the event loop awaits (no thread is held)."""
        request = self._push_request([item], block, timeout)
        with _full_when_no_room(self.name):
            if not block:
                self._call(request)
            elif self._attempt(request, 0.0) is None:
                await self._wait_call(request, PUSHES)

    # -- get -------------------------------------------------------------------------------

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return the item at the head.

        block=True waits for one up to `timeout` seconds (None or inf: without
        limit), as a request parked in the shard, not a poll; block=False does not
        wait. Raises Empty if there was none, ValueError for a negative timeout.
        """
        request = self._pull_request(block, timeout)
        items = self._wait(request, request.timeout, PULLS) if block else self._call(request)
        return self._first(items)

    def _pull_request(self, block: bool, timeout: float | None) -> Pull:
        timeout = check_timeout(timeout) if block else None
        return Pull(self.name, 1, bool(block), timeout, must_exist=True)

    def _first(self, items: list) -> Any:
        if not items:
            raise Empty(f"queue {self.name!r} is empty")
        return items[0]

    def get_nowait(self) -> Any:
        """get(block=False)."""
        return self.get(block=False)

    def get_nowait_batch(self, num_items: int) -> list:
        """Remove and return `num_items` items in order, or (Empty) none if fewer are there."""
        if isinstance(num_items, bool) or not isinstance(num_items, int):
            raise TypeError("Argument 'num_items' must be an int")
        if num_items < 0:
            raise ValueError("'num_items' must be nonnegative")
        items = self._call(Pull(self.name, max(1, num_items), False, exactly=True,
                                must_exist=True)) if num_items else []
        if len(items) < num_items:
            raise Empty(f"cannot get {num_items} items from queue {self.name!r}: fewer are there")
        return items

    async def get_async(self, block: bool = True, timeout: float | None = None) -> Any:
        """get() as an awaitable: a get that must wait for an item waits in the shard
        through a Ray call, which the event loop awaits (no thread is held)."""
        request = self._pull_request(block, timeout)
        items = self._call(request._replace(block=False, timeout=None))
        if not items and block:
            items = await self._wait_call(request, PULLS)
        return self._first(items)

    # -- end -------------------------------------------------------------------------------

    def shutdown(self, force: bool = False, grace_period_s: int = 5) -> None:
        """Remove the queue and its items; later calls on it, from any process, raise
        QueueNotFoundError, and gets waiting on it end with that error.

        force and grace_period_s are accepted for ray.util.queue's sake and change
        nothing: removing a queue is immediate. The server stays (it is shared).
        """
        try:
            self._call(Remove(self.name))
        except QueueNotFoundError:  # shut down before
            pass
