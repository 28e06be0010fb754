"""Journal formats: a journal of format 1 (before records were typed) still restores,
exactly; one of a format newer than the code is refused, by name (no Ray).

tests/fixtures/journal-v1/ is a format-1 journal and expected.py the store that
wrote it; tests/fixtures/journal_v1.py says how both were made.
"""

import pickle
import runpy
import shutil

import pytest

from pype.options import QueueOptions
from pype.shards import journal, records
from pype.shards.journal import FORMAT, Journal, JournalFormatError, read_journal
from pype.shards.store import QueueStore
from tests.fixtures.journal_v1 import DIRECTORY, describe

EXPECTED = runpy.run_path(str(DIRECTORY / "expected.py"))["EXPECTED"]
# Format 1 had every record type but Lead, which replication brought in format 2, and
# Refuse, a new code of format 2.
FORMAT_1_TYPES = tuple(kind for kind in records.RECORD_TYPES  # those of later dates are not
                       if kind not in (records.Lead, records.Refuse, records.Reject, records.Expire,
                                       records.Delay, records.Due, records.Extend, records.Move,
                                       records.Split, records.Undeliverable,
                                       records.Outbox, records.Resend, records.Delivered))


def open_store(directory):
    store = QueueStore(QueueOptions(), journal=Journal(directory, "never"))
    store.restore()
    return store


@pytest.fixture
def v1_journal(tmp_path):
    """A copy of the format-1 fixture (restoring rewrites the journal it reads)."""
    directory = tmp_path / "shard-0"
    shutil.copytree(DIRECTORY, directory, ignore=shutil.ignore_patterns("expected.py"))
    return directory


def test_the_fixture_is_format_1_with_a_snapshot_and_every_record_type(v1_journal):
    contents = read_journal(v1_journal)
    assert contents.format == 1 and contents.generation == 1 and contents.state is not None
    assert contents.torn_bytes == 0
    assert {type(record) for record in contents.records} == set(FORMAT_1_TYPES)


def test_a_format_1_journal_restores_exactly_and_is_rewritten_in_this_format(v1_journal):
    store = open_store(v1_journal)
    assert describe(store) == EXPECTED
    assert sorted(path.name for path in v1_journal.glob("*-*.*")) == ["snapshot-2.pkl", "wal-2.log"]
    assert read_journal(v1_journal).format == FORMAT
    # It goes on where it stopped: new lease ids come after every one issued before.
    issued = max(lease[0] for queue in EXPECTED["queues"].values() for lease in queue["leases"])
    [(lease_id, item, redelivered)] = store.pull("fifo", 1, ack=True)
    assert (lease_id > issued, item, redelivered) == (True, (3, 4.5), True)
    store.settle("fifo", [lease_id], outcome="nack")
    store.close()
    assert describe(open_store(v1_journal)) == describe(store)


def test_a_journal_written_now_restores_in_this_format(tmp_path):
    store = open_store(tmp_path)
    store.push(("q",), [1, 2, 3], producer=(5, 1))
    store.pull("q", 1)
    store._compact()
    [(lease_id, _, _)] = store.pull("q", 1, ack=True)
    store.close()
    contents = read_journal(tmp_path)
    assert contents.format == FORMAT
    assert next(journal._frames((tmp_path / "wal-1.log").read_bytes()))[0] == (0, FORMAT)
    assert [(type(record), record.first_id) for record in contents.records] == [(records.Lease, lease_id)]
    restored = open_store(tmp_path)
    assert describe(restored) == describe(store)
    assert restored.pull("q", -1) == [3]


def test_every_record_type_has_a_code_and_each_of_format_1_its_name():
    assert set(journal._CODES) == set(records.RECORD_TYPES)
    assert set(journal._FORMAT_1.values()) == set(FORMAT_1_TYPES)
    assert len(set(journal._CODES.values())) == len(journal._CODES)
    assert journal._FORMAT_RECORD not in journal._CODES.values()


def test_replay_shows_tools_each_record_typed_in_the_order_format_1_wrote_it(v1_journal):
    """bench/soak.py's journal trace reads the records that replay() observes."""
    contents = read_journal(v1_journal)
    seen = []
    QueueStore(QueueOptions()).replay(contents.state, contents.records,
                                      lambda record, moved: seen.append(record))
    written = [frame for frame, _ in journal._frames((v1_journal / "wal-1.log").read_bytes())]
    assert [type(record) for record in seen] == [journal._FORMAT_1[frame[0]] for frame in written]
    queues = [record.queue for record in seen if hasattr(record, "queue")]
    assert queues == [frame[1] for frame in written if hasattr(journal._FORMAT_1[frame[0]], "queue")]


def _write_log(directory, *frames):
    directory.mkdir()
    (directory / "wal-0.log").write_bytes(b"".join(journal._frame(frame) for frame in frames))


def test_a_log_of_a_newer_format_is_refused_by_name(tmp_path):
    _write_log(tmp_path / "j", (0, FORMAT + 1), (99, "a record of a kind this code never saw"))
    log = tmp_path / "j" / "wal-0.log"
    written = log.read_bytes()
    with pytest.raises(JournalFormatError, match=rf"wal-0.log is in format {FORMAT + 1}; .*reads formats 1 to {FORMAT}"):
        open_store(tmp_path / "j")
    assert log.read_bytes() == written, "a refused journal is left as it was"


def test_a_snapshot_of_a_newer_format_is_refused_by_name(tmp_path):
    store = open_store(tmp_path)
    store.push(("q",), [1])
    store._compact()
    store.close()
    snapshot = tmp_path / "snapshot-1.pkl"
    state = pickle.loads(snapshot.read_bytes())
    snapshot.write_bytes(pickle.dumps({**state, "format": FORMAT + 1}))
    with pytest.raises(JournalFormatError, match=rf"snapshot-1.pkl is in format {FORMAT + 1}"):
        read_journal(tmp_path)


def test_a_log_that_is_no_journal_of_a_known_format_is_refused(tmp_path):
    _write_log(tmp_path / "headless", (4, ("q",), [True], [1], None, 28, None))
    with pytest.raises(JournalFormatError, match="does not begin with a format record"):
        read_journal(tmp_path / "headless")
    _write_log(tmp_path / "unknown", (0, FORMAT), (99, "q"))
    with pytest.raises(JournalFormatError, match=f"not one of format {FORMAT}: \\(99, 'q'\\)"):
        read_journal(tmp_path / "unknown")
