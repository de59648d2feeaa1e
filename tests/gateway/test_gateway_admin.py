"""Admin API: dialog deletion (privacy), aliases, and the live guard."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from gateway_fakes import ADMIN, FakeEngine, chat_body, logged_turns, sse_events
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
        settings, dialog_log=dataclasses.replace(settings.dialog_log, flush_interval_s=3600.0)
    )
    async with AsyncTestClient(app=create_app(slow, transport=engine.transport())) as client:
        await client.post("/v1/chat/completions", json=chat_body(), headers=ADMIN)
        deleted = await client.delete("/admin/dialogs?key_id=env-admin", headers=ADMIN)
    assert deleted.json() == {"deleted_turns": 1}
    assert logged_turns(settings) == []


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
    assert empty.status_code == 422
    assert empty.json()["error"]["param"] == "adapter"
    assert odd.status_code == 400
    assert [a["adapter"] for a in aliases] == ["chat-v0000"]


def _scorer(texts: Sequence[str]) -> list[float]:
    return [1.0 if "idiot" in text else 0.0 for text in texts]


def _guarded(settings: GatewaySettings, action: str) -> GatewaySettings:
    guard = dataclasses.replace(settings.guard, enabled=True, action=action)  # type: ignore[arg-type]
    return dataclasses.replace(settings, guard=guard)


async def test_guard_block_refuses_without_calling_the_engine(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """With action block, a toxic last user turn gets the canned refusal (JSON and stream)."""
    guarded = _guarded(settings, "block")
    app = create_app(guarded, transport=engine.transport(), scorer=_scorer)
    async with AsyncTestClient(app=app) as client:
        plain = await client.post(
            "/v1/chat/completions", json=chat_body("you idiot"), headers=ADMIN
        )
        streamed = await client.post(
            "/v1/chat/completions", json=chat_body("you idiot", stream=True), headers=ADMIN
        )
        fine = await client.post("/v1/chat/completions", json=chat_body("hello"), headers=ADMIN)
    refusal = settings.guard.refusal
    assert plain.json()["choices"][0]["message"]["content"] == refusal
    assert plain.json()["choices"][0]["finish_reason"] == "content_filter"
    events = sse_events(streamed.content)
    assert refusal in events[0] and events[-1] == "[DONE]"
    assert fine.json()["choices"][0]["message"]["content"] == "Hi there, friend."
    assert len(engine.requests) == 1
    turns = logged_turns(settings)
    assert [(t["guard_flag"], t["finish_reason"]) for t in turns] == [
        (True, "content_filter"),
        (True, "content_filter"),
        (False, "stop"),
    ]
    assert [t["guard_score"] for t in turns] == [1.0, 1.0, 0.0]


async def test_guard_flag_forwards_and_flags(settings: GatewaySettings, engine: FakeEngine) -> None:
    """With action flag, the turn is answered by the engine and stored flagged."""
    app = create_app(_guarded(settings, "flag"), transport=engine.transport(), scorer=_scorer)
    async with AsyncTestClient(app=app) as client:
        response = await client.post(
            "/v1/chat/completions", json=chat_body("you idiot", stream=True), headers=ADMIN
        )
    assert sse_events(response.content)[-1] == "[DONE]"
    assert len(engine.requests) == 1
    [turn] = logged_turns(settings)
    assert (turn["guard_flag"], turn["guard_score"], turn["finish_reason"]) == (True, 1.0, "stop")


async def test_default_lexical_scorer_blocks_profanity(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """The policy's profanity_check scorer loads lazily and scores obvious insults high."""
    app = create_app(_guarded(settings, "block"), transport=engine.transport())
    async with AsyncTestClient(app=app) as client:
        rude = await client.post(
            "/v1/chat/completions", json=chat_body("fuck you, you stupid idiot"), headers=ADMIN
        )
        polite = await client.post(
            "/v1/chat/completions", json=chat_body("what a lovely day"), headers=ADMIN
        )
    assert rude.json()["choices"][0]["finish_reason"] == "content_filter"
    assert polite.json()["choices"][0]["finish_reason"] == "stop"
