"""The requests a client sends a shard, on either path, and how they travel on the wire.

Every call across the process boundary is one of the request types below: a
named tuple whose fields are the call's arguments. A `.remote()` call hands one
to the shard actor's Ray methods; a native call sends it over the shard's data
socket (pype.transport). The shard's engine answers both in the same way
(pype.shards.engine), so both paths share one set of semantics.

On the wire a request is an envelope, pickled with protocol 5:

    (request_id, (caller id, after), type code, request's fields)

request_id numbers the requests of one connection, so several may be in flight
(a producer's window, a consumer's prefetch). `after` is the sequence number of
the caller's last `.remote()` call to this shard, or 0: the shard holds the
request until it has run that call (read-your-writes across the two paths, see
pype.shards.engine). The request travels as a plain tuple with a type code, which
pickles four times faster than the named tuple itself. The reply is

    (request_id, status, value)

with status RESULT (value is the result) or ERROR (value is the exception). A
request that waits in the shard gets no answer until it is done; a client tells
a long wait from a dead shard by its connection (see pype.transport). Large
buffers (numpy arrays of LARGE_BUFFER bytes or more) travel out of band, as extra
frames that ZeroMQ sends without a copy (pickle protocol 5).
"""

from __future__ import annotations

import math
import pickle
import pickletools
from typing import Any, NamedTuple

from pype.errors import PypeError
from pype.options import QueueOptions

RESULT, ERROR = 0, 1
# Numbered pushes a client may have unanswered to one shard: the shard keeps that many
# answers per producer (pype.shards.producers), so that one sent again gets its own.
MAX_UNANSWERED_PUSHES = 10_000
LARGE_BUFFER = 64 * 1024  # bytes; smaller buffers ride inside the pickle (ZeroMQ copies them anyway)


# -- data ----------------------------------------------------------------------------

class Push(NamedTuple):
    """Push `items` to each of `queues` (see Server.push).

    producer: (producer id, sequence number, floor) of a native push, which the client
    may send again after a shard restart; the shard applies each sequence number once
    and answers it again as it did the first time. floor: the lowest number of the
    producer's still unanswered (pype.shards.producers).
    must_exist: raise QueueNotFoundError for a missing queue instead of creating it.
    key: the partition key of a `.remote()` push to a partitioned queue, whose head's
    shard runs it (pype.partitions); native pushes resolve it in the client.
    on_behalf: the caller id a shard sends a `.remote()` push for (its pin is the
    caller's, not the shard's).
    ttl: seconds the items live, counted from the push (the queue's ttl, if shorter,
    wins); None: the queue's. delay: seconds the items wait before they enter their
    queues; None: none.
    """

    queues: tuple[str, ...]
    items: list
    priority: float | None = None
    block: bool = False
    timeout: float | None = None
    producer: tuple[int, int, int] | None = None
    must_exist: bool = False
    key: Any = None
    on_behalf: str | None = None
    ttl: float | None = None
    delay: float | None = None


class Pull(NamedTuple):
    """Take (remove=False: peek at; ack=True: lease) up to batch_size items of `queue`.

    exactly: take batch_size items or none (a non-blocking pull answers [] if fewer
    are there; pype.Queue.get_nowait_batch). must_exist: raise QueueNotFoundError for a missing queue instead of
    answering [] (or waiting for its first push), and end the pull with it if the
    queue is removed while the pull waits.
    """

    queue: str
    batch_size: int | None = None
    block: bool | None = None
    timeout: float | None = None
    remove: bool = True
    ack: bool = False
    exactly: bool = False
    must_exist: bool = False


class PushPull(NamedTuple):
    """A stage's step, as one request: run `push`, then `pull` (both of one shard's
    queues). A push that fails answers its error, and the pull does not run; a pull
    that fails after the push was applied (now, or later while it waited) answers
    PullFailed. After a restart the client sends it again whole if its pull leases
    (retriable), else its numbered push alone (applied once). The answer is the pull's."""

    push: Push
    pull: Pull


class PullFailed(PypeError):
    """The pull of a PushPull failed (`error`) after its push was applied. Clients
    unwrap it: a user sees `error`, or the pull sent again where a redirect says."""

    def __init__(self, error: Exception):
        super().__init__(error)
        self.error = error


class Settle(NamedTuple):
    """End leases of `queue`: outcome "ack" (done), "nack" (return the items; with a
    `delay`, when it ends) or "reject" (give them up: a nack with requeue=False;
    pype.dead_letters); or "extend" them, `delay` seconds from now."""

    queue: str
    lease_ids: list[int]
    outcome: str
    delay: float | None = None


class Move(NamedTuple):
    """Move up to `count` items (-1: all) of `queue` to queue `destination`, in pull
    order; here: the client routes `destination` to the same shard as `queue`."""

    queue: str
    destination: str
    count: int = -1
    here: bool = False


class AwaitPush(NamedTuple):
    """Wait for the parts of a blocking `.remote()` push that waited in line for room."""

    pending: Any  # what the shard answered the Push: an int, or a PendingPush


