"""Admin API: dialog deletion (privacy) and aliases."""

from __future__ import annotations

import dataclasses
import io

import pyarrow.parquet as pq
from gateway_fakes import ADMIN, FakeEngine, chat_body, logged_turns
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings


async def test_delete_dialogs_by_key_and_by_conversation(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """DELETE /admin/dialogs removes one key's turns, or one conversation, and nothing else."""
    async with AsyncTestClient(app=create_app(settings, transport=engine.transport())) as client:
        created = (await client.post("/admin/keys", json={"name": "bob"}, headers=ADMIN)).json()
        bob = {"Authorization": f"Bearer {created['key']}"}
        for conversation in ("c1", "c2"):
            for headers in (bob, ADMIN):
                await client.post(
                    "/v1/chat/completions",
                    json=chat_body(),
                    headers={**headers, "X-Conversation-Id": f"{conversation}-{len(headers)}"},
                )
        admin_conversation = f"c1-{len(ADMIN)}"
        by_key = await client.delete(f"/admin/dialogs?key_id={created['key_id']}", headers=ADMIN)
        by_conversation = await client.delete(
            f"/admin/dialogs?conversation_id={admin_conversation}", headers=ADMIN
        )
        denied = await client.delete("/admin/dialogs?key_id=env-admin", headers=bob)
    assert by_key.json() == {"deleted_turns": 2}
    assert by_conversation.json() == {"deleted_turns": 1}
    assert denied.status_code == 403
    turns = logged_turns(settings)
    assert [(t["key_id"], t["conversation_id"]) for t in turns] == [
        ("env-admin", f"c2-{len(ADMIN)}")
    ]


async def test_delete_catches_turns_still_queued(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """Turns answered just before a deletion (still in the write queue) are deleted too."""
    slow = dataclasses.replace(
        settings,
        dialog_log=dataclasses.replace(
            settings.dialog_log, durable_ack=False, flush_interval_s=3600.0
        ),
    )
    async with AsyncTestClient(app=create_app(slow, transport=engine.transport())) as client:
        await client.post("/v1/chat/completions", json=chat_body(), headers=ADMIN)
        deleted = await client.delete("/admin/dialogs?key_id=env-admin", headers=ADMIN)
    assert deleted.json() == {"deleted_turns": 1}
    assert logged_turns(settings) == []


async def test_export_answers_the_named_conversations_as_parquet(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """POST /admin/dialogs/export: only the named conversations' turns, queued ones included;
    opted-out turns only when asked for; bad ids are 400 naming the field; admins only."""
    slow = dataclasses.replace(
        settings,
        dialog_log=dataclasses.replace(
            settings.dialog_log, durable_ack=False, flush_interval_s=3600.0
        ),
    )
    async with AsyncTestClient(app=create_app(slow, transport=engine.transport())) as client:
        created = (await client.post("/admin/keys", json={"name": "bob"}, headers=ADMIN)).json()
        bob = {"Authorization": f"Bearer {created['key']}"}
        for conversation, extra in (("a", {}), ("a", {"X-TuneShield-Opt-Out": "1"}), ("b", {})):
            headers = {**ADMIN, "X-Conversation-Id": conversation, **extra}
            await client.post("/v1/chat/completions", json=chat_body(), headers=headers)
        url = "/admin/dialogs/export"
        plain = await client.post(url, json={"conversation_ids": ["a", "z"]}, headers=ADMIN)
        everything = await client.post(
            url, json={"conversation_ids": ["a"], "include_opt_out": True}, headers=ADMIN
        )
        bad = await client.post(url, json={"conversation_ids": ["no spaces"]}, headers=ADMIN)
        empty = await client.post(url, json={"conversation_ids": []}, headers=ADMIN)
        denied = await client.post(url, json={"conversation_ids": ["a"]}, headers=bob)
    assert plain.status_code == 200, plain.text
    assert plain.headers["content-type"].startswith("application/vnd.apache.parquet")
    table = pq.read_table(io.BytesIO(plain.content))
    assert table.column("conversation_id").to_pylist() == ["a"]
    assert table.column("opt_out").to_pylist() == [False]
    assert pq.read_table(io.BytesIO(everything.content)).column("opt_out").to_pylist() == [
        False,
        True,
    ]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "conversation_ids[0]"
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "conversation_ids"
    assert denied.status_code == 403


async def test_aliases_survive_restart(settings: GatewaySettings, engine: FakeEngine) -> None:
    """An alias flip is stored in DuckDB; the seed does not undo it on the next start."""
    async with AsyncTestClient(app=create_app(settings, transport=engine.transport())) as client:
        await client.put("/admin/aliases/chat", json={"adapter": "chat-v0003"}, headers=ADMIN)
    async with AsyncTestClient(app=create_app(settings, transport=engine.transport())) as client:
        aliases = (await client.get("/admin/aliases", headers=ADMIN)).json()
        await client.post("/v1/chat/completions", json=chat_body(), headers=ADMIN)
    assert [(a["alias"], a["adapter"]) for a in aliases] == [("chat", "chat-v0003")]
    assert engine.requests[-1]["model"] == "chat-v0003"


async def test_bad_alias_update_is_rejected(settings: GatewaySettings, engine: FakeEngine) -> None:
    """An empty adapter name or a malformed alias never reaches the alias table."""
    async with AsyncTestClient(app=create_app(settings, transport=engine.transport())) as client:
        empty = await client.put("/admin/aliases/chat", json={"adapter": ""}, headers=ADMIN)
        odd = await client.put("/admin/aliases/a%20b", json={"adapter": "x"}, headers=ADMIN)
        aliases = (await client.get("/admin/aliases", headers=ADMIN)).json()
    assert empty.status_code == 400
    assert empty.json()["error"]["param"] == "adapter"
    assert odd.status_code == 400
    assert [a["adapter"] for a in aliases] == ["chat-v0000"]
