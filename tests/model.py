"""A reference model of one queue's semantics, shared by the tests that check against it.

It is the obvious, slow implementation of what pype/shards/queues.py does fast:
tests/test_queues.py checks the queue kinds against it, tests/test_fuzz.py the
live API.
"""

from pype.options import QueueOptions


class Model:
    """The obvious, slow implementation: a list of (priority, arrival, item).

    Leased entries wait in `leases`; one that comes back is remembered in `returned`
    with the number of the pull that first took it: it goes to the head of the queue,
    returned ones in the order they were first pulled. `deliveries` counts the leases
    of each entry that ended without an ack; at max_deliveries, or on a reject, the
    entry is given up: settle() returns it as (item, reason, deliveries). An entry
    pushed with `expires` is given up by expire(now) once that time has come, unless
    it is leased then: it expires once it comes back. A delayed push waits in
    `delayed` until fall_due(now) lets it in as an acknowledged push; a lease handed
    back with a delay (extend) is held by nobody until its deadline.
    """

    def __init__(self, options: QueueOptions):
        self.options = options
        self.entries = []
        self.arrivals = 0
        self.parked = []  # [items, priority, deadline, state-cell, expires]
        self.dropped = 0
        self.leases = {}  # lease id -> (entry, pull number)
        self.acked_ids = set()  # lease ids acked: acking one again is no error
        self.returned = {}  # arrival of an entry -> pull number
        self.pulls = 0
        self.first_pulls = {}  # arrival of an entry -> number of the pull that first took it
        self.deliveries = {}  # arrival of an entry -> its leases that ended without an ack
        self.expires = {}  # arrival of an entry -> (its time, its place among those that expire)
        self.expiry_order = 0
        self.delayed = []  # (due, order, items, priority, expires), by (due, order)
        self.delays = 0
        self.handed_back = set()  # lease ids

    def order(self):
        if self.options.kind == "priority":
            return sorted(self.entries, key=lambda e: (e[0], e[1]))
        head = sorted((e for e in self.entries if e[1] in self.returned),
                      key=lambda e: self.returned[e[1]])
        rest = [e for e in self.entries if e[1] not in self.returned]
        newest_first = self.options.kind == "lifo"
        return head + sorted(rest, key=lambda e: -e[1] if newest_first else e[1])

    def room(self):
        return float("inf") if not self.options.maxsize else self.options.maxsize - len(self.entries)

    def insert(self, items, priority, expires=None):
        for item in items:
            if expires is not None:
                self.expiry_order += 1
                self.expires[self.arrivals] = (expires, self.expiry_order)
            while self.options.maxsize and len(self.entries) >= self.options.maxsize:
                if self.options.kind == "lifo":  # a stack evicts from its bottom
                    oldest = self.order()[-1]
                else:
                    oldest = min(self.entries, key=lambda e: e[1])
                self.entries.remove(oldest)
                self.returned.pop(oldest[1], None)
                self.dropped += 1
            self.entries.append((0 if priority is None else priority, self.arrivals, item))
            self.arrivals += 1

    def take_entries(self, n):
        ordered = self.order()
        taken = ordered if n == -1 else ordered[:n]
        for entry in taken:
            self.entries.remove(entry)
            self.returned.pop(entry[1], None)
        return taken

    def take(self, n):
        return [e[2] for e in self.take_entries(n)]

    def lease(self, n, first_id):
        taken = self.take_entries(n)
        leased = []
        for lease_id, entry in enumerate(taken, first_id):
            self.pulls += 1
            leased.append((lease_id, entry[2], self.deliveries.get(entry[1], 0)))
            self.first_pulls.setdefault(entry[1], self.pulls)  # its place in the original order
            self.leases[lease_id] = (entry, self.first_pulls[entry[1]])
        return leased

    def settle(self, ids, outcome):
        """outcome: "ack", "nack" or "reject"; returns (ids not held, entries given up)."""
        missing, given_up = [], []
        for lease_id in ids:
            if lease_id not in self.leases:
                if outcome != "ack" or lease_id not in self.acked_ids:  # a second ack is harmless
                    missing.append(lease_id)
                continue
            if lease_id in self.handed_back and outcome != "nack":
                missing.append(lease_id)
                continue
            self.handed_back.discard(lease_id)
            entry, pull = self.leases.pop(lease_id)
            if outcome == "ack":
                self.acked_ids.add(lease_id)
                continue
            deliveries = self.deliveries[entry[1]] = self.deliveries.get(entry[1], 0) + 1
            limit = self.options.max_deliveries
            if outcome == "reject":
                given_up.append((entry[2], "rejected", deliveries))
            elif limit and deliveries >= limit:
                given_up.append((entry[2], "deliveries", deliveries))
            else:
                self.entries.append(entry)
                self.returned[entry[1]] = pull
        return missing, given_up

    def extend(self, ids, hand_back):
        missing = [i for i in ids if i not in self.leases or i in self.handed_back]
        if hand_back:
            self.handed_back.update(i for i in ids if i not in missing)
        return missing

    def delay(self, items, priority, due, expires=None):
        self.delays += 1
        self.delayed.append((due, self.delays, items, priority, expires))
        self.delayed.sort(key=lambda push: push[:2])

    def fall_due(self, now):
        """Let in the delayed pushes that are due; whether each entered at once."""
        entered = []
        while self.delayed and self.delayed[0][0] <= now:
            _, _, items, priority, expires = self.delayed.pop(0)
            entered.append(self.options.overflow == "drop_oldest" or (
                not self.parked and len(items) <= self.room()))
            if entered[-1]:
                self.insert(items, priority, expires)
            else:
                self.parked.append([items, priority, None, ["waiting"], expires])
        return entered

    def expire(self, now):
        """Give up the entries held whose time has come; (item, "expired", deliveries)."""
        doomed = sorted((self.expires[e[1]], e) for e in self.entries
                        if e[1] in self.expires and self.expires[e[1]][0] <= now)
        for _, entry in doomed:
            self.entries.remove(entry)
            self.returned.pop(entry[1], None)
        return [(entry[2], "expired", self.deliveries.get(entry[1], 0)) for _, entry in doomed]

    def admit(self, now):
        while self.parked:
            items, priority, deadline, cell, expires = self.parked[0]
            late = deadline is not None and now >= deadline
            if not late and len(items) > self.room():
                break
            self.parked.pop(0)
            if late:
                cell[0] = "expired"
            else:
                self.insert(items, priority, expires)
                cell[0] = "admitted"
