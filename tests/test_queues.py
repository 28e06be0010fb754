"""Every queue kind and flow-control setting against a reference model (no Ray)."""

import sys

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pype.errors import QueueFullError
from pype.options import (
    QueueOptions,
    as_items,
    as_names,
    check_batch_size,
    check_name,
    resolve_capacity,
)
from pype.shards.queues import item_size, item_sizes, make_queue, total_size
from tests.model import Model

options_strategy = st.builds(
    QueueOptions,
    kind=st.sampled_from(["fifo", "lifo", "priority", "batch"]),
    maxsize=st.sampled_from([0, 1, 2, 3, 5]),
    overflow=st.sampled_from(["reject", "block"]),
    max_deliveries=st.sampled_from([None, 1, 2, 3]),
) | st.builds(
    QueueOptions,
    kind=st.sampled_from(["fifo", "lifo", "batch"]),
    maxsize=st.sampled_from([1, 2, 3]),
    overflow=st.just("drop_oldest"),
    max_deliveries=st.sampled_from([None, 2]),
)


class QueueMachine(RuleBasedStateMachine):
    @initialize(options=options_strategy)
    def start(self, options):
        self.queue = make_queue(options)
        self.model = Model(options)
        self.now = 0.0
        self.tickets = []  # (real ticket, model cell)
        self.lease_ids = 0

    def priority_for(self, priority):
        return priority if self.model.options.kind == "priority" else None

    @rule(items=st.lists(st.integers(), max_size=4), priority=st.integers(-2, 2),
          ttl=st.none() | st.sampled_from([0.5, 1.0, 3.0]))
    def put(self, items, priority, ttl):
        priority = self.priority_for(priority)
        expires = None if ttl is None else self.now + ttl
        maxsize, overflow = self.model.options.maxsize, self.model.options.overflow
        fits = not self.model.parked and len(items) <= self.model.room()
        if overflow != "drop_oldest" and maxsize and len(items) > maxsize:
            with pytest.raises(ValueError):
                self.queue.put(items, priority)
        elif overflow == "reject" and not fits:
            with pytest.raises(QueueFullError):
                self.queue.put(items, priority)
        elif overflow == "block" and not fits:
            self.queue.put(items, priority, expires=expires)
            self.model.parked.append([items, priority, None, ["waiting"], expires])
        else:
            self.queue.put(items, priority, expires=expires)
            self.model.insert(items, priority, expires)

    @rule(items=st.lists(st.integers(), min_size=1, max_size=3), priority=st.integers(-2, 2),
          timeout=st.none() | st.sampled_from([0.0, 1.0, 5.0]))
    def offer(self, items, priority, timeout):
        priority = self.priority_for(priority)
        maxsize = self.model.options.maxsize
        deadline = None if timeout is None else self.now + timeout
        if self.model.options.overflow != "drop_oldest" and maxsize and len(items) > maxsize:
            with pytest.raises(ValueError):
                self.queue.offer(items, priority, deadline)
            return
        ticket = self.queue.offer(items, priority, deadline)
        cell = ["waiting"]
        if self.model.options.overflow == "drop_oldest" or (
                not self.model.parked and len(items) <= self.model.room()):
            self.model.insert(items, priority)
            cell[0] = "admitted"
        else:
            self.model.parked.append([items, priority, deadline, cell, None])
        self.tickets.append((ticket, cell))

    @rule(n=st.sampled_from([-1, 1, 2, 3, 8]))
    def take(self, n):
        assert self.queue.take(n) == self.model.take(n)
        self.queue.admit_parked(self.now)
        self.model.admit(self.now)

    @rule(n=st.sampled_from([-1, 1, 2, 3]))
    def lease(self, n):
        self.lease_ids += 10_000  # ids need not be dense, but never repeat
        assert self.queue.lease(n, self.lease_ids, deadline=0) == self.model.lease(n, self.lease_ids)
        self.queue.admit_parked(self.now)
        self.model.admit(self.now)

    @rule(data=st.data(), outcome=st.sampled_from(["ack", "nack", "reject"]))
    def settle(self, data, outcome):
        held = sorted(self.model.leases)
        ids = data.draw(st.lists(st.sampled_from([*held, 999_999]), unique=True, max_size=4)
                        if held else st.just([999_999]))
        assert self.queue.settle(ids, outcome) == self.model.settle(ids, outcome)
        self.queue.admit_parked(self.now)
        self.model.admit(self.now)

    @rule(n=st.sampled_from([-1, 1, 2, 5]))
    def peek(self, n):
        ordered = [e[2] for e in self.model.order()]
        assert self.queue.peek(n) == (ordered if n == -1 else ordered[:n])

    @rule(dt=st.sampled_from([0.5, 2.0]))
    def tick(self, dt):
        self.now += dt

    @rule(items=st.lists(st.integers(), min_size=1, max_size=3), priority=st.integers(-2, 2),
          delay=st.sampled_from([0.5, 1.0, 3.0]))
    def delay(self, items, priority, delay):
        priority = self.priority_for(priority)
        maxsize = self.model.options.maxsize
        if self.model.options.overflow != "drop_oldest" and maxsize and len(items) > maxsize:
            return  # the store refuses such a push before it waits (check_fits)
        self.queue.delay(items, priority, total_size(items), self.now + delay)
        self.model.delay(items, priority, self.now + delay)

    @rule()
    def fall_due(self):
        assert self.queue.fall_due(self.now) == self.model.fall_due(self.now)

    @rule(data=st.data(), hand_back=st.booleans())
    def extend(self, data, hand_back):
        held = sorted(self.model.leases)
        ids = data.draw(st.lists(st.sampled_from([*held, 999_999]), unique=True, max_size=3)
                        if held else st.just([999_999]))
        assert self.queue.extend(ids, 0, hand_back) == self.model.extend(ids, hand_back)

    @rule()
    def expire(self):
        assert self.queue.expire(self.now) == self.model.expire(self.now)
        self.queue.admit_parked(self.now)
        self.model.admit(self.now)

    @precondition(lambda self: any(cell[0] == "waiting" for _, cell in self.tickets))
    @rule(data=st.data())
    def withdraw(self, data):
        waiting = [(t, c) for t, c in self.tickets if c[0] == "waiting"]
        ticket, cell = data.draw(st.sampled_from(waiting))
        self.queue.withdraw(ticket)
        self.model.parked = [p for p in self.model.parked if p[3] is not cell]
        cell[0] = "expired"

    @invariant()
    def agrees_with_model(self):
        if not hasattr(self, "queue"):
            return
        assert len(self.queue) == len(self.model.entries)
        assert self.queue.delayed_items == sum(len(push[2]) for push in self.model.delayed)
        assert [t.state for t, _ in self.tickets] == [c[0] for _, c in self.tickets]
        assert self.queue.can_push() == (not self.model.parked and self.model.room() >= 1)
        assert self.queue.can_pull(-1) == bool(self.model.entries)
        assert self.queue.dropped == self.model.dropped
        assert sorted(self.queue.leases) == sorted(self.model.leases)
        assert (self.queue.pushed + self.queue.redelivered - self.queue.pulled - self.queue.dropped
                - self.queue.expired == len(self.queue))
        assert self.queue.nbytes == sum(
            item_size(e[2]) for e in [*self.model.entries, *(e for e, _ in self.model.leases.values())]
        ) + sum(total_size(push[2]) for push in self.model.delayed)
        if self.model.options.maxsize:  # items back from leases enter even a full queue
            assert len(self.queue) <= self.model.options.maxsize + len(self.model.returned)


