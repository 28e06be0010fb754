"""How one message travels on the data path's sockets: framing, with no sockets of its own.

A message is a list of frames: a pickle and, out of band, its large buffers
(pype.protocol.dumps). On a ZeroMQ socket each frame is a ZeroMQ frame
(send_frames, receive_frames). On a stream socket (the Unix sockets between a
shard and the clients of its node) a message is a header, the number of frames
and their lengths, then the frames: stream_message() makes it, send_stream()
writes it with one sendmsg, and a StreamReader cuts the bytes read in large
chunks back into messages, so that many small messages cost one system call.
"""

from __future__ import annotations

import socket
import struct

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
CHUNK = 1 << 18  # bytes a stream reader asks the kernel for at once


def stream_message(frames: list) -> list:
    """A message for a stream socket: a header (frame count, each frame's length), the frames."""
    if len(frames) == 1:  # the common case, kept short: one pickle, no large buffers
        return [_ONE_FRAME.pack(1, len(frames[0])), frames[0]]
    lengths = [memoryview(frame).nbytes for frame in frames]
    header = _COUNT.pack(len(frames)) + b"".join(_LENGTH.pack(length) for length in lengths)
    return [header, *frames]


class StreamReader:
    """Cuts a stream socket's bytes into messages (lists of frames).

    It reads in chunks of CHUNK bytes, so that many small messages cost one system
    call. A message larger than that gets one buffer of its own that the kernel
    fills directly, and its frames are views into it (no copy after the kernel's).
    """

    def __init__(self):
        self._chunk = bytearray(CHUNK)
        self._start = self._end = 0  # unparsed bytes: self._chunk[start:end]
        self._large: tuple | None = None  # (lengths, body, bytes filled) of a large message

    def read(self, sock: socket.socket) -> list[list] | None:
        """Read once from `sock` (blocking or not); return the messages now complete.

        None when the peer closed the connection; [] when a non-blocking socket had
        nothing (or not a whole message) yet.
        """
        if self._large is not None:
            lengths, body, filled = self._large
            got = sock.recv_into(memoryview(body)[filled:])
            if not got:
                return None
            if filled + got < len(body):
                self._large = (lengths, body, filled + got)
                return []
            self._large = None
            return [_split(memoryview(body), lengths)]
        if self._start and self._end == len(self._chunk):  # full: move the rest to the front
            rest = self._chunk[self._start:self._end]
            self._chunk[:len(rest)] = rest
            self._start, self._end = 0, len(rest)
        got = sock.recv_into(memoryview(self._chunk)[self._end:])
        if not got:
            return None
        self._end += got
        return self._parse()

    def _parse(self) -> list[list]:
        messages, chunk = [], self._chunk
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
            size = sum(lengths)
            body_start = self._start + header
            available = self._end - body_start
            if available >= size:
                body = bytes(memoryview(chunk)[body_start:body_start + size])  # the chunk is reused
                messages.append(_split(memoryview(body), lengths))
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


def _split(body: memoryview, lengths: list[int]) -> list[memoryview]:
    frames, offset = [], 0
    for length in lengths:
        frames.append(body[offset:offset + length])
        offset += length
    return frames


def send_stream(sock: socket.socket, message: list) -> list | None:
    """Write `message` (stream_message frames) to `sock`; return what is left (non-blocking
    socket, kernel buffer full) or None when all was written. Raises OSError if the peer left."""
    views = message
    while views:
        try:
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
