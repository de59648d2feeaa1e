"""/admin/adapters through the gateway app, with the engine faked."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from learner_fakes import FakeVLLM, adapter_folder
from litestar import Litestar
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings, load_settings
from learner.admin_routes import AdapterAdmin
from store import REQUIRED_FILES, AdapterRegistry, RunStore, open_database

ADMIN_KEY = "admin-test-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def settings(tmp_path: Path) -> GatewaySettings:
    """Gateway settings whose database already holds chat-v0000 (active) and chat-v0001."""
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
        runs = RunStore(database)
        runs.update(runs.create("chat").run_id, status="running", stage="train")
    finally:
        database.close()
    return settings


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


async def chat_model(client: AsyncTestClient[Litestar], engine: FakeVLLM) -> str:
    """The adapter the engine was asked for when a user chats with the public alias."""
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    response = await client.post("/v1/chat/completions", json=body, headers=ADMIN)
    assert response.status_code == 200, response.text
    return engine.calls[-1][1]


async def test_list_and_show_need_admin(client: AsyncTestClient[Litestar]) -> None:
    """Listing and showing answer registry rows to admins only; unknown versions are 404."""
    listed = await client.get("/admin/adapters", headers=ADMIN)
    shown = await client.get("/admin/adapters/chat-v0001", headers=ADMIN)
    missing = await client.get("/admin/adapters/chat-v0042", headers=ADMIN)
    anonymous = await client.get("/admin/adapters")
    assert [row["version"] for row in listed.json()] == ["chat-v0000", "chat-v0001", "chat-v0002"]
    assert shown.json()["status"] == "candidate"
    assert shown.json()["created_at"].endswith("Z")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "adapter_not_found"
    assert anonymous.status_code == 401


async def test_promote_then_rollback_changes_what_users_get(
    client: AsyncTestClient[Litestar], engine: FakeVLLM
) -> None:
    """Promote serves the new version on the public alias; rollback serves the old one."""
    assert await chat_model(client, engine) == "chat-v0000"
    promoted = await client.post("/admin/adapters/chat-v0001/promote", headers=ADMIN)
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["previous"] == "chat-v0000"
    assert await chat_model(client, engine) == "chat-v0001"
    rolled = await client.post("/admin/adapters/rollback", headers=ADMIN)
    assert rolled.json()["version"] == "chat-v0000"
    assert await chat_model(client, engine) == "chat-v0000"
    named = await client.post("/admin/adapters/rollback?version=chat-v0001", headers=ADMIN)
    assert named.json()["version"] == "chat-v0001"
    audit = (await client.get("/admin/audit", headers=ADMIN)).json()
    assert [(e["actor"], e["action"], e["target"]) for e in audit] == [
        ("env-admin", "rollback", "chat-v0001"),
        ("env-admin", "rollback", "chat-v0000"),
        ("env-admin", "promote", "chat-v0001"),
    ]
    assert audit[2]["detail"] == {"alias": "chat", "previous": "chat-v0000", "force": False}
    promotes = (await client.get("/admin/audit?action=promote", headers=ADMIN)).json()
    assert [e["target"] for e in promotes] == ["chat-v0001"]


async def test_rejected_needs_force(client: AsyncTestClient[Litestar], engine: FakeVLLM) -> None:
    """Promoting a rejected version answers 409 unless ?force=true, which serves it."""
    refused = await client.post("/admin/adapters/chat-v0002/promote", headers=ADMIN)
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "swap_refused"
    forced = await client.post("/admin/adapters/chat-v0002/promote?force=true", headers=ADMIN)
    assert forced.status_code == 200
    shown = await client.get("/admin/adapters/chat-v0002", headers=ADMIN)
    assert shown.json()["forced_promote_at"] is not None
    assert await chat_model(client, engine) == "chat-v0002"


async def test_engine_down_answers_503_and_keeps_alias(
    client: AsyncTestClient[Litestar], engine: FakeVLLM
) -> None:
    """A promote while the engine is down is a 503 and the alias still serves the old one."""
    engine.down = True
    response = await client.post("/admin/adapters/chat-v0001/promote", headers=ADMIN)
    engine.down = False
    assert response.status_code == 503
    assert "unchanged" in response.json()["error"]["message"]
    assert await chat_model(client, engine) == "chat-v0000"


async def test_runs_are_listed_and_shown(client: AsyncTestClient[Litestar]) -> None:
    """A gateway lists and shows the runs of the store (a learner elsewhere runs them); an
    unknown run is 404."""
    listed = (await client.get("/admin/learner/runs", headers=ADMIN)).json()
    shown = await client.get(f"/admin/learner/runs/{listed[0]['run_id']}", headers=ADMIN)
    missing = await client.get("/admin/learner/runs/run_nope", headers=ADMIN)
    assert [(run["status"], run["stage"]) for run in listed] == [("running", "train")]
    assert shown.json()["run_id"] == listed[0]["run_id"]
    assert missing.status_code == 404


async def test_register_copies_a_folder_in_as_the_next_candidate_then_promote_serves_it(
    client: AsyncTestClient[Litestar], engine: FakeVLLM, settings: GatewaySettings, tmp_path: Path
) -> None:
    """POST /admin/adapters copies the folder under the data dir as the alias's next
    version (a new alias starts at v0000), leaves the source alone; promote serves it."""
    source = adapter_folder(tmp_path / "built", "trained")
    body = {"alias": "chat", "path": str(source), "parent": "chat-v0000", "samples": 12}
    registered = await client.post("/admin/adapters", json=body, headers=ADMIN)
    assert registered.status_code == 201, registered.text
    record = registered.json()
    assert (record["version"], record["status"], record["samples"]) == (
        "chat-v0003",
        "candidate",
        12,
    )
    assert Path(record["path"]) == (settings.data_dir / "adapters" / "chat-v0003").resolve()
    assert sorted(p.name for p in Path(record["path"]).iterdir()) == sorted(REQUIRED_FILES)
    assert source.is_dir() and not list((settings.data_dir / "adapters").glob(".*"))
    fresh = await client.post(
        "/admin/adapters", json={"alias": "demo-x", "path": str(source)}, headers=ADMIN
    )
    assert fresh.json()["version"] == "demo-x-v0000"
    promoted = await client.post("/admin/adapters/chat-v0003/promote", headers=ADMIN)
    assert promoted.status_code == 200, promoted.text
    assert engine.loaded["chat-v0003"] == record["path"]
    assert await chat_model(client, engine) == "chat-v0003"


async def test_register_refuses_what_is_no_adapter_folder_naming_the_field(
    client: AsyncTestClient[Litestar], tmp_path: Path
) -> None:
    """A missing folder, a relative path, a folder without the weights, a bad alias: 422 with
    the field named, and nothing registered."""
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "adapter_config.json").write_text("{}")
    cases = {
        "path": [str(tmp_path / "missing"), "relative/folder", str(incomplete)],
        "alias": ["bad alias"],
    }
    for field, values in cases.items():
        for value in values:
            body = {"alias": "chat", "path": str(incomplete), field: value}
            response = await client.post("/admin/adapters", json=body, headers=ADMIN)
            assert response.status_code == 422, (value, response.text)
            assert response.json()["error"]["param"] == field, value
    listed = (await client.get("/admin/adapters", headers=ADMIN)).json()
    assert [row["version"] for row in listed] == ["chat-v0000", "chat-v0001", "chat-v0002"]
