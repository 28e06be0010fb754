"""The native data path's sockets: what a shard listens on, and one thread's connection to it.

A shard listens on two ZeroMQ ROUTER sockets. Clients on its own Ray node connect
to an ipc socket: a socket file in a directory only its owner can enter, which is
the authentication (the same user's processes). Clients on other nodes connect
over TCP on the node's address, with CURVE: the connection is encrypted and the
shard's ZAP handler admits only the client key of its server. Keys come from the
router in the topology, which only processes of the Ray cluster can ask for, so
nothing from anyone else ever reaches pickle.

ZeroMQ's pitfalls, and what this module does about them:
- a socket must never be used by two threads: each thread has its own connection
  per shard (Connections), and a shard's sockets belong to its loop thread;
- a ROUTER drops a reply silently at its high-water mark or to an unknown peer:
  the shard's sockets set ROUTER_MANDATORY and no high-water mark;
- a DEALER queues requests for a connection that is not up yet, and messages queued
  for a peer are discarded when it disconnects: a client watches its connection
  (a monitor socket) and resends what a restarted shard never answered, where
  that is safe (see pype.client);
- LINGER defaults to forever: every socket here sets 0;
- contexts do not survive fork: each process makes its own, lazily.
"""

from __future__ import annotations

import itertools
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from pype import protocol
from pype.errors import ShardRestartedError, ShardUnavailableError

logger = logging.getLogger("pype")

ZAP_DOMAIN = "pype"
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

    node_id: str     # the Ray node it runs on
    ipc: str | None  # endpoint for clients on that node
    tcp: str         # endpoint for clients on other nodes (CURVE)
    pid: int


def _context() -> zmq.Context:
    """This process's ZeroMQ context, made after any fork."""
    global _process_context
    if _process_context is None or _process_context[0] != os.getpid():
        _process_context = (os.getpid(), zmq.Context())
    return _process_context[1]


_process_context: tuple[int, zmq.Context] | None = None


# -- the shard's side ---------------------------------------------------------------------

class _AdmitOneKey:
    """ZAP credentials provider: admits exactly the server's client key."""

    def __init__(self, client_public: bytes):
        self._client = client_public

    def callback(self, domain: str, key: bytes) -> bool:
        """key: the client's public key, Z85-encoded (as pyzmq's authenticator passes it)."""
        return key == self._client


def private_directory(path: Path) -> Path:
    """Create `path` with mode 0700, or check that an existing one is ours and private.

    Raises PermissionError for a directory that others could enter: its socket
    files would admit them.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise PermissionError(f"{path} must belong to this user and admit nobody else "
                              f"(mode 0700); it has mode {stat.S_IMODE(info.st_mode):o}")
    return path


class ShardSockets:
    """A shard's listening sockets (used only by its loop thread) and its address."""

    def __init__(self, node_id: str, node_ip: str, keys: Keys, server_secret: bytes,
                 ipc_dir: Path | None, tcp_port: int, name: str):
        self.context = zmq.Context()
        self._auth = ThreadAuthenticator(self.context)
        self._auth.start()
        self._auth.configure_curve_callback(ZAP_DOMAIN, _AdmitOneKey(keys.client_public))
        self.tcp = self._router()
        self.tcp.curve_server = True
        self.tcp.curve_secretkey = server_secret
        self.tcp.curve_publickey = keys.server_public
        self.tcp.zap_domain = ZAP_DOMAIN.encode()
        if tcp_port:
            self.tcp.bind(f"tcp://{node_ip}:{tcp_port}")
            tcp_endpoint = f"tcp://{node_ip}:{tcp_port}"
        else:
            port = self.tcp.bind_to_random_port(f"tcp://{node_ip}")
            tcp_endpoint = f"tcp://{node_ip}:{port}"
        self.ipc = None
        self._ipc_path = None
        if ipc_dir is not None:
            directory = private_directory(ipc_dir)
            _remove_stale_sockets(directory)
            self._ipc_path = directory / f"{name}-{os.getpid()}.sock"
            self.ipc = self._router()
            self.ipc.bind(f"ipc://{self._ipc_path}")
        self.address = DataAddress(node_id, self.ipc and f"ipc://{self._ipc_path}", tcp_endpoint,
                                   os.getpid())

    def _router(self) -> zmq.Socket:
        socket = self.context.socket(zmq.ROUTER)
        socket.linger = 0
        socket.router_mandatory = True  # a reply to a peer that left raises, never vanishes
        socket.sndhwm = 0               # nor is it dropped at a high-water mark
        socket.rcvhwm = 0
        return socket

    @property
    def sockets(self) -> list[zmq.Socket]:
        return [socket for socket in (self.tcp, self.ipc) if socket is not None]

    def close(self) -> None:
        for socket in self.sockets:
            socket.close(linger=0)
        self._auth.stop()
        self.context.term()
        if self._ipc_path is not None:
            self._ipc_path.unlink(missing_ok=True)


