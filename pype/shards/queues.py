"""Queue kinds, flow control and argument rules: plain Python, no Ray, no threads.

A queue holds items in the order pulls take them. Every kind shares the same
flow control: an optional bound (maxsize), an overflow policy for pushes that do
not fit, and a line of parked pushes (items waiting for room), admitted strictly
in the order they parked. Overflow policies:

- reject: a push that does not fit raises QueueFullError and changes nothing.
- block: it waits in line and enters as room appears; nothing is refused or lost.
- drop_oldest: it enters at once; the items that waited longest are evicted and
  counted in `dropped`.

Independently of the policy, a producer may push with a deadline (block=True on
the API): its push waits in line and is withdrawn, unaccepted, at the deadline. Time is passed in by the caller, so
everything here is deterministic and can be tested against a model.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pype.errors import QueueFullError

KINDS = ("fifo", "lifo", "priority", "batch")
OVERFLOW_POLICIES = ("reject", "block", "drop_oldest")
MAX_NAME_LENGTH = 255


# -- argument rules, shared by the client handle and the shard --------------------

def check_name(name: Any) -> str:
    """Return `name` if it is a valid queue name: a str of 1 to 255 printable characters."""
    if not isinstance(name, str):
        raise TypeError(f"queue name must be a str, got {type(name).__name__}: {name!r}")
    if not name:
        raise ValueError("queue name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"queue name is {len(name)} characters long, the limit is {MAX_NAME_LENGTH}")
    if not name.isprintable():
        raise ValueError(f"queue name must not contain control characters: {name!r}")
    return name


def check_batch_size(batch_size: Any, allow_none: bool = True) -> int | None:
    """Return `batch_size` if valid: None (the queue's default), -1 (everything) or >= 1."""
    if batch_size is None and allow_none:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}: {batch_size!r}")
    if batch_size == 0 or batch_size < -1:
        raise ValueError(f"batch_size must be >= 1, or -1 for everything; got {batch_size}")
    return batch_size


