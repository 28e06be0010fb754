"""Pype: named queues between the processes of a Ray program, spread over shard actors."""

import logging

from pype.client import Server, connect, pull_wait, push_wait
from pype.dead_letters import DeadLetter
from pype.errors import (
    ConfigError,
    Empty,
    Full,
    ItemLostError,
    JournalFormatError,
    LeaseNotHeldError,
    NotEnoughReplicasError,
    NotPrimaryError,
    PypeError,
    QueueExistsError,
    QueueFullError,
    QueueNotFoundError,
    QueueTimeoutError,
    RedirectLimitError,
    ServerExistsError,
    ServerNotFoundError,
    ShardLostError,
    ShardRestartedError,
    ShardUnavailableError,
    StaleEpochError,
    VideoSourceError,
)
from pype.queue import Queue
from pype.video import EndOfStream, VideoServer

logging.getLogger("pype").addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DeadLetter",
    "Empty",
    "EndOfStream",
    "Full",
    "ItemLostError",
    "JournalFormatError",
    "LeaseNotHeldError",
    "NotEnoughReplicasError",
    "NotPrimaryError",
    "PypeError",
    "Queue",
    "QueueExistsError",
    "QueueFullError",
    "QueueNotFoundError",
    "QueueTimeoutError",
    "RedirectLimitError",
    "Server",
    "ServerExistsError",
    "ServerNotFoundError",
    "ShardLostError",
    "ShardRestartedError",
    "ShardUnavailableError",
    "StaleEpochError",
    "VideoServer",
    "VideoSourceError",
    "connect",
    "pull_wait",
    "push_wait",
]
