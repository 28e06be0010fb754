"""Hypothesis drives the public API of a live server with random, often hostile, calls.

Every call, on either path (drawn at random), must either do what a reference model
says or raise a documented error (TypeError or ValueError for bad arguments, a
pype.PypeError or ValueError from the operation), and the server must answer
correctly afterwards.
"""

import uuid

import pytest
import ray
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

import pype
from pype.options import QueueOptions
from tests.model import Model

DOCUMENTED = (TypeError, ValueError, pype.PypeError)

names = st.sampled_from(["a", "b", "ü/../x", "y" * 246])  # 255 characters with the prefix
bad_names = st.sampled_from(["", "tab\there", "z" * 256, 42, None, b"bytes"])
items = st.one_of(st.integers(), st.text(max_size=20), st.binary(max_size=64), st.none(),
                  st.floats(allow_nan=False), st.lists(st.integers(), max_size=3),
                  st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
batch_sizes = st.sampled_from([None, 1, 2, 5, -1])
bad_batch_sizes = st.sampled_from([0, -2, 1.5, True, "3"])


class ApiMachine(RuleBasedStateMachine):
    def __init__(self, server):
        super().__init__()
        self.server = server
        self.prefix = uuid.uuid4().hex[:8]
        self.models: dict[str, Model] = {}
        self.dead = self.queue("dead")  # the queues' dead-letter queue (add's max_deliveries)
        self.given_up = []  # DeadLetters the models gave up, in the order they were given up

    def queue(self, name):
        return f"{self.prefix}-{name}"

    def call(self, method, native):
        """The server's `method` on one path, returning its result either way."""
        operation = getattr(self.server, method)
        return operation if native else lambda *a, **k: ray.get(operation.remote(*a, **k))

    def model(self, name):
        return self.models.setdefault(name, Model(QueueOptions()))

    @rule(name=names, data=st.lists(items, max_size=4), expand=st.booleans(), native=st.booleans())
    def push(self, name, data, expand, native):
        model = self.model(name)
        priority = 1 if model.options.kind == "priority" else None
        count = self.call("push", native)(data, self.queue(name), expand=expand, priority=priority)
        pushed = data if expand else [data]
        assert count == len(pushed)
        model.insert(pushed, priority)

    @rule(name=names, batch_size=batch_sizes, native=st.booleans())
    def pull(self, name, batch_size, native):
        model = self.models.get(name)  # a pull does not create a queue
        expected = [] if model is None else model.take(batch_size or model.options.pull_size)
        assert self.call("pull", native)(self.queue(name), batch_size) == expected

    @rule(name=names, source=names, item=items, batch_size=batch_sizes)
    def push_pull(self, name, source, item, batch_size):
        """The push, then the pull, as the model says, on one shard or two (names fall
        where the hash puts them)."""
        model = self.model(name)
        assume(model.options.kind != "priority")  # push_pull has no priority
        model.insert([item], None)
        pulled = self.models.get(source)
        expected = [] if pulled is None else pulled.take(batch_size or pulled.options.pull_size)
        got = self.server.push_pull(item, self.queue(name), self.queue(source), batch_size=batch_size)
        assert got == expected

    @rule(name=names, batch_size=st.sampled_from([1, 3, -1]),
          outcome=st.sampled_from(["ack", "nack", "reject"]), native=st.booleans())
    def lease_and_settle(self, name, batch_size, outcome, native):
        model = self.models.get(name) or Model(QueueOptions())
        leased = self.call("pull", native)(self.queue(name), batch_size, ack=True)
        modelled = model.lease(batch_size, first_id=0)
        assert [pair[1:] for pair in leased] == [pair[1:] for pair in modelled]  # items, deliveries
        ids = [lease for lease, _, _ in leased]
        if outcome == "ack":
            assert self.call("ack", native)(self.queue(name), ids) == len(leased)
        else:
            nack = self.call("nack", native)
            assert nack(self.queue(name), ids, requeue=outcome == "nack") == len(leased)
        missing, given_up = model.settle([lease for lease, _, _ in modelled], outcome)
        assert missing == []
        if model.options.dead_letter:
            self.given_up += [pype.DeadLetter(item, self.queue(name), reason, deliveries)
                              for item, reason, deliveries in given_up]
        if given_up and model.options.dead_letter:  # the shard's sender pushes them over
            arrived = self.server.pull(self.dead, len(self.given_up), block=True, timeout=60,
                                       remove=False)
            assert len(arrived) == len(self.given_up)
        assert self.server.dead_letters(self.dead) == self.given_up

    @rule(name=names, item=items, outcome=st.sampled_from(["nack", "reject"]),
          native=st.booleans())
    def deliver_until_given_up(self, name, item, outcome, native):
        """Push an item and fail its deliveries: a queue with max_deliveries gives it up."""
        self.push(name, item, False, native)
        for _ in range(3):
            self.lease_and_settle(name, -1, outcome, native)

    @initialize(kind=st.sampled_from(["fifo", "lifo", "priority", "batch"]),
                max_deliveries=st.sampled_from([None, 1, 2]))
    def add_a_queue_with_dead_letters(self, kind, max_deliveries):
        self.add("a", kind, max_deliveries)

    @rule(name=names, kind=st.sampled_from(["fifo", "lifo", "priority", "batch", "bogus", 7]),
          max_deliveries=st.sampled_from([None, 1, 2]))
    def add(self, name, kind, max_deliveries):
        options = {"max_deliveries": max_deliveries, "dead_letter": self.dead}
        if kind not in ("fifo", "lifo", "priority", "batch"):
            with pytest.raises(DOCUMENTED):
                self.server.add.remote(self.queue(name), kind=kind)
        elif name in self.models:
            with pytest.raises(pype.QueueExistsError):
                ray.get(self.server.add.remote(self.queue(name), kind=kind, **options))
        else:
            assert ray.get(self.server.add.remote(self.queue(name), kind=kind, **options))
            self.models[name] = Model(QueueOptions(kind=kind, **options))

    @rule(name=names)
    def remove(self, name):
        ref = self.server.remove.remote(self.queue(name))
        model = self.models.pop(name, None)
        if model is None:
            with pytest.raises(pype.QueueNotFoundError):
                ray.get(ref)
        else:
            assert ray.get(ref) == len(model.entries)

    @rule(name=bad_names, batch_size=batch_sizes)
    def bad_name(self, name, batch_size):
        for call in (lambda: self.server.push.remote(1, name),
                     lambda: self.server.pull.remote(name, batch_size),
                     lambda: self.server.ack.remote(name, [1]),
                     lambda: self.server.push(1, name),
                     lambda: self.server.pull(name, batch_size),
                     lambda: self.server.ack(name, [1])):
            with pytest.raises(DOCUMENTED):
                call()

    @rule(name=names, batch_size=bad_batch_sizes)
    def bad_batch_size(self, name, batch_size):
        with pytest.raises(DOCUMENTED):
            self.server.pull.remote(self.queue(name), batch_size)

    @rule(name=names, lease=st.integers(min_value=-(2**63), max_value=2**63 - 1),
          native=st.booleans())
    def unknown_lease(self, name, lease, native):
        with pytest.raises(DOCUMENTED):
            self.call("ack", native)(self.queue(name), [lease])

    @rule(name=names)
    def priority_on_a_plain_queue(self, name):
        if self.model(name).options.kind == "priority":
            return
        with pytest.raises(ValueError, match="priority"):
            ray.get(self.server.push.remote(1, self.queue(name), priority=3))

    @invariant()
    def lengths_agree(self):
        for name, model in self.models.items():
            assert ray.get(self.server.queue_len.remote(self.queue(name))) == len(model.entries)


def test_random_api_calls_succeed_as_modelled_or_raise_documented_errors(server):
    run_state_machine_as_test(
        lambda: ApiMachine(server),
        settings=settings(max_examples=12, stateful_step_count=25, deadline=None,
                          suppress_health_check=list(HealthCheck)))
