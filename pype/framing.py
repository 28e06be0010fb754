"""How one message travels on the data path's sockets: framing, with no sockets of its own.

A message is a list of frames: a pickle and, out of band, its large buffers
(pype.protocol.dumps). On a ZeroMQ socket each frame is a ZeroMQ frame
(send_frames, receive_frames). On a stream socket (the Unix sockets between a
shard and the clients of its node) a message is a header, the number of frames
and their lengths, then the frames: stream_message() makes it, send_stream()
writes it with one sendmsg, and a StreamReader cuts the bytes read in large
chunks back into messages, so that many small messages cost one system call.

On a stream socket a frame may also be a SegmentSlice: bytes that lie in a shared
memory segment (pype.segments), sent as a small descriptor, so that a large buffer
crosses without a copy. The segment's file descriptor goes first, on the
connection's descriptor channel: a SOCK_SEQPACKET socket pair whose one end the
client sends beside its first bytes (SCM_RIGHTS). Why a channel of its own: a
stream socket read with recvmsg (as descriptors need) costs about 8 us more per
round trip on the development VM than one read with recv_into, and bytes read
with recv_into lose any descriptors that came with them.
"""

from __future__ import annotations

import os
import socket
import struct
from collections import deque
from typing import NamedTuple

import zmq

# Plain ints: pyzmq's enum constants cost microseconds per use on the hot path.
EVENTS, POLLIN, RCVMORE, SNDMORE = (int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.RCVMORE),
                                    int(zmq.SNDMORE))


def receive_frames(socket: zmq.Socket) -> list:
    """The frames of one message waiting on `socket`: the first copied (it is small),
    the rest, out-of-band buffers, without a copy."""
    frames = [socket.recv()]
    while socket.getsockopt(RCVMORE):
        frames.append(socket.recv(copy=False))
    return frames


def send_frames(socket: zmq.Socket, frames: list, identity: bytes | None = None) -> None:
    """Send one message: an optional ROUTER identity, the pickle, and its buffers uncopied."""
    if identity is not None:
        socket.send(identity, SNDMORE)
    last = len(frames) - 1
    socket.send(frames[0], SNDMORE if last else 0)
    for number, frame in enumerate(frames[1:], 1):
        socket.send(frame, SNDMORE if number < last else 0, copy=False)


_COUNT = struct.Struct("<I")
_LENGTH = struct.Struct("<Q")
_ONE_FRAME = struct.Struct("<IQ")
_SEGMENT = struct.Struct("<QQQ")  # a SegmentSlice's descriptor: segment, offset, nbytes
_IN_SEGMENT = 1 << 63  # a frame length with this bit set: the frame is a descriptor
CHUNK = 1 << 18  # bytes a stream reader asks the kernel for at once
# File descriptors one record of a descriptor channel carries (the kernel takes up to
# 253): a message lends no more segments than that, and a reader makes room for that many.
MAX_FDS_PER_WRITE = 64
_ANCILLARY = socket.CMSG_SPACE(MAX_FDS_PER_WRITE * 4)


