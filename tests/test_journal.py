"""The write-ahead log and snapshots: a restored store equals the one that wrote them (no Ray)."""

import logging
import os
import random
import stat
import threading
import time

import pytest

from pype.errors import PypeError, QueueFullError
from pype.options import QueueOptions
from pype.shards import journal
from pype.shards.journal import Journal, safe_dir_name
from pype.shards.store import QueueStore

OPTIONS = [QueueOptions(kind="fifo"), QueueOptions(kind="lifo", maxsize=5, overflow="block"),
           QueueOptions(kind="priority", maxsize=6), QueueOptions(kind="batch", max_bytes=2000),
           QueueOptions(kind="fifo", maxsize=4, overflow="drop_oldest"),
           QueueOptions(kind="fifo", max_deliveries=2, dead_letter="a"),
           QueueOptions(kind="lifo", max_deliveries=1)]
NAMES = ["a", "../etc/passwd", "ünï cödé", "x" * 255, "b/c"]


# Queues a push makes give up on an item after 3 deliveries, and send it to queue "a" (but "a").
DEFAULTS = QueueOptions(max_deliveries=3, dead_letter="a")


def open_store(directory, fsync="never", compact_bytes=1 << 20):
    store = QueueStore(DEFAULTS, journal=Journal(directory, fsync), compact_bytes=compact_bytes)
    store.restore()
    return store


def picture(store):
    """Everything a client could observe of the store, leases, producers' numbers and
    refusals included."""
    queues = {name: (queue.options, queue.peek(-1), sorted(queue.leases.items()),
                     [(t.items, t.priority) for t in queue.parked], queue.nbytes,
                     queue.pushed, queue.pulled, queue.dropped, queue.acked, queue.redelivered,
                     queue.dead_lettered, queue.dead_dropped, queue.peek_letters(-1),
                     queue.expired, queue.next_expiry(), queue.delayed)
              for name, queue in store._queues.items()}
    answers = {(producer, sequence, seen.floor): repr(answer)
               for producer, seen in store._producers._seen.items()
               for sequence, answer in seen.answers.items()}
    return queues, answers, store.outbox, store.outbox_producer


def random_operations(store, rng, count):
    sequences = {}
    for _ in range(count):
        name = rng.choice(NAMES)
        roll = rng.random()
        try:
            if roll < 0.08:
                store.add(name, rng.choice(OPTIONS), exist_ok=True)
            elif roll < 0.10:
                store.remove(name)
            elif roll < 0.45:
                items = [rng.choice([rng.randint(0, 99), "s" * rng.randint(0, 300), (1, 2.5)])
                         for _ in range(rng.randint(1, 3))]
                names = (name,) if rng.random() < 0.8 else tuple(rng.sample(NAMES, 2))
                kinds = [store.describe(each) for each in names]
                priority = rng.randint(0, 3) if any(k and k["kind"] == "priority" for k in kinds) else None
                # a native push's number: its producer's next, or one sent again after a
                # "restart"; or none (a blocking or .remote() push)
                producer = rng.randint(1, 3)
                sequence = sequences[producer] = sequences.get(producer, 0) + 1
                if rng.random() < 0.2:
                    sequence = rng.randint(1, sequence)
                floor = max(1, sequence - rng.randint(0, 3))  # the lowest still unanswered
                producer = (producer, sequence, floor) if rng.random() < 0.5 else None
                ttl = rng.choice([None, None, 1.0, 5.0])
                delay = rng.choice([None, None, None, 0.5, 3.0])
                try:
                    store.push(names, items, priority, producer=producer, ttl=ttl, delay=delay)
                except (PypeError, ValueError) as error:
                    store.refuse(producer, error)  # as the shard's engine does
                    raise
            elif roll < 0.65:
                store.pull(name, rng.choice([1, 2, -1]))
            elif roll < 0.82:
                store.pull(name, rng.choice([1, 2]), ack=True)
            elif roll < 0.81:  # a redrive: at once (the same shard) or through the outbox
                other = rng.choice([each for each in NAMES if each != name])
                store.move(name, other, rng.choice([1, 3, -1]), here=rng.random() < 0.5)
            elif roll < 0.83:  # time passes: items expire, delayed pushes fall due
                store.expire_items(now=time.time() + rng.uniform(0, 6))
                store.fall_due(now=time.time() + rng.uniform(0, 6))
            elif roll < 0.85 and store.outbox:  # the shard's sender: delivered, or refused
                entry, producer = store.outgoing()
                if rng.random() < 0.7:
                    store.push((entry.queue,), entry.items, producer=producer)
                    store.delivered(entry.number)
                else:
                    store.renumber(entry.number)
            else:
                queue = store._queues.get(name)
                held = list(queue.leases) if queue else []
                if held:
                    outcome = rng.choice(["ack", "nack", "reject", "extend"])
                    delay = rng.choice([None, 2.0]) if outcome == "nack" else 10.0
                    store.settle(name, rng.sample(held, rng.randint(1, len(held))), outcome, delay)
        except (PypeError, ValueError):
            pass  # full queues, missing queues: refused calls change nothing


