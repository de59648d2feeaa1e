"""The learning schedule: policy parsing, one job, never two rounds at once."""

from __future__ import annotations

import asyncio

import pytest

from learner.rounds import LearnerConfig
from learner.scheduler import JOB_ID, ScheduleConfig, build_scheduler, next_run_time


def test_learner_policy_loads_every_section() -> None:
    """policies/learner.yaml gives the alias, round plan, schedule and worker settings."""
    config = LearnerConfig.from_policy()
    assert config.alias == "chat"
    assert config.schedule.min_new_dialogs >= 1 and config.worker.timeout_s > 0


def test_schedule_refuses_bad_values_by_name() -> None:
    """A bad crontab line, a zero interval or min_new_dialogs are refused with the field named."""
    with pytest.raises(ValueError, match="cron"):
        ScheduleConfig(cron="every tuesday")
    with pytest.raises(ValueError, match="interval_minutes"):
        ScheduleConfig(interval_minutes=0)
    with pytest.raises(ValueError, match="min_new_dialogs"):
        ScheduleConfig(min_new_dialogs=0)


async def test_disabled_schedule_has_no_scheduler() -> None:
    """enabled: false builds no scheduler at all."""

    async def job() -> None:
        return None

    assert build_scheduler(job, ScheduleConfig(enabled=False)) is None


async def test_cron_schedule_names_the_next_run() -> None:
    """A cron schedule registers one job whose next run time is known once started."""

    async def job() -> None:
        return None

    scheduler = build_scheduler(job, ScheduleConfig(cron="0 3 * * *"))
    assert scheduler is not None
    scheduler.start()
    try:
        assert [j.id for j in scheduler.get_jobs()] == [JOB_ID]
        when = next_run_time(scheduler)
        assert when is not None and "03:00:00" in when
    finally:
        scheduler.shutdown(wait=False)


async def test_a_running_round_is_never_started_twice() -> None:
    """Ticks that come while the job still runs are skipped (max_instances=1)."""
    running, most, calls = 0, 0, 0

    async def slow_round() -> None:
        nonlocal running, most, calls
        calls += 1
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.6)
        running -= 1

    # 0.1 s ticks against a 0.6 s round.
    scheduler = build_scheduler(slow_round, ScheduleConfig(interval_minutes=0.1 / 60))
    assert scheduler is not None
    scheduler.start()
    try:
        await asyncio.sleep(1.5)
    finally:
        scheduler.shutdown(wait=False)
    assert calls >= 2, "the job ran again once the first round ended"
    assert most == 1
