"""A shard's I/O loop: the thread that serves the data sockets for the request engine.

It waits on the shard's listening sockets (pype.shards.listeners) and the peers of
its Unix socket with epoll, and on an eventfd that other threads write to wake it.
Each native request it reads goes to the engine (pype.shards.engine) under the
engine's lock, with a reply function that writes the answer back to the peer it
came from: over the Unix socket, or over the ZeroMQ socket, which only this thread
may use (an answer made on a Ray thread goes through an outbox and the eventfd).
Between events it sleeps until the engine's next deadline or housekeeping tick.
Large buffers that the Unix peers send in shared memory segments are held,
lent on and given back by pype.shards.segments; this loop moves the notices.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from pype import protocol
from pype.framing import (
    EVENTS,
    MAX_FDS_PER_WRITE,
    POLLIN,
    receive_frames,
    segment_slices,
    send_descriptors,
    send_frames,
    stream_message,
)
from pype.payloads import resolved
from pype.shards.engine import Reply, ShardEngine
from pype.shards.listeners import ShardSockets, UnixPeer
from pype.shards.segments import SharedSegments

logger = logging.getLogger("pype")

_WAKEUP, _ACCEPT, _TCP = object(), object(), object()  # what woke the loop, besides a peer
HOUSEKEEPING_INTERVAL = 0.1  # seconds between looks for expired leases and new queue names
MAX_BATCH = 256              # messages read from one socket before the loop looks elsewhere


def _answer(request_id: int, status: int, value: Any) -> list:
    """The frames of a native request's answer."""
    if status == protocol.RESULT and type(value) is list and value:
        value = resolved(value)  # items pushed by reference travel by value here
    try:
        return protocol.dumps((request_id, status, value))
    except Exception as error:  # noqa: BLE001 - an answer that cannot be pickled
        return protocol.dumps((request_id, protocol.ERROR, TypeError(
            f"the shard's answer could not be sent: {error!r}")))


class _TcpReply:
    """Sends the answer to a native request back over the ZeroMQ socket it came on."""

    __slots__ = ("identity", "loop", "request_id", "socket")

    def __init__(self, loop: ShardLoop, identity: bytes, request_id: int):
        self.loop, self.identity, self.request_id = loop, identity, request_id
        self.socket = loop.tcp_socket

    def __call__(self, status: int, value: Any) -> None:
        frames = _answer(self.request_id, status, value)
        if not self.loop.on_loop_thread():
            self.loop.send_tcp_later(self.identity, frames)
            return
        try:
            send_frames(self.socket, frames, self.identity)
            self.loop.tcp_used()
        except zmq.ZMQError as error:  # the client is gone (ROUTER_MANDATORY): nobody to tell
            logger.debug("pype shard: a client left before its answer: %s", error)


class _UnixReply:
    """Sends the answer to a native request back to the Unix peer it came from."""

    __slots__ = ("loop", "peer", "request_id")

    def __init__(self, loop: ShardLoop, peer: UnixPeer, request_id: int):
        self.loop, self.peer, self.request_id = loop, peer, request_id

    def __call__(self, status: int, value: Any) -> None:
        self.loop.send_to(self.peer, _answer(self.request_id, status, value))