def check_timeout(timeout: Any, what: str = "timeout") -> float | None:
    """Return `timeout` if valid: None (no limit) or a number of seconds >= 0."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{what} must be a number of seconds or None, got {timeout!r}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"{what} must be >= 0, got {timeout}")
    return float(timeout)


def check_priority(priority: Any) -> float | int | None:
    """Return `priority` if valid: None or a real number (lower is pulled first)."""
    if priority is None:
        return None
    if isinstance(priority, bool) or not isinstance(priority, (int, float)) or math.isnan(priority):
        raise TypeError(f"priority must be a number, got {priority!r}")
    return priority


# -- options ----------------------------------------------------------------------

@dataclass(frozen=True)
class QueueOptions:
    """How a queue behaves. Construction validates; errors are TypeError/ValueError."""

    kind: str = "fifo"
    maxsize: int = 0                    # 0 = unbounded
    overflow: str = "reject"            # what a push that does not fit does
    batch_size: int = 8                 # batch kind: the batch a plain pull waits for
    batch_timeout: float = 0.01         # batch kind: how long it waits for it

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if isinstance(self.maxsize, bool) or not isinstance(self.maxsize, int):
            raise TypeError(f"maxsize must be an int, got {self.maxsize!r}")
        if self.maxsize < 0:
            raise ValueError(f"maxsize must be >= 0 (0 = unbounded), got {self.maxsize}")
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(
                f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}; got {self.overflow!r}")
        if self.overflow == "drop_oldest" and self.kind == "priority":
            raise ValueError("overflow='drop_oldest' is not defined for priority queues")
        if check_batch_size(self.batch_size, allow_none=False) == -1:
            raise ValueError("batch_size of a queue must be >= 1")
        if check_timeout(self.batch_timeout, "batch_timeout") is None:
            raise TypeError("batch_timeout must be a number of seconds")

    @property
    def pull_size(self) -> int:
        """How many items a pull without batch_size asks for."""
        return self.batch_size if self.kind == "batch" else 1


def resolve_capacity(maxsize: int | None, use_locking: bool = False,
                     semaphore: int | None = None, batch_lock: int | None = None) -> int | None:
    """Map the seed's flow-control arguments onto one maxsize (None = not given).

    use_locking=True is capacity 1 (the producer may push again only after a pull);
    semaphore=N and batch_lock=N are capacity N. Two of them that disagree are an error.
    """
    given = {}
    if maxsize is not None:
        given["maxsize"] = maxsize
    if use_locking:
        given["use_locking"] = 1
    for key, value in (("semaphore", semaphore), ("batch_lock", batch_lock)):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an int >= 1, got {value!r}")
            given[key] = value
    if len(set(given.values())) > 1:
        raise ValueError(f"conflicting capacities: {given}")
    return next(iter(given.values()), None)


# -- parked pushes ----------------------------------------------------------------

class ParkedPush:
    """Items a producer asked to push with block=True that did not fit yet.

    state is 'waiting' until the queue admits the items ('admitted') or the
    deadline passes first ('expired'; nothing of it was accepted). A queue that is
    removed meanwhile leaves it 'removed'.
    """

    __slots__ = ("deadline", "items", "priority", "state")

    def __init__(self, items: list, priority: Any, deadline: float | None):
        self.items = items
        self.priority = priority
        self.deadline = deadline
        self.state = "waiting"

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


# -- queue kinds ------------------------------------------------------------------

class Queue:
    """Base class: storage of one kind plus the shared flow control.

    Subclasses implement the storage primitives _append, _pop, _pop_oldest,
    _peek and __len__. Counters: pushed and pulled count items, dropped counts
    items evicted by overflow='drop_oldest'.
    """

    kind = ""

    def __init__(self, options: QueueOptions):
        self.options = options
        self.parked: deque[ParkedPush] = deque()
        self.pushed = self.pulled = self.dropped = 0

    def __len__(self) -> int:
        raise NotImplementedError

    # flow control

    def room(self) -> int | float:
        """Free places (inf for an unbounded queue)."""
        if not self.options.maxsize:
            return math.inf
        return max(0, self.options.maxsize - len(self))

    def can_push(self) -> bool:
        """True if a push of one item would be accepted without dropping anything."""
        return not self.parked and self.room() >= 1

    def check_fits(self, count: int) -> None:
        """Raise ValueError if `count` items can never fit, even in the empty queue."""
        maxsize = self.options.maxsize
        if maxsize and count > maxsize and self.options.overflow != "drop_oldest":
            raise ValueError(f"{count} items can never fit in a queue of maxsize {maxsize}")

    def put(self, items: list, priority: Any = None) -> None:
        """Push all of `items` or none of them, as the queue's overflow policy says.

        reject: QueueFullError if they do not all fit, or if pushes are parked
        (nobody jumps their line). block: park them, without deadline, if they do
        not fit. drop_oldest: evict the items that have waited longest.
        """
        if self.options.overflow == "block":
            self.offer(items, priority, deadline=None)
            return
        if self.options.overflow == "reject":
            self.check_fits(len(items))
            if self.parked or len(items) > self.room():
                waiting = ", pushes waiting" if self.parked else ""
                raise QueueFullError(
                    f"is full ({len(self)} of {self.options.maxsize} items{waiting})")
        self._insert(items, priority)

    def offer(self, items: list, priority: Any, deadline: float | None) -> ParkedPush:
        """Push now if the items fit, else park them in line; return the push's ticket."""
        self.check_fits(len(items))
        ticket = ParkedPush(items, priority, deadline)
        if self.options.overflow == "drop_oldest" or (not self.parked and len(items) <= self.room()):
            self._insert(items, priority)
            ticket.state = "admitted"
        else:
            self.parked.append(ticket)
        return ticket

    def admit_parked(self, now: float) -> bool:
        """Admit parked pushes, oldest first, while they fit; expire late ones.

        Returns True if any parked push changed state.
        """
        changed = False
        while self.parked:
            head = self.parked[0]
            late = head.expired(now)
            if not late and len(head.items) > self.room():
                break
            self.parked.popleft()
            if late:
                head.state = "expired"
            else:
                self._insert(head.items, head.priority)
                head.state = "admitted"
            changed = True
        return changed

    def withdraw(self, ticket: ParkedPush) -> None:
        """Take a parked push out of the line (its deadline passed)."""
        if ticket.state == "waiting":
            self.parked.remove(ticket)
            ticket.state = "expired"

    def _insert(self, items: list, priority: Any) -> None:
        maxsize = self.options.maxsize
        for item in items:
            if maxsize and len(self) >= maxsize:  # only reached under drop_oldest
                self._pop_oldest()
                self.dropped += 1
            self._append(item, priority)
        self.pushed += len(items)

    # pulls

    def can_pull(self, batch_size: int | None = None) -> bool:
        """True if a pull of `batch_size` items (-1: at least one) would be full."""
        wanted = self.options.pull_size if batch_size is None else batch_size
        return len(self) >= max(1, wanted)

    def take(self, batch_size: int) -> list:
        """Remove and return up to `batch_size` items (-1: all), in pull order."""
        count = len(self) if batch_size == -1 else min(batch_size, len(self))
        items = [self._pop() for _ in range(count)]
        self.pulled += count
        return items

    def peek(self, batch_size: int) -> list:
        """Return up to `batch_size` items (-1: all) in pull order, leaving them."""
        count = len(self) if batch_size == -1 else min(batch_size, len(self))
        return self._peek(count)

    def clear(self) -> int:
        """Remove every item and parked push; return the number of items removed."""
        count = len(self)
        for _ in range(count):
            self._pop()
        for ticket in self.parked:
            ticket.state = "removed"
        self.parked.clear()
        return count

    # storage primitives

    def _append(self, item: Any, priority: Any) -> None:
        raise NotImplementedError

    def _pop(self) -> Any:
        raise NotImplementedError

    def _pop_oldest(self) -> Any:
        raise NotImplementedError

    def _peek(self, count: int) -> list:
        raise NotImplementedError


