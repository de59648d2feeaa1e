"""The dialog log writer: answered turns go to DuckDB in batches, off the request path.

Handlers only append to an in-memory list (``submit`` never waits); one task writes
batches in a worker thread when ``batch_size`` turns are waiting or ``flush_interval_s``
has passed. ``stop`` drains everything still queued before the database closes, so a
turn the gateway answered is not lost on a clean shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from gateway.settings import DialogLogConfig
from store import DialogStore, TurnRecord

logger = logging.getLogger(__name__)


class DialogLogWriter:
    """Batched, asynchronous writer of ``TurnRecord`` rows."""

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
        self._writing = 0
        self._wakeup = asyncio.Event()
        self._changed = asyncio.Condition()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Turns accepted but not yet committed to DuckDB."""
        return len(self._pending) + self._writing

    def submit(self, turn: TurnRecord) -> None:
        """Queue one turn; returns at once."""
        if self._stopping and self._task is None:
            logger.error("dialog log: turn %s arrived after shutdown, not logged", turn.turn_id)
            if self._on_lost is not None:
                self._on_lost(1)
            return
        self._pending.append(turn)
        if len(self._pending) >= self._config.batch_size:
            self._wakeup.set()

    def start(self) -> None:
        """Start the background writer task (inside a running event loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="dialog-log-writer")

    async def flush(self) -> None:
        """Wait until every turn submitted so far is committed (or counted as lost)."""
        async with self._changed:
            self._wakeup.set()
            await self._changed.wait_for(lambda: self.depth == 0)

    async def stop(self) -> None:
        """Drain the queue, then end the writer task."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._config.flush_interval_s)
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[: self._config.batch_size]
                del self._pending[: self._config.batch_size]
                self._writing = len(batch)
                try:
                    await self._write(batch)
                finally:
                    self._writing = 0
                async with self._changed:
                    self._changed.notify_all()
            if self._stopping:
                return

    async def _write(self, batch: list[TurnRecord]) -> None:
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
                    await asyncio.sleep(0.1 * attempt)
                continue
            if self._on_written is not None:
                self._on_written(len(batch))
            return
        logger.error("dialog log: %d turns lost after %d attempts", len(batch), attempts)
        if self._on_lost is not None:
            self._on_lost(len(batch))
