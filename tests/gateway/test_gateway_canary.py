"""Canary rollouts through the gateway: the admin routes, the routing split, abort."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from learner_fakes import FakeVLLM, adapter_folder
from litestar import Litestar
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings, load_settings
from learner.admin_routes import AdapterAdmin
from store import AdapterRegistry, open_database

ADMIN_KEY = "admin-test-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SHARE = 0.3
CONVERSATIONS = 400


@pytest.fixture
def settings(tmp_path: Path) -> GatewaySettings:
    """A store with chat-v0000 active, chat-v0001 a candidate and chat-v0002 rejected."""
    settings = load_settings(
        upstream_url="http://engine.test",
        data_dir=tmp_path / "data",
        environ={"TUNESHIELD_ADMIN_KEY": ADMIN_KEY},
    )
    database = open_database(settings.store_url)
    try:
        registry = AdapterRegistry(database)
        registry.register("chat-v0000", adapter_folder(tmp_path, "chat-v0000"), status="active")
        registry.register("chat-v0001", adapter_folder(tmp_path, "chat-v0001"))
        registry.register("chat-v0002", adapter_folder(tmp_path, "chat-v0002"), status="rejected")
    finally:
        database.close()
    # Hundreds of chats in a second from one key: the test is about routing, not limits.
    limits = dataclasses.replace(
        settings.limits, rate_limit_burst=10_000, rate_limit_per_minute=1e6
    )
    return dataclasses.replace(settings, limits=limits)


@pytest.fixture
def engine() -> FakeVLLM:
    engine = FakeVLLM()
    engine.loaded["chat-v0000"] = "/adapters/chat-v0000"
    return engine


@pytest.fixture
async def client(
    settings: GatewaySettings, engine: FakeVLLM
) -> AsyncIterator[AsyncTestClient[Litestar]]:
    app = create_app(settings, transport=engine.transport(), extensions=[AdapterAdmin()])
    async with AsyncTestClient(app=app) as test:
        yield test


async def served_by(client: AsyncTestClient[Litestar], conversation: str | None = None) -> str:
    """The adapter version that wrote the reply (its response header)."""
    headers = dict(ADMIN)
    if conversation is not None:
        headers["X-Conversation-Id"] = conversation
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    response = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"].startswith("from chat-v")
    return response.headers["x-tuneshield-version"]


async def test_canary_splits_traffic_sticky_per_conversation_until_aborted(
    client: AsyncTestClient[Litestar], engine: FakeVLLM
) -> None:
    """Starting a canary loads the candidate without flipping the alias; then about the
    share of conversations is answered by it, each conversation by one version every
    time, requests without a conversation id are split one by one; an abort sends all
    back to the stable version, and both steps are in the audit log with their actor."""
    assert await served_by(client, "before") == "chat-v0000"
    started = await client.post("/admin/adapters/chat-v0001/canary?share=0.3", headers=ADMIN)
    assert started.status_code == 201, started.text
    canary = started.json()
    assert (canary["state"], canary["candidate"], canary["stable"], canary["share"]) == (
        "running",
        "chat-v0001",
        "chat-v0000",
        SHARE,
    )
    assert ("load", "chat-v0001") in engine.calls
    first = {f"c{i}": await served_by(client, f"c{i}") for i in range(CONVERSATIONS)}
    share = list(first.values()).count("chat-v0001") / CONVERSATIONS
    # Binomial(400, 0.3): the share's standard deviation is 0.023.
    assert 0.22 < share < 0.38, share
    for conversation in list(first)[:60]:
        assert await served_by(client, conversation) == first[conversation]
    anonymous = {await served_by(client) for _ in range(40)}
    assert anonymous == {"chat-v0000", "chat-v0001"}
    aliases = (await client.get("/v1/models", headers=ADMIN)).json()["data"]
    assert [model["id"] for model in aliases] == ["chat"]

    status = await client.get("/admin/canary", headers=ADMIN)
    assert status.status_code == 200
    assert status.json()["state"] == "running" and status.json()["tests"] == []

    aborted = await client.post("/admin/canary/abort?reason=looks+off", headers=ADMIN)
    assert aborted.status_code == 200, aborted.text
    assert (aborted.json()["state"], aborted.json()["decided_by"], aborted.json()["reason"]) == (
        "aborted",
        "env-admin",
        "looks off",
    )
    assert {await served_by(client, conversation) for conversation in first} == {"chat-v0000"}
    again = await client.post("/admin/canary/abort", headers=ADMIN)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "canary_conflict"
    audit = (await client.get("/admin/audit", headers=ADMIN)).json()
    assert [(e["actor"], e["action"], e["target"]) for e in audit[:2]] == [
        ("env-admin", "canary_abort", "chat-v0001"),
        ("env-admin", "canary_start", "chat-v0001"),
    ]
    shown = (await client.get("/admin/canary?alias=chat", headers=ADMIN)).json()
    assert shown["state"] == "aborted" and shown["decided_at"].endswith("Z")


async def test_canary_start_refusals(client: AsyncTestClient[Litestar], engine: FakeVLLM) -> None:
    """A version that is served, rejected or unknown, a share outside (0, 1) and a second
    canary of one alias are refused with the error shape; nothing is loaded for them."""
    served = await client.post("/admin/adapters/chat-v0000/canary?share=0.2", headers=ADMIN)
    rejected = await client.post("/admin/adapters/chat-v0002/canary?share=0.2", headers=ADMIN)
    unknown = await client.post("/admin/adapters/chat-v0042/canary?share=0.2", headers=ADMIN)
    whole = await client.post("/admin/adapters/chat-v0001/canary?share=1", headers=ADMIN)
    missing = await client.post("/admin/adapters/chat-v0001/canary", headers=ADMIN)
    anonymous = await client.post("/admin/adapters/chat-v0001/canary?share=0.2")
    assert [r.status_code for r in (served, rejected, unknown, whole, missing, anonymous)] == [
        409,
        409,
        404,
        400,
        400,
        401,
    ]
    assert "already serves" in served.json()["error"]["message"]
    assert "rejected" in rejected.json()["error"]["message"]
    assert ("load", "chat-v0002") not in engine.calls
    none_yet = await client.get("/admin/canary", headers=ADMIN)
    assert none_yet.status_code == 404
    assert none_yet.json()["error"]["code"] == "canary_not_found"
    first = await client.post("/admin/adapters/chat-v0001/canary?share=0.2", headers=ADMIN)
    assert first.status_code == 201
    second = await client.post("/admin/adapters/chat-v0001/canary?share=0.5", headers=ADMIN)
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "canary_conflict"
    nul = await client.post("/admin/canary/abort?reason=a%00b", headers=ADMIN)
    assert nul.status_code == 400
    still = (await client.get("/admin/canary", headers=ADMIN)).json()
    assert still["state"] == "running"
