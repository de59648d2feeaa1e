"""/admin/learner through the gateway app: dialogs posted by users, a round started over
HTTP (fake worker, fake vLLM), its progress, log tail, report, and the learner's status."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from learner_fakes import FakeVLLM
from litestar import Litestar
from litestar.testing import AsyncTestClient

from engine import ensure_identity_adapter
from gateway.app import create_app
from gateway.settings import GatewaySettings, load_settings
from learner.admin_routes import AdapterAdmin
from learner.process import EmbeddedLearner
from learner.rounds import LearnerConfig, LearnerOptions
from store import AdapterRegistry, open_database

ADMIN_KEY = "admin-test-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
FAKE_WORKER = Path(__file__).with_name("fake_worker.py")


@pytest.fixture
def settings(tmp_path: Path) -> GatewaySettings:
    return load_settings(
        upstream_url="http://engine.test",
        data_dir=tmp_path / "data",
        environ={"TUNESHIELD_ADMIN_KEY": ADMIN_KEY},
    )


def options(settings: GatewaySettings, mode: str) -> LearnerOptions:
    config = LearnerConfig.from_policy()
    worker = dataclasses.replace(config.worker, poll_s=0.05, settle_s=0.0)
    control = dataclasses.replace(config.control, poll_s=0.05, reconcile_s=0.2)
    return LearnerOptions(
        base_model="tiny",
        adapters_dir=settings.data_dir / "adapters",
        config=dataclasses.replace(config, worker=worker, control=control),
        worker_command=lambda d: [sys.executable, str(FAKE_WORKER), str(d), mode],
    )


@pytest.fixture
async def client(
    settings: GatewaySettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[AsyncTestClient[Litestar]]:
    database = open_database(settings.store_url)
    monkeypatch.setattr(
        "tuneshield.make_identity_adapter",
        lambda base, folder: FakeVLLM and _fake_adapter(Path(folder)),
    )
    ensure_identity_adapter(
        AdapterRegistry(database), "chat", "tiny", settings.data_dir / "adapters"
    )
    database.close()
    engine = FakeVLLM()
    engine.loaded["chat-v0000"] = "/adapters/chat-v0000"
    learner = EmbeddedLearner(options(settings, "pass"))
    admin = AdapterAdmin(learner.options.config, active_learner=learner.active_name)
    app = create_app(settings, transport=engine.transport(), extensions=[admin, learner])
    async with AsyncTestClient(app=app) as test:
        yield test


def _fake_adapter(folder: Path) -> None:
    folder.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_text("{}")


async def chat(client: AsyncTestClient[Litestar], conversation: str) -> str:
    body = {
        "model": "chat",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": f"what about {conversation}?"},
        ],
    }
    headers = {**ADMIN, "X-Conversation-Id": conversation}
    response = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


async def wait_finished(client: AsyncTestClient[Litestar], run_id: str) -> dict[str, Any]:
    for _ in range(400):
        shown = (await client.get(f"/admin/learner/runs/{run_id}", headers=ADMIN)).json()
        if shown["status"] in ("succeeded", "failed", "rejected"):
            return dict(shown)
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} did not finish: {shown}")


async def test_round_over_http_serves_the_new_adapter(client: AsyncTestClient[Litestar]) -> None:
    """Dialogs logged by the gateway feed a round queued over HTTP and run by the learner;
    users then get the new version; the run shows its log tail, stage times and report; a
    second request while one is queued or running is 409."""
    assert await chat(client, "cats") == "from chat-v0000"
    await chat(client, "dogs")
    for _ in range(200):  # the dialog log writes in batches
        status = (await client.get("/admin/learner/status", headers=ADMIN)).json()
        if status["new_conversations"] == 2:
            break
        await asyncio.sleep(0.05)
    assert status["enabled"] and status["active_learner"] and status["new_conversations"] == 2
    assert status["active_version"] == "chat-v0000" and status["scheduled"] is True

    started = await client.post("/admin/learner/run", headers=ADMIN)
    assert started.status_code == 202 and started.json()["status"] == "queued"
    busy = await client.post("/admin/learner/run", headers=ADMIN)
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "round_running"
    run = await wait_finished(client, started.json()["run_id"])
    assert run["status"] == "succeeded" and run["version"] == "chat-v0001"
    assert run["claimed_by"]
    assert run["report"] is True and "fake worker: training" in run["log_tail"]
    # Its stage times as the learner recorded them, the worker's own in the worker's place
    # (the fake worker trains only); it wrote no samples file.
    stages = [stage["stage"] for stage in run["stages"]]
    assert stages == ["snapshot", "train", "register", "hotswap", "report"], stages
    assert run["stages"][1]["worker"] is True and run["samples"] is False
    assert await chat(client, "birds") == "from chat-v0001"

    report = await client.get(f"/admin/learner/runs/{run['run_id']}/report", headers=ADMIN)
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert "chat-v0001" in report.text
    after = (await client.get("/admin/learner/status", headers=ADMIN)).json()
    assert after["watermark"] is not None and after["active_version"] == "chat-v0001"
    assert after["recent_runs"][0]["run_id"] == run["run_id"]
    audit = (await client.get("/admin/audit", headers=ADMIN)).json()
    assert [(e["actor"], e["action"], e["target"]) for e in audit] == [
        ("learner", "activate", "chat-v0001")
    ]
    assert audit[0]["detail"]["run_id"] == run["run_id"]


async def test_learner_routes_need_admin_and_known_runs(client: AsyncTestClient[Litestar]) -> None:
    """Non-admins get 401/403; an unknown run's report is 404."""
    assert (await client.post("/admin/learner/run")).status_code == 401
    missing = await client.get("/admin/learner/runs/run_nope/report", headers=ADMIN)
    assert missing.status_code == 404


async def test_gateway_without_learner_queues_for_the_learner(settings: GatewaySettings) -> None:
    """`tuneshield gateway` alone queues a round (202) for whichever learner becomes active;
    its status says no learner is active and lists the queued run; a second request is 409."""
    app = create_app(settings, transport=FakeVLLM().transport(), extensions=[AdapterAdmin()])
    async with AsyncTestClient(app=app) as test:
        response = await test.post("/admin/learner/run", headers=ADMIN)
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "queued"
        again = await test.post("/admin/learner/run", headers=ADMIN)
        assert again.status_code == 409 and again.json()["error"]["code"] == "round_running"
        status = (await test.get("/admin/learner/status", headers=ADMIN)).json()
        assert status["enabled"] is False and status["active_learner"] is None
        assert status["queued"] == [response.json()["run_id"]]
