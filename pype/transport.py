"""The client's side of the native data path: connections to shards, and the Pipeline.

A client on a shard's own Ray node connects to its Unix stream socket (two system
calls a request, no helper thread); a client on another node connects over TCP
with ZeroMQ and CURVE: encrypted, and admitted only with its server's client key,
which comes from the router in the topology (only processes of the Ray cluster can
ask for it). How a message is framed is pype.framing's; what a shard listens on is
pype.shards.listeners'.

On the Unix socket, large buffers cross in shared memory (pype.segments): each
connection has its pool of segments, and tells the shard which of the shard's
segments it no longer reads before its next request.

Why two: measured on a 2-core VM, a ZeroMQ round trip costs 150 us (its I/O
thread hands every message between threads) where a Unix socket costs 54 us,
and 44,000 against 122,000 pipelined messages/s. ZeroMQ earns its place across
the network, with CURVE and reconnection; on one node the plain socket wins.

ZeroMQ's pitfalls, and what the client does about them:
- a socket must never be used by two threads: each thread has its own Pipeline,
  with its own connection per shard;
- a DEALER queues requests for a connection that is not up yet, and messages queued
  for a peer are discarded when it disconnects: a client watches its connection
  (a monitor socket) and resends what a restarted shard never answered, where
  that is safe (pype.protocol.retriable);
- LINGER defaults to forever: every socket here sets 0;
- contexts do not survive fork: each process makes its own, lazily.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from pype import protocol
from pype.errors import NotPrimaryError, ShardRestartedError, ShardUnavailableError
from pype.framing import (
    EVENTS,
    POLLIN,
    StreamReader,
    descriptor_channel,
    receive_frames,
    segment_slices,
    send_descriptors,
    send_frames,
    send_stream,
    stream_message,
)
from pype.segments import Borrowed, SegmentPool

logger = logging.getLogger("pype")

RECONNECT_ATTEMPTS = 10  # new incarnations of one shard a request is sent to before giving up
# ZeroMQ heartbeats on TCP connections: a shard whose machine died sends no FIN or RST,
# and TCP alone would keep the connection open for hours. libzmq's own I/O thread
# answers them, so a shard whose Python is busy (a compaction, a GIL-heavy push) still
# does: only a shard that stopped (its node or process) misses them.
HEARTBEAT_INTERVAL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 5000


@dataclass(frozen=True)
class Keys:
    """The CURVE keys of one server: its shards' public key and the one client key it admits.

    Handed out in the topology; the shards' secret key is not in it.
    """

    server_public: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def generate(cls) -> tuple[Keys, bytes]:
        """New keys, and the server's secret key (for the shards only)."""
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        return cls(server_public, client_public, client_secret), server_secret


@dataclass(frozen=True)
class DataAddress:
    """Where one incarnation of a shard listens."""

    node_id: str      # the Ray node it runs on
    unix: str | None  # path of its Unix socket, for clients on that node
    tcp: str          # ZeroMQ endpoint for clients on other nodes (CURVE)
    pid: int
    primary: bool = True  # False: a backup replica, which serves no client (NotPrimaryError)


def _context() -> zmq.Context:
    """This process's ZeroMQ context, made after any fork."""
    global _process_context
    if _process_context is None or _process_context[0] != os.getpid():
        _process_context = (os.getpid(), zmq.Context())
    return _process_context[1]


_process_context: tuple[int, zmq.Context] | None = None


class Disconnected(Exception):
    """The connection to the shard broke (its process died or became unreachable)."""