TestQueueMachine = QueueMachine.TestCase
TestQueueMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@given(st.lists(st.tuples(st.integers(-3, 3), st.integers())))
def test_priority_is_lowest_first_and_fifo_among_equals(entries):
    queue = make_queue(QueueOptions(kind="priority"))
    for priority, item in entries:
        queue.put([(priority, item)], priority)
    expected = [entry for _, entry in sorted(enumerate(entries), key=lambda p: (p[1][0], p[0]))]
    assert queue.take(-1) == expected


@given(st.lists(st.integers(), max_size=30), st.integers(1, 7))
def test_batch_pulls_return_items_in_single_pull_order(items, size):
    batched, single = make_queue(QueueOptions(kind="batch")), make_queue(QueueOptions(kind="fifo"))
    batched.put(items)
    single.put(items)
    out = []
    while len(batched):
        out.extend(batched.take(size))
    assert out == [single.take(1)[0] for _ in items]


def test_seed_flow_control_names_map_to_capacity():
    assert resolve_capacity(None, use_locking=True) == 1
    assert resolve_capacity(None, semaphore=4) == 4
    assert resolve_capacity(None, batch_lock=3) == 3
    assert resolve_capacity(2) == 2
    assert resolve_capacity(None) is None
    assert resolve_capacity(1, use_locking=True) == 1
    with pytest.raises(ValueError, match="conflicting"):
        resolve_capacity(5, use_locking=True)
    with pytest.raises(ValueError):
        resolve_capacity(None, semaphore=0)


