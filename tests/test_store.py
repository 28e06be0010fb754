"""QueueStore with real threads: blocking calls, parked pushes, read-your-writes (no Ray)."""

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pype.errors import (
    LeaseNotHeldError,
    QueueExistsError,
    QueueFullError,
    QueueNotFoundError,
    QueueTimeoutError,
)
from pype.options import QueueOptions
from pype.shards.store import PendingPush, QueueStore
from tests.events import until


@pytest.fixture
def store():
    return QueueStore(QueueOptions())


@pytest.fixture(scope="module")
def threads():
    with ThreadPoolExecutor(max_workers=16) as pool:
        yield pool


@pytest.fixture
def in_thread(threads):
    """in_thread(f, *args) runs f in a thread and returns a join(timeout) for its result."""
    def start(function, *args):
        future = threads.submit(function, *args)

        def join(timeout=5.0):
            try:
                return future.result(timeout)
            except TimeoutError:
                raise AssertionError("call still blocked") from None
        return join
    return start


def test_push_creates_queue_and_pull_takes_in_order(store):
    assert store.push(("q",), [1, 2, 3]) == 3
    assert store.pull("q", batch_size=2) == [1, 2]
    assert store.pull("q", batch_size=-1) == [3]
    assert store.pull("q") == []
    assert store.pull("unknown") == []


def test_blocking_pull_wakes_on_push(store, in_thread):
    join = in_thread(store.pull, "q", 1, True, None, True, True)
    until(lambda: store.stats()["waiting_calls"], "the pull to wait")
    started = time.monotonic()
    store.push(("q",), ["x"])
    assert join() == ["x"]
    assert time.monotonic() - started < 0.5  # woken by the push; its own wait has no end


def test_blocking_pull_returns_partial_batch_at_timeout(store):
    store.push(("q",), [1, 2])
    started = time.monotonic()
    assert store.pull("q", 5, True, 0.1, True, True) == [1, 2]
    assert 0.09 <= time.monotonic() - started < 1.0


def test_blocking_pull_for_more_than_fits_returns_when_the_queue_is_full(store):
    store.add("q", QueueOptions(maxsize=2))
    store.push(("q",), [1, 2])
    started = time.monotonic()
    assert store.pull("q", 10, True, 5.0, True, True) == [1, 2]
    assert time.monotonic() - started < 0.5


def test_pull_never_waits_without_may_wait(store):
    started = time.monotonic()
    assert store.pull("q", 1, True, 5.0, True, may_wait=False) == []
    assert time.monotonic() - started < 1.0  # not the 5 s it was offered


def test_batch_queue_plain_pull_waits_for_batch_then_returns_partial(store):
    store.add("b", QueueOptions(kind="batch", batch_size=3, batch_timeout=0.1))
    store.push(("b",), [1, 2, 3, 4])
    assert store.pull("b", may_wait=True) == [1, 2, 3]  # full batch: no wait
    started = time.monotonic()
    assert store.pull("b", may_wait=True) == [4]
    assert 0.09 <= time.monotonic() - started < 1.0


def test_blocking_push_parks_until_a_pull_makes_room(store, in_thread):
    store.add("q", QueueOptions(maxsize=1))
    store.push(("q",), ["a"])
    pending = store.push(("q",), ["b"], block=True, timeout=5)
    assert isinstance(pending, PendingPush)
    join = in_thread(store.await_push, pending)
    assert store.pull("q") == ["a"]
    assert join() == 1
    assert store.pull("q") == ["b"]


def test_non_blocking_push_does_not_jump_the_line_of_parked_producers(store):
    store.add("q", QueueOptions(maxsize=2))
    store.push(("q",), ["a"])
    pending = store.push(("q",), ["b", "c"], block=True)  # needs 2 places, 1 is free
    with pytest.raises(QueueFullError, match="pushes waiting"):
        store.push(("q",), ["jumper"])  # would fit the free place
    assert store.pull("q") == ["a"]
    assert store.await_push(pending) == 2
    assert store.pull("q", batch_size=-1) == ["b", "c"]


