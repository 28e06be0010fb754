"""A shard's write-ahead log and snapshots: what it accepted survives its process.

Layout of one shard's directory (Pype creates it with mode 0700, files 0600):

    snapshot-<g>.pkl   the whole state when log generation g began (none for g = 0)
    wal-<g>.log        every change since then, one framed record each
    boot-id            the boot of the operating system that last opened it (Linux)

A frame is a 4-byte length, a 4-byte CRC32 and a pickle. Appending writes the
record to the operating system before the call that caused it returns, so a
killed shard process loses nothing it acknowledged; `fsync` decides what
survives the loss of the machine: "always" syncs every record before the call
returns (a replicated primary's reply waits for a sync that runs beside its
backups': Journal.sync), "batch" syncs at most FSYNC_INTERVAL later, "never" leaves it to the
operating system. A record cut short by a crash is dropped, with a warning, when
the log is read back. A process that opens the journal again after its own crash
finds every record it wrote, whatever the mode, as long as the operating system
did not restart meanwhile: Journal.kept_every_write says so, from boot-id.

Compaction writes the state as snapshot g+1 (to a temporary file, synced, then
renamed), starts wal-(g+1).log and deletes generation g. Reading takes the
newest complete snapshot and replays its log.

Queue names live only inside records: no file name is made from user input.

Formats. This code writes format 2 (FORMAT):

- a log's first frame is its format record, (0, 2); every other frame is one
  record of pype.shards.records as (its type code, *its fields), a plain tuple,
  which pickles several times faster than the named tuple itself (the hot path:
  one record per push);
- a snapshot is the pickle of the store's state dict with "format": 2 added.

Format 1 (before records were typed) had no format record: each frame was a
plain tuple whose first field named its kind, ("push", queues, entered, ...),
the fields in the order of the typed record's, and the snapshot had no "format".
Journals of format 1 still restore, exactly: reading converts each of its
records to the typed record (_from_format_1, the only place that knows format 1),
and QueueStore.restore then compacts at once, so that the journal is all in
format 2 before anything is appended to it. (Converting was chosen over refusing
old journals: it is one table, and a shard keeps what it had accepted across the
upgrade.) A journal of a format newer than this code reads (a snapshot's
"format", a log's format record) is refused with JournalFormatError, which names
it, rather than read wrongly. The framing and the format record (0, <format>)
stay as they are in every format, so that any version can tell which it meets.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import xxhash

from pype.errors import JournalFormatError
from pype.options import FSYNC_MODES
from pype.shards import records
from pype.shards.records import Record

logger = logging.getLogger("pype")

FSYNC_INTERVAL = 0.05  # seconds between syncs in "batch" mode
FORMAT = 2  # the format this code writes; it reads 1 to FORMAT (see the module docstring)
_FRAME = struct.Struct("<II")  # length, crc32 of the pickled record
_FILE_MODE = 0o600
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")  # Linux: new at each boot
EXIT_JOURNAL_FAILED = 74  # the exit status of a shard whose journal could not be written (EX_IOERR)
_DIR_MODE = 0o700

# Each record type's code in the log. The codes are the format: never change one
# (a new record type takes a new code; changing what a code means is a new FORMAT).
_FORMAT_RECORD = 0  # the code of a log's first frame, (0, FORMAT)
_CODES: dict[type, int] = {
    records.Add: 1, records.Remove: 2, records.Pin: 3, records.Push: 4, records.Insert: 5,
    records.Admit: 6, records.Take: 7, records.Lease: 8, records.Settle: 9, records.Expect: 10,
    records.Import: 11, records.Arrived: 12, records.Export: 13, records.Release: 14,
    records.Lead: 15, records.Refuse: 16, records.Reject: 17, records.Outbox: 18,
    records.Resend: 19, records.Delivered: 20, records.Expire: 21, records.Delay: 22,
    records.Due: 23, records.Extend: 24, records.Move: 25, records.Split: 26,
    records.Undeliverable: 27}
_TYPES: dict[int, type] = {code: kind for kind, code in _CODES.items()}

# Format 1's name for each record type: its records were (name, *fields).
_FORMAT_1: dict[str, type] = {
    "add": records.Add, "remove": records.Remove, "pin": records.Pin, "push": records.Push,
    "insert": records.Insert, "admit": records.Admit, "take": records.Take,
    "lease": records.Lease, "settle": records.Settle, "expect": records.Expect,
    "import": records.Import, "arrived": records.Arrived, "export": records.Export,
    "release": records.Release}


def safe_dir_name(label: str) -> str:
    """A file-system-safe, collision-free directory name for a user-given label."""
    slug = re.sub(r"[^A-Za-z0-9_-]", "_", label)[:40]
    return f"{slug}-{xxhash.xxh64_hexdigest(label.encode())[:12]}"


def _write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written (a write may take part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _stop_the_shard(directory: Path, error: OSError) -> NoReturn:
    """A journal write or sync failed. The store changed its memory before it: going on
    would serve and acknowledge what the journal does not hold. Stop the process; its
    restart replays the journal (Kafka halts on a log directory's failure)."""
    logger.critical("pype journal %s: a write failed (%s): the shard stops", directory, error)
    os._exit(EXIT_JOURNAL_FAILED)


def _boot_id() -> str | None:
    """This boot of the operating system, or None where it cannot tell (not Linux)."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return None


def make_private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) with mode 0700; return it."""
    path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    path.chmod(_DIR_MODE)  # mkdir's mode is filtered by the umask
    return path


@dataclass(frozen=True)
class JournalPlace:
    """Where a shard's journal lies below persistence.dir, which the shard expands on its
    own node: <dir>/<server>/<shard>/. fresh: a shard new to this index (a resize),
    which sets aside the journal of one that a shrink removed (it holds no queue)."""

    server: str  # safe_dir_name of the server's label
    shard: str   # "shard-<index>"
    fresh: bool = False

    def directory(self, base: Path, restarted: bool) -> Path:
        """The journal's directory under `base`; `restarted`: Ray restarted this shard
        (its journal is its own, never set aside)."""
        directory = Path(base) / self.server / self.shard
        if self.fresh and not restarted and directory.exists():
            directory.rename(directory.with_name(f"{self.shard}.retired-{os.urandom(4).hex()}"))
        return directory


class Journal:
    """Appends a shard's records to its log and compacts the log into snapshots."""

    def __init__(self, directory: Path, fsync: str = "always"):
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}; got {fsync!r}")
        self.directory = make_private_dir(Path(directory))
        self.fsync = fsync
        self.generation = 0
        self.log_bytes = 0
        self._fd = -1
        self._dirty = False
        self._lock = threading.Lock()  # the writer and the "batch" syncer share the fd
        self._stop = threading.Event()
        self.kept_every_write = self._note_boot()
        if fsync == "batch":
            threading.Thread(target=self._sync_periodically, name="pype-fsync", daemon=True).start()

    def _note_boot(self) -> bool:
        """Does the directory hold every record that the process before this one
        acknowledged? Yes if that process left its boot-id here (the directory is the
        one it wrote to, not a new or emptied one) and fsync is "always" (each record
        was synced before anything that depends on it was acknowledged) or
        the operating system has not restarted since (what it wrote is in the OS's
        cache at least, even if it was killed; a local filesystem, whose write errors
        the writer saw). Records this boot for the next process."""
        boot = _boot_id()
        path = self.directory / "boot-id"
        last = path.read_text() if path.exists() else None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
        try:
            _write_all(fd, (boot or "unknown").encode())
        finally:
            os.close(fd)
        return last is not None and (self.fsync == "always" or (boot is not None and last == boot))

    # -- reading back ---------------------------------------------------------------

    def load(self) -> JournalContents:
        """Read the directory (see read_journal) and open the newest log for appending,
        cut back to its last whole record.

        If contents.format is older than FORMAT, compact() before appending: a log
        holds the records of one format (QueueStore.restore does so).
        """
        contents = read_journal(self.directory)
        if contents.torn_bytes:
            logger.warning("pype journal %s: dropped %d bytes of a record cut short by a crash",
                           self._log_path(contents.generation), contents.torn_bytes)
        self.generation = contents.generation
        self._open_log(self._log_path(contents.generation), truncate_to=contents.log_bytes)
        return contents

    # -- writing --------------------------------------------------------------------

    def extend(self, batch: Iterable[Record], sync: bool = True) -> None:
        """Write records in one write; with fsync "always", sync them once before
        returning (a backup writes each message of its primary so: group commit).
        sync=False leaves the sync to a later sync(): a replicated primary's records
        are synced on a thread of their own while its backups sync theirs."""
        frames = b"".join(_frame((_CODES[type(record)],) + record) for record in batch)
        with self._lock:
            try:
                _write_all(self._fd, frames)
                if sync and self.fsync == "always":
                    os.fsync(self._fd)
            except OSError as error:
                _stop_the_shard(self.directory, error)
            self.log_bytes += len(frames)
            if not sync or self.fsync != "always":
                self._dirty = True

    def sync(self) -> None:
        """Sync every record written before this call. Writers go on meanwhile: it
        syncs a duplicate of the log's descriptor (after a compaction, the records of
        the old log are in the synced snapshot)."""
        with self._lock:
            if self._fd < 0:
                return
            try:
                fd = os.dup(self._fd)
            except OSError as error:  # out of descriptors: no sync, so no acknowledgement
                _stop_the_shard(self.directory, error)
        try:
            os.fsync(fd)
        except OSError as error:
            _stop_the_shard(self.directory, error)
        finally:
            os.close(fd)

    def compact(self, state: dict) -> None:
        """Make `state` (the store's dict, to which the snapshot adds "format": FORMAT)
        the next generation's snapshot, and start its log."""
        generation = self.generation + 1
        final = self._snapshot_path(generation)
        temporary = final.with_suffix(".tmp")
        snapshot = pickle.dumps({**state, "format": FORMAT}, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
            try:
                _write_all(fd, snapshot)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, final)
            self._sync_directory()
            with self._lock:
                os.close(self._fd)
                self._fd = -1
                old = self.generation
                self.generation = generation
                self._open_log(self._log_path(generation), truncate_to=0)
        except OSError as error:  # the old log holds every record; a restart replays it
            _stop_the_shard(self.directory, error)
        self._log_path(old).unlink(missing_ok=True)
        self._snapshot_path(old).unlink(missing_ok=True)
        logger.info("pype journal %s: compacted into snapshot %d", self.directory, generation)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if self._fd >= 0:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1

    def _open_log(self, path: Path, truncate_to: int) -> None:
        """Open the log at `path` for appending after its first `truncate_to` bytes; a log
        started afresh (truncate_to=0) gets its format record first."""
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, _FILE_MODE)
        os.ftruncate(self._fd, truncate_to)
        self.log_bytes = truncate_to
        if truncate_to == 0:
            format_record = _frame((_FORMAT_RECORD, FORMAT))
            os.write(self._fd, format_record)
            os.fsync(self._fd)  # whatever "fsync" says: no record may outlive it
            self.log_bytes = len(format_record)
        self._sync_directory()

    def _sync_periodically(self) -> None:
        while not self._stop.wait(FSYNC_INTERVAL):
            with self._lock:
                dirty, self._dirty = self._dirty, False
            if dirty:
                self.sync()

    def _sync_directory(self) -> None:
        """Make file creations and renames in the directory durable."""
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _log_path(self, generation: int) -> Path:
        return self.directory / f"wal-{generation}.log"

    def _snapshot_path(self, generation: int) -> Path:
        return self.directory / f"snapshot-{generation}.pkl"


