"""The shard's request engine alone: no sockets, no threads, a clock the test turns.

Each request goes in through dispatch() with a reply function, as the I/O loop and
the shard actor hand them in; time passes only when the test moves the clock.
"""

import pytest

from pype import protocol
from pype.errors import QueueFullError, QueueTimeoutError
from pype.hashing import shard_for
from pype.options import QueueOptions
from pype.protocol import (
    Add,
    Arrived,
    CanPull,
    CanPush,
    Expect,
    Export,
    Pull,
    Push,
    Stats,
)
from pype.shards.engine import ShardEngine
from pype.shards.store import QueueStore


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Answer:
    """A reply function that keeps what it was told; result() raises an error answer."""

    def __init__(self):
        self.answers = []

    def __call__(self, status, value):
        self.answers.append((status, value))

    @property
    def done(self) -> bool:
        return bool(self.answers)

    def result(self):
        [(status, value)] = self.answers
        if status == protocol.ERROR:
            raise value
        return value


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def engine(clock):
    return ShardEngine(QueueStore(QueueOptions(), clock=clock), 0, poll_wait=0.5)


def run(engine, request, caller="c", after=0, may_wait=True) -> Answer:
    answer = Answer()
    with engine.lock:
        engine.dispatch(request, caller, after, may_wait, answer)
    return answer


def tick(engine, clock, seconds):
    clock.now += seconds
    with engine.lock:
        engine.expire(clock.now)


def test_a_blocking_pull_parks_until_a_push_answers_it(engine):
    waiting = run(engine, Pull("q", 1, True, None))
    assert not waiting.done
    assert run(engine, Stats()).result()["waiting_calls"] == 1
    assert run(engine, Push(("q",), ["x"])).result() == 1
    assert waiting.result() == ["x"]
    assert run(engine, Stats()).result()["waiting_calls"] == 0


def test_a_parked_pull_is_answered_at_its_deadline_and_not_before(engine, clock):
    waiting = run(engine, Pull("q", 2, True, 5.0))
    assert engine.next_deadline() == clock.now + 5.0
    tick(engine, clock, 4.999)
    assert not waiting.done
    run(engine, Push(("q",), ["only one"]))  # not a full batch: it keeps waiting
    assert not waiting.done
    tick(engine, clock, 0.001)
    assert waiting.result() == ["only one"]  # the timeout returns what is there
    assert engine.next_deadline() is None


def test_a_batch_queue_waits_its_batch_timeout_then_returns_a_partial_batch(engine, clock):
    run(engine, Add("b", QueueOptions(kind="batch", batch_size=3, batch_timeout=0.2)))
    run(engine, Push(("b",), [1, 2]))
    waiting = run(engine, Pull("b"))  # block None: a batch queue waits
    tick(engine, clock, 0.1)
    assert not waiting.done
    tick(engine, clock, 0.1)
    assert waiting.result() == [1, 2]


def test_parked_pulls_are_answered_in_the_order_they_parked(engine):
    first, second = run(engine, Pull("q", 1, True)), run(engine, Pull("q", 1, True))
    run(engine, Push(("q",), ["a"]))
    assert first.result() == ["a"] and not second.done
    run(engine, Push(("q",), ["b"]))
    assert second.result() == ["b"]


def test_can_pull_waits_for_its_condition_or_answers_false_at_its_deadline(engine, clock):
    waiting = run(engine, CanPull("q", 2, 1.0))
    run(engine, Push(("q",), [1]))
    assert not waiting.done
    run(engine, Push(("q",), [2]))
    assert waiting.result() is True
    late = run(engine, CanPull("r", 1, 1.0))
    tick(engine, clock, 1.0)
    assert late.result() is False
    polled = run(engine, CanPull("r", 1))  # no wait given: the shard's poll_wait
    tick(engine, clock, 0.5)
    assert polled.result() is False


