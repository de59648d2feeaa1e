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
    """Promote serves the new version on the public alias; rollback serves the old one; a
    second rollback is refused (nothing earlier) and leaves the alias where it is."""
    assert await chat_model(client, engine) == "chat-v0000"
    promoted = await client.post("/admin/adapters/chat-v0001/promote", headers=ADMIN)
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["previous"] == "chat-v0000"
    assert await chat_model(client, engine) == "chat-v0001"
    rolled = await client.post("/admin/adapters/rollback", headers=ADMIN)
    assert rolled.json()["version"] == "chat-v0000"
    assert await chat_model(client, engine) == "chat-v0000"
    again = await client.post("/admin/adapters/rollback", headers=ADMIN)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "swap_refused"
    assert "no earlier version" in again.json()["error"]["message"]
    assert await chat_model(client, engine) == "chat-v0000"
    statuses = {row["version"]: row["status"] for row in
                (await client.get("/admin/adapters", headers=ADMIN)).json()}  # fmt: skip
    assert statuses == {"chat-v0000": "active", "chat-v0001": "retired", "chat-v0002": "rejected"}
    audit = (await client.get("/admin/audit", headers=ADMIN)).json()
    assert [(e["actor"], e["action"], e["target"]) for e in audit] == [
        ("env-admin", "rollback", "chat-v0000"),
        ("env-admin", "promote", "chat-v0001"),
    ]
    assert audit[1]["detail"] == {"alias": "chat", "previous": "chat-v0000", "force": False}
    promotes = (await client.get("/admin/audit?action=promote", headers=ADMIN)).json()
    assert [e["target"] for e in promotes] == ["chat-v0001"]


async def test_rollback_to_a_named_earlier_version(
    client: AsyncTestClient[Litestar], engine: FakeVLLM, settings: GatewaySettings, tmp_path: Path
) -> None:
    """?version= goes back to an earlier promotion of the alias (its alias found from the
    name); a version never served is refused with a 409 that says so."""
    database = open_database(settings.store_url)
    try:
        AdapterRegistry(database).register("chat-v0003", adapter_folder(tmp_path, "chat-v0003"))
    finally:
        database.close()
    for version in ("chat-v0001", "chat-v0003"):
        response = await client.post(f"/admin/adapters/{version}/promote", headers=ADMIN)
        assert response.status_code == 200, response.text
    named = await client.post("/admin/adapters/rollback?version=chat-v0000", headers=ADMIN)
    assert named.status_code == 200, named.text
    assert (named.json()["version"], named.json()["previous"]) == ("chat-v0000", "chat-v0003")
    assert await chat_model(client, engine) == "chat-v0000"
    refused = await client.post("/admin/adapters/rollback?version=chat-v0001", headers=ADMIN)
    assert refused.status_code == 409
    assert "no earlier version" in refused.json()["error"]["message"]


async def test_alias_history_lists_flips_newest_first(
    client: AsyncTestClient[Litestar], engine: FakeVLLM
) -> None:
    """GET /admin/aliases/{alias}/history answers admins every flip, newest first, with its
    kind, actor and time, the one serving now marked; unknown aliases are 404."""
    await client.post("/admin/adapters/chat-v0001/promote", headers=ADMIN)
    await client.post("/admin/adapters/rollback", headers=ADMIN)
    history = await client.get("/admin/aliases/chat/history", headers=ADMIN)
    assert history.status_code == 200, history.text
    entries = history.json()
    assert [(e["version"], e["previous"], e["kind"], e["actor"], e["active"]) for e in entries] == [
        ("chat-v0000", "chat-v0001", "rollback", "env-admin", True),
        ("chat-v0001", "chat-v0000", "promote", "env-admin", False),
        ("chat-v0000", None, "seed", None, False),
    ]
    assert all(entry["changed_at"].endswith("Z") for entry in entries)
    newest = await client.get("/admin/aliases/chat/history?limit=1", headers=ADMIN)
    assert newest.json() == entries[:1]
    missing = await client.get("/admin/aliases/nope/history", headers=ADMIN)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "alias_not_found"
    assert (await client.get("/admin/aliases/chat/history")).status_code == 401


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
    """POST /admin/adapters copies the folder from the import root (policies/learner.yaml,
    in the data dir) under the data dir as the alias's next version (a new alias starts at
    v0000), leaves the source alone; promote serves it."""
    source = adapter_folder(settings.data_dir / "imports", "trained")
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
    client: AsyncTestClient[Litestar], settings: GatewaySettings
) -> None:
    """A relative path or a bad alias (off the schema): 400; a missing folder: 404; a folder
    without the weights: 409; each naming the field, and nothing registered."""
    imports = settings.data_dir / "imports"
    incomplete = imports / "incomplete"
    incomplete.mkdir(parents=True)
    (incomplete / "adapter_config.json").write_text("{}")
    cases = [
        ("path", "relative/folder", 400),
        ("alias", "bad alias", 400),
        ("path", str(imports / "missing"), 404),
        ("path", str(incomplete), 409),
    ]
    for field, value, status in cases:
        body = {"alias": "chat", "path": str(incomplete), field: value}
        response = await client.post("/admin/adapters", json=body, headers=ADMIN)
        assert response.status_code == status, (value, response.text)
        assert response.json()["error"]["param"] == field, value
    listed = (await client.get("/admin/adapters", headers=ADMIN)).json()
    assert [row["version"] for row in listed] == ["chat-v0000", "chat-v0001", "chat-v0002"]
