"""The dialog log writer: answered turns reach the store in batches, never one by one.

Durable acknowledgement (``durable_ack``, the default) means a turn is on disk before its
reply is acknowledged (the JSON body, or a stream's final ``[DONE]``), so a crash loses no
acknowledged turn. The handler hands its finished turn to ``acknowledge`` and waits for
one of two group writes, whichever ``journal`` selects:

- ``journal`` on (the default): one task appends every turn that finished since its last
  append to the gateway's ``DialogJournal`` (one write and ``fdatasync``), then resolves
  their futures; the store receives the journaled turns in batches as without
  ``durable_ack``, and a committed batch releases its journal lines.
- ``journal`` off: the writer commits every turn that finished since its last commit in
  one store transaction, at most one commit starting per ``commit_interval_s``, the next
  batch gathering while one commits (for gateways without a disk that outlives them).

When every attempt fails, the waiting handlers get ``DialogLogUnavailableError`` (503)
instead of an acknowledgement; the turn stays queued for the store.

``submit`` queues a turn nobody waits for (a stream the client abandoned). With
``durable_ack`` off, ``acknowledge`` does the same: turns wait in memory up to
``flush_interval_s`` (or until ``batch_size`` are queued), and a crash loses them.
``stop`` drains everything still queued before the store closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from gateway.dialog_journal import DialogJournal
from gateway.errors import DialogLogUnavailableError
from gateway.settings import DialogLogConfig
from store import DialogStore, TurnRecord

logger = logging.getLogger(__name__)

_Waiter = asyncio.Future[None]


class DialogLogWriter:
    """Group-committing writer of ``TurnRecord`` rows (one transaction per batch)."""

    def __init__(
        self,
        store: DialogStore,
        config: DialogLogConfig,
        *,
        journal: DialogJournal | None = None,
        on_written: Callable[[int], None] | None = None,
        on_lost: Callable[[int], None] | None = None,
    ) -> None:
        self._store = store
        self._config = config
        # Only durable acknowledgement waits for the journal.
        self._journal = journal if config.durable_ack else None
        self._on_written = on_written
        self._on_lost = on_lost
        # The store's queue; per pending turn, its waiter's future (None when nobody
        # waits for the store) and its journal segment (None when not journaled).
        self._pending: list[TurnRecord] = []
        self._waiters: list[_Waiter | None] = []
        self._segments: list[int | None] = []
        self._writing = 0
        self._first_queued = 0.0
        self._last_commit = float("-inf")
        self._hurry = 0
        self._wakeup = asyncio.Event()
        self._changed = asyncio.Condition()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        # The journal's queue, written by its own task.
        self._to_journal: list[tuple[TurnRecord, _Waiter]] = []
        self._journaling = 0
        self._journal_wakeup = asyncio.Event()
        self._journal_stopping = False
        self._journal_task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Turns accepted but not yet committed."""
        return len(self._pending) + self._writing + len(self._to_journal) + self._journaling

    @property
    def durable(self) -> bool:
        """Whether ``acknowledge`` waits for the turn to be on disk."""
        return self._config.durable_ack

    @property
    def journal(self) -> DialogJournal | None:
        """The journal acknowledged turns go to first (None: not journaled); a deletion
        purges its lines (``DELETE /admin/dialogs``)."""
        return self._journal

    def submit(self, turn: TurnRecord) -> None:
        """Queue one turn nobody waits for; returns at once."""
        self._enqueue(turn, None, None)

    async def acknowledge(self, turn: TurnRecord) -> None:
        """Queue one turn; with ``durable_ack``, return once it is on disk (journaled, or
        its row committed).

        Raises ``DialogLogUnavailableError`` when the write failed every attempt (or the
        writer has stopped). Cancelling the caller does not unlog the turn.
        """
        if not self._config.durable_ack:
            self._enqueue(turn, None, None)
            return
        waiter: _Waiter = asyncio.get_running_loop().create_future()
        if self._journal is not None:
            accepted = self._enqueue_journal(turn, waiter)
        else:
            accepted = self._enqueue(turn, waiter, None)
        if not accepted:
            raise DialogLogUnavailableError("the dialog log is shut down; the turn was not logged")
        await waiter

    def _closed(self, stopping: bool, task: asyncio.Task[None] | None) -> bool:
        return stopping and (task is None or task.done())

    def _lost_after_shutdown(self, turn: TurnRecord) -> bool:
        logger.error("dialog log: turn %s arrived after shutdown, not logged", turn.turn_id)
        if self._on_lost is not None:
            self._on_lost(1)
        return False

    def _enqueue(self, turn: TurnRecord, waiter: _Waiter | None, segment: int | None) -> bool:
        if self._closed(self._stopping, self._task):
            return self._lost_after_shutdown(turn)
        if not self._pending:
            self._first_queued = asyncio.get_running_loop().time()
            self._wakeup.set()
        self._pending.append(turn)
        self._waiters.append(waiter)
        self._segments.append(segment)
        if len(self._pending) >= self._config.batch_size:
            self._wakeup.set()
        return True

    def _enqueue_journal(self, turn: TurnRecord, waiter: _Waiter) -> bool:
        if self._closed(self._journal_stopping, self._journal_task):
            return self._lost_after_shutdown(turn)
        self._to_journal.append((turn, waiter))
        self._journal_wakeup.set()
        return True

    def start(self) -> None:
        """Start the background writer task(s) (inside a running event loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="dialog-log-writer")
        if self._journal is not None and self._journal_task is None:
            self._journal_task = asyncio.create_task(
                self._run_journal(self._journal), name="dialog-journal-writer"
            )

    async def flush(self) -> None:
        """Wait until every turn submitted so far is committed (or counted as lost)."""
        self._hurry += 1
        try:
            async with self._changed:
                self._wakeup.set()
                await self._changed.wait_for(lambda: self.depth == 0)
        finally:
            self._hurry -= 1

    async def stop(self) -> None:
        """Drain the queues (journal first: it feeds the store's), then end the tasks."""
        self._journal_stopping = True
        self._journal_wakeup.set()
        if self._journal_task is not None:
            await self._journal_task
            self._journal_task = None
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    def _due(self) -> float:
        """Loop time at which the pending turns are to be written."""
        if self._stopping or self._hurry or len(self._pending) >= self._config.batch_size:
            return float("-inf")
        if self._config.durable_ack and self._journal is None:
            return max(self._first_queued, self._last_commit + self._config.commit_interval_s)
        return self._first_queued + self._config.flush_interval_s

    async def _run_journal(self, journal: DialogJournal) -> None:
        while True:
            self._journal_wakeup.clear()
            if not self._to_journal:
                if self._journal_stopping:
                    return
                await self._journal_wakeup.wait()
                continue
            entries, self._to_journal = self._to_journal, []
            turns = [turn for turn, _ in entries]
            self._journaling = len(entries)
            try:
                segment: int | None = await asyncio.to_thread(journal.append, turns)
            except OSError:
                logger.exception("dialog log: journaling %d turns failed", len(turns))
                segment = None
            finally:
                self._journaling = 0
            # Queued for the store either way: a turn the journal refused is not
            # acknowledged, but it is not dropped either.
            for turn, waiter in entries:
                self._enqueue(turn, None, segment)
                _settle(waiter, segment is not None, "the dialog journal")
            async with self._changed:
                self._changed.notify_all()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wakeup.clear()
            if not self._pending:
                if self._stopping:
                    return
                await self._wakeup.wait()
                continue
            delay = self._due() - loop.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), delay)
                continue
            size = self._config.batch_size
            batch, waiters = self._pending[:size], self._waiters[:size]
            segments = self._segments[:size]
            # What is left over is due at once (non-durable) or after the interval.
            del self._pending[:size], self._waiters[:size], self._segments[:size]
            self._writing = len(batch)
            self._last_commit = loop.time()
            try:
                written = await self._write(batch, segments)
            finally:
                self._writing = 0
            if self._journal is not None:
                if written:
                    self._journal.committed(s for s in segments if s is not None)
                elif not self._stopping:
                    # Safe in the journal: tried again with the next batch. At shutdown
                    # they stay there for the next start.
                    for turn, segment in zip(batch, segments, strict=True):
                        if segment is not None:
                            self._enqueue(turn, None, segment)
            for waiter in waiters:
                if waiter is not None:  # else nobody waits
                    _settle(waiter, written, "the dialog log")
            async with self._changed:
                self._changed.notify_all()

    async def _write(self, batch: list[TurnRecord], segments: list[int | None]) -> bool:
        """Insert the batch in one transaction; False when every attempt failed."""
        attempts = self._config.write_attempts
        for attempt in range(1, attempts + 1):
            try:
                await asyncio.to_thread(self._store.insert, batch)
            except Exception:
                logger.exception(
                    "dialog log: writing %d turns failed (attempt %d/%d)",
                    len(batch),
                    attempt,
                    attempts,
                )
                if attempt < attempts:
                    await asyncio.sleep(self._config.retry_delay_s * attempt)
                continue
            if self._on_written is not None:
                self._on_written(len(batch))
            return True
        journaled = sum(segment is not None for segment in segments)
        if journaled:
            # Not lost: their journal lines stay until the store has them.
            logger.error(
                "dialog log: %d journaled turns not written after %d attempts; "
                "kept in the journal and tried again",
                journaled,
                attempts,
            )
        lost = len(batch) - journaled
        if lost:
            logger.error("dialog log: %d turns lost after %d attempts", lost, attempts)
            if self._on_lost is not None:
                self._on_lost(lost)
        return False


def _settle(waiter: _Waiter, written: bool, where: str) -> None:
    """Acknowledge a waiting turn, or refuse it (503) when it could not be written."""
    if waiter.done():  # the caller left
        return
    if written:
        waiter.set_result(None)
    else:
        waiter.set_exception(
            DialogLogUnavailableError(
                f"the turn could not be written to {where}; "
                "the reply is not acknowledged, retry later"
            )
        )