class FifoQueue(Queue):
    """First in, first out."""

    kind = "fifo"

    def __init__(self, options: QueueOptions):
        super().__init__(options)
        self._items: deque = deque()

    def __len__(self) -> int:
        return len(self._items)

    def _append(self, item, priority):
        self._items.append(item)

    def _pop(self):
        return self._items.popleft()

    _pop_oldest = _pop

    def _peek(self, count):
        return list(itertools.islice(self._items, count))


class BatchQueue(FifoQueue):
    """A FIFO whose plain pull waits up to batch_timeout for batch_size items."""

    kind = "batch"


class LifoQueue(FifoQueue):
    """Last in, first out: the seed's stack."""

    kind = "lifo"

    def _pop(self):
        return self._items.pop()

    def _pop_oldest(self):
        return self._items.popleft()

    def _peek(self, count):
        return list(itertools.islice(reversed(self._items), count))


class PriorityQueue(Queue):
    """Lowest priority first; first in, first out among equal priorities.

    A push without priority gets priority 0.
    """

    kind = "priority"

    def __init__(self, options: QueueOptions):
        super().__init__(options)
        self._heap: list = []
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def _append(self, item, priority):
        heapq.heappush(self._heap, (0 if priority is None else priority, next(self._sequence), item))

    def _pop(self):
        return heapq.heappop(self._heap)[2]

    def _peek(self, count):
        return [entry[2] for entry in heapq.nsmallest(count, self._heap)]


_CLASSES = {cls.kind: cls for cls in (FifoQueue, LifoQueue, PriorityQueue, BatchQueue)}


def make_queue(options: QueueOptions) -> Queue:
    """Return an empty queue of the kind `options` name."""
    return _CLASSES[options.kind](options)


def as_items(data: Any, expand: bool) -> list:
    """The items a push carries: [data], or the elements of a list/tuple if expand."""
    if not expand:
        return [data]
    if not isinstance(data, (list, tuple)):
        raise TypeError(f"expand=True needs a list or tuple, got {type(data).__name__}")
    return list(data)


def as_names(queues: str | Iterable[str]) -> tuple[str, ...]:
    """The queue names a push targets: one str, or a non-empty list/tuple of them."""
    if isinstance(queues, str):
        return (check_name(queues),)
    if not isinstance(queues, (list, tuple)):
        raise TypeError(f"queues must be a str or a list/tuple of str, got {type(queues).__name__}")
    if not queues:
        raise ValueError("queues must name at least one queue")
    names = tuple(check_name(name) for name in queues)
    if len(set(names)) != len(names):
        raise ValueError(f"queues names a queue twice: {list(queues)}")
    return names