class Connection:
    """One thread's connection to one incarnation of a shard, with requests in flight on it.

    send() returns a request id; receive(request_id) waits for that request's
    reply and keeps replies to other requests for later. Not thread-safe: one
    thread uses it (or several, taking turns under a lock, as Producer does).
    """

    address: DataAddress
    endpoint: str
    broken = False

    @staticmethod
    def to(address: DataAddress, keys: Keys, local: bool) -> Connection:
        """A connection to `address`: its Unix socket from its own node, else TCP."""
        if local and address.unix:
            return UnixConnection(address)
        return CurveConnection(address, keys)

    def send(self, caller: tuple, request: tuple) -> int:
        raise NotImplementedError

    def receive(self, request_id: int, timeout: float | None) -> tuple[int, object] | None:
        """(status, value) of request `request_id`; None after `timeout` s (None: no limit).

        Raises Disconnected if the connection breaks first.
        """
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- several requests at once (Pipeline.first) ------------------------------------

    poll_targets: list  # what zmq.Poller watches for this connection's replies (and breaks)

    def pump(self) -> None:
        """Keep the replies that arrived, without waiting (a poll target is ready).

        Raises Disconnected if the connection broke."""
        raise NotImplementedError

    def has_reply(self, request_id: int) -> bool:
        return request_id in self._replies

    def discard(self, request_id: int) -> None:
        """Nobody waits for the reply to `request_id` any more: drop it when it comes."""
        if self._replies.pop(request_id, None) is None:
            self._discarded.add(request_id)

    def _keep(self, request_id: int, reply: tuple[int, object]) -> None:
        """Hold a reply that arrived while waiting for another one."""
        if request_id in self._discarded:
            self._discarded.remove(request_id)
        else:
            self._replies[request_id] = reply


class UnixConnection(Connection):
    """A blocking Unix stream socket to a shard on this node: two system calls a request."""

    def __init__(self, address: DataAddress):
        self.address, self.endpoint = address, address.unix
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.socket.connect(address.unix)
        except OSError as error:  # that incarnation is gone
            self.socket.close()
            raise Disconnected(f"{address.unix}: {error}") from None
        self._channel, self._channel_end = descriptor_channel()  # the end goes with the 1st write
        self._reader = StreamReader(self._channel)
        self._ids = itertools.count(1)
        self._replies: dict[int, tuple[int, object]] = {}
        self._discarded: set[int] = set()
        self._timeout: float | None = None  # as last set on the socket (SO_RCVTIMEO)
        self.poll_targets = [self.socket.fileno()]
        self.pool = SegmentPool()  # this connection's segments, for its large buffers
        self._borrowed = Borrowed(self.socket)  # the shard's segments it maps

    def send(self, caller: tuple, request: tuple) -> int:
        if self.broken:
            raise Disconnected(self.endpoint)
        request_id = next(self._ids)
        frames = protocol.encode_request(request_id, caller, request)
        message = self._release_notice() if self._borrowed.released else []
        try:
            if len(frames) > 1:
                frames = self.pool.place(frames)
                slices = segment_slices(frames)
                if slices:
                    send_descriptors(self._channel, slices)
            message += stream_message(frames)
            if self._channel_end is None:
                send_stream(self.socket, message)
            else:
                send_stream(self.socket, message, [self._channel_end.fileno()])
                self._channel_end.close()
                self._channel_end = None
        except OSError as error:
            self.broken = True
            raise Disconnected(f"{self.endpoint}: {error}") from None
        except BaseException:  # interrupted: a record or bytes may have gone without the rest
            self.broken = True
            raise
        return request_id

    def _release_notice(self) -> list:
        notice = protocol.SegmentsReleased(self._borrowed.take_released())
        return stream_message(protocol.encode_request(protocol.NOTICE, ("", 0), notice))

    def _take(self, messages: list[list]) -> None:
        """Keep the replies among `messages`, and the notices' news."""
        for frames in messages:
            if len(frames) > 1:
                try:
                    frames = self._borrowed.attach(frames)
                except OSError as error:  # its request fails, saying why; the others go on
                    request_id = protocol.request_id_of(frames)
                    if request_id is not None:
                        self._keep(request_id, (protocol.ERROR, error))
                    continue
            try:
                got_id, status, value = protocol.loads(frames)
            except Exception as error:  # noqa: BLE001 - e.g. an item's class not importable here
                request_id = protocol.request_id_of(frames)
                if request_id is not None:
                    self._keep(request_id, (protocol.ERROR, TypeError(
                        f"this process could not read the shard's answer: {error!r}")))
                continue
            if got_id == protocol.NOTICE:
                if status == protocol.RESULT:
                    self.pool.freed(value.segments)
            else:
                self._keep(got_id, (status, value))

    def receive(self, request_id: int, timeout: float | None) -> tuple[int, object] | None:
        reply = self._replies.pop(request_id, None)
        if reply is not None:
            return reply
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._set_timeout(left)
            else:
                self._set_timeout(None)
            self.pump()
            reply = self._replies.pop(request_id, None)
            if reply is not None:
                return reply

    def pump(self) -> None:
        try:
            messages = self._reader.read(self.socket)
        except BlockingIOError:  # a blocking receive's timeout passed
            return
        except (OSError, ValueError) as error:
            logger.debug("pype: connection to %s broke: %s", self.endpoint, error)
            messages = None
        if messages is None:
            self.broken = True
            raise Disconnected(self.endpoint)
        self._take(messages)

    def _set_timeout(self, timeout: float | None) -> None:
        """Bound a blocking receive in the kernel (SO_RCVTIMEO), not with Python's socket
        timeout, which polls before every call. Only a change costs a system call; a
        timeout a little longer than asked is fine (deadlines are checked again)."""
        if timeout is not None:
            timeout = max(0.001, round(timeout, 1) + 0.1)
        if timeout != self._timeout:
            seconds = 0 if timeout is None else int(timeout)
            micros = 0 if timeout is None else int((timeout - seconds) * 1e6)
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                   struct.pack("ll", seconds, micros))
            self._timeout = timeout

    def close(self) -> None:
        """Close the connection. While this process still reads segments the shard lent
        it, the socket stays open, so that the shard keeps them as they are."""
        self._reader.close()
        if self._channel_end is not None:
            self._channel_end.close()
        self.pool.close()
        self._borrowed.close_when_unused()