def test_a_blocking_push_waits_in_line_and_times_out_by_the_engines_clock(engine, clock):
    run(engine, Add("full", QueueOptions(maxsize=1)))
    run(engine, Push(("full",), [1]))
    waiting = run(engine, Push(("full",), [2], block=True, timeout=2.0))
    assert not waiting.done
    assert run(engine, Pull("full")).result() == [1]  # makes room: the push enters
    assert waiting.result() == 1
    run(engine, Pull("full"))
    run(engine, Push(("full",), [3]))
    late = run(engine, Push(("full",), [4], block=True, timeout=2.0))
    tick(engine, clock, 2.0)
    with pytest.raises(QueueTimeoutError):
        late.result()


def test_a_request_waits_for_its_callers_earlier_ray_call(engine):
    """Read-your-writes: `after` names the caller's last main-thread call."""
    held = run(engine, Pull("q", -1), caller="p", after=2)
    assert not held.done  # call 2 of caller p has not run yet
    run(engine, Push(("q",), ["one"]), caller="p")
    with engine.lock:
        engine.dispatch(Push(("q",), ["two"]), "p", 0, False, Answer())
        engine._record("p", 2)  # as submit() does once a main-thread call ran
    assert held.result() == ["one", "two"]


def test_the_io_loop_is_told_of_each_new_deadline(engine):
    told = []
    engine.new_deadline = lambda: told.append(engine.next_deadline())
    run(engine, Pull("q", 1, True, 3.0))
    run(engine, Pull("q", 1, True))  # no deadline: nothing to tell
    assert told == [engine.clock() + 3.0]


def test_a_request_that_may_not_wait_is_answered_at_once(engine):
    assert run(engine, Pull("q", 1, True, 10.0), may_wait=False).result() == []
    assert run(engine, CanPush("q", 10.0), may_wait=False).result() is True


def named(shards: int, seed: int, index: int, avoid: str = "") -> str:
    """A queue name that a topology of `shards` shards (hash `seed`) gives shard `index`."""
    return next(name for name in (f"q{n}" for n in range(1000))
                if shard_for(name, shards, seed) == index and name != avoid)


def test_a_refused_push_sent_again_is_refused_again_on_a_shard_that_was_resized(engine):
    """After a resize the engine looks for moved queues before running a push: a push
    sent again must still get its first answer there, not "applied"."""
    full, other = named(2, 5, 0), named(2, 5, 0, avoid=named(2, 5, 0))
    run(engine, Export(shards=2, seed=5, epoch=1)).result()
    run(engine, Add(full, QueueOptions(maxsize=1))).result()
    run(engine, Push((full,), ["in"])).result()
    with pytest.raises(QueueFullError):
        run(engine, Push((full,), ["lost?"], producer=(7, 1, 1))).result()
    assert run(engine, Push((other,), ["later"], producer=(7, 2, 1))).result() == 1
    with pytest.raises(QueueFullError):  # its reply was lost: sent again
        run(engine, Push((full,), ["lost?"], producer=(7, 1, 1))).result()


def test_a_push_held_for_a_queue_on_its_way_is_applied_after_a_later_push_of_its_producer():
    """Shard 1 of a resize from 2 shards: pushes to a queue coming from shard 0 wait
    until it arrived; a later push of the same producer to a queue shard 1 had already
    runs first. The held one must still be applied when it runs, not taken for sent
    again because a higher number passed."""
    engine = ShardEngine(QueueStore(QueueOptions()), 1, poll_wait=0.5)
    coming, staying = named(2, 5, 0), named(2, 5, 1)
    run(engine, Expect(shards=2, seed=5)).result()
    held = run(engine, Push((coming,), ["first"], producer=(7, 1, 1)))
    assert not held.done
    assert run(engine, Push((staying,), ["second"], producer=(7, 2, 1))).result() == 1
    run(engine, Arrived()).result()
    assert held.result() == 1
    assert run(engine, Pull(coming, -1)).result() == ["first"]
