"""Large buffers between the processes of one node, through shared memory: the client's side.

Over a shard's Unix socket (pype.transport.UnixConnection) a buffer of SHARED_MIN
bytes or more (a numpy array, out of band: pype.protocol.dumps) does not go
through the socket. The sender copies it into a segment of its pool, a memfd
that it keeps mapped, and the message carries a small descriptor
(pype.framing.SegmentSlice); the segment's file descriptor goes ahead on the
connection's descriptor channel (SCM_RIGHTS). That
copy is the only one: the shard maps the segment and keeps the item as a view of
it (pype.shards.segments), and a consumer on the node that pulls the item gets
the descriptor and the file descriptor in turn, maps the segment, and reads the
item from it.

A segment's life, as its sender's pool sees it:
- free: mapped, its pages already in memory, waiting for a buffer;
- busy: it carries a buffer to the shard. The shard answers SegmentsFreed when no
  item of its own and no consumer's array uses the bytes any more (an item pulled
  without a lease or acknowledged, and the consumers' views released), and it is
  free again;
- gone: the connection closed (its shard died, or the client let it go). Busy
  segments are never used again, since a consumer may still read one; the kernel
  frees each with its last mapping and file descriptor, in whichever process.

So a segment in use is never written, a dead process's share goes with it (a
consumer's or producer's mappings and descriptors with the process, a shard's
with its connections), and nothing lingers in /dev/shm. When the pool is at its
limits (MAX_SEGMENTS, MAX_POOL_BYTES) and nothing is free, buffers go through the
socket by value, as they do over TCP, to the journal and to backups.

A receiver maps each segment privately (Borrowed.attach()): its arrays are
writable and its writes stay its own, and it sees the segment's bytes as they
are, which nobody writes while it reads them. When its last view of a segment is
gone, the segment's number waits for the connection's next request, which tells
the shard (SegmentsReleased); a connection that closes while its process still
reads a segment keeps its socket open until then.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import mmap
import os
import weakref
from collections import deque

from pype.framing import MAX_FDS_PER_WRITE, SegmentSlice

logger = logging.getLogger("pype")

SHARED_MIN = 256 * 1024  # bytes: smaller buffers cross the socket in one write anyway
MAX_SEGMENTS = MAX_FDS_PER_WRITE  # segments one connection's pool holds
MAX_POOL_BYTES = 512 * 1024 * 1024
MAX_FREE_SEGMENTS = 16  # free segments kept mapped beyond that are let go
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def is_sealed(fd: int, size: int) -> bool:
    """Whether the memfd `fd` has at least `size` bytes and can never shrink: a mapping
    of it cannot fault (SIGBUS) because its sender truncated it."""
    try:
        return (fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
                and os.fstat(fd).st_size >= size)
    except OSError:  # not a memfd
        return False


class _Segment:
    __slots__ = ("__weakref__", "_close_fd", "capacity", "fd", "mapping", "number", "view")

    def __init__(self, number: int, capacity: int):
        self.number, self.capacity = number, capacity
        self.fd = os.memfd_create(f"pype-segment-{number}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self._close_fd = weakref.finalize(self, os.close, self.fd)
        os.ftruncate(self.fd, capacity)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SEALS)
        self.mapping = mmap.mmap(self.fd, capacity)
        self.view = memoryview(self.mapping)

    def close(self) -> None:
        self.view.release()
        self.mapping.close()
        self._close_fd()


class SegmentPool:
    """One connection's segments (see the module docstring). Not thread-safe: its
    connection's thread uses it."""

    def __init__(self):
        self._numbers = itertools.count(1)
        self._free: dict[int, _Segment] = {}
        self._busy: dict[int, _Segment] = {}
        self._bytes = 0

    def place(self, frames: list) -> list:
        """`frames` (a pickle and its out-of-band buffers) with each buffer of SHARED_MIN
        bytes or more copied into a segment and replaced by its SegmentSlice, while the
        pool has room; the others stay as they are (sent by value)."""
        placed = [frames[0]]
        for buffer in frames[1:]:
            raw = buffer.raw()  # a PickleBuffer's bytes, contiguous
            nbytes = raw.nbytes
            segment = self._take(nbytes) if nbytes >= SHARED_MIN else None
            if segment is None:
                placed.append(buffer)
                continue
            segment.view[:nbytes] = raw
            placed.append(SegmentSlice(segment.number, 0, nbytes, segment.fd))
        return placed

    def freed(self, numbers) -> None:
        """The shard no longer uses these segments: they can carry other buffers."""
        for number in numbers:
            segment = self._busy.pop(number, None)
            if segment is not None:
                self._free[number] = segment
        while len(self._free) > MAX_FREE_SEGMENTS:  # a burst is over: give its memory back
            self._drop(next(iter(self._free.values())))

    def close(self) -> None:
        """Let every segment go (the connection closed). Busy ones are never reused."""
        for segment in (*self._free.values(), *self._busy.values()):
            segment.close()
        self._free.clear()
        self._busy.clear()
        self._bytes = 0

    @property
    def sizes(self) -> tuple[int, int]:
        """(free, busy) segments: for tests and stats."""
        return len(self._free), len(self._busy)

    def _take(self, nbytes: int) -> _Segment | None:
        capacity = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        if capacity > MAX_POOL_BYTES:
            return None
        fitting = [s for s in self._free.values() if s.capacity >= nbytes]
        best = min(fitting, key=lambda s: s.capacity, default=None)
        if best is None or best.capacity > 2 * nbytes:  # none, or one that wastes half
            while not self._room_for(capacity) and self._free:  # drop free ones that fit badly
                self._drop(min(self._free.values(), key=lambda s: s.capacity))
            if self._room_for(capacity):
                try:
                    best = _Segment(next(self._numbers), capacity)
                except OSError as error:  # out of memory or descriptors: by value, then
                    logger.warning("pype: no shared memory segment (%s); sending by value", error)
                    return None
                self._bytes += capacity
            elif best is None or best.number not in self._free:
                return None
        self._free.pop(best.number, None)
        self._busy[best.number] = best
        return best

    def _room_for(self, capacity: int) -> bool:
        return (len(self._free) + len(self._busy) < MAX_SEGMENTS
                and self._bytes + capacity <= MAX_POOL_BYTES)

    def _drop(self, segment: _Segment) -> None:
        del self._free[segment.number]
        self._bytes -= segment.capacity
        segment.close()


