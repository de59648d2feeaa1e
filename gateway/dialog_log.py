"""The dialog log writer: one task commits answered turns to the store in batches.

Durable acknowledgement (``durable_ack``, the default) is a group commit: a handler
hands its finished turn to ``acknowledge`` and waits; the writer task commits every turn
that finished since its last commit in one transaction (never one per turn), at most one
commit starting per ``commit_interval_s``, the next batch gathering while one commits,
then resolves each turn's future. The reply is sent only after that, so a crash loses no
acknowledged turn. When every attempt fails, the waiting handlers get
``DialogLogUnavailableError`` (503) instead of an acknowledgement.

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
        on_written: Callable[[int], None] | None = None,
        on_lost: Callable[[int], None] | None = None,
    ) -> None:
        self._store = store
        self._config = config
        self._on_written = on_written
        self._on_lost = on_lost
        self._pending: list[TurnRecord] = []
        # One entry per pending turn: its waiter's future, or None when nobody waits.
        self._waiters: list[_Waiter | None] = []
        self._writing = 0
        self._first_queued = 0.0
        self._last_commit = float("-inf")
        self._hurry = 0
        self._wakeup = asyncio.Event()
        self._changed = asyncio.Condition()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Turns accepted but not yet committed."""
        return len(self._pending) + self._writing

    @property
    def durable(self) -> bool:
        """Whether ``acknowledge`` waits for the commit."""
        return self._config.durable_ack

    def submit(self, turn: TurnRecord) -> None:
        """Queue one turn nobody waits for; returns at once."""
        self._enqueue(turn, None)

    async def acknowledge(self, turn: TurnRecord) -> None:
        """Queue one turn; with ``durable_ack``, return once its row is committed.

        Raises ``DialogLogUnavailableError`` when the commit failed every attempt (or the
        writer has stopped). Cancelling the caller does not unlog the turn.
        """
        if not self._config.durable_ack:
            self._enqueue(turn, None)
            return
        waiter: _Waiter = asyncio.get_running_loop().create_future()
        if not self._enqueue(turn, waiter):
            raise DialogLogUnavailableError("the dialog log is shut down; the turn was not logged")
        await waiter

    def _enqueue(self, turn: TurnRecord, waiter: _Waiter | None) -> bool:
        if self._stopping and (self._task is None or self._task.done()):
            logger.error("dialog log: turn %s arrived after shutdown, not logged", turn.turn_id)
            if self._on_lost is not None:
                self._on_lost(1)
            return False
        if not self._pending:
            self._first_queued = asyncio.get_running_loop().time()
            self._wakeup.set()
        self._pending.append(turn)
        self._waiters.append(waiter)
        if len(self._pending) >= self._config.batch_size:
            self._wakeup.set()
        return True

    def start(self) -> None:
        """Start the background writer task (inside a running event loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="dialog-log-writer")

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
        """Drain the queue, then end the writer task."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    def _due(self) -> float:
        """Loop time at which the pending turns are to be written."""
        if self._stopping or self._hurry or len(self._pending) >= self._config.batch_size:
            return float("-inf")
        if self._config.durable_ack:
            return max(self._first_queued, self._last_commit + self._config.commit_interval_s)
        return self._first_queued + self._config.flush_interval_s

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
            # What is left over is due at once (non-durable) or after the interval.
            del self._pending[:size], self._waiters[:size]
            self._writing = len(batch)
            self._last_commit = loop.time()
            try:
                written = await self._write(batch)
            finally:
                self._writing = 0
            for waiter in waiters:
                if waiter is None or waiter.done():  # nobody waits, or the caller left
                    continue
                if written:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(
                        DialogLogUnavailableError(
                            "the turn could not be written to the dialog log; "
                            "the reply is not acknowledged, retry later"
                        )
                    )
            async with self._changed:
                self._changed.notify_all()

    async def _write(self, batch: list[TurnRecord]) -> bool:
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
        logger.error("dialog log: %d turns lost after %d attempts", len(batch), attempts)
        if self._on_lost is not None:
            self._on_lost(len(batch))
        return False
