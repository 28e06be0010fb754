"""A shard's listening sockets: its Unix socket for clients on its node, its CURVE socket
for the others, and the peers connected to the Unix one.

Only the shard's loop thread uses them (pype.shards.loop). The Unix socket's file
lies in a directory only its owner may enter, which is the authentication (the
same user's processes). The ZeroMQ ROUTER admits, through its ZAP handler, only
the client key of its server (pype.transport.Keys), so nothing from anyone else
ever reaches pickle. It sets ROUTER_MANDATORY and no high-water mark, so that a
reply is never dropped silently, and LINGER 0.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from pype.framing import StreamReader, send_stream
from pype.transport import DataAddress, Keys

ZAP_DOMAIN = "pype"


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
                 unix_dir: Path | None, tcp_port: int, name: str):
        self.context = zmq.Context()
        self._auth = ThreadAuthenticator(self.context)
        self._auth.start()
        self._auth.configure_curve_callback(ZAP_DOMAIN, _AdmitOneKey(keys.client_public))
        self.tcp = self.context.socket(zmq.ROUTER)
        self.tcp.linger = 0
        self.tcp.router_mandatory = True  # a reply to a peer that left raises, never vanishes
        self.tcp.sndhwm = self.tcp.rcvhwm = 0  # nor is it dropped at a high-water mark
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
        self.unix = None
        self._unix_path = None
        if unix_dir is not None:
            directory = private_directory(unix_dir)
            _remove_stale_sockets(directory)
            self._unix_path = directory / f"{name}-{os.getpid()}.sock"
            self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.unix.bind(str(self._unix_path))
            self.unix.listen(128)
            self.unix.setblocking(False)
        self.address = DataAddress(node_id, self._unix_path and str(self._unix_path), tcp_endpoint,
                                   os.getpid())

    def close(self) -> None:
        self.tcp.close(linger=0)
        self._auth.stop()
        self.context.term()
        if self.unix is not None:
            self.unix.close()
            self._unix_path.unlink(missing_ok=True)


class UnixPeer:
    """A client connected to the shard's Unix socket: what it sent, what waits to go back."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.socket = sock
        self.reader = StreamReader()
        self.outgoing: list = []  # replies not written yet (kernel buffer full, or corked)
        self.corked = False  # answering a batch of requests: write the answers together
        self.watching_output = False  # the loop waits for room in the socket
        self.closed = False

    def flush(self) -> bool:
        """Write what waits; return True if some still waits."""
        if self.outgoing:
            self.outgoing = send_stream(self.socket, self.outgoing) or []
        return bool(self.outgoing)


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