@pytest.mark.parametrize("seed", range(6))
def test_a_restored_store_equals_the_one_that_wrote_the_log(tmp_path, seed):
    rng = random.Random(seed)
    compact_bytes = 4000 if seed % 2 else 1 << 30  # odd seeds compact many times
    store = open_store(tmp_path, compact_bytes=compact_bytes)
    random_operations(store, rng, 400)
    store.expire_leases(now=4e9)  # far in the future: every lease ends
    random_operations(store, rng, 100)
    expected = picture(store)
    assert expected, "the operations left some queues"
    # No close(): the process "dies" here. Every record already reached the OS.
    restored = open_store(tmp_path, compact_bytes=compact_bytes)
    assert picture(restored) == expected
    assert len(list(tmp_path.glob("wal-*.log"))) == 1
    if compact_bytes == 4000:
        assert restored._journal.generation > 1


def test_a_record_cut_short_by_a_crash_is_dropped_and_the_log_goes_on(tmp_path, caplog):
    store = open_store(tmp_path)
    store.push(("q",), [1, 2, 3])
    store.pull("q", 1)
    log = next(tmp_path.glob("wal-*.log"))
    whole = log.read_bytes()
    store.push(("q",), [4])
    log.write_bytes(log.read_bytes()[:-3])  # the last record lost its tail
    with caplog.at_level(logging.WARNING, logger="pype"):
        restored = open_store(tmp_path)
    assert "cut short by a crash" in caplog.text
    assert restored.pull("q", -1) == [2, 3]
    assert log.stat().st_size > len(whole)  # the torn bytes are gone, the new records follow
    assert open_store(tmp_path).pull("q", -1) == []


