"""Configuration files: defaults, overrides, and errors that name the key and the file."""

from pathlib import Path

import pytest

from pype.config import load_config
from pype.errors import ConfigError


def test_default_config_is_complete_and_valid():
    config = load_config()
    assert config.shards >= 1
    assert config.queue_defaults.kind == "fifo"
    assert config.shard.num_cpus == 0


def test_a_file_overrides_the_defaults_and_keywords_override_the_file(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text("shards: 3\nshard:\n  waiter_threads: 4\nqueue_defaults:\n  maxsize: 10\n")
    config = load_config(path)
    assert (config.shards, config.shard.waiter_threads, config.queue_defaults.maxsize) == (3, 4, 10)
    assert config.shard.poll_wait == load_config().shard.poll_wait
    assert load_config(path, shards=5, shard={"poll_wait": 0.01}).shards == 5
    assert str(path) in config.source


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, key", [
    ("shards: 0", "shards"), ("shards: two", "shards"), ("shards: true", "shards"),
    ("hash_seed: -1", "hash_seed"), ("shard:\n  waiter_threads: 0", "shard.waiter_threads"),
    ("shard:\n  poll_wait: -1", "shard.poll_wait"), ("shard: 3", "shard"),
    ("queue_defaults:\n  kind: heap", "queue_defaults"), ("sharts: 2", "sharts"),
    ("shard:\n  threads: 2", "shard.threads"), ("- a list", "mapping"), ("shards: [", "YAML"),
    ("replicas: 0", "replicas"), ("replicas: 2\nmin_insync: 3", "min_insync"),
    ("min_insync: 0", "min_insync"), ("replicas: 1.5", "replicas"),
])
def test_bad_values_raise_config_error_naming_key_and_file(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert key in str(caught.value)
    assert "bad.yaml" in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_min_insync_defaults_to_two_from_three_replicas_else_one():
    assert [load_config(replicas=n).min_insync for n in (1, 2, 3, 5)] == [1, 1, 2, 2]
    assert load_config(replicas=3, min_insync=3).min_insync == 3


def test_bad_keyword_override_is_a_config_error():
    with pytest.raises(ConfigError, match="keyword arguments.*shards"):
        load_config(shards=-2)
    with pytest.raises(ConfigError, match="unknown key 'shard_count'"):
        load_config(shard_count=2)


def test_persistence_dir_keeps_variables_and_tilde_for_each_node_to_expand(monkeypatch, tmp_path):
    """The path is expanded where each shard runs, not where the config is read."""
    config = load_config(persistence={"dir": "${PYPE_DATA}/pype"})
    assert config.persistence.dir == "${PYPE_DATA}/pype"
    monkeypatch.setenv("PYPE_DATA", str(tmp_path))
    assert config.persistence.on_this_node() == tmp_path / "pype"
    home = load_config(persistence={"dir": "~/pype-data"})
    assert home.persistence.on_this_node() == Path("~/pype-data").expanduser()
    literal = load_config(persistence={"dir": str(tmp_path / "a$$b")})
    assert literal.persistence.on_this_node() == tmp_path / "a$b"


def test_a_relative_persistence_dir_is_relative_to_where_the_config_is_loaded(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    config = load_config(persistence={"dir": "journals"})
    assert config.persistence.dir == str(tmp_path / "journals")


def test_an_unset_variable_in_persistence_dir_is_a_config_error_naming_it(monkeypatch):
    monkeypatch.delenv("PYPE_DATA", raising=False)
    config = load_config(persistence={"dir": "${PYPE_DATA}/pype"})
    with pytest.raises(ConfigError, match=r"PYPE_DATA is not set on node"):
        config.persistence.on_this_node()
    with pytest.raises(ConfigError, match=r"\$\$"):
        load_config(persistence={"dir": "/data/$5"}).persistence.on_this_node()