@pytest.mark.parametrize("bad, error", [
    ({"kind": "heap"}, ValueError), ({"maxsize": -1}, ValueError), ({"maxsize": 1.5}, TypeError),
    ({"overflow": "drop_newest"}, ValueError), ({"overflow": None}, ValueError), ({"kind": "priority", "overflow": "drop_oldest"}, ValueError),
    ({"batch_size": 0}, ValueError), ({"batch_size": -1}, ValueError), ({"batch_size": "8"}, TypeError),
    ({"batch_timeout": -1.0}, ValueError),
])
def test_bad_queue_options_are_refused(bad, error):
    with pytest.raises(error):
        QueueOptions(**bad)


@pytest.mark.parametrize("name, error", [
    (5, TypeError), (None, TypeError), (b"q", TypeError), ("", ValueError),
    ("x" * 256, ValueError), ("a\nb", ValueError), ("tab\there", ValueError),
])
def test_bad_queue_names_are_refused(name, error):
    with pytest.raises(error):
        check_name(name)


def test_names_of_any_script_are_accepted():
    for name in ["q", "x" * 255, "données/été", "队列", "a b"]:
        assert check_name(name) == name


@pytest.mark.parametrize("size, error", [(0, ValueError), (-2, ValueError), (1.0, TypeError),
                                         (True, TypeError), ("3", TypeError)])
def test_bad_batch_sizes_are_refused(size, error):
    with pytest.raises(error):
        check_batch_size(size)


def test_push_arguments():
    assert as_items([1, 2], expand=True) == [1, 2]
    assert as_items([1, 2], expand=False) == [[1, 2]]
    with pytest.raises(TypeError):
        as_items(5, expand=True)
    assert as_names("q") == ("q",)
    assert as_names(["a", "b"]) == ("a", "b")
    with pytest.raises(ValueError):
        as_names([])
    with pytest.raises(ValueError):
        as_names(["a", "a"])
    with pytest.raises(TypeError):
        as_names({"a"})


@given(st.lists(st.one_of(st.integers(), st.text(), st.binary(), st.floats(allow_nan=False),
                          st.none(), st.booleans(), st.lists(st.integers(), max_size=3),
                          st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))))
@example([[1, 2], [3]])  # one kind, not flat
@example([{"a": 1}])
def test_item_sizes_at_c_speed_equal_item_size_one_by_one(items):
    assert item_sizes(items) == [item_size(item) for item in items]
    if all(type(item) in (int, str, bytes, float, bool, type(None)) for item in items):
        assert item_sizes(items) == [sys.getsizeof(item) for item in items]