def test_block_policy_queues_keep_every_push_in_line(store):
    store.add("q", QueueOptions(maxsize=1, overflow="block"))
    assert store.push(("q",), [1]) == 1
    assert store.push(("q",), [2]) == 1  # no room: accepted into the line, not refused
    assert store.push(("q",), [3]) == 1
    assert store.length("q") == 1
    assert not store.can_push("q")
    assert [store.pull("q") for _ in range(4)] == [[1], [2], [3], []]
    assert store.can_push("q")


def test_blocking_push_times_out_and_is_not_accepted(store):
    store.add("q", QueueOptions(maxsize=1))
    store.push(("q",), ["a"])
    pending = store.push(("q",), ["late"], block=True, timeout=0.1)
    with pytest.raises(QueueTimeoutError, match="'q'"):
        store.await_push(pending)
    assert store.pull("q", batch_size=-1) == ["a"]
    assert store.can_push("q")


def test_parked_push_fails_clearly_when_its_queue_is_removed(store, in_thread):
    store.add("q", QueueOptions(maxsize=1))
    store.push(("q",), ["a"])
    pending = store.push(("q",), ["b"], block=True)
    join = in_thread(store.await_push, pending)
    assert store.remove("q") == 1
    with pytest.raises(QueueNotFoundError, match="removed"):
        join()


def test_fan_out_push_names_the_full_queue_and_keeps_the_others(store):
    store.add("full", QueueOptions(maxsize=1))
    store.push(("full",), [0])
    with pytest.raises(QueueFullError, match="'full'.*other 1 queues"):
        store.push(("full", "open"), ["x"])
    assert store.pull("open") == ["x"]
    assert store.pull("full") == [0]


def test_priority_on_a_non_priority_queue_is_an_error(store):
    with pytest.raises(ValueError, match="priority"):
        store.push(("fifo",), [1], priority=3)
    assert store.length("fifo") == 0


def test_can_pull_and_can_push_wait_for_their_condition(store, in_thread):
    store.add("q", QueueOptions(maxsize=1))
    started = time.monotonic()
    assert store.can_pull("q", wait=0.05) is False
    assert time.monotonic() - started >= 0.045
    join = in_thread(store.can_pull, "q", None, 5.0)
    until(lambda: store.stats()["waiting_calls"], "can_pull to wait")
    store.push(("q",), [1])
    assert join() is True
    assert store.can_push("q", wait=0) is False
    join = in_thread(store.can_push, "q", 5.0)
    store.pull("q")
    assert join() is True


def test_catch_up_waits_for_the_callers_earlier_call(store, in_thread):
    join = in_thread(store.catch_up, ("caller", 2))
    until(lambda: store.stats()["waiting_calls"], "catch_up to wait")
    store.record(("caller", 1))
    with pytest.raises(AssertionError, match="still blocked"):
        join(timeout=0.1)
    store.record(("caller", 2))
    assert join() is True
    assert store.catch_up(("someone else", 0))  # nothing sent yet: no wait


def test_catch_up_gives_up_on_calls_a_restarted_shard_never_saw(store, caplog):
    started = time.monotonic()
    assert store.catch_up(("caller", 5), limit=0.1) is False
    assert 0.09 <= time.monotonic() - started < 1.0
    assert "did not run within" in caplog.text


def test_add_remove_and_stats(store):
    assert store.add("q", QueueOptions(kind="lifo"))
    with pytest.raises(QueueExistsError):
        store.add("q", QueueOptions())
    assert store.add("q", QueueOptions(), exist_ok=True) is False
    store.push(("q",), [1, 2, 3])
    assert store.pull("q") == [3]
    assert "lifo, 2 items): [2, 1]" in store.render("q")
    stats = store.stats()
    assert stats["per_queue"]["q"] == {
        "kind": "lifo", "depth": 2, "maxsize": 0, "bytes": 2 * sys.getsizeof(1), "max_bytes": 0,
        "leased": 0, "pushed": 3, "pulled": 1, "dropped": 0, "acked": 0, "redelivered": 0,
        "waiting_producers": 0}
    assert stats["bytes"] == 2 * sys.getsizeof(1)
    assert store.remove("q") == 2
    with pytest.raises(QueueNotFoundError):
        store.remove("q")
    assert store.stats()["discarded"] == 2
    assert store.stats()["pushed"] == 3


