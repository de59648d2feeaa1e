"""The learner's control loop with a fake engine and a fake worker: leadership, the run
queue, bootstrap and engine reconciliation."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

from learner_fakes import FakeVLLM, adapter_folder

from engine import VLLMClient
from learner import LearnerConfig, LearnerOptions, build_learner, queue_round
from store import AdapterRegistry, AliasStore, RunStore, open_database

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")


def options(tmp_path: Path) -> LearnerOptions:
    config = LearnerConfig.from_policy()
    config = dataclasses.replace(
        config,
        worker=dataclasses.replace(config.worker, poll_s=0.05, settle_s=0.0),
        control=dataclasses.replace(config.control, poll_s=0.05, reconcile_s=0.05),
        schedule=dataclasses.replace(config.schedule, enabled=False),
    )
    return LearnerOptions(
        base_model="tiny",
        adapters_dir=tmp_path / "adapters",
        config=config,
        worker_command=lambda d: [sys.executable, str(FAKE_WORKER), str(d), "pass"],
    )


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_takeover_fails_orphans_runs_queued_rounds_and_restores_the_engine(
    tmp_path: Path,
) -> None:
    """A learner that becomes active fails the run its predecessor left running, runs the
    queued one with its recorded settings, and loads the active version into an engine
    that lost it (a restart)."""
    database = open_database(tmp_path / "store.duckdb")
    registry = AdapterRegistry(database)
    registry.register("chat-v0000", adapter_folder(tmp_path, "chat-v0000"), status="active")
    registry.next_version("chat")
    aliases = AliasStore(database)
    aliases.seed({"chat": "chat-v0000"})
    runs = RunStore(database)
    orphan = runs.create("chat", None)
    runs.claim_next("dead-learner", orphan.run_id)
    engine = FakeVLLM()
    bootstrapped: list[bool] = []
    learner = build_learner(
        database,
        aliases,
        [VLLMClient("http://engine.test", client=engine.client())],
        options(tmp_path),
        tmp_path / "data",
        bootstrap=lambda: bootstrapped.append(True),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(learner.run(stop))
    try:
        await until(learner.active.is_set)
        await until(lambda: "chat-v0000" in engine.loaded)
        assert bootstrapped == [True]
        assert runs.get(orphan.run_id).status == "failed"
        assert "stopped before the run finished" in (runs.get(orphan.run_id).error or "")
        # Nothing was logged: the queued round fails for want of dialogs, but it ran.
        queued = queue_round(runs, "chat", learner.rounds.round_settings())
        await until(lambda: runs.get(queued.run_id).status in ("failed", "succeeded"))
        assert runs.get(queued.run_id).claimed_by == learner.name
        assert "no new dialogs" in (runs.get(queued.run_id).error or "")
        engine.loaded.clear()  # the engine restarted
        await until(lambda: "chat-v0000" in engine.loaded)
    finally:
        stop.set()
        await task
        database.close()
    assert not learner.active.is_set()