@dataclass
class JournalContents:
    """What a journal directory holds, as read_journal() found it."""

    generation: int
    state: dict | None  # the newest readable snapshot's state, None before the first
    records: list[Record]  # the whole records logged after it
    log_bytes: int      # bytes of the log's whole frames
    torn_bytes: int     # bytes after them: a record cut short by a crash
    format: int         # the oldest format of the files read (FORMAT if there were none)


def read_journal(directory: Path) -> JournalContents:
    """Read a shard's journal without changing it (Journal.load, and tools that inspect one).

    Records of format 1 come back typed, like those of format 2. Raises
    JournalFormatError for a file of a newer format than FORMAT.
    """
    directory = Path(directory)
    generation, state = _newest_snapshot(directory)
    formats = []
    if state is not None:
        formats.append(_snapshot_format(state, directory / f"snapshot-{generation}.pkl"))
    path = directory / f"wal-{generation}.log"
    data = path.read_bytes() if path.exists() else b""
    frames, good_bytes = [], 0
    for frame, end in _frames(data):
        frames.append(frame)
        good_bytes = end
    log_format, typed = _decode_log(frames, path)
    if log_format is not None:
        formats.append(log_format)
    return JournalContents(generation, state, typed, good_bytes, len(data) - good_bytes,
                           min(formats, default=FORMAT))



