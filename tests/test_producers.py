"""The answers a shard keeps of numbered pushes (pype.shards.producers), alone."""

import pickle

from pype.errors import QueueFullError
from pype.shards.producers import APPLIED, MAX_ANSWERS, Producers


def refused() -> QueueFullError:
    try:
        raise QueueFullError("queue 'q' is full")
    except QueueFullError as error:
        return error


def test_each_number_gets_its_first_answer_whatever_came_after_it():
    producers = Producers()
    producers.note((7, 1, 1), refused())
    producers.note((7, 2, 1), APPLIED)
    assert isinstance(producers.first_answer((7, 1, 1)), QueueFullError)
    assert producers.first_answer((7, 2, 1)) is APPLIED
    assert producers.first_answer((7, 3, 1)) is None   # new
    assert producers.first_answer((8, 1, 1)) is None   # another producer's numbers
    assert producers.first_answer(None) is None        # not numbered


def test_answers_below_the_floor_are_dropped_and_taken_as_applied():
    producers = Producers()
    producers.note((7, 1, 1), refused())
    producers.note((7, 2, 1), APPLIED)
    producers.note((7, 3, 3), APPLIED)  # the client had its answers to 1 and 2
    seen = producers._seen[7]
    assert list(seen.answers) == [3] and seen.floor == 3
    assert producers.first_answer((7, 1, 1)) is APPLIED  # never sent again by a client


def test_a_kept_refusal_holds_no_traceback():
    error = refused()
    assert error.__traceback__ is not None
    producers = Producers()
    producers.note((7, 1, 1), error)
    kept = producers.first_answer((7, 1, 1))
    assert kept.__traceback__ is None and str(kept) == str(error)


def test_a_producer_keeps_at_most_max_answers():
    producers = Producers()
    for number in range(1, MAX_ANSWERS + 2):
        producers.note((7, number, 1), APPLIED)  # a client that never raises its floor
    assert len(producers._seen[7].answers) == MAX_ANSWERS
    assert producers.first_answer((7, 1, 1)) is APPLIED


def test_old_journals_and_snapshots_keep_the_highest_number_rule():
    producers = Producers()
    producers.note((7, 5), APPLIED)  # a Push record of before the floor: (id, number)
    assert producers.first_answer((7, 3, 3)) is APPLIED
    assert producers.first_answer((7, 6, 6)) is None
    loaded = Producers.load({7: 5, 8: 2})  # a snapshot's {producer id: highest number}
    assert loaded.first_answer((7, 5, 5)) is APPLIED and loaded.first_answer((8, 3, 3)) is None
    assert loaded.last_numbers() == {7: 5, 8: 2}


def test_producers_survive_a_snapshot():
    producers = Producers()
    producers.note((7, 1, 1), refused())
    producers.note((7, 2, 1), APPLIED)
    restored = Producers.load(pickle.loads(pickle.dumps(producers)))
    assert isinstance(restored.first_answer((7, 1, 1)), QueueFullError)
    assert restored.first_answer((7, 2, 1)) is APPLIED
