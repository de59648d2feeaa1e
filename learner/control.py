"""The learner's control loop: exactly one active learner runs rounds and keeps engines
serving what the aliases say.

``Learner.run`` first waits for the leader lock in the store (a second learner waits
here, and takes over when the first dies: its lock goes with its database connection).
Once active it

1. fails the runs its predecessor left ``running`` (nothing runs them any more);
2. bootstraps: every seeded alias gets its identity adapter (version 0) registered;
3. starts the schedule (APScheduler 3.x), whose job only *queues* a due round;
4. loops: claims the oldest queued round (queued by any gateway's
   ``POST /admin/learner/run`` or by the schedule) and runs it with the settings it was
   queued with; every ``reconcile_s`` loads the active versions an engine lacks; checks
   that it still holds the lock, and stops (for its supervisor to restart it) if not.

``tuneshield learner`` runs this in its own process; ``tuneshield serve`` runs the same
loop inside the one process that owns the DuckDB file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine import EngineUnavailable, HotSwap, VLLMError
from learner.privacy import privacy_pass
from learner.rounds import ControlConfig, RoundRunner
from learner.scheduler import build_privacy_scheduler, build_scheduler
from store import Database, LeaderLock, RunRecord, RunStore

if TYPE_CHECKING:
    from learner.metrics import LearnerMetrics

logger = logging.getLogger(__name__)


class LeadershipLost(RuntimeError):
    """The leader lock's connection was lost: another learner may be active now."""


def learner_id() -> str:
    """This process's name in run rows: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Learner:
    """The control plane of one store: rounds, schedule, engine reconciliation."""

    def __init__(
        self,
        database: Database,
        rounds: RoundRunner,
        *,
        bootstrap: Callable[[], Any] | None = None,
        name: str | None = None,
        metrics: LearnerMetrics | None = None,
    ) -> None:
        self.database = database
        self.rounds = rounds
        # The rounds' hot-swap: it flips aliases on every engine this learner keeps in line.
        self.hotswap: HotSwap = rounds.hotswap
        self.bootstrap = bootstrap
        self.name = name or learner_id()
        self.metrics = metrics
        self.control: ControlConfig = rounds.config.control
        self.lock = LeaderLock(database, self.name)
        self.runs = RunStore(database)
        self.active = asyncio.Event()
        """Set once this learner holds the leader lock."""
        self._unreachable: set[str] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Wait for leadership, then run until ``stop`` is set; raise ``LeadershipLost``."""
        if not await self._lead(stop):
            return
        try:
            await self._serve(stop)
        finally:
            await self.rounds.close()
            await asyncio.to_thread(self.lock.release)
            self.active.clear()

    async def _lead(self, stop: asyncio.Event) -> bool:
        waiting = False
        while not stop.is_set():
            if await asyncio.to_thread(self.lock.try_acquire):
                logger.info("learner %s is the active learner", self.name)
                self.active.set()
                return True
            if not waiting:
                logger.info("learner %s: another learner is active; waiting", self.name)
                waiting = True
            await _wait(stop, self.control.leader_poll_s)
        return False

    async def _serve(self, stop: asyncio.Event) -> None:
        orphans = await asyncio.to_thread(
            self.runs.fail_running, "its learner stopped before the run finished"
        )
        if orphans:
            logger.warning("learner: failed runs left running by a stopped learner: %s", orphans)
        if self.bootstrap is not None:
            await asyncio.to_thread(self.bootstrap)
        scheduler = build_scheduler(self._queue_if_due, self.rounds.config.schedule)
        if scheduler is not None:
            scheduler.start()
        privacy = build_privacy_scheduler(
            self._privacy_pass, self.rounds.config.privacy.purge_interval_minutes
        )
        privacy.start()
        loop = asyncio.get_running_loop()
        next_reconcile = loop.time()
        round_task: asyncio.Task[RunRecord] | None = None
        try:
            while not stop.is_set():
                if not await asyncio.to_thread(self.lock.check):
                    raise LeadershipLost(f"learner {self.name} lost the leader lock")
                if loop.time() >= next_reconcile:
                    await self._reconcile()
                    next_reconcile = loop.time() + self.control.reconcile_s
                if round_task is not None and round_task.done():
                    await self._settle(round_task)
                    round_task = None
                if round_task is None:
                    claimed = await asyncio.to_thread(self.runs.claim_next, self.name)
                    if claimed is not None:
                        logger.info("learner: running round %s", claimed.run_id)
                        round_task = asyncio.create_task(
                            self.rounds.execute(claimed), name=claimed.run_id
                        )
                await _wait(stop, self.control.poll_s)
        finally:
            if scheduler is not None:
                scheduler.shutdown(wait=False)
            privacy.shutdown(wait=False)
            if round_task is not None and not round_task.done():
                round_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await round_task

    async def _settle(self, task: asyncio.Task[RunRecord]) -> None:
        """Log how a round ended; one that crashed outside its own error handling is
        marked failed, so that it does not block every later round as 'running'."""
        _log_outcome(task)
        if task.cancelled() or task.exception() is None:
            return
        run_id = task.get_name()
        try:
            run = await asyncio.to_thread(self.runs.get, run_id)
            if run.status == "running":
                await asyncio.to_thread(
                    self.runs.update, run_id, status="failed", error=f"crashed: {task.exception()}"
                )
        except Exception as error:  # the store is unreachable: the next leader fails it
            logger.error("learner: could not mark round %s failed: %s", run_id, error)

    async def _privacy_pass(self) -> None:
        """Retention and the purge of deleted dialogs' copies (learner/privacy.py)."""
        try:
            await asyncio.to_thread(
                privacy_pass, self.database, self.rounds.data_dir, self.rounds.config.privacy
            )
        except Exception as error:  # the store is unreachable: the next pass retries
            logger.error("learner: privacy pass failed: %s", error)

    async def _queue_if_due(self) -> None:
        queued = await asyncio.to_thread(self.rounds.queue_if_due)
        if queued is not None:
            logger.info("learner: scheduled round %s queued", queued.run_id)

    async def _reconcile(self) -> None:
        for client in self.hotswap.clients:
            url = client.base_url
            try:
                await self.hotswap.reconcile(client)
            except (EngineUnavailable, VLLMError) as error:
                # A refused load is an engine that answers; only no answer is "down".
                self._engine_answered(url, not isinstance(error, EngineUnavailable))
                # Once per outage, not every few seconds while an engine starts.
                if url not in self._unreachable:
                    logger.warning("learner: engine %s: %s", url, error.message)
                self._unreachable.add(url)
                continue
            self._engine_answered(url, True)
            if url in self._unreachable:
                logger.info("learner: engine %s answers again", url)
                self._unreachable.discard(url)

    def _engine_answered(self, url: str, answered: bool) -> None:
        if self.metrics is not None:
            self.metrics.engine_answered(url, answered)


def _log_outcome(task: asyncio.Task[RunRecord]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        logger.error("learner: round %s crashed: %s", task.get_name(), error)
        return
    record = task.result()
    logger.info(
        "learner: round %s %s%s",
        record.run_id,
        record.status,
        f" ({record.version})" if record.version else "",
    )


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