class ShardLoop:
    """Serves one shard's data sockets on a thread of its own; see the module docstring.

    housekeeping(engine), if given, runs every housekeeping_interval seconds on this
    thread, under the engine's lock, after the engine's own (expired leases).
    """

    def __init__(self, engine: ShardEngine, sockets: ShardSockets,
                 housekeeping: Callable[[ShardEngine], None] | None = None,
                 housekeeping_interval: float = HOUSEKEEPING_INTERVAL):
        self.engine = engine
        self.index = engine.index
        self._sockets = sockets
        self._housekeeping = housekeeping
        self._housekeeping_interval = housekeeping_interval
        self._tcp_outbox: deque = deque()  # answers for TCP peers made on Ray's threads
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK)
        self._epoll = select.epoll()
        self._sources: dict[int, object] = {}  # file descriptor -> _WAKEUP, _ACCEPT, _TCP or a peer
        self._tcp_unread = True  # look at the ZeroMQ socket's EVENTS before sleeping
        self._stopping = False
        self.segments = SharedSegments(wake=self._wake_for_segments)
        self._thread = threading.Thread(target=self._run, name=f"pype-shard-{engine.index}",
                                        daemon=True)
        engine.new_deadline = self._wake_for_a_deadline
        self._thread.start()

    # -- entry points from other threads ------------------------------------------------

    def on_loop_thread(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def send_tcp_later(self, identity: bytes, frames: list) -> None:
        """An answer for a TCP peer, made on a Ray thread: the loop's thread sends it (it
        alone may use the ZeroMQ socket)."""
        self._tcp_outbox.append((identity, frames))
        os.eventfd_write(self._wakeup, 1)

    def _wake_for_segments(self) -> None:
        if not self.on_loop_thread():  # a segment to free: its producer waits to hear of it
            os.eventfd_write(self._wakeup, 1)

    def _wake_for_a_deadline(self) -> None:
        if not self.on_loop_thread():  # the loop sleeps until its old deadline: wake it
            os.eventfd_write(self._wakeup, 1)

    def stop(self) -> None:
        self._stopping = True
        os.eventfd_write(self._wakeup, 1)
        self._thread.join(timeout=5)
        self._sockets.close()

    @property
    def address(self):
        """Where the data sockets listen (a pype.transport.DataAddress)."""
        return self._sockets.address

    # -- the thread -----------------------------------------------------------------------

    def _watch(self, fd: int, source: object, mask: int = select.EPOLLIN) -> None:
        self._sources[fd] = source
        self._epoll.register(fd, mask)

    def _run(self) -> None:
        poll = self._epoll.poll
        self._watch(self._wakeup, _WAKEUP)
        # ZeroMQ's file descriptor is edge-triggered: it only says "look at the socket's
        # EVENTS". _serve_tcp() does, whenever it fired or the socket was used since.
        self._watch(self._sockets.tcp.getsockopt(zmq.FD), _TCP)
        if self._sockets.unix is not None:
            self._watch(self._sockets.unix.fileno(), _ACCEPT)
        engine = self.engine
        next_housekeeping = engine.clock()
        while not self._stopping:
            now = engine.clock()
            deadline = engine.next_deadline()
            until = next_housekeeping if deadline is None else min(next_housekeeping, deadline)
            events = poll(0 if self._tcp_unread else max(0.0, until - now))
            with engine.lock:
                try:
                    next_housekeeping = self._serve(events, next_housekeeping)
                except Exception:  # the loop must outlive any one request's bug
                    logger.exception("pype shard %d: the loop failed; it goes on", self.index)

    def _serve(self, events: list, next_housekeeping: float) -> float:
        """Serve what woke the loop, then deadlines and housekeeping (lock held)."""
        sources = self._sources
        for fd, mask in events:
            source = sources.get(fd)
            if source is _WAKEUP:
                os.eventfd_read(self._wakeup)
                self._send_tcp_outbox()
            elif source is _ACCEPT:
                self._accept()
            elif source is _TCP:
                self._tcp_unread = True
            elif source is not None:
                if mask & select.EPOLLOUT:
                    self._flush(source)
                if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    self._serve_unix(source)
        if self._tcp_unread:
            self._serve_tcp()
        now = self.engine.clock()
        self.engine.expire(now)
        if now >= next_housekeeping:
            next_housekeeping = now + self._housekeeping_interval
            self.engine.housekeep()
            if self._housekeeping is not None:
                self._housekeeping(self.engine)
        if self.segments.has_news:  # after expiry and housekeeping, which may drop items
            self._send_segment_notices()
        return next_housekeeping

    def _send_tcp_outbox(self) -> None:
        socket = self._sockets.tcp
        while self._tcp_outbox:
            identity, frames = self._tcp_outbox.popleft()
            try:
                send_frames(socket, frames, identity)
            except zmq.ZMQError as error:  # the client is gone (ROUTER_MANDATORY)
                logger.debug("pype shard: a client left before its answer: %s", error)
        self.tcp_used()

    def _serve_tcp(self) -> None:
        """Run up to MAX_BATCH requests that wait on the ZeroMQ socket."""
        socket = self._sockets.tcp
        ready, receive = socket.getsockopt, socket.recv
        for _ in range(MAX_BATCH):
            if not ready(EVENTS) & POLLIN:
                self._tcp_unread = False
                return
            identity = receive()
            self.engine.counts["tcp_requests"] += 1
            reply_to = functools.partial(_TcpReply, self, identity)
            request = self._decode(receive_frames(socket), reply_to)
            if request is not None:
                request_id, (caller_id, after), request = request
                self.engine.dispatch(request, caller_id, after, True, reply_to(request_id))

    @property
    def tcp_socket(self) -> zmq.Socket:
        return self._sockets.tcp

    def tcp_used(self) -> None:
        """A send on the ZeroMQ socket may have taken its descriptor's edge: look again."""
        self._tcp_unread = True

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._sockets.unix.accept()
            except BlockingIOError:
                return
            except OSError as error:  # out of file descriptors: it waits in the backlog
                logger.warning("pype shard %d: could not accept a client: %r", self.index, error)
                return
            self._watch(sock.fileno(), UnixPeer(sock))

    def _serve_unix(self, peer: UnixPeer) -> None:
        """Run the requests a Unix peer sent; forget the peer if it left."""
        try:
            messages = peer.reader.read(peer.socket)
        except (OSError, ValueError) as error:
            logger.warning("pype shard %d: dropped a client: %r", self.index, error)
            messages = None
        if messages is None:
            self._drop(peer)
            return
        peer.corked = True  # the answers to this read's requests leave in one write
        reply_to = functools.partial(_UnixReply, self, peer)
        for frames in messages:
            if len(frames) > 1:
                try:
                    frames = self.segments.received(peer, frames)
                except ValueError as error:
                    self._refuse(frames, reply_to, error)
                    continue
            request = self._decode(frames, reply_to)
            if request is None:
                continue
            request_id, (caller_id, after), request = request
            if type(request) is protocol.SegmentsReleased:
                self.segments.released(peer, request.segments)
            else:
                self.engine.dispatch(request, caller_id, after, True, reply_to(request_id))
        peer.corked = False
        self._flush(peer)

    def send_to(self, peer: UnixPeer, frames: list) -> None:
        """Send an answer to a Unix peer; what the kernel cannot take now goes when it can.
        Its buffers that lie in shared memory segments go as segments."""
        if peer.closed:
            return  # it left: nobody to tell
        if len(frames) > 1 and peer.reader.channel is not None:
            frames = self._lend(peer, frames)
        peer.outgoing.extend(stream_message(frames))
        if not peer.corked:
            self._flush(peer)

    def _lend(self, peer: UnixPeer, frames: list) -> list:
        """`frames` with the buffers that lie in segments lent to `peer`, their
        descriptors sent ahead on its channel; as they were if the channel is full."""
        lent = self.segments.lend(peer, frames, MAX_FDS_PER_WRITE)
        slices = segment_slices(lent)
        if not slices:
            return frames
        try:
            send_descriptors(peer.reader.channel, slices)
        except OSError:  # full (the client reads slowly) or gone: by value, then
            self.segments.released(peer, [frame.segment for frame in slices])
            return frames
        return lent

    def _send_segment_notices(self) -> None:
        for peer, numbers in self.segments.collect().items():
            self.send_to(peer, protocol.dumps((protocol.NOTICE, protocol.RESULT,
                                               protocol.SegmentsFreed(tuple(numbers)))))

    def _flush(self, peer: UnixPeer) -> None:
        """Write what waits for `peer`; watch for room in its socket while some still waits."""
        if peer.closed:
            return
        was_waiting = peer.watching_output
        try:
            waiting = peer.flush()
        except OSError:
            self._drop(peer)
            return
        if waiting != was_waiting:
            mask = select.EPOLLIN | select.EPOLLOUT if waiting else select.EPOLLIN
            self._epoll.modify(peer.socket.fileno(), mask)
            peer.watching_output = waiting

    def _drop(self, peer: UnixPeer) -> None:
        if not peer.closed:
            peer.closed = True
            fd = peer.socket.fileno()
            self._epoll.unregister(fd)
            del self._sources[fd]
            peer.socket.close()
            peer.reader.close()
            peer.outgoing = []  # answers to nobody: let their items go
            self.segments.left(peer)

    def _decode(self, frames: list, reply_to: Callable[[int], Reply]) -> tuple | None:
        """(request_id, caller, request) of a native message, or None if it cannot be read.

        A request the shard cannot unpickle (most often an item of a class that this
        process cannot import, such as one defined in the driver's __main__) is
        answered with a TypeError when its request id can be read, so that its caller
        does not wait for an answer that never comes.
        """
        self.engine.counts["native_requests"] += 1
        try:
            return protocol.decode_request(frames)
        except Exception as error:  # noqa: BLE001 - a malformed message from an admitted peer
            self._refuse(frames, reply_to, TypeError(
                f"the shard could not read this request ({error!r}); its items must be "
                f"importable in the shard's process (define their classes in a module, "
                f"not in the driver's __main__)"))
            return None

    def _refuse(self, frames: list, reply_to: Callable[[int], Reply], error: Exception) -> None:
        """Answer a request the shard cannot run with `error`, if its id can be read."""
        request_id = protocol.request_id_of(frames)
        if request_id is None:
            logger.warning("pype shard %d: dropped a malformed message: %r", self.index, error)
        else:
            reply_to(request_id)(protocol.ERROR, error)