class Borrowed:
    """The shard's segments that one connection maps (a consumer's side; see the
    module docstring).

    attach() maps them; when the last view of a mapping is gone (on any thread), its
    segment number waits in `released` for the connection's next request. The shard
    counts this connection as a reader of its segments until it says so, or until the
    connection's socket closes. So the socket must stay open while a mapping lives,
    or the producer could write over arrays this process still reads: Borrowed keeps
    the socket, and close_when_unused() closes it after the last mapping.
    """

    def __init__(self, sock):
        self.released: deque[int] = deque()  # shard segments no longer read here
        self._socket = sock
        self._mappings: set[object] = set()  # one token per live mapping
        self._closing = False

    def attach(self, frames: list) -> list:
        """`frames` received with each SegmentSlice replaced by a view of its bytes (a
        private mapping: this process's writes stay its own). Raises OSError, having
        closed every descriptor and released every segment it could not map."""
        attached = []
        for position, frame in enumerate(frames):
            if type(frame) is not SegmentSlice:
                attached.append(frame)
                continue
            try:
                mapping = mmap.mmap(frame.fd, frame.offset + frame.nbytes,
                                    flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, ValueError) as error:
                for later in frames[position:]:
                    if type(later) is SegmentSlice:
                        os.close(later.fd)
                        self.released.append(later.segment)
                raise OSError(f"could not map a shared memory segment: {error}") from None
            os.close(frame.fd)
            token = object()
            self._mappings.add(token)
            weakref.finalize(mapping, self._unmapped, token, frame.segment)
            attached.append(memoryview(mapping)[frame.offset:frame.offset + frame.nbytes])
        return attached

    def take_released(self) -> tuple[int, ...]:
        numbers = []
        while self.released:
            numbers.append(self.released.popleft())
        return tuple(numbers)

    def close_when_unused(self) -> None:
        """Close the socket now, or after the last mapping if some still live."""
        self._closing = True
        if not self._mappings:
            self._socket.close()

    def _unmapped(self, token: object, number: int) -> None:  # a finalizer: any thread
        self._mappings.discard(token)
        self.released.append(number)
        if self._closing and not self._mappings:
            self._socket.close()
