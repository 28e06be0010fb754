"""The name -> shard function: stable, consistent and even."""

from collections import Counter

import pytest

from pype.hashing import jump_hash, shard_for

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