# -- conditions ------------------------------------------------------------------------

class CanPull(NamedTuple):
    """Would a pull of batch_size be full? wait: seconds to wait for it (None: the
    shard's poll_wait; math.inf: no limit)."""

    queue: str
    batch_size: int | None = None
    wait: float | None = None


class CanPush(NamedTuple):
    """Would a push of one item be accepted? wait: as for CanPull."""

    queue: str
    wait: float | None = None


# -- queues and introspection ---------------------------------------------------------------

class Add(NamedTuple):
    queue: str
    options: QueueOptions
    exist_ok: bool = False


class Remove(NamedTuple):
    """Delete `queue`. partitions: how many the caller knows it has; a head of another
    count refuses (pype.partitions.Partitioned), so that its partitions go too."""

    queue: str
    partitions: int = 1


class Length(NamedTuple):
    """Items of `queue` ready to pull: 0 for a missing queue, or with must_exist
    QueueNotFoundError."""

    queue: str
    must_exist: bool = False


class Describe(NamedTuple):
    """The options of `queue` as a dict, or None."""

    queue: str


class Render(NamedTuple):
    """A one-line picture of `queue` (print_queue); show: also print it in the shard."""

    queue: str
    show: bool = True


class DeadLetters(NamedTuple):
    """The dead letters (pype.dead_letters.DeadLetter) among the first batch_size items of
    `queue` (-1: all), in pull order, left in the queue."""

    queue: str
    batch_size: int = -1


class Names(NamedTuple):
    """The names of the shard's queues."""


class Stats(NamedTuple):
    """The shard's counters."""


# -- moving queues between shards (the router's resize; Ray calls only) --------------------

class Expect(NamedTuple):
    """Queues that a topology of `shards` shards gave other shards may come here: hold
    requests for them until Arrived."""

    shards: int
    seed: int


class Export(NamedTuple):
    """Give up the queues that a topology of `shards` shards (`epoch`) gives to other
    shards; the answer holds them (name -> queue)."""

    shards: int
    seed: int
    epoch: int


class Import(NamedTuple):
    """Take over `queues` (what an Export answered)."""

    queues: dict


class Arrived(NamedTuple):
    """Every queue on its way here came: serve the requests held for them."""


class Release(NamedTuple):
    """The queues this shard exported arrived where they belong: drop them here."""


# -- shared memory (pype.segments; on a shard's Unix socket only) ----------------------------

class SegmentsReleased(NamedTuple):
    """The client's arrays of these shard segments are gone (pype.segments.attach).

    A notice about the connection, for the shard's loop, not its engine: it is sent
    with request id NOTICE and gets no answer."""

    segments: tuple[int, ...]


class SegmentsFreed(NamedTuple):
    """The answer, with request id NOTICE, that the shard sends unasked: these
    segments of the client's pool carry nothing the shard or a consumer still uses."""

    segments: tuple[int, ...]


NOTICE = 0  # the request id of the notices above (a connection numbers its requests from 1)


# -- replication (pype.shards.replication; shard to shard) ---------------------------------

class Replicate(NamedTuple):
    """A message of the shard's primary to this backup: a replication Batch or Snapshot;
    the answer is the backup's Position."""

    message: Any


class Redirect(PypeError):
    """A shard's answer that the request belongs elsewhere: the client follows it
    (pype.routing.Routes.follow, the one place that knows each kind) and sends the
    request again where it now goes. It never reaches a user."""


class Moved(Redirect):
    """A request reached a shard that gave `queue` up to another one, in the topology
    of `epoch` (a resize). Clients handle it: they fetch that topology and send the
    request again to the new shard, for `queues` (the request's queues that it did not
    apply: all of them, but for a blocking push whose other parts found room before
    the move; `accepted` counts their items)."""

    def __init__(self, queue: str, epoch: int, queues: tuple[str, ...] = (), accepted: int = 0):
        super().__init__(queue, epoch, queues, accepted)
        self.queue, self.epoch = queue, epoch
        self.queues, self.accepted = queues or (queue,), accepted

    def __str__(self) -> str:
        return f"queue {self.queue!r} moved to another shard (topology epoch {self.epoch})"


# -- what requests mean to a client that sends them -------------------------------------

def push_of(request: tuple) -> Push | None:
    """The push `request` makes: itself, a PushPull's push part, or None."""
    kind = type(request)
    if kind is Push:
        return request
    if kind is PushPull:
        return request.push
    return None


def takes_a_sequence(request: tuple) -> bool:
    """Does `request` get its sender's producer id and next sequence number? A push that
    does not wait does (alone or in a PushPull): the shard applies each sequence number
    once, so the push may be sent again after a restart. (A blocking push may wait in
    line; it is not resent.)"""
    push = push_of(request)
    return push is not None and not push.block and push.producer is None


