"""YAML configuration -> a validated Config.

configs/default.yaml holds every key with
its default. A user's file needs only the keys it changes, and keyword arguments
(Server.remote(shards=4), or shard={"waiter_threads": 8}) override both. Bad values
raise ConfigError naming the key and where it came from.
"""

from __future__ import annotations

import math
import os
import socket
import string
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import yaml

from pype.errors import ConfigError
from pype.options import FSYNC_MODES, QueueOptions

DEFAULT_CONFIG = "default.yaml"
# Keys whose value may be a mapping but is one value, replaced whole, not a section
# merged key by key: `placement: {resource: NAME}` then `placement: spread`.
WHOLE_VALUES = ("placement",)
MB = 1 << 20
LOCAL_TRANSPORTS = ("unix", "tcp")


@dataclass(frozen=True)
class ShardConfig:
    """Options of each shard actor."""

    num_cpus: float
    max_restarts: int
    waiter_threads: int
    poll_wait: float
    memory_budget: int     # bytes; 0 = none
    max_item_bytes: int    # bytes; 0 = none


@dataclass(frozen=True)
class Persistence:
    """Where and how shards log what they accept (see pype.shards.journal).

    dir is the path as configured: `~` and environment variables (`$VAR`, `${VAR}`)
    in it are expanded by each shard on its own node (on_this_node), so that each
    node keeps its journals on its own disk. A relative path without them was made
    absolute where the config was loaded.
    """

    dir: str | None        # None: no persistence
    fsync: str
    compact_bytes: int

    def on_this_node(self) -> Path:
        """dir expanded in this process, on its node; ConfigError naming the node and
        the variable if one is not set here."""
        return expand_path(self.dir)


def expand_path(template: str) -> Path:
    """`template` with `~` and $VAR / ${VAR} expanded from this process's environment.

    Unlike os.path.expandvars, a variable that is not set is an error: a journal
    must never land in a directory literally named "${PYPE_DATA}".
    """
    try:
        expanded = string.Template(template).substitute(os.environ)
    except KeyError as missing:
        raise ConfigError(
            f"persistence.dir {template!r}: the environment variable {missing.args[0]} is not "
            f"set on node {_node_name()}") from None
    except ValueError as error:  # a "$" not followed by a name
        raise ConfigError(f"persistence.dir {template!r}: {error} (write $$ for a literal $)") from None
    return Path(expanded).expanduser().resolve()


def _node_name() -> str:
    """This process's node, as an operator finds it in `ray status`: its IP and Ray node id."""
    if ray.is_initialized():
        return f"{ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()})"
    return socket.gethostname()


@dataclass(frozen=True)
class Transport:
    """How shards serve the native data path (see pype.transport)."""

    local: str               # unix | tcp: how clients on a shard's own node connect
    socket_dir: Path         # where the Unix socket files lie (mode 0700)
    tcp_port: int            # port of shard 0 (shard i: tcp_port + i); 0 = any free port
    request_timeout: float   # seconds before a native call to a silent shard fails


@dataclass(frozen=True)
class Placement:
    """Where the shards go: "spread" or "pack", or spread over nodes with `resource`."""

    strategy: str            # spread | pack | resource
    resource: str | None = None


@dataclass(frozen=True)
class Config:
    """A server's whole configuration."""

    shards: int
    hash_seed: int
    placement: Placement
    replicas: int     # copies of each shard, on distinct nodes; 1: not replicated
    min_insync: int   # replicas that hold a change before it is acknowledged
    shard: ShardConfig
    transport: Transport
    persistence: Persistence
    queue_defaults: QueueOptions
    source: str  # the files and arguments it was read from, for messages
    settings: dict = field(compare=False)  # the merged keys and values, as a YAML file has them


def default_config_path() -> Path:
    """Where the shipped default configuration lies.

    In a checkout (pip install -e) it is configs/default.yaml beside the package;
    a regular install puts it under <prefix>/share/pype/configs/.
    """
    checkout = Path(__file__).resolve().parent.parent / "configs" / DEFAULT_CONFIG
    if checkout.is_file():
        return checkout
    return Path(sysconfig.get_path("data")) / "share" / "pype" / "configs" / DEFAULT_CONFIG


def load_config(path: str | Path | None = None, **overrides: Any) -> Config:
    """Read the default config, then `path` over it, then `overrides` over both.

    Raises FileNotFoundError for a missing file and ConfigError for a bad value.
    """
    default_path = default_config_path()
    raw = _read(default_path)
    sources = [str(default_path)]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Pype config file not found: {path}")
        _merge(raw, _read(path), str(path))
        sources.append(str(path))
    if overrides:
        _merge(raw, overrides, "keyword arguments")
        sources.append("keyword arguments")
    return _build(raw, " + ".join(sources))