def _frame(value: tuple) -> bytes:
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def _check_format(found: Any, path: Path) -> int:
    if type(found) is not int or not 1 <= found <= FORMAT:
        raise JournalFormatError(
            f"pype journal {path} is in format {found!r}; this version of Pype reads formats "
            f"1 to {FORMAT}. Start the shard with the (newer) Pype that wrote it, or move the "
            f"journal's directory aside to start the shard empty.")
    return found


def _snapshot_format(state: Any, path: Path) -> int:
    """The format of a snapshot's `state`, which loses its "format" entry (the store's
    state is the rest)."""
    if not isinstance(state, dict):
        raise JournalFormatError(f"pype journal {path} is not a snapshot Pype wrote "
                                 f"(a {type(state).__name__}, not a dict)")
    return _check_format(state.pop("format", 1), path)


def _decode_log(frames: list, path: Path) -> tuple[int | None, list[Record]]:
    """(the format of a log's frames, None for an empty log; its records, typed)."""
    if not frames:
        return None, []
    first = frames[0]
    if type(first) is tuple and first and type(first[0]) is str:  # format 1: no format record
        return 1, _decoded(frames, _from_format_1, path, 1)
    if type(first) is not tuple or len(first) != 2 or first[0] != _FORMAT_RECORD:
        raise JournalFormatError(f"pype journal {path} does not begin with a format record: "
                                 f"{first!r:.80}")
    log_format = _check_format(first[1], path)
    return log_format, _decoded(frames[1:], _from_format_2, path, log_format)