def _remove_stale_sockets(directory: Path) -> None:
    """Remove socket files of shard processes that are gone (their name ends in the pid)."""
    for path in directory.glob("*.sock"):
        try:
            pid = int(path.stem.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except (IndexError, ValueError, ProcessLookupError):
            path.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, another user's


# -- the client's side ---------------------------------------------------------------------

class Disconnected(Exception):
    """The connection to the shard broke (its process died or became unreachable)."""


class Connection:
    """One thread's socket to one incarnation of a shard, with requests in flight on it.

    send() returns a request id; receive(request_id) waits for that request's
    reply and keeps replies to other requests for later. Not thread-safe: one
    thread uses it (or several, taking turns under a lock, as Producer does).
    """

    def __init__(self, address: DataAddress, keys: Keys, local: bool):
        context = _context()
        self.address = address
        self.socket = context.socket(zmq.DEALER)
        self.socket.linger = 0
        self.socket.sndhwm = 0
        self.socket.rcvhwm = 0
        if local and address.ipc:
            endpoint = address.ipc
        else:
            endpoint = address.tcp
            self.socket.curve_serverkey = keys.server_public
            self.socket.curve_publickey = keys.client_public
            self.socket.curve_secretkey = keys.client_secret
        self.endpoint = endpoint
        # Any of these means the shard's incarnation at this endpoint is gone (or refuses us).
        self._monitor = self.socket.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self.socket.connect(endpoint)
        self._poll_items = [(self.socket, POLLIN), (self._monitor, POLLIN)]
        self._ids = itertools.count(1)
        self._replies: dict[int, tuple[int, object]] = {}
        self.broken = False

    def send(self, caller: tuple, request: tuple) -> int:
        if self._monitor.getsockopt(EVENTS) & POLLIN:
            self._check_monitor()  # broke while idle: say so before anything is sent
        if self.broken:
            raise Disconnected(self.endpoint)
        request_id = next(self._ids)
        send_frames(self.socket, protocol.encode_request(request_id, caller, request))
        return request_id

    def receive(self, request_id: int, timeout: float | None) -> tuple[int, object]:
        """(status, value) of request `request_id`; None after `timeout` s (None: no limit).

        Raises Disconnected if the connection breaks first.
        """
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
                self._replies[got_id] = (status, value)
            wait = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            events = zmq.zmq_poll(self._poll_items, wait)
            if len(events) > (socket in dict(events)):  # the monitor spoke
                self._check_monitor()
            if not events and deadline is not None and time.monotonic() >= deadline:
                return None

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


def retriable(request: tuple) -> bool:
    """May `request` be sent again to a restarted shard that may have applied it already?

    Yes for pushes that carry a producer sequence number (the shard applies each
    once), leasing and peeking pulls (an unanswered lease expires and its items
    come back), requests that change nothing, and add(exist_ok=True). Not for a
    plain pull (its items would be gone unseen), ack/nack, remove, add, or a
    blocking push: those raise ShardRestartedError.
    """
    kind = type(request)
    if kind is protocol.Push:
        return request.producer is not None
    if kind is protocol.Pull:
        return request.ack or not request.remove
    if kind is protocol.Add:
        return request.exist_ok
    return kind not in (protocol.Settle, protocol.Remove, protocol.AwaitPush)


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
    to send again (retriable()); the others fail with ShardRestartedError. A shard
    that does not come back within request_timeout seconds fails them with
    ShardUnavailableError.
    """

    def __init__(self, keys: Keys, locate, local_node: str, request_timeout: float):
        self._keys = keys
        self._locate = locate              # (index, fresh) -> DataAddress (asks Ray; may raise)
        self._local_node = local_node
        self._timeout = request_timeout
        self._producer = int.from_bytes(os.urandom(8), "little") >> 1
        self._sequences: dict[int, int] = {}
        self._connections: dict[int, Connection] = {}
        self._tickets = itertools.count(1)
        self._in_flight: dict[int, dict[int, list]] = {}  # shard -> ticket -> [request_id, caller, request]
        self._failures: dict[int, Exception] = {}  # ticket -> why it failed in a reconnect

    def send(self, index: int, caller: tuple, request: tuple) -> tuple[int, int]:
        if type(request) is protocol.Push and not request.block:
            sequence = self._sequences.get(index, 0) + 1
            self._sequences[index] = sequence
            request = request[:5] + ((self._producer, sequence),)  # as _replace, 4x faster
            request = tuple.__new__(protocol.Push, request)
        ticket = next(self._tickets)
        entry = [0, caller, request]
        self._in_flight.setdefault(index, {})[ticket] = entry
        try:
            entry[0] = self._connection(index).send(caller, request)
        except Disconnected:
            self._reconnect(index)
        return index, ticket

    def result(self, ticket: tuple[int, int], wait: float | None = 0.0) -> object:
        """The answer to `ticket`, or its error raised. `wait`: seconds the request may
        wait in the shard (None: no limit); the answer may take request_timeout longer."""
        index, number = ticket
        in_flight = self._in_flight[index]
        limit = None if wait is None else wait + self._timeout
        while True:
            entry = in_flight.get(number)
            if entry is None:  # failed in a reconnect
                raise self._failures.pop(number)
            try:
                reply = self._connections[index].receive(entry[0], limit)
            except Disconnected:
                self._reconnect(index)
                continue
            if reply is None:
                del in_flight[number]
                self._drop(index)
                raise unreachable(index, self._timeout, "no answer")
            del in_flight[number]
            status, value = reply
            if status == protocol.ERROR:
                raise value
            return value

    def call(self, index: int, caller: tuple, request: tuple, wait: float | None = 0.0) -> object:
        return self.result(self.send(index, caller, request), wait)

    def _connection(self, index: int, fresh: bool = False) -> Connection:
        connection = self._connections.get(index)
        if connection is None:
            address = self._locate(index, fresh)
            if address.node_id == self._local_node and address.ipc and not fresh and \
                    not os.path.exists(address.ipc.removeprefix("ipc://")):
                address = self._locate(index, True)  # that incarnation is gone
            connection = self._connections[index] = Connection(
                address, self._keys, address.node_id == self._local_node)
        return connection

    def _drop(self, index: int) -> None:
        connection = self._connections.pop(index, None)
        if connection is not None:
            connection.close()

    def _reconnect(self, index: int) -> None:
        """The connection to shard `index` broke: connect to its new incarnation and resend."""
        self._drop(index)
        connection = self._connection(index, fresh=True)
        for ticket, entry in list(self._in_flight.get(index, {}).items()):
            if retriable(entry[2]):
                entry[0] = connection.send(entry[1], entry[2])
            else:
                del self._in_flight[index][ticket]
                self._failures[ticket] = ShardRestartedError(
                    f"shard {index} restarted while this {type(entry[2]).__name__.lower()} was in "
                    f"flight; it may or may not have been applied")

    def close(self) -> None:
        for index in list(self._connections):
            self._drop(index)


def unreachable(index: int, seconds: float, why: str) -> ShardUnavailableError:
    return ShardUnavailableError(
        f"shard {index} did not answer within {seconds:g} s (transport.request_timeout): {why}")
