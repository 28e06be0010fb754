"""A shard's write-ahead log and snapshots: what it accepted survives its process.

Layout of one shard's directory (Pype creates it with mode 0700, files 0600):

    snapshot-<g>.pkl   the whole state when log generation g began (none for g = 0)
    wal-<g>.log        every change since then, one framed record each

A record is a 4-byte length, a 4-byte CRC32 and a pickle. Appending writes the
record to the operating system before the call that caused it returns, so a
killed shard process loses nothing it acknowledged; `fsync` decides what
survives the loss of the machine: "always" syncs every record before the call
returns, "batch" syncs at most FSYNC_INTERVAL later, "never" leaves it to the
operating system. A record cut short by a crash is dropped, with a warning, when
the log is read back.

Compaction writes the state as snapshot g+1 (to a temporary file, synced, then
renamed), starts wal-(g+1).log and deletes generation g. Reading takes the
newest complete snapshot and replays its log.

Queue names live only inside records: no file name is made from user input.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from pype.options import FSYNC_MODES

logger = logging.getLogger("pype")

FSYNC_INTERVAL = 0.05  # seconds between syncs in "batch" mode
_HEADER = struct.Struct("<II")  # length, crc32 of the pickled record
_FILE_MODE = 0o600
_DIR_MODE = 0o700


def safe_dir_name(label: str) -> str:
    """A file-system-safe, collision-free directory name for a user-given label."""
    slug = re.sub(r"[^A-Za-z0-9_-]", "_", label)[:40]
    return f"{slug}-{xxhash.xxh64_hexdigest(label.encode())[:12]}"


def make_private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) with mode 0700; return it."""
    path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    path.chmod(_DIR_MODE)  # mkdir's mode is filtered by the umask
    return path


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
        if fsync == "batch":
            threading.Thread(target=self._sync_periodically, name="pype-fsync", daemon=True).start()

    # -- reading back ---------------------------------------------------------------

    def load(self) -> tuple[Any, list]:
        """Return (the newest snapshot's state or None, the records logged after it).

        Opens that generation's log for appending, cut back to its last whole record.
        """
        contents = read_journal(self.directory)
        if contents.torn_bytes:
            logger.warning("pype journal %s: dropped %d bytes of a record cut short by a crash",
                           self._log_path(contents.generation), contents.torn_bytes)
        self.generation = contents.generation
        self._open_log(self._log_path(contents.generation), truncate_to=contents.log_bytes)
        return contents.state, contents.records

    # -- writing --------------------------------------------------------------------

    def append(self, record: tuple) -> None:
        """Write one record; with fsync "always", also sync it before returning."""
        payload = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
        frame = _HEADER.pack(len(payload), zlib.crc32(payload)) + payload
        with self._lock:
            os.write(self._fd, frame)
            self.log_bytes += len(frame)
            if self.fsync == "always":
                os.fsync(self._fd)
            else:
                self._dirty = True

    def compact(self, state: Any) -> None:
        """Make `state` the next generation's snapshot and start its empty log."""
        generation = self.generation + 1
        final = self._snapshot_path(generation)
        temporary = final.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
        try:
            os.write(fd, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, final)
        self._sync_directory()
        with self._lock:
            os.close(self._fd)
            old = self.generation
            self.generation = generation
            self._open_log(self._log_path(generation), truncate_to=0)
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
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, _FILE_MODE)
        os.ftruncate(self._fd, truncate_to)
        self.log_bytes = truncate_to
        self._sync_directory()

    def _sync_periodically(self) -> None:
        while not self._stop.wait(FSYNC_INTERVAL):
            with self._lock:
                if self._dirty and self._fd >= 0:
                    os.fsync(self._fd)
                    self._dirty = False

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
    state: Any          # the newest readable snapshot's state, None before the first
    records: list       # the whole records logged after it
    log_bytes: int      # bytes of those records
    torn_bytes: int     # bytes after them: a record cut short by a crash


def read_journal(directory: Path) -> JournalContents:
    """Read a shard's journal without changing it (Journal.load, and tools that inspect one)."""
    directory = Path(directory)
    generation, state = _newest_snapshot(directory)
    path = directory / f"wal-{generation}.log"
    data = path.read_bytes() if path.exists() else b""
    records, good_bytes = [], 0
    for record, end in _frames(data):
        records.append(record)
        good_bytes = end
    return JournalContents(generation, state, records, good_bytes, len(data) - good_bytes)


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
    """Yield (record, offset after it) for each whole, intact record of `data`."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, offset)
        start, end = offset + _HEADER.size, offset + _HEADER.size + length
        if end > len(data) or zlib.crc32(data[start:end]) != crc:
            return
        try:
            record = pickle.loads(data[start:end])
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError):
            return
        yield record, end
        offset = end
