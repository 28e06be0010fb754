"""What callers may pass: argument rules and queue options. Plain Python, no Ray.

The client handle checks arguments here before it sends anything, the config
builds its queue_defaults from QueueOptions, and the shards store QueueOptions
with every queue. This module sits below all three, so none of them imports
another to learn the rules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

KINDS = ("fifo", "lifo", "priority", "batch")
OVERFLOW_POLICIES = ("reject", "block", "drop_oldest")
FSYNC_MODES = ("always", "batch", "never")
MAX_NAME_LENGTH = 255
MAX_PARTITIONS = 1024


# -- argument rules ---------------------------------------------------------------

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
    """Return `timeout` if valid: None (no limit; so is inf) or a number of seconds >= 0."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{what} must be a number of seconds or None, got {timeout!r}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"{what} must be >= 0, got {timeout}")
    return None if timeout == math.inf else float(timeout)


def check_ttl(ttl: Any, what: str = "ttl") -> float | None:
    """Return `ttl` if valid: None (no limit) or a finite number of seconds > 0."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(f"{what} must be a number of seconds or None, got {ttl!r}")
    if not math.isfinite(ttl) or ttl <= 0:
        raise ValueError(f"{what} must be a finite number of seconds > 0 (None: no limit), got {ttl}")
    return float(ttl)


def check_delay(delay: Any, what: str = "delay") -> float | None:
    """Return `delay` if valid: None or 0 (none; None is returned) or a finite number of
    seconds > 0."""
    if delay is None:
        return None
    if isinstance(delay, bool) or not isinstance(delay, (int, float)):
        raise TypeError(f"{what} must be a number of seconds or None, got {delay!r}")
    if not math.isfinite(delay) or delay < 0:
        raise ValueError(f"{what} must be a finite number of seconds >= 0, got {delay}")
    return float(delay) or None


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
    maxsize: int = 0                    # items; 0 = unbounded
    max_bytes: int = 0                  # bytes of the items held (see item_size); 0 = unbounded
    overflow: str = "reject"            # what a push that does not fit does
    batch_size: int = 8                 # batch kind: the batch a plain pull waits for
    batch_timeout: float = 0.01         # batch kind: how long it waits for it
    visibility_timeout: float = 30.0    # seconds a leased item (pull with ack) stays leased
    partitions: int = 1                 # sub-queues spread over the shards (pype.partitions)
    partition_seed: int = 0             # in the partitions' names; add() picks one that spreads them
    max_deliveries: int | None = None   # deliveries of an item, unacknowledged, before it is given up
    dead_letter: str | None = None      # the queue given-up items go to (pype.dead_letters); None: dropped
    ttl: float | None = None            # seconds an item lives from its push; None: no limit

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        for key in ("maxsize", "max_bytes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{key} must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"{key} must be >= 0 (0 = unbounded), got {value}")
        if isinstance(self.partitions, bool) or not isinstance(self.partitions, int):
            raise TypeError(f"partitions must be an int, got {self.partitions!r}")
        if not 1 <= self.partitions <= MAX_PARTITIONS:
            raise ValueError(f"partitions must be between 1 and {MAX_PARTITIONS}, got {self.partitions}")
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(
                f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}; got {self.overflow!r}")
        if self.overflow == "drop_oldest" and self.kind == "priority":
            raise ValueError("overflow='drop_oldest' is not defined for priority queues")
        if check_batch_size(self.batch_size, allow_none=False) == -1:
            raise ValueError("batch_size of a queue must be >= 1")
        if check_timeout(self.batch_timeout, "batch_timeout") is None:
            raise TypeError("batch_timeout must be a number of seconds")
        if not check_timeout(self.visibility_timeout, "visibility_timeout"):
            raise ValueError("visibility_timeout must be a number of seconds > 0")
        if self.max_deliveries is not None:
            if isinstance(self.max_deliveries, bool) or not isinstance(self.max_deliveries, int):
                raise TypeError(f"max_deliveries must be an int or None, got {self.max_deliveries!r}")
            if self.max_deliveries < 1:
                raise ValueError(f"max_deliveries must be >= 1 (None: no limit), got {self.max_deliveries}")
        if self.dead_letter is not None:
            check_name(self.dead_letter)
        check_ttl(self.ttl)

    def check_dead_letter(self, queue: str) -> None:
        """Raise ValueError if these are the options of a queue named `queue` that sends its
        dead letters to itself."""
        if self.dead_letter == queue:
            raise ValueError(f"queue {queue!r} cannot be its own dead-letter queue")

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



# -- push arguments ---------------------------------------------------------------

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