def descriptor_channel() -> tuple[socket.socket, socket.socket]:
    """(this side's end, the end to send the peer) of a new descriptor channel."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send_descriptors(channel: socket.socket, slices: list[SegmentSlice]) -> None:
    """Send the fds of `slices` (at most MAX_FDS_PER_WRITE) as one record of `channel`,
    with their segment numbers, which the reader checks against the messages' frames:
    a record left without its message (a send interrupted between the two) is found,
    not taken for the next message's. Raises BlockingIOError if a non-blocking channel
    is full, OSError if the peer left."""
    numbers = struct.pack(f"<{len(slices)}Q", *(frame.segment for frame in slices))
    fds = struct.pack(f"{len(slices)}i", *(frame.fd for frame in slices))
    channel.sendmsg([numbers], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])


def _received_fds(ancillary: list) -> list[int]:
    fds = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(struct.unpack(f"{len(data) // 4}i", data[:len(data) // 4 * 4]))
    return fds


class SegmentSlice(NamedTuple):
    """A frame whose bytes lie in a shared memory segment: `nbytes` from `offset` of the
    memfd `fd`. `segment` names it for the sender (whose number it is): the receiver
    says by it when it no longer needs the bytes. Received, fd is the receiver's own
    copy of the descriptor, which it must close."""

    segment: int
    offset: int
    nbytes: int
    fd: int


def stream_message(frames: list) -> list:
    """A message for a stream socket: a header (frame count, each frame's length), the frames.

    A SegmentSlice frame travels as its descriptor; its fd must go on the descriptor
    channel before the message (send_descriptors, in the order of the frames)."""
    if len(frames) == 1:  # the common case, kept short: one pickle, no large buffers
        return [_ONE_FRAME.pack(1, len(frames[0])), frames[0]]
    parts, lengths = [], []
    for frame in frames:
        if type(frame) is SegmentSlice:
            frame = _SEGMENT.pack(frame.segment, frame.offset, frame.nbytes)
            lengths.append(_SEGMENT.size | _IN_SEGMENT)
        else:
            lengths.append(memoryview(frame).nbytes)
        parts.append(frame)
    header = _COUNT.pack(len(parts)) + b"".join(_LENGTH.pack(length) for length in lengths)
    return [header, *parts]


def segment_slices(frames: list) -> list[SegmentSlice]:
    """The SegmentSlice frames among `frames`, in order."""
    return [frame for frame in frames if type(frame) is SegmentSlice]


class StreamReader:
    """Cuts a stream socket's bytes into messages (lists of frames).

    It reads in chunks of CHUNK bytes, so that many small messages cost one system
    call. A message larger than that gets one buffer of its own that the kernel
    fills directly, and its frames are views into it (no copy after the kernel's).
    A SegmentSlice frame takes the next file descriptor of the descriptor channel,
    `channel`; a reader made without one (a shard's, for a new peer) reads with
    recvmsg until the peer's first bytes bring the channel's end. close() closes the
    channel and the descriptors that no frame took.
    """

    def __init__(self, channel: socket.socket | None = None):
        self._chunk = bytearray(CHUNK)
        self._start = self._end = 0  # unparsed bytes: self._chunk[start:end]
        self._large: tuple | None = None  # (lengths, body, bytes filled) of a large message
        self.channel = channel
        self._fds: deque[tuple[int, int]] = deque()  # (segment, fd) from the channel, unclaimed

    def _receive(self, sock: socket.socket, into: memoryview) -> int:
        if self.channel is not None:
            return sock.recv_into(into)
        got, ancillary, _, _ = sock.recvmsg_into([into], _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
        fds = _received_fds(ancillary)
        if fds:  # the peer's descriptor channel, beside its first bytes
            for extra in fds[1:]:
                os.close(extra)
            try:
                self.channel = socket.socket(fileno=fds[0])
            except OSError:
                os.close(fds[0])
                raise ValueError("a descriptor channel that is not a socket: not a Pype peer") \
                    from None
            self.channel.setblocking(False)
        return got

    def _next_fd(self, segment: int) -> int:
        """The fd of `segment`, the next on the channel."""
        if not self._fds and self.channel is not None:
            try:
                numbers, ancillary, flags, _ = self.channel.recvmsg(
                    MAX_FDS_PER_WRITE * 8, _ANCILLARY, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
            except OSError:  # nothing there (BlockingIOError), or the channel is gone
                numbers, ancillary, flags = b"", [], 0
            fds = _received_fds(ancillary)
            if flags & socket.MSG_CTRUNC or len(numbers) != 8 * len(fds):
                for fd in fds:
                    os.close(fd)
                raise ValueError("file descriptors of shared memory segments were lost "
                                 "(MSG_CTRUNC: this process may have too many files open)")
            self._fds.extend(zip(struct.unpack(f"<{len(fds)}Q", numbers), fds))
        if not self._fds:
            raise ValueError("a shared memory frame without its descriptor: not a Pype peer")
        number, fd = self._fds.popleft()
        if number != segment:
            os.close(fd)
            raise ValueError(f"the descriptor channel is out of step (segment {number} came "
                             f"for segment {segment}): the connection cannot go on")
        return fd

    def read(self, sock: socket.socket) -> list[list] | None:
        """Read once from `sock` (blocking or not); return the messages now complete.

        None when the peer closed the connection; [] when a non-blocking socket had
        nothing (or not a whole message) yet.
        """
        if self._large is not None:
            lengths, body, filled = self._large
            got = self._receive(sock, memoryview(body)[filled:])
            if not got:
                return None
            if filled + got < len(body):
                self._large = (lengths, body, filled + got)
                return []
            self._large = None
            return [self._split(memoryview(body), lengths)]
        if self._start and self._end == len(self._chunk):  # full: move the rest to the front
            rest = self._chunk[self._start:self._end]
            self._chunk[:len(rest)] = rest
            self._start, self._end = 0, len(rest)
        got = self._receive(sock, memoryview(self._chunk)[self._end:])
        if not got:
            return None
        self._end += got
        return self._parse()

    def close(self) -> None:
        """Close the descriptor channel and the descriptors that no frame took."""
        while self._fds:
            os.close(self._fds.popleft()[1])
        if self.channel is not None:
            self.channel.close()

    def _parse(self) -> list[list]:
        messages: list[list] = []
        try:
            return self._parse_into(messages)
        except ValueError:  # not a Pype peer: close what it sent beside the bytes
            for frames in messages:
                for frame in frames:
                    if type(frame) is SegmentSlice:
                        os.close(frame.fd)
            raise

    def _parse_into(self, messages: list[list]) -> list[list]:
        chunk = self._chunk
        while self._end - self._start >= _ONE_FRAME.size:
            count, length = _ONE_FRAME.unpack_from(chunk, self._start)
            if count == 1:  # the common case, kept short: one pickle
                end = self._start + _ONE_FRAME.size + length
                if end <= self._end:
                    messages.append([bytes(memoryview(chunk)[self._start + _ONE_FRAME.size:end])])
                    self._start = end
                    continue
            header = _COUNT.size + count * _LENGTH.size
            if header > CHUNK:
                raise ValueError(f"a message of {count} frames: not a Pype peer")
            if self._end - self._start < header:
                break
            lengths = [_LENGTH.unpack_from(chunk, self._start + _COUNT.size + i * _LENGTH.size)[0]
                       for i in range(count)]
            size = sum(length & ~_IN_SEGMENT for length in lengths)
            body_start = self._start + header
            available = self._end - body_start
            if available >= size:
                body = bytes(memoryview(chunk)[body_start:body_start + size])  # the chunk is reused
                messages.append(self._split(memoryview(body), lengths))
                self._start = body_start + size
            elif header + size > CHUNK:  # larger than a chunk: a buffer of its own
                body = bytearray(size)
                body[:available] = chunk[body_start:self._end]
                self._start = self._end = 0
                self._large = (lengths, body, available)
                break
            else:
                break
        if self._start == self._end:
            self._start = self._end = 0
        return messages


    def _split(self, body: memoryview, lengths: list[int]) -> list:
        frames, offset = [], 0
        for length in lengths:
            if length & _IN_SEGMENT:
                length &= ~_IN_SEGMENT
                if length != _SEGMENT.size:
                    raise ValueError("a shared memory frame of the wrong size: not a Pype peer")
                segment, start, nbytes = _SEGMENT.unpack(body[offset:offset + length])
                frames.append(SegmentSlice(segment, start, nbytes, self._next_fd(segment)))
            else:
                frames.append(body[offset:offset + length])
            offset += length
        return frames


def send_stream(sock: socket.socket, message: list, fds: list[int] | None = None) -> list | None:
    """Write `message` (stream_message frames) to `sock`; return what is left (non-blocking
    socket, kernel buffer full) or None when all was written. Raises OSError if the peer left.

    `fds` go beside the first bytes written (a client's first message: its descriptor
    channel's end), and the list is emptied then."""
    views = message
    while views:
        try:
            if fds:
                sent = sock.sendmsg(views, [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                             struct.pack(f"{len(fds)}i", *fds))])
                fds.clear()
            else:
                sent = sock.sendmsg(views)
        except BlockingIOError:
            return [memoryview(part).cast("B") for part in views]
        if sent == sum(len(part) if type(part) is bytes else memoryview(part).nbytes
                       for part in views):
            return None  # the common case: all of it at once
        rest = []
        for part in views:
            size = memoryview(part).nbytes
            if sent >= size:
                sent -= size
            else:
                rest.append(memoryview(part).cast("B")[sent:])
                sent = 0
        views = rest
    return None
