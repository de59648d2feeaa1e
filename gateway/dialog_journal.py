"""The dialog journal: acknowledged turns on disk before they reach the store.

A store commit costs DuckDB ~1.5-5 ms of CPU per transaction (PostgreSQL a round trip),
and every reply waiting for one adds that to its latency and to the gateway's core. An
append of the same turns to a file plus ``fdatasync`` costs ~0.2 ms, most of it spent
waiting on the disk with the GIL released. So with ``dialog_log.journal`` a turn is
acknowledged once its line is in the journal; the store receives the turns in batches
(``flush_interval_s``), and a gateway that starts inserts whatever its journal holds that
the store lacks (a kill -9 between the two) before it serves.

The journal is a folder of numbered segment files (one JSON line per turn). A segment is
deleted once it is closed and all its turns are committed to the store; a new segment
starts when the current one passes ``journal_segment_bytes``. One gateway process owns a
journal folder (an exclusive ``flock``): a second one on the same data dir is refused.
A line cut short by a crash was never acknowledged (its ``fdatasync`` had not returned)
and is skipped on recovery.
"""

from __future__ import annotations

import fcntl
import logging
import os
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


class JournalInUseError(RuntimeError):
    """Another process holds the journal folder."""


class DialogJournal:
    """Append-only segments of acknowledged turns that the store may not have yet."""

    def __init__(self, directory: Path, segment_bytes: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._segment_bytes = segment_bytes
        self._lock_file: IO[str] | None = open(directory / _LOCK_NAME, "a")  # noqa: SIM115
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            raise JournalInUseError(
                f"the dialog journal {directory} is used by another gateway process; "
                "give each gateway its own --data-dir"
            ) from None
        self._recovered = self._segments()
        self._current = max(self._recovered, default=0) + 1
        self._fd: int | None = None
        self._size = 0
        # Turns journaled but not yet committed to the store, per segment. Appends run in
        # a worker thread, commits are reported from the event loop: both take the lock.
        self._outstanding: dict[int, int] = {}
        self._lock = threading.Lock()
        self._encoder = msgspec.json.Encoder()

    def _segments(self) -> list[int]:
        numbers = []
        for path in self.directory.glob(f"*{_SUFFIX}"):
            if path.stem.isdigit():
                numbers.append(int(path.stem))
        return sorted(numbers)

    def _path(self, segment: int) -> Path:
        return self.directory / f"{segment:08d}{_SUFFIX}"

    def recover(self) -> list[TurnRecord]:
        """The turns of the segments a previous process left (it did not stop cleanly)."""
        decoder = msgspec.json.Decoder(TurnRecord)
        turns = []
        for segment in self._recovered:
            path = self._path(segment)
            for number, line in enumerate(path.read_bytes().splitlines(), start=1):
                try:
                    turns.append(decoder.decode(line))
                except msgspec.DecodeError:
                    # Only the last line can be torn, and it was never acknowledged.
                    logger.warning("dialog journal: %s line %d unreadable, skipped", path, number)
        return turns

    def discard_recovered(self) -> None:
        """Delete the recovered segments (their turns are in the store now)."""
        for segment in self._recovered:
            self._path(segment).unlink(missing_ok=True)
        self._recovered = []

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
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
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

    def close(self) -> None:
        """Close the file; delete the current segment too if all its turns are stored."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
                if not self._outstanding.get(self._current):
                    self._path(self._current).unlink(missing_ok=True)
                    self._outstanding.pop(self._current, None)
            left = sum(self._outstanding.values())
        if left:
            logger.warning(
                "dialog log: %d acknowledged turns are only in the journal %s; "
                "they are inserted when a gateway next starts on this data dir",
                left,
                self.directory,
            )
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
