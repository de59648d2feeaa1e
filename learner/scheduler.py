"""The learning schedule: one APScheduler 3.x job inside the gateway process.

One ``AsyncIOScheduler`` on the gateway's event loop runs one job, ``max_instances=1``
and ``coalesce=True``: a round still going when the next tick comes is not started
twice, and ticks missed meanwhile collapse into one. The job itself asks the round
runner whether enough new conversations arrived (``min_new_dialogs``) before it starts
a round, and waits for the round to end (so ``max_instances`` means what it says).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

logger = logging.getLogger(__name__)

JOB_ID = "learning-round"
PRIVACY_JOB_ID = "privacy"


@dataclass(frozen=True)
class ScheduleConfig:
    """When rounds run (policies/learner.yaml, section ``schedule``)."""

    enabled: bool = field(default=True, metadata={"help": "Run rounds on a schedule."})
    interval_minutes: float = field(default=360.0, metadata={"help": "Minutes between ticks."})
    cron: str | None = field(
        default=None, metadata={"help": "Crontab line (UTC); wins over the interval."}
    )
    min_new_dialogs: int = field(
        default=100, metadata={"help": "New conversations a scheduled round needs."}
    )

    def __post_init__(self) -> None:
        if self.interval_minutes <= 0:
            raise ValueError(f"interval_minutes must be > 0, got {self.interval_minutes}")
        if self.min_new_dialogs < 1:
            raise ValueError(f"min_new_dialogs must be >= 1, got {self.min_new_dialogs}")
        if self.cron is not None:
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(self.cron, timezone=UTC)
            except ValueError as error:
                raise ValueError(f"cron: {self.cron!r} is not a crontab line: {error}") from None

    def trigger(self) -> Any:
        """The APScheduler trigger of this schedule."""
        from apscheduler.triggers.cron import CronTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        if self.cron is not None:
            return CronTrigger.from_crontab(self.cron, timezone=UTC)
        return IntervalTrigger(seconds=self.interval_minutes * 60, timezone=UTC)


def build_scheduler(
    job: Callable[[], Awaitable[Any]], config: ScheduleConfig
) -> AsyncIOScheduler | None:
    """A scheduler (not started) running ``job`` on ``config``'s trigger; None if disabled.

    ``start()`` it from inside the running event loop; ``shutdown(wait=False)`` on exit.
    """
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    if not config.enabled:
        return None
    scheduler = AsyncIOScheduler(timezone=UTC)
    scheduler.add_job(
        job,
        config.trigger(),
        id=JOB_ID,
        name="TuneShield learning round",
        max_instances=1,
        coalesce=True,
        # A tick missed while the loop was busy still runs, late, rather than never.
        misfire_grace_time=None,
    )
    return scheduler


def build_privacy_scheduler(
    job: Callable[[], Awaitable[Any]], interval_minutes: float
) -> AsyncIOScheduler:
    """A scheduler (not started) running the learner's privacy pass (retention, then the
    purge of deleted dialogs' copies: learner/privacy.py) every ``interval_minutes``.

    Its own scheduler, so that it runs when the rounds' schedule is off; its first pass
    runs at once, so a learner that starts purges what was deleted while none ran.
    """
    from datetime import datetime

    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.interval import IntervalTrigger

    scheduler = AsyncIOScheduler(timezone=UTC)
    scheduler.add_job(
        job,
        IntervalTrigger(seconds=interval_minutes * 60, timezone=UTC),
        id=PRIVACY_JOB_ID,
        name="TuneShield privacy pass",
        max_instances=1,
        coalesce=True,
        misfire_grace_time=None,
        next_run_time=datetime.now(UTC),
    )
    return scheduler


def next_run_time(scheduler: AsyncIOScheduler | None) -> str | None:
    """When the job fires next (ISO, UTC), or None when there is no schedule."""
    if scheduler is None:
        return None
    job = scheduler.get_job(JOB_ID)
    when = getattr(job, "next_run_time", None) if job is not None else None
    return when.isoformat() if when is not None else None


def next_fire_time(config: ScheduleConfig) -> str | None:
    """When ``config``'s trigger fires next from now (ISO, UTC): what a gateway shows of the
    schedule the learner runs."""
    from datetime import datetime

    when = config.trigger().get_next_fire_time(None, datetime.now(UTC))
    return when.isoformat() if when is not None else None