class CurveConnection(Connection):
    """A ZeroMQ DEALER socket, CURVE-encrypted, to a shard on another node."""

    def __init__(self, address: DataAddress, keys: Keys):
        context = _context()
        self.address = address
        self.socket = context.socket(zmq.DEALER)
        self.socket.linger = 0
        self.socket.sndhwm = 0
        self.socket.rcvhwm = 0
        self.socket.heartbeat_ivl = HEARTBEAT_INTERVAL_MS
        self.socket.heartbeat_timeout = HEARTBEAT_TIMEOUT_MS
        self.socket.curve_serverkey = keys.server_public
        self.socket.curve_publickey = keys.client_public
        self.socket.curve_secretkey = keys.client_secret
        endpoint = self.endpoint = address.tcp
        # Any of these means the shard's incarnation at this endpoint is gone (or refuses us).
        self._monitor = self.socket.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self.socket.connect(endpoint)
        self._poll_items = [(self.socket, POLLIN), (self._monitor, POLLIN)]
        self._ids = itertools.count(1)
        self._replies: dict[int, tuple[int, object]] = {}
        self._discarded: set[int] = set()
        self.poll_targets = [self.socket, self._monitor]  # the monitor says when it broke

    def send(self, caller: tuple, request: tuple) -> int:
        if self._monitor.getsockopt(EVENTS) & POLLIN:
            self._check_monitor()  # broke while idle: say so before anything is sent
        if self.broken:
            raise Disconnected(self.endpoint)
        request_id = next(self._ids)
        send_frames(self.socket, protocol.encode_request(request_id, caller, request))
        return request_id

    def receive(self, request_id: int, timeout: float | None) -> tuple[int, object] | None:
        reply = self._replies.pop(request_id, None)
        if reply is not None:
            return reply
        socket = self.socket
        socket_ready = socket.getsockopt
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while socket_ready(EVENTS) & POLLIN:
                got_id, status, value = protocol.loads(receive_frames(socket))
                if got_id == request_id:
                    return status, value
                self._keep(got_id, (status, value))
            wait = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            events = zmq.zmq_poll(self._poll_items, wait)
            if len(events) > (socket in dict(events)):  # the monitor spoke
                self._check_monitor()
            if not events and deadline is not None and time.monotonic() >= deadline:
                return None

    def pump(self) -> None:
        while self.socket.getsockopt(EVENTS) & POLLIN:  # what came before a break first
            got_id, status, value = protocol.loads(receive_frames(self.socket))
            self._keep(got_id, (status, value))
        if self._monitor.getsockopt(EVENTS) & POLLIN:
            self._check_monitor()

    def _check_monitor(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            self.broken = True
            if event["event"] & (zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED):
                raise Disconnected(self.endpoint)
            logger.error("pype: the shard at %s refused this client's key (event %s)",
                         self.endpoint, event["event"])
            raise Disconnected(self.endpoint)

    def close(self) -> None:
        self.socket.disable_monitor()
        self._monitor.close(linger=0)
        self.socket.close(linger=0)


class Pipeline:
    """Requests to the shards of one server, several in flight per shard, resent after restarts.

    Each thread of a process has its own (sockets are not thread-safe); a Producer
    or Consumer has one of its own. send() returns a ticket; result(ticket) waits
    for its answer. A push without block=True gets this pipeline's producer id
    and the next sequence number for its shard, so that a restarted shard applies
    it once however often it is sent.

    When a connection breaks (the shard's process died), the pipeline asks
    locate(index) for the shard's new address (Ray restarts the actor), connects,
    and sends again, in their order, the requests still unanswered that are safe
    to send again (protocol.retriable); the others fail with ShardRestartedError. A shard
    that does not come back within request_timeout seconds fails them with
    ShardUnavailableError. So does one that stops answering on an open connection,
    unless it is `replicated` and another replica leads by then: its primary stopped
    (the router replaces one silent for half of request_timeout), and the pipeline
    goes to the new one as after a restart.
    """

    def __init__(self, keys: Keys, locate, local_node: str, request_timeout: float,
                 replicated: bool = False):
        self._keys = keys
        self._replicated = replicated
        self._locate = locate              # (index, fresh) -> DataAddress (asks Ray; may raise)
        self._local_node = local_node
        self._timeout = request_timeout
        self._producer = int.from_bytes(os.urandom(8), "little") >> 1
        self._sequences: dict[int, int] = {}
        self._connections: dict[int, Connection] = {}
        self._tickets = itertools.count(1)
        self._in_flight: dict[int, dict[int, list]] = {}  # shard -> ticket -> [request_id, caller, request]
        self._failures: dict[int, Exception] = {}  # ticket -> why it failed in a reconnect
        self._answered: dict[int, tuple] = {}  # ticket -> its reply, kept through a reconnect
        self._pull_lost: set[int] = set()  # PushPulls whose push alone was sent again

    def send(self, index: int, caller: tuple, request: tuple) -> tuple[int, int]:
        in_flight = self._in_flight.setdefault(index, {})
        if protocol.takes_a_sequence(request):
            sequence = self._sequences.get(index, 0) + 1
            self._sequences[index] = sequence
            request = protocol.numbered(request, (self._producer, sequence, _floor(in_flight, sequence)))
        ticket = next(self._tickets)
        entry = [0, caller, request]
        in_flight[ticket] = entry
        try:
            entry[0] = self._connection(index).send(caller, request)
        except Disconnected:  # found broken before sending: this one is safe to send anew
            self._reconnect(index, unsent=ticket)
            if ticket in self._failures:  # the shard did not come back: it was never sent
                raise self._failures.pop(ticket) from None
        except BaseException:  # not sent (an item that cannot be pickled): not in flight
            del self._in_flight[index][ticket]
            raise
        return index, ticket

    def result(self, ticket: tuple[int, int], wait: float | None = 0.0) -> object:
        """The answer to `ticket`, or its error raised. `wait`: seconds the request may
        wait in the shard (None: no limit); the answer may take request_timeout longer."""
        index, number = ticket
        in_flight = self._in_flight[index]
        limit = None if wait is None else wait + self._timeout
        failovers = 0
        while True:
            entry = in_flight.get(number)
            if entry is None and number in self._answered:  # answered before a reconnect
                return self._outcome(index, number, *self._answered.pop(number))
            if entry is None:  # failed in a reconnect
                self._pull_lost.discard(number)
                raise self._failures.pop(number)
            try:
                reply = self._connections[index].receive(entry[0], limit)
            except Disconnected:
                self._reconnect(index)
                continue
            if (reply is None and self._replicated and failovers < RECONNECT_ATTEMPTS
                    and self._replaced(index)):
                failovers += 1  # a primary that stopped: to the one that replaced it
                self._reconnect(index)
                continue
            if reply is None:  # connected, but no answer in time: give up on this connection
                error = unreachable(index, self._timeout, "no answer")
                self._fail_all(index, error)
                del self._failures[number]
                self._pull_lost.discard(number)
                raise error
            status, value = reply
            if status == protocol.ERROR and type(value) is NotPrimaryError:
                failovers += 1  # this replica does not lead: to the new primary, as after
                if failovers <= RECONNECT_ATTEMPTS:  # a restart
                    self._reconnect(index)
                    continue
            del in_flight[number]
            return self._outcome(index, number, status, value)

    def _outcome(self, index: int, number: int, status: int, value: object) -> object:
        """A request's answer, or its error raised; a PushPull whose push alone was sent
        again (after a reconnect) has its push's answer: its pull's fate is unknown."""
        lost = number in self._pull_lost
        self._pull_lost.discard(number)
        if status == protocol.ERROR:
            raise value
        if lost:
            raise ShardRestartedError(
                f"shard {index} restarted or failed over while this push_pull was in flight: "
                f"its push was applied (once), its pull may or may not have taken items")
        return value

    def _replaced(self, index: int) -> bool:
        """Does shard `index` have another primary than the one connected (which did not
        answer)? A slow primary that leads still is no reason to send anything again."""
        try:
            return self._locate(index, True) != self._connections[index].address
        except ShardUnavailableError:
            return False

    def call(self, index: int, caller: tuple, request: tuple, wait: float | None = 0.0) -> object:
        return self.result(self.send(index, caller, request), wait)

    def first(self, tickets: list[tuple[int, int]], timeout: float | None) -> tuple[int, int] | None:
        """The first of `tickets` whose answer is in (result() then returns it at once),
        or None after `timeout` seconds (None: no limit). The tickets may go to several
        shards: one poll waits on all their connections."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            waiting_on: dict = {}
            for ticket in tickets:
                index, number = ticket
                entry = self._in_flight.get(index, {}).get(number)
                connection = self._connections.get(index)
                if entry is None or connection is None or connection.has_reply(entry[0]):
                    return ticket  # answered, or failed (result() raises its error)
                for target in connection.poll_targets:
                    waiting_on[target] = index
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            poller = zmq.Poller()
            for target in waiting_on:
                poller.register(target, zmq.POLLIN)
            for target, _ in poller.poll(None if left is None else max(1, int(left * 1000))):
                index = waiting_on[target]
                try:
                    self._connections[index].pump()
                except Disconnected:
                    self._reconnect(index)

    def forget(self, ticket: tuple[int, int]) -> None:
        """Nobody will ask for the answer to `ticket` (answered or not): drop it."""
        index, number = ticket
        entry = self._in_flight.get(index, {}).pop(number, None)
        self._failures.pop(number, None)
        self._answered.pop(number, None)
        self._pull_lost.discard(number)
        connection = self._connections.get(index)
        if entry is not None and connection is not None:
            connection.discard(entry[0])

    def _connection(self, index: int, fresh: bool = False) -> Connection:
        connection = self._connections.get(index)
        if connection is None:
            address = self._locate(index, fresh)
            try:
                connection = Connection.to(address, self._keys, address.node_id == self._local_node)
            except Disconnected:  # the incarnation we knew is gone: ask where the new one is
                connection = Connection.to(self._locate(index, True), self._keys,
                                           address.node_id == self._local_node)
            self._connections[index] = connection
        return connection

    def _drop(self, index: int) -> None:
        connection = self._connections.pop(index, None)
        if connection is not None:
            connection.close()

    def _reconnect(self, index: int, unsent: int | None = None) -> None:
        """The connection to shard `index` broke: connect to its new incarnation and send
        again, in order, what is safe to send again (`unsent`: a ticket never sent).

        What is not safe to send again fails with ShardRestartedError, or with the
        ShardUnavailableError that says the shard did not come back."""
        in_flight = self._in_flight.get(index, {})
        self._keep_answers(index, in_flight)
        unsafe = {}
        for ticket, entry in in_flight.items():
            if ticket == unsent or protocol.retriable(entry[2]):
                continue
            push = protocol.push_of(entry[2])
            if push is not None and type(entry[2]) is not protocol.Push and protocol.retriable(push):
                entry[2] = push  # a PushPull: its push goes again alone, its pull is lost
                self._pull_lost.add(ticket)
            else:
                unsafe[ticket] = type(entry[2]).__name__.lower()
        for ticket in unsafe:
            del in_flight[ticket]
        unavailable = self._send_again(index, in_flight)
        for ticket, kind in unsafe.items():
            self._failures[ticket] = unavailable or ShardRestartedError(
                f"shard {index} restarted while this {kind} was in flight; "
                f"it may or may not have been applied")

    def _keep_answers(self, index: int, in_flight: dict) -> None:
        """Take out of `in_flight` the requests whose replies came before the connection
        broke, keeping the replies: sent again, a push the shard refused (a full queue)
        would meet its exactly-once check, which a later push of this pipeline passed,
        and be answered as applied. A backup's NotPrimaryError is no answer: sent again."""
        connection = self._connections.get(index)
        if connection is None:
            return
        poller = zmq.Poller()  # replies still unread in the socket, before its end
        for target in connection.poll_targets:
            poller.register(target, zmq.POLLIN)
        try:
            if poller.poll(0):
                connection.pump()
        except (Disconnected, OSError, zmq.ZMQError):
            pass  # what came before the break was kept
        for ticket, entry in list(in_flight.items()):
            if connection.has_reply(entry[0]):
                status, value = connection.receive(entry[0], 0)
                if not (status == protocol.ERROR and type(value) is NotPrimaryError):
                    self._answered[ticket] = (status, value)
                    del in_flight[ticket]

    def _send_again(self, index: int, in_flight: dict) -> ShardUnavailableError | None:
        """Send `in_flight` to the shard's new incarnation; on failure fail them all and
        return the error."""
        error = unreachable(index, self._timeout, "it keeps dying")
        for _ in range(RECONNECT_ATTEMPTS):
            self._drop(index)
            try:
                connection = self._connection(index, fresh=True)  # raises ShardUnavailableError
                for entry in in_flight.values():
                    entry[0] = connection.send(entry[1], entry[2])
                return None
            except Disconnected:  # the new incarnation died too: ask again
                continue
            except ShardUnavailableError as unavailable:
                error = unavailable
                break
        self._fail_all(index, error)
        return error

    def _fail_all(self, index: int, error: Exception) -> None:
        """Fail every request in flight to shard `index` with `error` (those answered
        before keep their answers); drop the connection."""
        self._keep_answers(index, self._in_flight.get(index, {}))
        self._drop(index)
        for ticket in list(self._in_flight.get(index, {})):
            del self._in_flight[index][ticket]
            self._failures[ticket] = error

    def close(self) -> None:
        for index in list(self._connections):
            self._drop(index)


def _floor(in_flight: dict, sequence: int) -> int:
    """The lowest sequence number among the numbered pushes `in_flight` (in the order
    sent, so the first one's), or `sequence` if there are none: the shard may forget
    the answers below it (pype.shards.producers), which will not be sent again."""
    for _, _, request in in_flight.values():
        push = protocol.push_of(request)
        if push is not None and push.producer is not None:
            return push.producer[1]
    return sequence


def unreachable(index: int, seconds: float, why: str) -> ShardUnavailableError:
    return ShardUnavailableError(
        f"shard {index} did not answer within {seconds:g} s (transport.request_timeout): {why}")
