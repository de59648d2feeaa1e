"""Learning rounds orchestrated in the gateway process, with a fake worker and a fake vLLM:
register + hot-swap on pass, rejected never served, crashes and kills leave the previous
adapter live and the run failed with its error, nothing half-written registered."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from learner_fakes import FakeVLLM, adapter_folder

from engine import HotSwap, VLLMClient
from learner.engine_inference import round_prefix
from learner.rounds import LearnerConfig, RoundBusy, RoundRunner, decode_round_settings
from store import (
    AdapterRegistry,
    AliasStore,
    Database,
    DialogStore,
    RunStore,
    TurnRecord,
    open_database,
    utcnow,
)

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")


@dataclass
class Stack:
    database: Database
    registry: AdapterRegistry
    aliases: AliasStore
    runs: RunStore
    engine: FakeVLLM
    runner: RoundRunner
    data_dir: Path

    def log_dialogs(self, count: int, *, age_s: float = 60.0) -> None:
        at = utcnow() - timedelta(seconds=age_s)
        turns = []
        for index in range(count):
            messages = [
                {"role": "user", "content": f"hello {index}"},
                {"role": "assistant", "content": "hi there"},
                {"role": "user", "content": f"tell me about cats {index}"},
            ]
            turns.append(
                TurnRecord(
                    f"t{index}-{at.timestamp()}",
                    f"conv{index}-{at.timestamp()}",
                    "k",
                    at + timedelta(milliseconds=index),
                    "chat",
                    "chat-v0000",
                    json.dumps(messages),
                    "cats are nice",
                    "stop",
                    None,
                    None,
                    1.0,
                    None,
                    False,
                    None,
                    False,
                    False,
                )
            )
        DialogStore(self.database).insert(turns)


def worker_pids(round_dir: Path) -> list[int]:
    found = subprocess.run(
        ["pgrep", "-f", f"fake_worker.py {round_dir}"], capture_output=True, text=True
    )
    return [int(pid) for pid in found.stdout.split()]


def make_runner(stack_parts: dict[str, object], mode: str, **schedule: object) -> RoundRunner:
    config = LearnerConfig.from_policy()
    config = dataclasses.replace(
        config,
        worker=dataclasses.replace(config.worker, poll_s=0.05, settle_s=0.0, timeout_s=30),
        schedule=dataclasses.replace(config.schedule, **schedule),
    )
    return RoundRunner(
        stack_parts["database"],  # type: ignore[arg-type]
        stack_parts["registry"],  # type: ignore[arg-type]
        stack_parts["runs"],  # type: ignore[arg-type]
        stack_parts["hotswap"],  # type: ignore[arg-type]
        base_model="tiny",
        data_dir=stack_parts["data_dir"],  # type: ignore[arg-type]
        adapters_dir=stack_parts["data_dir"] / "adapters",  # type: ignore[operator]
        config=config,
        worker_command=lambda round_dir: [sys.executable, str(FAKE_WORKER), str(round_dir), mode],
    )


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[dict[str, object]]:
    database = open_database(tmp_path / "db.duckdb")
    registry, aliases, engine = AdapterRegistry(database), AliasStore(database), FakeVLLM()
    client = VLLMClient("http://engine.test", client=engine.client())
    registry.register("chat-v0000", adapter_folder(tmp_path, "chat-v0000"), status="active")
    aliases.set("chat", "chat-v0000")
    engine.loaded["chat-v0000"] = str(tmp_path / "chat-v0000")
    yield {
        "database": database,
        "registry": registry,
        "aliases": aliases,
        "runs": RunStore(database),
        "engine": engine,
        "hotswap": HotSwap(registry, aliases, client),
        "data_dir": tmp_path / "data",
    }
    await client.aclose()
    database.close()


def stack(parts: dict[str, object], mode: str, **schedule: object) -> Stack:
    return Stack(
        parts["database"],  # type: ignore[arg-type]
        parts["registry"],  # type: ignore[arg-type]
        parts["aliases"],  # type: ignore[arg-type]
        parts["runs"],  # type: ignore[arg-type]
        parts["engine"],  # type: ignore[arg-type]
        make_runner(parts, mode, **schedule),
        parts["data_dir"],  # type: ignore[arg-type]
    )


async def test_passing_round_registers_and_serves_the_candidate(parts: dict[str, object]) -> None:
    """A passed candidate becomes chat-v0001 with lineage, watermark and counts, and the
    alias serves it; the next round starts after this one's watermark."""
    s = stack(parts, "pass")
    s.log_dialogs(3)
    run = await s.runner.run()
    assert (run.status, run.version, run.progress, run.error) == (
        "succeeded",
        "chat-v0001",
        1.0,
        None,
    )
    assert s.aliases.get("chat") == "chat-v0001"
    record = s.registry.get("chat-v0001")
    assert record.status == "active" and record.parent == "chat-v0000"
    assert (record.samples, record.flagged, record.healed, record.judge) == (12, 3, 3, "embedding")
    assert record.gate_metrics["passed"] is True
    assert record.hyperparameters["run_id"] == run.run_id
    assert record.snapshot_from is None and record.snapshot_to is not None
    assert Path(record.path) == s.data_dir / "adapters" / "chat-v0001"
    spec = json.loads((s.runner.round_dir(run.run_id) / "round.json").read_text())
    assert spec["parent_adapter"] == s.registry.get("chat-v0000").path
    assert "<img" in (s.runner.round_dir(run.run_id) / "report.html").read_text()
    summary = json.loads((s.runner.round_dir(run.run_id) / "summary.json").read_text())
    timed = [stage["stage"] for stage in summary["stages"]]
    assert timed == ["snapshot", "worker", "register", "hotswap", "report"]
    assert s.runner.watermark() == record.snapshot_to
    assert s.runner.new_conversations() == 0
    again = await s.runner.run()
    assert again.status == "failed" and "no new dialogs" in (again.error or "")


