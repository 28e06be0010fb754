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

import asyncio
import functools
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

import ray

from pype.client import PULLS, PUSHES, Server, connect
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
from pype.protocol import Describe, Length, Pull, Push, Remove

TASK_NATIVE_WAIT = 0.02  # seconds a blocking call of a task waits natively (see Queue._wait)
# ray.util.queue's actor_options that mean something for the shards of a default server.
SHARD_OPTIONS = ("num_cpus", "max_restarts")

_defaults: dict[str, Server] = {}  # this process's handle to its job's default server
_defaults_lock = threading.Lock()


def default_server(actor_options: dict | None = None) -> Server:
    """This Ray job's default server, started on first use (see the module docstring).

    actor_options (num_cpus, max_restarts) apply to its shards when this call starts
    it; a default server that runs already keeps the options it was started with.
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
                    server = Server.remote(name=name, shard=shard)
                except ServerExistsError:  # another process of the job started it meanwhile
                    server = connect(name)
            _defaults[name] = server
        return server


def _shard_options(actor_options: dict | None) -> dict:
    options = dict(actor_options or {})
    unknown = sorted(set(options) - set(SHARD_OPTIONS))
    if unknown:
        raise ValueError(
            f"actor_options {unknown} do not apply to pype.Queue: its items live in the shards of "
            f"a shared Pype server, which take {list(SHARD_OPTIONS)}; pass server= for more control")
    return options


def _in_task() -> bool:
    """Does this thread run a Ray task (not the driver, not an actor)?"""
    context = ray.get_runtime_context()
    return context.worker.mode == ray.WORKER_MODE and context.get_actor_id() is None


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")


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
    QueueExistsError if that queue has a different maxsize or kind.
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
        self._shard = self.server.shard_of(self.name)
        bound = max(0, maxsize)
        if not self.server.add(self.name, kind="fifo", maxsize=bound, overflow="reject",
                               exist_ok=True):
            existing = self._call(Describe(self.name))
            if existing is None or (existing["kind"], existing["maxsize"]) != ("fifo", bound):
                raise QueueExistsError(f"queue {self.name!r} exists with options {existing}, "
                                       f"not a FIFO of maxsize {bound}")

    def _call(self, request: tuple, wait: float | None = 0.0) -> Any:
        return self.server._native(self._shard, request, wait)

    def _wait(self, request: Pull | Push, timeout: float | None, group: str) -> Any:
        """Run `request`, which may wait `timeout` seconds in the shard (None: no limit).

        In a Ray task it waits natively for TASK_NATIVE_WAIT at most, then through a
        Ray call: a task blocked in ray.get lends its CPU slot to other tasks (every
        call of ray.util.queue is a ray.get), where one blocked on a socket keeps it,
        and tasks that wait for each other could then hold every slot forever.
        """
        if (timeout is not None and timeout <= TASK_NATIVE_WAIT) or not _in_task():
            return self._call(request, timeout)
        started = time.monotonic()
        try:
            answer = self._call(request._replace(timeout=TASK_NATIVE_WAIT), TASK_NATIVE_WAIT)
            if answer:  # items, or the number of items accepted
                return answer
        except QueueTimeoutError:  # a put found no room yet; it was not accepted
            pass
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        return ray.get(self.server._wait_call(self._shard, request._replace(timeout=left), group))

    def __repr__(self) -> str:
        return f"pype.Queue(maxsize={self.maxsize}, name={self.name!r})"

    # -- size -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.size()

    def size(self) -> int:
        """The number of items in the queue."""
        return self._call(Length(self.name))

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

        block=True waits for room up to `timeout` seconds (None: without limit);
        block=False does not wait. Raises Full if there was no room, ValueError for a
        negative timeout. Puts that wait are let in in the order they began waiting.
        """
        if block:
            _check_timeout(timeout)
        self._push([item], bool(block), timeout if block else None)

    def put_nowait(self, item: Any) -> None:
        """put(item, block=False)."""
        self.put(item, block=False)

    def put_nowait_batch(self, items: Iterable) -> None:
        """Add `items` at the tail, in order, all of them or (Full) none."""
        if not isinstance(items, Iterable):
            raise TypeError("Argument 'items' must be an Iterable")
        items = list(items)
        if items:
            self._push(items, False, None)

    def _push(self, items: list, block: bool, timeout: float | None) -> None:
        request = Push((self.name,), items, block=block, timeout=timeout, must_exist=True)
        try:
            if block:
                self._wait(request, timeout, PUSHES)
            else:
                self._call(request)
        except (QueueFullError, QueueTimeoutError) as error:
            raise Full(f"queue {self.name!r} is full: {error}") from None

    async def put_async(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """put() as an awaitable: it waits in a thread of the event loop's executor."""
        await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self.put, item, block, timeout))

    # -- get -------------------------------------------------------------------------------

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return the item at the head.

        block=True waits for one up to `timeout` seconds (None: without limit), as a
        request parked in the shard, not a poll; block=False does not wait. Raises
        Empty if there was none, ValueError for a negative timeout.
        """
        if block:
            _check_timeout(timeout)
        request = Pull(self.name, 1, bool(block), timeout if block else None, must_exist=True)
        items = self._wait(request, timeout, PULLS) if block else self._call(request)
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
        if num_items == 0:
            return []
        items = self._call(Pull(self.name, num_items, False, exactly=True, must_exist=True))
        if not items:
            raise Empty(f"cannot get {num_items} items from queue {self.name!r}: fewer are there")
        return items

    async def get_async(self, block: bool = True, timeout: float | None = None) -> Any:
        """get() as an awaitable: it waits in a thread of the event loop's executor."""
        return await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self.get, block, timeout))

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
