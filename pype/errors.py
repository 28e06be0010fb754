"""Exceptions Pype raises.

Every class derives from PypeError and survives Ray: ``ray.get`` of a remote call
re-raises an instance of the original class, so ``except pype.QueueFullError`` works
around ``ray.get(server.push.remote(...))``.

Where a built-in exception fits, a class also derives from it, so code that
catches the built-in catches the Pype error too: QueueExistsError, ConfigError,
ServerExistsError and JournalFormatError are ValueErrors; QueueNotFoundError, LeaseNotHeldError and
ServerNotFoundError are LookupErrors; QueueTimeoutError is a TimeoutError;
VideoSourceError is an OSError; ShardUnavailableError, ShardRestartedError and
NotPrimaryError are ConnectionErrors. Empty and Full (pype.Queue's) are the standard
library's queue.Empty and queue.Full, through ray.util.queue's Empty and Full.
QueueFullError, ShardLostError, RedirectLimitError, ItemLostError, NotEnoughReplicasError
and StaleEpochError name states no built-in exception describes, and derive from
PypeError alone.
"""

from __future__ import annotations

import ray.util.queue


class PypeError(Exception):
    """Base class of every error Pype raises on purpose."""


class QueueExistsError(PypeError, ValueError):
    """add() named a queue that already exists (pass exist_ok=True to accept it)."""


class QueueNotFoundError(PypeError, LookupError):
    """The operation needs a queue that does not exist."""


class QueueFullError(PypeError):
    """A non-blocking push met a full queue whose overflow policy is 'reject'."""


class QueueTimeoutError(PypeError, TimeoutError):
    """A blocking push found no room before its timeout; nothing was accepted."""


class LeaseNotHeldError(PypeError, LookupError):
    """ack/nack named lease ids that are not held: expired (the items went back to
    the queue, for another consumer), nacked before, or never issued (an ack of an id
    acked before is no error; a nack of one is).

    `lease_ids` lists them; the call settled the other ids it was given.
    """

    def __init__(self, message: str, lease_ids: list[int] = ()):
        super().__init__(message, list(lease_ids))
        self.lease_ids = list(lease_ids)

    def __str__(self) -> str:
        return self.args[0]

    @classmethod
    def of(cls, queue: str, missing: list[int], given: int, requeue: bool) -> LeaseNotHeldError:
        """The error of a settle of `given` ids of `queue` that found `missing` not held."""
        return cls(f"queue {queue!r}: {len(missing)} of {given} lease ids are not held (their "
                   f"lease expired and the items went back to the queue, they were returned "
                   f"before, or they were never issued): {missing[:10]}; the other "
                   f"{given - len(missing)} were {'returned' if requeue else 'acked'}", missing)


class ShardLostError(PypeError):
    """A shard restarted and lost what this call depended on; the call was not applied.

    Without persistence a restarted shard starts empty: each caller's first call to a
    queue it held raises this once, naming the queue; later calls work on the new,
    empty queue. A blocking push that waited for room in a shard that restarted
    raises it too. Retry the call (push the items again) if that is what you want.
    """


class ShardUnavailableError(PypeError, ConnectionError):
    """A native call could not reach its shard within transport.request_timeout seconds.

    The shard's process died and Ray did not bring it back in time (or will not:
    max_restarts is spent), or its node is unreachable. The message names the shard.
    """


class ShardRestartedError(PypeError, ConnectionError):
    """A native call was in flight when its shard's process died, and it is not safe to
    send again: it may or may not have been applied (a plain pull's items may be gone,
    an ack may have been applied). Like Ray's RayActorError on the `.remote()` path.
    """


class NotPrimaryError(PypeError, ConnectionError):
    """The replica that got this request does not serve its shard (any longer): another
    was promoted in a newer leader epoch, or this one was fenced. Clients fetch the
    topology that names the new primary and send again what is safe to send again.
    A change this replica had taken but not yet acknowledged may or may not be in the
    new primary."""


class NotEnoughReplicasError(PypeError):
    """The shard refuses changes for now: its in-sync set is at min_insync and a member
    stopped answering, so nothing more can be acknowledged without risking its loss.
    Retriable: the shard takes changes again once a backup has caught up."""


class StaleEpochError(PypeError):
    """A replication message or request of a leader epoch that is over: its sender was
    replaced as primary and is fenced (pype.shards.replication)."""


class RedirectLimitError(PypeError):
    """A request was sent on to a queue's new place more times in a row than a client
    follows (pype.routing.MAX_REDIRECTS): the queue's shard or layout kept changing
    meanwhile. The request was not applied to the queues it names in the message (a
    push to several queues may have been applied to the others)."""


class JournalFormatError(PypeError, ValueError):
    """A shard's journal is in a format this version of Pype does not read (a newer
    one), or is not a journal; the message names the file and the format. The shard
    does not start, and the directory is left as it was."""


class ItemLostError(PypeError):
    """A large item pushed by reference could not be read: its pushing process died.

    Returned in the item's place by the pull (see pype.payloads), not raised.
    """


class VideoSourceError(PypeError, OSError):
    """A camera or video file could not be opened or decoded; the message names it."""


class ConfigError(PypeError, ValueError):
    """A configuration value is invalid; the message names the key and the file."""


class ServerExistsError(PypeError, ValueError):
    """Server.remote(name=...) named a server that already runs: connect() to it."""


class ServerNotFoundError(PypeError, LookupError):
    """connect() found no server of that name in that namespace."""


class Empty(PypeError, ray.util.queue.Empty):
    """pype.Queue: a get found no item (at once, or before its timeout)."""


class Full(PypeError, ray.util.queue.Full):
    """pype.Queue: a put found no room (at once, or before its timeout)."""
