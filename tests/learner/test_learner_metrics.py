"""The learner's metrics with a fake engine and a fake worker: round outcomes, stage
durations and gate verdicts as rounds finish, engine up/down from the reconcile loop; on
the gateway's /metrics inside ``tuneshield serve``, on a port of its own for
``tuneshield learner``, closed when it stops."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from learner_fakes import FakeVLLM
from litestar import Litestar, Router
from litestar.testing import AsyncTestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine import VLLMClient
from gateway.app import create_app
from gateway.settings import load_settings
from learner import LearnerConfig, LearnerOptions, build_learner, queue_round
from learner.metrics import LearnerMetrics, MetricsPortError, serve_metrics
from learner.process import EmbeddedLearner, LearnerSettings, run_learner
from store import (
    AliasStore,
    Database,
    DialogStore,
    RunStore,
    TurnRecord,
    load_store_settings,
    open_database,
    utcnow,
)

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")
ENGINE_URL = "http://engine.test"
FAST_PERIOD_S = 0.05
WAIT_S = 15.0


def options(tmp_path: Path, mode: str = "pass", **control: object) -> LearnerOptions:
    config = LearnerConfig.from_policy()
    config = dataclasses.replace(
        config,
        worker=dataclasses.replace(config.worker, poll_s=FAST_PERIOD_S, settle_s=0.0),
        control=dataclasses.replace(
            config.control, poll_s=FAST_PERIOD_S, reconcile_s=FAST_PERIOD_S, **control
        ),
        schedule=dataclasses.replace(config.schedule, enabled=False),
    )
    return LearnerOptions(
        base_model="tiny",
        adapters_dir=tmp_path / "adapters",
        config=config,
        worker_command=worker(mode),
    )


def worker(mode: str) -> Callable[[Path], list[str]]:
    return lambda round_dir: [sys.executable, str(FAKE_WORKER), str(round_dir), mode]


def log_dialogs(database: Database, count: int) -> None:
    """``count`` conversations of one turn each, a minute old (past the settle time)."""
    at = utcnow() - timedelta(minutes=1)
    stamp = at.timestamp()
    messages = json.dumps([{"role": "user", "content": "tell me about cats"}])
    DialogStore(database).insert(
        [
            TurnRecord(
                turn_id=f"t{index}-{stamp}",
                conversation_id=f"c{index}-{stamp}",
                key_id="k",
                created_at=at + timedelta(milliseconds=index),
                alias="chat",
                adapter="chat-v0000",
                request_messages=messages,
                reply="cats are nice",
                finish_reason="stop",
                prompt_tokens=None,
                completion_tokens=None,
                latency_ms=1.0,
                ttft_ms=None,
                stream=False,
                guard_score=None,
                guard_flag=False,
                opt_out=False,
            )
            for index in range(count)
        ]
    )


def value(text: str, name: str, **labels: str) -> float | None:
    """One sample of a Prometheus text exposition (None when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def rounds(text: str) -> dict[str, float | None]:
    return {
        outcome: value(text, "tuneshield_learner_rounds_total", outcome=outcome)
        for outcome in ("promoted", "rejected", "failed")
    }


def stage_count(text: str, stage: str) -> float | None:
    return value(text, "tuneshield_learner_round_stage_duration_seconds_count", stage=stage)


def gate(text: str, verdict: str) -> float | None:
    return value(
        text, "tuneshield_learner_gate_checks_total", gate="toxic_toxicity", verdict=verdict
    )


async def until(check: Callable[[], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(FAST_PERIOD_S)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_finished_rounds_count_outcomes_stage_durations_and_gate_verdicts(
    tmp_path: Path,
) -> None:
    """Before any round every outcome reads 0; a passed round counts promoted, its stages
    (the learner's and the worker's) and a passed gate; a rejected one counts rejected and
    a failed gate; a worker crash counts failed."""
    database = open_database(tmp_path / "store.duckdb")
    engine = FakeVLLM()
    metrics = LearnerMetrics(CollectorRegistry())
    aliases = AliasStore(database)
    aliases.seed({"chat": "chat-v0000"})
    async with engine.client() as http:
        learner = build_learner(
            database,
            aliases,
            [VLLMClient(ENGINE_URL, client=http)],
            options(tmp_path),
            tmp_path / "data",
            metrics=metrics,
        )
        try:
            text = generate_latest(metrics.registry).decode()
            assert rounds(text) == {"promoted": 0.0, "rejected": 0.0, "failed": 0.0}
            assert gate(text, "pass") == 0.0

            log_dialogs(database, 3)
            assert (await learner.rounds.run()).status == "succeeded"
            text = generate_latest(metrics.registry).decode()
            assert rounds(text) == {"promoted": 1.0, "rejected": 0.0, "failed": 0.0}
            for stage in ("snapshot", "worker", "register", "hotswap", "report", "train"):
                assert stage_count(text, stage) == 1.0, stage
            assert (gate(text, "pass"), gate(text, "fail")) == (1.0, 0.0)

            log_dialogs(database, 2)
            learner.rounds.worker_command = worker("reject")
            assert (await learner.rounds.run()).status == "rejected"
            log_dialogs(database, 2)
            learner.rounds.worker_command = worker("crash")
            assert (await learner.rounds.run()).status == "failed"
            text = generate_latest(metrics.registry).decode()
            assert rounds(text) == {"promoted": 1.0, "rejected": 1.0, "failed": 1.0}
            assert (gate(text, "pass"), gate(text, "fail")) == (1.0, 1.0)
            assert stage_count(text, "hotswap") == 1.0, "only a passed candidate is swapped"
            assert stage_count(text, "worker") == 3.0
        finally:
            database.close()


async def test_reconcile_reports_the_engine_down_and_up(tmp_path: Path) -> None:
    """The control loop's reconcile sets tuneshield_engine_up per engine root URL: 1 while
    the engine answers, 0 when it refuses connections, 1 again once it is back."""
    database = open_database(tmp_path / "store.duckdb")
    engine = FakeVLLM()
    metrics = LearnerMetrics(CollectorRegistry())

    def reported() -> float | None:
        return metrics.registry.get_sample_value("tuneshield_engine_up", {"engine": ENGINE_URL})

    aliases = AliasStore(database)
    aliases.seed({"chat": "chat-v0000"})
    stop = asyncio.Event()
    async with engine.client() as http:
        learner = build_learner(
            database,
            aliases,
            [VLLMClient(f"{ENGINE_URL}/v1", client=http)],
            options(tmp_path),
            tmp_path / "data",
            metrics=metrics,
        )
        task = asyncio.create_task(learner.run(stop))
        try:
            await until(lambda: reported() == 1.0)
            engine.down = True
            await until(lambda: reported() == 0.0)
            engine.down = False
            await until(lambda: reported() == 1.0)
        finally:
            stop.set()
            await task
            database.close()


class StoreAccess:
    """A gateway extension that hands the test the app's one database connection."""

    database: Database | None = None

    def routers(self) -> list[Router]:
        return []

    def lifespan(
        self, app: Litestar, database: Database, client: httpx.AsyncClient
    ) -> AbstractAsyncContextManager[None]:
        @asynccontextmanager
        async def opened() -> AsyncIterator[None]:
            self.database = database
            yield

        return opened()


async def test_serve_shows_the_learner_metrics_on_the_gateway(tmp_path: Path) -> None:
    """In one process (``tuneshield serve``) a round run by the embedded learner is counted
    on the gateway's /metrics, beside the gateway's own engine gauge (no duplicate)."""
    settings = load_settings(upstream_url=f"{ENGINE_URL}/v1", data_dir=tmp_path, environ={})
    engine = FakeVLLM()
    store = StoreAccess()
    learner = EmbeddedLearner(options(tmp_path))
    app = create_app(settings, transport=engine.transport(), extensions=[store, learner])
    async with AsyncTestClient(app=app) as client:
        assert store.database is not None and learner.learner is not None
        await until(learner.learner.active.is_set)
        text = (await client.get("/metrics")).text
        assert rounds(text) == {"promoted": 0.0, "rejected": 0.0, "failed": 0.0}
        assert value(text, "tuneshield_engine_up", engine=ENGINE_URL) == 1.0
        log_dialogs(store.database, 3)
        queue_round(RunStore(store.database), "chat", learner.learner.rounds.round_settings())
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while rounds(scraped := (await client.get("/metrics")).text)["promoted"] != 1.0:
            assert asyncio.get_running_loop().time() < deadline, scraped
            await asyncio.sleep(FAST_PERIOD_S)
        assert gate(scraped, "pass") == 1.0
        assert stage_count(scraped, "worker") == 1.0


async def test_learner_process_serves_its_metrics_and_closes_the_port(tmp_path: Path) -> None:
    """``tuneshield learner`` with ``control.metrics_port`` serves its metrics there (an
    unreachable engine reads 0) and closes the port when it stops."""
    port = free_port()
    unreachable = f"http://127.0.0.1:{free_port()}"
    settings = LearnerSettings(
        data_dir=tmp_path,
        store=load_store_settings(tmp_path, environ={}),
        engine_urls=(unreachable,),
        engine_api_key=None,
        seed_aliases={},
        options=options(tmp_path, metrics_port=port),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run_learner(settings, stop))
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        async with httpx.AsyncClient() as http:
            deadline = asyncio.get_running_loop().time() + WAIT_S
            while True:
                assert not task.done(), task
                assert asyncio.get_running_loop().time() < deadline, "no metrics served"
                try:
                    text = (await http.get(url)).text
                except httpx.ConnectError:
                    text = ""
                if value(text, "tuneshield_engine_up", engine=unreachable) == 0.0:
                    break
                await asyncio.sleep(FAST_PERIOD_S)
            assert rounds(text) == {"promoted": 0.0, "rejected": 0.0, "failed": 0.0}
    finally:
        stop.set()
        await task
    with pytest.raises(httpx.ConnectError):
        httpx.get(url)


def test_busy_metrics_port_is_an_error_naming_the_setting() -> None:
    """A port something else holds fails the start with one message naming the setting."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = int(holder.getsockname()[1])
        with (
            pytest.raises(MetricsPortError, match=r"control\.metrics_port"),
            serve_metrics(CollectorRegistry(), "127.0.0.1", port),
        ):
            pass