async def test_rejected_candidate_is_registered_never_served(parts: dict[str, object]) -> None:
    """Gates that reject leave the alias alone; the version is registered rejected with
    the reasons."""
    s = stack(parts, "reject")
    s.log_dialogs(2)
    run = await s.runner.run()
    assert run.status == "rejected" and "toxic_toxicity" in (run.error or "")
    assert s.aliases.get("chat") == "chat-v0000"
    assert s.registry.get("chat-v0001").status == "rejected"
    assert ("load", "chat-v0001") not in s.engine.calls


async def test_crashing_worker_fails_the_run_and_registers_nothing(
    parts: dict[str, object],
) -> None:
    """A worker error ends the run failed with the worker's message; no version appears."""
    s = stack(parts, "crash")
    s.log_dialogs(2)
    run = await s.runner.run()
    assert run.status == "failed" and "out of memory in sft" in (run.error or "")
    assert run.stage == "sft", "the stage reached stays visible"
    assert [r.version for r in s.registry.list("chat")] == ["chat-v0000"]
    assert s.aliases.get("chat") == "chat-v0000"
    assert s.runner.watermark() is None, "a failed round consumes no dialogs"


async def test_killed_worker_fails_the_run_previous_stays_live(parts: dict[str, object]) -> None:
    """A worker killed mid-training (SIGKILL) fails the run; the alias and registry are
    unchanged and the log is readable."""
    s = stack(parts, "hang")
    s.log_dialogs(2)
    run = await s.runner.start()
    round_dir = s.runner.round_dir(run.run_id)
    for _ in range(200):
        if (
            "training" in (round_dir / "worker.log").read_text()
            if (round_dir / "worker.log").exists()
            else False
        ):
            break
        await asyncio.sleep(0.05)
    assert s.runner.busy
    with pytest.raises(RoundBusy):
        await s.runner.start()
    (pid,) = worker_pids(round_dir)
    # What the worker had loaded on the engine under the round's private names.
    leftover = f"{round_prefix(run.run_id)}candidate"
    s.engine.loaded[leftover] = str(round_dir / "adapter")
    os.kill(pid, signal.SIGKILL)
    while s.runner.busy:
        await asyncio.sleep(0.05)
    final = s.runs.get(run.run_id)
    assert final.status == "failed" and "signal 9" in (final.error or "")
    assert ("unload", leftover) in s.engine.calls and set(s.engine.loaded) == {"chat-v0000"}
    assert [r.version for r in s.registry.list("chat")] == ["chat-v0000"]
    assert s.aliases.get("chat") == "chat-v0000"
    assert not (s.data_dir / "adapters").exists()


async def test_the_worker_samples_on_the_engine_with_its_key(parts: dict[str, object]) -> None:
    """The round's spec names the engine that answered; its API key reaches the worker in
    the environment, never in round.json."""
    engine: FakeVLLM = parts["engine"]  # type: ignore[assignment]
    key = "engine-secret-key"
    client = VLLMClient("http://engine.test", api_key=key, client=engine.client())
    parts["hotswap"] = HotSwap(parts["registry"], parts["aliases"], client)  # type: ignore[arg-type]
    s = stack(parts, "pass")
    s.log_dialogs(2)
    run = await s.runner.run()
    assert run.status == "succeeded", run.error
    round_dir = s.runner.round_dir(run.run_id)
    spec = json.loads((round_dir / "round.json").read_text())
    assert spec["inference"]["url"] == "http://engine.test"
    assert spec["inference"]["prefix"] == round_prefix(run.run_id)
    assert key not in (round_dir / "round.json").read_text()
    assert (round_dir / "fake-engine.txt").read_text() == f"http://engine.test {key}"
    await client.aclose()


async def test_engine_down_at_swap_keeps_previous_live(parts: dict[str, object]) -> None:
    """When the engine cannot load the candidate, it stays a registered candidate and the
    previous version keeps serving; the run is failed saying so."""
    s = stack(parts, "pass")
    s.log_dialogs(2)
    s.engine.down = True
    run = await s.runner.run()
    assert run.status == "failed" and "chat-v0000 stays live" in (run.error or "")
    assert s.registry.get("chat-v0001").status == "candidate"
    assert s.aliases.get("chat") == "chat-v0000"


async def test_close_kills_the_worker_and_fails_the_run(parts: dict[str, object]) -> None:
    """Stopping the gateway mid-round kills the worker and marks the run failed."""
    s = stack(parts, "hang")
    s.log_dialogs(2)
    run = await s.runner.start()
    await asyncio.sleep(1.0)
    await s.runner.close()
    final = s.runs.get(run.run_id)
    assert final.status == "failed" and "learner stopped" in (final.error or "")
    assert worker_pids(s.runner.round_dir(run.run_id)) == []


async def test_queue_if_due_needs_min_new_dialogs(parts: dict[str, object]) -> None:
    """A scheduled round is queued only once enough new conversations arrived, and not
    while another one waits; the queued run carries the settings it will run with."""
    s = stack(parts, "pass", min_new_dialogs=3)
    s.log_dialogs(2)
    assert s.runner.queue_if_due() is None
    assert s.runs.list() == []
    s.log_dialogs(1)
    run = s.runner.queue_if_due()
    assert run is not None and run.status == "queued"
    assert decode_round_settings(s.runs.settings(run.run_id)).plan == s.runner.config.round
    assert s.runner.queue_if_due() is None
