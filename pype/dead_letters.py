"""Dead letters: items a queue gave up on, and why. Plain Python, no Ray.

A queue with max_deliveries gives up on an item that was delivered (leased) that
many times and never acknowledged; nack(requeue=False) gives up on one at once; an
item whose time to live ended (ttl) expires. A
queue with a dead_letter queue sends such items there, each as a DeadLetter that
says where it came from and why; one without drops them and counts them.

A dead-letter queue is an ordinary queue: pulls from it return the items
themselves, and dead_letters() reads them with their DeadLetter. A push whose
first item is a DeadLetter stores its DeadLetters as dead letters (the shards
send them so; a redrive of what dead_letters() returned keeps them so).
"""

from __future__ import annotations

from typing import Any, NamedTuple

DELIVERIES = "deliveries"  # delivered max_deliveries times, never acknowledged
REJECTED = "rejected"      # nack(requeue=False)
EXPIRED = "expired"        # its time to live ended (ttl)
REASONS = (DELIVERIES, REJECTED, EXPIRED)


class DeadLetter(NamedTuple):
    """An item that queue `queue` gave up on, for `reason` (one of REASONS), after
    `deliveries` deliveries."""

    item: Any
    queue: str
    reason: str
    deliveries: int


def unwrap(stored: Any) -> Any:
    """The item a queue hands out for what it stores: a DeadLetter's item, else itself."""
    return stored.item if type(stored) is DeadLetter else stored