def numbered(request: tuple, producer: tuple[int, int, int]) -> tuple:
    """`request` with its push numbered `producer` (see takes_a_sequence)."""
    if type(request) is PushPull:
        return PushPull(with_field(request.push, "producer", producer), request.pull)
    return with_field(request, "producer", producer)


def retriable(request: tuple) -> bool:
    """May `request` be sent again to a restarted shard that may have applied it already?

    Yes for pushes that carry a producer sequence number (the shard applies each
    once), leasing and peeking pulls (an unanswered lease expires and its items
    come back), requests that change nothing, and add(exist_ok=True). Not for a
    plain pull (its items would be gone unseen), ack/nack, remove, add, move (its
    items would move twice), or a blocking push: those raise ShardRestartedError.
    """
    kind = type(request)
    if kind is Push:
        return request.producer is not None
    if kind is Pull:
        return request.ack or not request.remove
    if kind is PushPull:  # else the push goes again alone (pype.transport.Pipeline)
        return retriable(request.push) and retriable(request.pull)
    if kind is Add:
        return request.exist_ok
    return kind not in (Settle, Remove, AwaitPush, Move)


def wait_of(request: tuple) -> float | None:
    """Seconds `request` may wait in the shard before it is answered (None: no limit);
    the client waits that long, and its request_timeout more, for the answer."""
    kind = type(request)
    if kind is PushPull:
        request, kind = request.pull, Pull
    if kind is Pull:
        return 0.0 if request.block is False else request.timeout
    if kind is Push:
        return request.timeout if request.block else 0.0
    if kind is CanPull or kind is CanPush:
        return None if request.wait == math.inf else request.wait
    return 0.0


def with_field(request: tuple, field: str, value: Any) -> tuple:
    """`request` with its field `field` set to `value`: request._replace(field=value),
    four times faster (a pipeline stamps every push with its sequence number)."""
    kind = type(request)
    position = _POSITIONS[kind][field]
    return tuple.__new__(kind, (*request[:position], value, *request[position + 1:]))


# -- wire format ---------------------------------------------------------------------------

REQUEST_TYPES = (Push, Pull, Settle, AwaitPush, CanPull, CanPush, Add, Remove, Length, Describe,
                 Render, Names, Stats, Expect, Export, Import, Arrived, Release, Replicate,
                 DeadLetters, Move, PushPull, SegmentsReleased)
_CODES = {kind: code for code, kind in enumerate(REQUEST_TYPES)}
_POSITIONS = {kind: {field: position for position, field in enumerate(kind._fields)}
              for kind in REQUEST_TYPES}


def encode_request(request_id: int, caller: tuple[str, int], request: tuple) -> list:
    """Frames of one request (see the module docstring)."""
    kind = type(request)
    if kind is PushPull:  # its parts as plain tuples too
        return dumps((request_id, caller, _CODES[kind], (tuple(request.push), tuple(request.pull))))
    return dumps((request_id, caller, _CODES[kind], tuple(request)))


def decode_request(frames: list) -> tuple[int, tuple[str, int], tuple]:
    """(request_id, caller, request) of frames made by encode_request.

    Raises (TypeError, ValueError, IndexError, pickle errors, ...) for anything else.
    """
    request_id, caller, code, fields = loads(frames)
    kind = REQUEST_TYPES[code]
    if kind is PushPull:
        push, pull = fields
        return request_id, caller, PushPull(_typed(Push, push), _typed(Pull, pull))
    return request_id, caller, _typed(kind, fields)


def _typed(kind: type, fields: tuple) -> tuple:
    if len(fields) != len(kind._fields):
        raise ValueError(f"{kind.__name__} has {len(kind._fields)} fields, not {len(fields)}")
    return tuple.__new__(kind, fields)


def request_id_of(frames: list) -> int | None:
    """The request id of a message decode_request could not read, if its start is
    readable (the id is the envelope's first element), so that it can be answered."""
    try:
        for opcode, argument, _ in pickletools.genops(bytes(frames[0][:64])):
            if opcode.name in ("BININT", "BININT1", "BININT2", "LONG1"):
                return argument
            if opcode.name not in ("PROTO", "FRAME", "MARK"):
                return None
    except Exception:  # noqa: BLE001 - cut off or not a pickle at all
        return None
    return None


def dumps(message: tuple) -> list:
    """Frames of one message: the pickle, then its large buffers, out of band."""
    buffers: list = []

    def keep_small(buffer: pickle.PickleBuffer) -> bool:
        if buffer.raw().nbytes < LARGE_BUFFER:
            return True  # in band
        buffers.append(buffer)
        return False

    return [pickle.dumps(message, protocol=5, buffer_callback=keep_small), *buffers]


def loads(frames: list) -> tuple:
    """The message of `frames` (as dumps() made them; bytes, memoryviews or zmq.Frames)."""
    if len(frames) == 1:
        return pickle.loads(frames[0])
    first, *buffers = frames
    return pickle.loads(first, buffers=[getattr(b, "buffer", b) for b in buffers])
