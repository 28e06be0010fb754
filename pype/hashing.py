"""The one function that maps a queue name to a shard.

Clients and the router both call shard_for(), so they always agree. The name is
hashed with xxhash64 and the hash is placed with Lamping and Veach's jump
consistent hash: growing from n to n+1 shards moves only 1/(n+1) of the names.

A name may carry a hash tag, as in Redis Cluster: when it holds a "{", a "}" after
it and something between them, only that tag is hashed, so "{video}.frames" and
"{video}.boxes" live on one shard, where a stage's push and pull travel as one
request (Server.push_pull).
"""

import xxhash

_MASK64 = (1 << 64) - 1


def jump_hash(key: int, buckets: int) -> int:
    """Return the bucket in [0, buckets) of a 64-bit key (jump consistent hash)."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    bucket, candidate = -1, 0
    while candidate < buckets:
        bucket = candidate
        key = (key * 2862933555777941757 + 1) & _MASK64
        candidate = int((bucket + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return bucket


def placed_by(name: str) -> str:
    """The part of `name` that places it: its hash tag (the text between its first "{"
    and the next "}", if not empty), else all of it. Names with a non-printable
    character are placed whole: a partition's name holds one (pype.partitions), so
    the partitions of a tagged queue still spread over the shards."""
    start = name.find("{")
    if start != -1 and name.isprintable():
        end = name.find("}", start + 1)
        if end > start + 1:
            return name[start + 1:end]
    return name


def shard_for(name: str, shards: int, seed: int = 0) -> int:
    """Return the index of the shard that owns queue `name` (see placed_by)."""
    return jump_hash(xxhash.xxh64_intdigest(placed_by(name).encode("utf-8"), seed), shards)