def test_many_threads_lose_and_duplicate_nothing(store, in_thread):
    store.add("q", QueueOptions(maxsize=7))
    producers, per_producer = 4, 300

    def produce(p):
        for i in range(per_producer):
            store.await_push(store.push(("q",), [(p, i)], block=True, timeout=10))

    def consume():
        got = []
        while True:
            items = store.pull("q", 3, True, 0.5, True, True)
            if not items:
                return got
            got.extend(items)

    joins = [in_thread(produce, p) for p in range(producers)] + [in_thread(consume) for _ in range(3)]
    results = [join(timeout=30) for join in joins]
    consumed = [item for got in results[producers:] for item in got]
    assert sorted(consumed) == sorted((p, i) for p in range(producers) for i in range(per_producer))
    for got in results[producers:]:
        for p in range(producers):
            mine = [i for q, i in got if q == p]
            assert mine == sorted(mine)


# -- leases ---------------------------------------------------------------------------

def test_leased_items_come_back_on_nack_and_on_expiry_in_their_order(store):
    store.push(("q",), list(range(6)))
    first = store.pull("q", 2, ack=True)
    second = store.pull("q", 2, ack=True)
    assert [item for _, item, _ in first + second] == [0, 1, 2, 3]
    assert store.length("q") == 2 and store.stats()["leased"] == 4
    assert store.settle("q", [lease for lease, _, _ in second], requeue=True) == 2
    assert store.expire_leases(now=time.time() + 31) == 2  # the default visibility_timeout is 30 s
    assert store.pull("q", -1) == [0, 1, 2, 3, 4, 5]
    counters = store.stats()["per_queue"]["q"]
    assert counters["redelivered"] == 4 and counters["leased"] == 0 and counters["bytes"] == 0


def test_acked_items_are_gone_and_stale_lease_ids_are_a_clear_error(store):
    store.push(("q",), ["a", "b"])
    (lease_a, _, _), (lease_b, _, _) = store.pull("q", 2, ack=True)
    assert store.settle("q", [lease_a], requeue=False) == 1
    store.expire_leases(now=time.time() + 60)  # b's lease ends: b goes back
    [(lease_b_again, item, redelivered)] = store.pull("q", -1, ack=True)
    assert item == "b" and redelivered
    with pytest.raises(LeaseNotHeldError, match=r"2 of 3 lease ids are not held.*other 1 were acked"):
        store.settle("q", [lease_a, lease_b, lease_b_again], requeue=False)
    assert store.pull("q", -1) == []
    assert store.stats()["per_queue"]["q"]["acked"] == 2


def test_a_blocked_pull_wakes_when_a_lease_expires(store, in_thread):
    store.add("q", QueueOptions(visibility_timeout=0.2))
    store.push(("q",), ["x"])
    assert [item for _, item, _ in store.pull("q", ack=True)] == ["x"]
    join = in_thread(store.pull, "q", 1, True, 30.0, True, True)
    until(lambda: store.stats()["waiting_calls"], "the pull to wait")
    assert store.expire_leases(now=time.time() + 0.5) == 1
    assert join() == ["x"]


# -- limits ---------------------------------------------------------------------------

def test_max_bytes_bounds_a_queue_like_maxsize(store):
    store.add("q", QueueOptions(max_bytes=3000))
    store.push(("q",), [b"x" * 1000, b"y" * 1000])
    with pytest.raises(QueueFullError, match="of 3000 bytes"):
        store.push(("q",), [b"z" * 1000])
    with pytest.raises(ValueError, match="can never fit"):
        store.push(("q",), [b"z" * 4000])
    store.pull("q")
    assert store.push(("q",), [b"z" * 1000]) == 1


def test_memory_budget_and_max_item_size_refuse_a_push_and_change_nothing():
    store = QueueStore(QueueOptions(), memory_budget=10_000, max_item_bytes=6_000)
    store.push(("a",), [b"x" * 5000])
    with pytest.raises(ValueError, match="larger than the shard's max_item_bytes"):
        store.push(("b",), [b"x" * 7000])
    with pytest.raises(QueueFullError, match="memory budget is spent"):
        store.push(("b",), [b"x" * 3000, b"x" * 3000])
    assert store.length("b") == 0
    store.pull("a")
    assert store.push(("b",), [b"x" * 3000, b"x" * 3000]) == 2
    assert store.stats()["bytes"] == store.stats()["per_queue"]["b"]["bytes"] > 6000
