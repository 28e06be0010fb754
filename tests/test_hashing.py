"""The name -> shard function: stable, consistent and even."""

from collections import Counter

import pytest

from pype.hashing import jump_hash, placed_by, shard_for
from pype.partitions import partition_name

NAMES = [f"queue-{i}" for i in range(1000)]


def test_same_name_same_shard_and_seed_changes_it():
    assert all(shard_for(n, 8) == shard_for(n, 8) for n in NAMES)
    assert sum(shard_for(n, 8, seed=0) != shard_for(n, 8, seed=1) for n in NAMES) > 700


@pytest.mark.parametrize("shards", [2, 4, 8])
def test_spread_over_shards_is_even(shards):
    counts = Counter(shard_for(name, shards) for name in NAMES)
    assert set(counts) == set(range(shards))
    mean = len(NAMES) / shards
    assert max(counts.values()) / mean <= 1.2


def test_growing_by_one_shard_moves_few_names():
    for shards in (1, 2, 4, 7):
        moved = sum(shard_for(n, shards) != shard_for(n, shards + 1) for n in NAMES)
        expected = len(NAMES) / (shards + 1)
        assert moved <= 1.3 * expected
        # names that move go to the new shard only
        assert all(shard_for(n, shards + 1) == shards
                   for n in NAMES if shard_for(n, shards) != shard_for(n, shards + 1))


def test_jump_hash_known_values_and_bounds():
    assert jump_hash(0, 1) == 0
    assert all(0 <= jump_hash(k, 10) < 10 for k in range(1000))
    with pytest.raises(ValueError):
        jump_hash(1, 0)


def test_a_hash_tag_places_names_together_as_in_redis_cluster():
    assert placed_by("{video}.frames") == placed_by("{video}.boxes") == "video"
    assert all(shard_for(f"{{stage}}-{i}", 8) == shard_for("{stage}-0", 8) for i in range(100))
    # Redis Cluster's rule: the first "{", the next "}", something between them
    assert placed_by("a{b}c{d}") == "b"
    assert placed_by("{}x{y}") == "{}x{y}"  # an empty first tag: the whole name
    assert placed_by("a{b") == "a{b" and placed_by("a}b{") == "a}b{" and placed_by("plain") == "plain"
    assert placed_by("{x}}") == "x"


def test_the_partitions_of_a_tagged_queue_still_spread():
    names = [partition_name("{t}q", j) for j in range(64)]
    assert all(placed_by(name) == name for name in names)
    assert len({shard_for(name, 4) for name in names}) == 4
