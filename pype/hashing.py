"""The one function that maps a queue name to a shard.

Clients and the router both call shard_for(), so they always agree. The name is
hashed with xxhash64 and the hash is placed with Lamping and Veach's jump
consistent hash: growing from n to n+1 shards moves only 1/(n+1) of the names.
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


def shard_for(name: str, shards: int, seed: int = 0) -> int:
    """Return the index of the shard that owns queue `name`."""
    return jump_hash(xxhash.xxh64_intdigest(name.encode("utf-8"), seed), shards)