def _read(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def _merge(base: dict, update: dict, source: str, prefix: str = "") -> None:
    """Copy `update` into `base` key by key; unknown keys are an error."""
    for key, value in update.items():
        if key not in base:
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'; known: {', '.join(base)}")
        if isinstance(base[key], dict) and key not in WHOLE_VALUES:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {prefix}{key} must be a mapping, got {value!r}")
            _merge(base[key], value, source, f"{prefix}{key}.")
        else:
            base[key] = value


def _placement(value: Any, source: str) -> Placement:
    if value in ("spread", "pack"):
        return Placement(value)
    if (isinstance(value, dict) and list(value) == ["resource"] and isinstance(value["resource"], str)
            and value["resource"]):
        return Placement("resource", value["resource"])
    raise ConfigError(f"{source}: placement must be spread, pack or {{resource: NAME}}, got {value!r}")


def _journal_template(directory: str) -> str:
    """A relative path without `~` or variables is relative to where the config is
    loaded (shard processes may run elsewhere); the others are expanded on each node."""
    if "$" in directory or directory.startswith("~") or Path(directory).is_absolute():
        return directory
    return str(Path(directory).resolve())


def _build(raw: dict, source: str) -> Config:
    def number(key: str, value: Any, kind: type, minimum: float) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise ConfigError(f"{source}: {key} must be {'a number' if kind is float else 'an integer'}"
                              f", got {value!r}")
        if (isinstance(value, float) and math.isnan(value)) or value < minimum:
            raise ConfigError(f"{source}: {key} must be >= {minimum}, got {value!r}")
        return value

    shard, persistence, transport = raw["shard"], raw["persistence"], raw["transport"]
    if transport["local"] not in LOCAL_TRANSPORTS:
        raise ConfigError(f"{source}: transport.local must be one of {', '.join(LOCAL_TRANSPORTS)}, "
                          f"got {transport['local']!r}")
    socket_dir = transport["socket_dir"]
    if socket_dir is not None and not isinstance(socket_dir, (str, Path)):
        raise ConfigError(f"{source}: transport.socket_dir must be a path or null, got {socket_dir!r}")
    shards = number("shards", raw["shards"], int, 1)
    replicas = number("replicas", raw["replicas"], int, 1)
    min_insync = raw["min_insync"]
    if min_insync is None:
        min_insync = 2 if replicas >= 3 else 1
    elif number("min_insync", min_insync, int, 1) > replicas:
        raise ConfigError(f"{source}: min_insync must be at most replicas ({replicas}), got "
                          f"{min_insync}: a change could never be acknowledged")
    tcp_port = number("transport.tcp_port", transport["tcp_port"], int, 0)
    if tcp_port + shards > 65536:
        raise ConfigError(f"{source}: transport.tcp_port + shards must stay below 65536, "
                          f"got {tcp_port} + {shards}")
    if persistence["fsync"] not in FSYNC_MODES:
        raise ConfigError(f"{source}: persistence.fsync must be one of {', '.join(FSYNC_MODES)}, "
                          f"got {persistence['fsync']!r}")
    directory = persistence["dir"]
    if directory is not None and not isinstance(directory, (str, Path)):
        raise ConfigError(f"{source}: persistence.dir must be a path or null, got {directory!r}")
    try:
        queue_defaults = QueueOptions(**raw["queue_defaults"])
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{source}: queue_defaults: {error}") from None
    return Config(
        shards=shards,
        hash_seed=number("hash_seed", raw["hash_seed"], int, 0),
        placement=_placement(raw["placement"], source),
        replicas=replicas,
        min_insync=min_insync,
        shard=ShardConfig(
            num_cpus=number("shard.num_cpus", shard["num_cpus"], float, 0),
            max_restarts=number("shard.max_restarts", shard["max_restarts"], int, -1),
            waiter_threads=number("shard.waiter_threads", shard["waiter_threads"], int, 1),
            poll_wait=number("shard.poll_wait", shard["poll_wait"], float, 0),
            memory_budget=int(number("shard.memory_budget_mb", shard["memory_budget_mb"], float, 0)
                              * MB),
            max_item_bytes=int(number("shard.max_item_mb", shard["max_item_mb"], float, 0) * MB),
        ),
        transport=Transport(
            local=transport["local"],
            socket_dir=Path(socket_dir).expanduser().resolve() if socket_dir is not None
            else Path(tempfile.gettempdir()) / f"pype-{os.getuid()}",
            tcp_port=tcp_port,
            request_timeout=number("transport.request_timeout", transport["request_timeout"], float,
                                   0.001),
        ),
        persistence=Persistence(
            dir=None if directory is None else _journal_template(str(directory)),
            fsync=persistence["fsync"],
            compact_bytes=int(number("persistence.compact_mb", persistence["compact_mb"], float,
                                     0.001) * MB),
        ),
        queue_defaults=queue_defaults,
        source=source,
        settings=raw,
    )
