"""The dialog journal: acknowledged turns on disk before they reach the store.

A store commit costs DuckDB milliseconds of CPU per transaction (PostgreSQL a round
trip), and every reply waiting for one adds that to its latency and to the gateway's core.
An append of the same turns to a file plus ``fdatasync`` is mostly a wait on the disk with
the GIL released (the paced figures of docs/gateway.md, ``benchmarks/gateway.py``, went
from 0.967x to 0.989x direct). So with ``dialog_log.journal`` a turn is
acknowledged once its line is in the journal; the store receives the turns in batches
(``flush_interval_s``), and a gateway that starts inserts whatever its journal holds that
the store lacks (a kill -9 between the two) before it serves.

Each gateway process writes its own folder under ``dialog-journal/`` (gateways may share a
data dir), holding an exclusive ``flock`` on it while it runs: a folder whose lock can be
taken belongs to a process that is gone, and a starting gateway recovers it. A folder is
numbered segment files (one JSON line per turn); a segment is deleted once it is closed
and all its turns are committed to the store, a new one starts when the current one passes
``journal_segment_bytes``, and a clean stop leaves no folder behind. A line cut short by a
crash was never acknowledged (its ``fdatasync`` had not returned) and is skipped.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
import socket
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

import msgspec

from store import TurnRecord

logger = logging.getLogger(__name__)

JOURNAL_DIRNAME = "dialog-journal"
_SUFFIX = ".jsonl"
_LOCK_NAME = "lock"


class DialogJournal:
    """This process's append-only segments of acknowledged turns the store may lack."""

    def __init__(self, root: Path, segment_bytes: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self._segment_bytes = segment_bytes
        # Before this process's own folder exists, so it is never taken for an orphan.
        self._orphans = [held for held in map(_lock_if_orphaned, _folders(root)) if held]
        # Made and locked under a hidden name, then renamed: another gateway starting now
        # never sees this folder unlocked (and takes it for an orphan).
        name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        making = root / f".{name}"
        making.mkdir()
        held = _lock_if_orphaned(making)
        assert held is not None  # a folder just made, with a name nobody else picks
        self._lock_file: IO[str] | None = held[1]
        self.directory = making.rename(root / name)
        _sync_directory(root)
        self._current = 1
        self._fd: int | None = None
        self._size = 0
        # Turns journaled but not yet committed to the store, per segment. Appends run in
        # a worker thread, commits are reported from the event loop: both take the lock.
        self._outstanding: dict[int, int] = {}
        self._lock = threading.Lock()
        self._encoder = msgspec.json.Encoder()

    def recover(self) -> list[TurnRecord]:
        """The turns that gateways gone before left in their folders (killed, or stopped
        while the store refused their last turns). A line journaled by an older gateway
        lacks the fields added since: they read as ``TurnRecord``'s defaults (a turn
        without ``delivered`` was delivered: abandoned turns were not journaled apart)."""
        decoder = msgspec.json.Decoder(TurnRecord)
        turns = []
        for folder, _ in self._orphans:
            for path in sorted(folder.glob(f"*{_SUFFIX}")):
                for number, line in enumerate(path.read_bytes().splitlines(), start=1):
                    try:
                        turns.append(decoder.decode(line))
                    except msgspec.DecodeError:
                        # Only a last line can be torn, and it was never acknowledged.
                        logger.warning(
                            "dialog journal: %s line %d unreadable, skipped", path, number
                        )
        return turns

    def discard_recovered(self) -> None:
        """Delete the recovered folders (their turns are in the store now)."""
        for folder, lock_file in self._orphans:
            shutil.rmtree(folder, ignore_errors=True)
            lock_file.close()
        self._orphans = []

    def _path(self, segment: int) -> Path:
        return self.directory / f"{segment:08d}{_SUFFIX}"

    def append(self, turns: Sequence[TurnRecord]) -> int:
        """Write ``turns`` and ``fdatasync`` them; return their segment. Blocking: one
        caller at a time, in a worker thread."""
        data = b"".join(self._encoder.encode(turn) + b"\n" for turn in turns)
        with self._lock:
            if self._fd is None or self._size >= self._segment_bytes:
                self._rotate()
            segment, fd = self._current, self._fd
            assert fd is not None
            self._outstanding[segment] = self._outstanding.get(segment, 0) + len(turns)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fdatasync(fd)
        except OSError:
            with self._lock:
                self._outstanding[segment] -= len(turns)
            raise
        self._size += len(data)
        return segment

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._current += 1
        self._fd = os.open(self._path(self._current), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self._size = 0
        # The new file's name must be durable too, or a crash could lose the whole file.
        _sync_directory(self.directory)
        self._drop_committed()

    def committed(self, segments: Iterable[int]) -> None:
        """Count one committed turn per entry; delete closed segments with none left."""
        with self._lock:
            for segment in segments:
                self._outstanding[segment] -= 1
            self._drop_committed()

    def _drop_committed(self) -> None:
        for segment, count in list(self._outstanding.items()):
            if count == 0 and segment != self._current:
                self._path(segment).unlink(missing_ok=True)
                del self._outstanding[segment]

    def purge(self, turn_ids: Iterable[str]) -> list[Path]:
        """Remove the lines of ``turn_ids`` (deleted from the store) from this process's
        segments; return the files rewritten or deleted.

        A closed segment is rewritten without those lines (beside it, then renamed over
        it: nobody appends to it any more). The segment being appended to is never
        rewritten under a writer: when the store has all its turns (no append in flight,
        since an append counts its turns before it writes) it is closed and deleted, and
        the next append starts a new one; otherwise it is closed at the next append and
        deleted once its turns are committed, as any segment is.
        """
        ids = set(turn_ids)
        touched: list[Path] = []
        if not ids:
            return touched
        decoder = msgspec.json.Decoder(_JournalLine)
        with self._lock:
            for path in sorted(self.directory.glob(f"*{_SUFFIX}")):
                segment = int(path.stem)
                if segment == self._current and self._fd is not None:
                    if self._outstanding.get(segment, 0) == 0:
                        os.close(self._fd)
                        self._fd = None
                        self._outstanding.pop(segment, None)
                        path.unlink(missing_ok=True)
                        touched.append(path)
                    else:
                        self._size = self._segment_bytes
                    continue
                if _rewrite_without(path, ids, decoder):
                    touched.append(path)
        return touched

    def close(self) -> None:
        """Close the file; delete this process's folder if the store has all its turns
        (else leave it, unlocked, for the next gateway that starts to recover)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            left = sum(self._outstanding.values())
        if left:
            logger.warning(
                "dialog log: %d acknowledged turns are only in the journal %s; "
                "they are inserted when a gateway next starts on this data dir",
                left,
                self.directory,
            )
        else:
            shutil.rmtree(self.directory, ignore_errors=True)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


class _JournalLine(msgspec.Struct):
    """The part of a journal line a purge reads."""

    turn_id: str


def _rewrite_without(
    path: Path, ids: set[str], decoder: msgspec.json.Decoder[_JournalLine]
) -> bool:
    """Rewrite ``path`` without the lines of ``ids`` (atomically); whether any went."""
    lines = path.read_bytes().splitlines(keepends=True)
    kept: list[bytes] = []
    for line in lines:
        try:
            gone = decoder.decode(line).turn_id in ids
        except msgspec.DecodeError:
            gone = False  # a torn last line: recovery skips it
        if not gone:
            kept.append(line)
    if len(kept) == len(lines):
        return False
    # The kept lines may be turns the store lacks yet: durable before the rename.
    scratch = path.with_name(f".{path.name}.purging")
    with scratch.open("wb") as handle:
        handle.write(b"".join(kept))
        handle.flush()
        os.fdatasync(handle.fileno())
    os.replace(scratch, path)
    _sync_directory(path.parent)
    return True


def _folders(root: Path) -> list[Path]:
    """The gateways' folders (a hidden one is still being made, and holds no turns)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _sync_directory(directory: Path) -> None:
    """Make the names in ``directory`` durable (a new file's or folder's entry)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _lock_if_orphaned(folder: Path) -> tuple[Path, IO[str]] | None:
    """The folder and its held lock when no live process holds it; None otherwise."""
    lock_file = open(folder / _LOCK_NAME, "a")  # noqa: SIM115 - held while the folder is ours
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        return None
    return folder, lock_file
