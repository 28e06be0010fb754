"""What each producer's numbered pushes got, so that a push sent again gets the same answer.

A native push carries producer=(producer id, sequence number, floor): the client
numbers its pushes to each shard, and `floor` is the lowest of its numbers still
unanswered, so every number below it was answered and will not come again. The shard
notes each number's answer, APPLIED or the error that refused it, in the same journal
record as the change (records.Push, records.Refuse). A push sent again after its reply
was lost (a restart, a failover) gets its first answer: applied once however often it
is sent; refused again, never "applied" because a later push of its producer passed,
nor applied after pushes numbered after it.

Answers below a producer's floor are dropped. A number below the floor is answered
APPLIED: journals written before the floor existed carry (id, sequence) alone, taken
as their own floor, which is the older rule "every number up to the highest seen was
applied". At most MAX_ANSWERS answers are kept per producer (a client has no more
numbered pushes than that in flight to one shard: a Producer's window is capped so)
and MAX_PRODUCERS producers, the least recently seen dropped first.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

from pype.protocol import MAX_UNANSWERED_PUSHES

APPLIED = True
MAX_ANSWERS = MAX_UNANSWERED_PUSHES  # per producer: numbers at or above its floor
MAX_PRODUCERS = 100_000   # producers whose answers are kept (the least recently seen go)

Answer = bool | Exception  # APPLIED, or the error a push was refused with


class ProducerAnswers:
    """One producer's answers: every number below `floor` was answered; `answers` holds
    those from the floor on, in the order they came."""

    __slots__ = ("answers", "floor")

    def __init__(self, floor: int = 0):
        self.floor = floor
        self.answers: OrderedDict[int, Answer] = OrderedDict()

    @property
    def last(self) -> int:
        """The highest number answered (floor - 1 if none above the floor)."""
        return max(self.answers, default=self.floor - 1)

    def __getstate__(self):
        return self.floor, self.answers

    def __setstate__(self, state):
        self.floor, self.answers = state


class Producers:
    """The answers of every producer seen lately; see the module docstring."""

    def __init__(self):
        self._seen: OrderedDict[int, ProducerAnswers] = OrderedDict()

    @classmethod
    def load(cls, state: Any) -> Producers:
        """The Producers of a snapshot's "producers": itself, or, in a snapshot written
        before answers were kept, a mapping of producer id to its highest number."""
        if isinstance(state, Producers):
            return state
        producers = cls()
        for producer_id, last in (state or {}).items():
            producers.note((producer_id, last), APPLIED)
        return producers

    def first_answer(self, producer: tuple | None) -> Answer | None:
        """What the push numbered `producer` got when it first came: APPLIED, the error
        that refused it, or None if it is new (or not numbered)."""
        if producer is None:
            return None
        seen = self._seen.get(producer[0])
        if seen is None:
            return None
        if producer[1] < seen.floor:
            return APPLIED
        return seen.answers.get(producer[1])

    def note(self, producer: tuple | None, answer: Answer) -> None:
        """Keep `answer` for the push numbered `producer` (None: not numbered), and drop
        the answers its floor says will not be asked for again. An error is kept
        without its traceback, which would hold the refused items."""
        if producer is None:
            return
        producer_id, sequence = producer[0], producer[1]
        floor = producer[2] if len(producer) > 2 else sequence
        seen = self._seen.get(producer_id)
        if seen is None:
            seen = self._seen[producer_id] = ProducerAnswers(floor)
            if len(self._seen) > MAX_PRODUCERS:
                self._seen.popitem(last=False)
        self._seen.move_to_end(producer_id)
        answers = seen.answers
        if floor > seen.floor:
            seen.floor = floor
            while answers and next(iter(answers)) < floor:  # numbers come in order, mostly
                answers.popitem(last=False)
        answers[sequence] = answer if answer is APPLIED else copy.copy(answer)
        if len(answers) > MAX_ANSWERS:
            oldest, _ = answers.popitem(last=False)
            seen.floor = max(seen.floor, oldest + 1)

    def last_numbers(self) -> dict[int, int]:
        """Each producer's highest number answered (stats, tests)."""
        return {producer_id: seen.last for producer_id, seen in self._seen.items()}

    def __len__(self) -> int:
        return len(self._seen)