def _decoded(frames: list, decode: Callable[[tuple], Record], path: Path,
             log_format: int) -> list[Record]:
    typed = []
    for frame in frames:
        try:
            typed.append(decode(frame))
        except (KeyError, TypeError, ValueError) as error:
            raise JournalFormatError(f"pype journal {path}: a record that is not one of format "
                                     f"{log_format}: {frame!r:.80}") from error
    return typed


def _from_format_2(frame: tuple) -> Record:
    kind = _TYPES[frame[0]]
    if len(frame) != len(kind._fields) + 1:
        raise TypeError(f"{kind.__name__} has {len(kind._fields)} fields")
    return tuple.__new__(kind, frame[1:])


def _from_format_1(frame: tuple) -> Record:
    """The typed record of a format-1 record: ("push", queues, entered, ...) is
    records.Push(queues, entered, ...); ("arrived", None) is records.Arrived()."""
    name, *fields = frame
    kind = _FORMAT_1[name]
    return records.Arrived() if kind is records.Arrived else kind(*fields)


def _newest_snapshot(directory: Path) -> tuple[int, Any]:
    generations = sorted(
        (int(match.group(1)) for match in
         (re.fullmatch(r"snapshot-(\d+)\.pkl", p.name) for p in directory.iterdir()) if match),
        reverse=True)
    for generation in generations:
        try:
            return generation, pickle.loads((directory / f"snapshot-{generation}.pkl").read_bytes())
        except (OSError, pickle.UnpicklingError, EOFError) as error:
            logger.warning("pype journal: snapshot %d unreadable (%s); trying an older one",
                           generation, error)
    return 0, None


def _frames(data: bytes) -> Iterator[tuple[Any, int]]:
    """Yield (the unpickled frame, offset after it) for each whole, intact frame of `data`."""
    offset = 0
    while offset + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, offset)
        start, end = offset + _FRAME.size, offset + _FRAME.size + length
        if end > len(data) or zlib.crc32(data[start:end]) != crc:
            return
        try:
            record = pickle.loads(data[start:end])
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError):
            return
        yield record, end
        offset = end