def test_journal_files_are_private_and_never_named_after_queues(tmp_path):
    directory = tmp_path / "journals" / "shard-0"
    store = open_store(directory, compact_bytes=100)
    for name in NAMES:
        store.push((name,), [name] * 5)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = list(directory.iterdir())
    assert {path.name.split("-")[0] for path in files} == {"wal", "snapshot", "boot"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_fsync_modes_all_restore_and_bad_mode_is_refused(tmp_path):
    for mode in ("always", "batch", "never"):
        store = open_store(tmp_path / mode, fsync=mode)
        store.push(("q",), [mode])
        store.close()
        assert open_store(tmp_path / mode).pull("q", 1) == [mode]
    with pytest.raises(ValueError, match="fsync must be one of"):
        Journal(tmp_path / "bad", "sometimes")


def test_server_names_become_safe_distinct_directory_names():
    names = ["pype", "../../x", "a/b", "a_b", ".", "", "ü" * 300]
    dirs = [safe_dir_name(name) for name in names]
    assert len(set(dirs)) == len(dirs)
    for directory in dirs:
        assert "/" not in directory and not directory.startswith(".") and len(directory) <= 53
    assert os.path.basename(dirs[1]) == dirs[1]


@pytest.mark.parametrize("compact", [False, True], ids=["log", "snapshot"])
def test_a_refusal_is_answered_again_after_a_restart(tmp_path, compact):
    store = open_store(tmp_path)
    store.add("full", QueueOptions(maxsize=1))
    store.push(("full",), ["in"])
    with pytest.raises(QueueFullError) as refusal:
        store.push(("full",), ["lost?"], producer=(7, 1, 1))
    store.refuse((7, 1, 1), refusal.value)  # as the shard's engine does
    store.push(("other",), ["later"], producer=(7, 2, 1))
    if compact:
        store._compact()
    restored = open_store(tmp_path)
    with pytest.raises(QueueFullError, match="'full'"):
        restored.answer_again((7, 1, 1), 1)
    assert restored.answer_again((7, 2, 1), 1) == 1


@pytest.mark.parametrize("fsync", ["never", "batch"])
def test_a_journal_opened_again_on_the_same_boot_kept_every_write(tmp_path, fsync):
    """A shard process killed and started again finds every record it wrote in the OS's
    cache, whatever the fsync mode; after the OS restarted, only "always" says so."""
    if journal._boot_id() is None:
        pytest.skip("this operating system does not say which boot this is")
    store = open_store(tmp_path, fsync)
    store.push(("q",), [1])
    store.close()
    for mode, boot, kept in ((fsync, None, True), (fsync, "an earlier boot", False),
                             ("always", "an earlier boot", True)):
        if boot is not None:
            (tmp_path / "boot-id").write_text(boot)
        reopened = Journal(tmp_path, mode)
        assert reopened.kept_every_write is kept, (mode, boot)
        reopened.close()
    (tmp_path / "boot-id").unlink()  # a directory emptied, or not the one it wrote to
    assert not Journal(tmp_path, "always").kept_every_write


def _spy_on_fsync(monkeypatch) -> list:
    """The inode of each file os.fsync syncs from now on (it still syncs)."""
    real_fsync, synced = os.fsync, []

    def fsync(fd):
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def _log_inode(directory) -> int:
    return max(directory.glob("wal-*.log")).stat().st_ino


def test_records_written_unsynced_are_synced_by_sync_also_after_a_compaction(tmp_path, monkeypatch):
    store = open_store(tmp_path, fsync="always")
    synced = _spy_on_fsync(monkeypatch)
    store.replicate = lambda position, record: None  # a replicated primary's store: sync apart
    store.add("q", QueueOptions())
    store.push(("q",), ["x"])
    assert _log_inode(tmp_path) not in synced  # written, not synced
    store.sync()
    assert _log_inode(tmp_path) in synced
    store._compact()
    store.push(("q",), ["y"])
    synced.clear()
    store.sync()
    assert synced == [_log_inode(tmp_path)]  # the new generation's log
    assert store.pull("q", -1, remove=False) == open_store(tmp_path).pull("q", -1, remove=False)


def test_with_fsync_batch_the_syncer_syncs_what_was_written(tmp_path, monkeypatch):
    store = open_store(tmp_path, fsync="batch")
    store.add("q", QueueOptions())
    real_fsync, pushed_synced, on_writers_path = os.fsync, threading.Event(), []
    log = max(tmp_path.glob("wal-*.log"))
    pushed_size = None  # the log's size once the push is written

    def fsync(fd):
        if threading.current_thread() is threading.main_thread():
            on_writers_path.append(fd)
        status = os.fstat(fd)
        real_fsync(fd)
        if pushed_size is not None and status.st_ino == log.stat().st_ino and status.st_size >= pushed_size:
            pushed_synced.set()

    monkeypatch.setattr(os, "fsync", fsync)
    store.push(("q",), ["x"])
    pushed_size = log.stat().st_size
    assert pushed_synced.wait(timeout=120)  # the syncer's, every FSYNC_INTERVAL
    assert on_writers_path == []
