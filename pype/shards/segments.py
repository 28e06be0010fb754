"""A shard's side of the shared memory segments that its node's clients send (pype.segments).

A request on the Unix socket may carry a buffer in a segment of its sender's
pool: a SegmentSlice with the segment's file descriptor. received() maps the
segment and hands the request a view of the bytes, so the item the
engine keeps is a numpy array on the segment, never copied. lend() does the
reverse for an answer to a Unix client: a buffer that lies in a segment goes as
a SegmentSlice, and that client counts as a user of the segment until it says
SegmentsReleased, or leaves. Everything else (TCP clients, `.remote()` calls,
the journal, backups, queues moving to other shards) reads the bytes through the
view, by value.

A segment is in use while the shard's view of it lives (its item is queued,
leased, parked, or on its way to the journal or the backups) or a client holds
one of its views. When neither is true, the shard closes its file descriptor
and mapping and tells the sender, on its connection, that the segment is free
(SegmentsFreed). If the sender left, nobody is told, and the memory goes with
the last mapping.

The shard holds each segment's mapping only through its items: numpy keeps the
mapping alive (its arrays' buffers are views of it; not necessarily of the view
received() made), and the mapping's finalizer says when the last is gone. It runs
on whichever thread drops an item (a Ray call's too): it appends to a deque and
wakes the loop, whose thread drains it.
"""

from __future__ import annotations

import bisect
import itertools
import mmap
import os
import weakref
from collections import defaultdict, deque
from collections.abc import Callable

import numpy as np

from pype.framing import SegmentSlice
from pype.segments import SHARED_MIN, is_sealed


class _Held:
    """One segment the shard holds: its descriptor, where it is mapped, who uses it."""

    __slots__ = ("fd", "mapped", "number", "owner", "owner_number", "size", "start", "views")

    def __init__(self, number: int, fd: int, mapping: mmap.mmap, owner: object, owner_number: int):
        self.number, self.fd = number, fd
        self.mapped = weakref.ref(mapping)  # alive while an item of the shard's uses it
        self.owner, self.owner_number = owner, owner_number  # the sender's connection, its number
        self.size = len(mapping)
        self.start = _address(memoryview(mapping))
        self.views: dict[object, int] = {}  # client connection -> views lent to it


def _address(buffer) -> int:
    return np.frombuffer(buffer, np.uint8).__array_interface__["data"][0]


class SharedSegments:
    """The segments one shard holds (see the module docstring). Its methods run under
    the engine's lock (on the loop's thread, or a Ray thread that answers a parked
    request); `wake` is called when an item's last use of a segment goes, on any thread."""

    def __init__(self, wake: Callable[[], None] = lambda: None):
        self._wake = wake
        self._numbers = itertools.count(1)
        self._held: dict[int, _Held] = {}
        self._starts: list[int] = []  # start addresses of the mappings, sorted
        self._by_start: dict[int, _Held] = {}  # the newest held at each address
        self._unmapped: deque[int] = deque()  # segments whose mapping is gone (any thread)
        self._notices: dict[object, list[int]] = defaultdict(list)  # sender -> its freed numbers

    def __len__(self) -> int:
        return len(self._held)

    def received(self, sender: object, frames: list) -> list:
        """`frames` of a request from `sender` with each SegmentSlice replaced by a view
        of its bytes. Raises ValueError (having closed the descriptors) for a segment
        that is not a sealed memfd of the size it claims."""
        self._forget_unmapped()  # before a new mapping may take an old one's address
        viewed = []
        for position, frame in enumerate(frames):
            if type(frame) is not SegmentSlice:
                viewed.append(frame)
                continue
            end = frame.offset + frame.nbytes
            try:
                if not is_sealed(frame.fd, end):
                    raise ValueError(f"a shared memory segment that is not a sealed memfd of "
                                     f"at least {end} bytes")
                mapping = mmap.mmap(frame.fd, end)  # shared, and writable: so are the items
            except (ValueError, OSError) as error:
                for later in frames[position:]:
                    if type(later) is SegmentSlice:
                        os.close(later.fd)
                raise ValueError(f"the shard could not map a shared memory segment: {error}") \
                    from None
            held = _Held(next(self._numbers), frame.fd, mapping, sender, frame.segment)
            self._held[held.number] = held
            if held.start not in self._by_start:
                bisect.insort(self._starts, held.start)
            self._by_start[held.start] = held
            weakref.finalize(mapping, self._on_unmapped, held.number)
            viewed.append(memoryview(mapping)[frame.offset:end])
        return viewed

    def lend(self, client: object, frames: list, room: int) -> list:
        """`frames` of an answer to `client` with each large buffer that lies in a
        segment as a SegmentSlice (at most `room` of them)."""
        lent, count = [frames[0]], 0
        for buffer in frames[1:]:
            held = None
            if count < room and self._held:
                raw = buffer.raw()
                if raw.nbytes >= SHARED_MIN:
                    address = _address(raw)
                    held = self._holding(address, raw.nbytes)
            if held is None:
                lent.append(buffer)
                continue
            held.views[client] = held.views.get(client, 0) + 1
            lent.append(SegmentSlice(held.number, address - held.start, raw.nbytes, held.fd))
            count += 1
        return lent

    def released(self, client: object, numbers) -> None:
        """`client` no longer reads these segments (its SegmentsReleased)."""
        for number in numbers:
            held = self._held.get(number)
            if held is None or held.views.get(client, 0) <= 0:
                continue  # not lent to it: a confused client changes nothing
            held.views[client] -= 1
            if not held.views[client]:
                del held.views[client]
            self._free_if_unused(held)

    def left(self, connection: object) -> None:
        """`connection` closed: nothing of it reads a segment any more (a client keeps its
        socket open while it reads one: pype.segments.Borrowed), and nobody is told of
        the segments it sent."""
        self._notices.pop(connection, None)
        for held in list(self._held.values()):
            if held.owner is connection:
                held.owner = None
            if held.views.pop(connection, None):
                self._free_if_unused(held)

    def collect(self) -> dict[object, list[int]]:
        """The segments freed since the last call, by sender: {connection: its numbers}."""
        self._forget_unmapped()
        notices, self._notices = self._notices, defaultdict(list)
        return notices

    @property
    def has_news(self) -> bool:
        return bool(self._unmapped or self._notices)

    def _on_unmapped(self, number: int) -> None:  # a finalizer: any thread
        self._unmapped.append(number)
        self._wake()

    def _forget_unmapped(self) -> None:
        while self._unmapped:
            held = self._held.get(self._unmapped.popleft())
            if held is not None:
                self._free_if_unused(held)

    def _holding(self, address: int, nbytes: int) -> _Held | None:
        at = bisect.bisect_right(self._starts, address) - 1
        if at < 0:
            return None
        held = self._by_start[self._starts[at]]
        if address + nbytes <= held.start + held.size and held.mapped() is not None:
            return held
        return None

    def _free_if_unused(self, held: _Held) -> None:
        if held.mapped() is not None or held.views:
            return
        del self._held[held.number]
        if self._by_start.get(held.start) is held:  # else a newer mapping took its address
            del self._by_start[held.start]
            del self._starts[bisect.bisect_left(self._starts, held.start)]
        os.close(held.fd)
        if held.owner is not None:
            self._notices[held.owner].append(held.owner_number)
