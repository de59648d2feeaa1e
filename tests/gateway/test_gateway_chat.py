"""Chat completions through the gateway: relay, streaming, aliases, logging."""

from __future__ import annotations

import json

from gateway_fakes import ADMIN, FakeEngine, chat_body, logged_turns, sse_events
from litestar import Litestar
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings


async def test_json_completion_is_relayed_and_forwarded_to_the_active_adapter(
    client: AsyncTestClient[Litestar], engine: FakeEngine
) -> None:
    """The public alias 'chat' reaches the engine as its adapter, and the reply comes back."""
    response = await client.post("/v1/chat/completions", json=chat_body(), headers=ADMIN)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "Hi there, friend."
    assert engine.requests[0]["model"] == "chat-v0000"
    assert engine.requests[0]["messages"] == [{"role": "user", "content": "hello there"}]


async def test_unknown_fields_are_forwarded_untouched(
    client: AsyncTestClient[Litestar], engine: FakeEngine
) -> None:
    """Sampling options the gateway does not model still reach the engine."""
    body = chat_body(top_k=5, repetition_penalty=1.1, temperature=0.2)
    assert (await client.post("/v1/chat/completions", json=body, headers=ADMIN)).status_code == 200
    sent = engine.requests[0]
    assert (sent["top_k"], sent["repetition_penalty"], sent["temperature"]) == (5, 1.1, 0.2)


async def test_alias_flip_changes_the_adapter_forwarded(
    client: AsyncTestClient[Litestar], engine: FakeEngine
) -> None:
    """PUT /admin/aliases/chat makes the next request use the new adapter."""
    flip = await client.put("/admin/aliases/chat", json={"adapter": "chat-v0007"}, headers=ADMIN)
    assert flip.status_code == 200
    assert flip.json()["adapter"] == "chat-v0007"
    await client.post("/v1/chat/completions", json=chat_body(), headers=ADMIN)
    assert engine.requests[-1]["model"] == "chat-v0007"


async def test_models_lists_public_aliases_only(client: AsyncTestClient[Litestar]) -> None:
    """/v1/models shows aliases, never adapter names, and hides private aliases."""
    await client.put(
        "/admin/aliases/judge", json={"adapter": "judge-v1", "public": False}, headers=ADMIN
    )
    models = (await client.get("/v1/models", headers=ADMIN)).json()
    assert [card["id"] for card in models["data"]] == ["chat"]


async def test_unknown_model_is_404_naming_the_field(client: AsyncTestClient[Litestar]) -> None:
    """A model that is not an alias (e.g. an adapter name) is refused, never forwarded."""
    response = await client.post(
        "/v1/chat/completions", json={**chat_body(), "model": "chat-v0000"}, headers=ADMIN
    )
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "model"
    assert response.json()["error"]["code"] == "model_not_found"


async def test_stream_is_relayed_event_by_event(
    client: AsyncTestClient[Litestar], engine: FakeEngine
) -> None:
    """Every engine chunk reaches the client in order, then [DONE]; usage was requested upstream."""
    response = await client.post("/v1/chat/completions", json=chat_body(stream=True), headers=ADMIN)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.content)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "Hi there, friend."
    assert engine.requests[0]["stream_options"] == {"include_usage": True}
    # The client did not ask for usage: the engine's usage-only chunk is not relayed.
    assert all(chunk["choices"] for chunk in chunks)


async def test_usage_only_chunk_is_relayed_when_asked(client: AsyncTestClient[Litestar]) -> None:
    """With include_usage the final chunk has empty choices and the token counts."""
    body = chat_body(stream=True, stream_options={"include_usage": True})
    response = await client.post("/v1/chat/completions", json=body, headers=ADMIN)
    chunks = [json.loads(event) for event in sse_events(response.content)[:-1]]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 5


async def test_turns_are_logged_with_conversation_tokens_and_adapter(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """JSON and streamed turns land in DuckDB with ids, adapter, reply, finish reason, tokens."""
    headers = {**ADMIN, "X-Conversation-Id": "conv-42"}
    async with AsyncTestClient(app=create_app(settings, transport=engine.transport())) as client:
        json_reply = await client.post("/v1/chat/completions", json=chat_body(), headers=headers)
        assert json_reply.headers["x-conversation-id"] == "conv-42"
        stream = await client.post(
            "/v1/chat/completions", json=chat_body(stream=True), headers=headers
        )
        assert stream.headers["x-conversation-id"] == "conv-42"
        fresh = await client.post("/v1/chat/completions", json=chat_body(), headers=ADMIN)
    turns = logged_turns(settings)
    assert len(turns) == 3
    for turn in turns[:2]:
        assert turn["conversation_id"] == "conv-42"
        assert (turn["alias"], turn["adapter"]) == ("chat", "chat-v0000")
        assert turn["reply"] == "Hi there, friend."
        assert turn["finish_reason"] == "stop"
        assert (turn["prompt_tokens"], turn["completion_tokens"]) == (7, 5)
        assert json.loads(turn["request_messages"])[0]["content"] == "hello there"
        assert turn["key_id"] == "env-admin"
    assert [turn["stream"] for turn in turns[:2]] == [False, True]
    assert turns[2]["conversation_id"] == fresh.headers["x-conversation-id"] != "conv-42"


async def test_opt_out_header_marks_the_turn(settings: GatewaySettings, engine: FakeEngine) -> None:
    """The opt-out header stores the turn with opt_out set, so exports leave it out."""
    async with AsyncTestClient(app=create_app(settings, transport=engine.transport())) as client:
        await client.post(
            "/v1/chat/completions", json=chat_body(), headers={**ADMIN, "X-TuneShield-Opt-Out": "1"}
        )
        await client.post("/v1/chat/completions", json=chat_body(), headers=ADMIN)
    assert [turn["opt_out"] for turn in logged_turns(settings)] == [True, False]


async def test_log_drains_on_shutdown(settings: GatewaySettings, engine: FakeEngine) -> None:
    """Without durable acknowledgement, every answered turn is in DuckDB after shutdown,
    even with a long flush interval."""
    import dataclasses

    slow = dataclasses.replace(
        settings,
        dialog_log=dataclasses.replace(
            settings.dialog_log, durable_ack=False, flush_interval_s=3600.0, batch_size=1000
        ),
    )
    answered = 0
    async with AsyncTestClient(app=create_app(slow, transport=engine.transport())) as client:
        for index in range(40):
            body = chat_body(f"message {index}", stream=index % 2 == 0)
            response = await client.post("/v1/chat/completions", json=body, headers=ADMIN)
            answered += response.status_code == 200
        metrics = (await client.get("/metrics")).text
        assert "gateway_dialog_log_queue_depth 40.0" in metrics
    turns = logged_turns(settings)
    assert answered == 40
    assert sorted(json.loads(t["request_messages"])[0]["content"] for t in turns) == sorted(
        f"message {index}" for index in range(40)
    )


async def test_metrics_count_requests_tokens_and_errors(client: AsyncTestClient[Litestar]) -> None:
    """/metrics exposes request, token and error counters from this app's registry."""
    await client.post("/v1/chat/completions", json=chat_body(), headers=ADMIN)
    await client.post("/v1/chat/completions", json=chat_body())
    text = (await client.get("/metrics")).text
    assert (
        'gateway_requests_total{method="POST",route="/v1/chat/completions",status="200"} 1.0'
        in text
    )
    assert 'gateway_tokens_total{kind="completion"} 5.0' in text
    assert 'gateway_errors_total{status="401",type="authentication_error"} 1.0' in text


async def test_healthz_reports_engine_state(
    client: AsyncTestClient[Litestar], engine: FakeEngine
) -> None:
    """/healthz is 200 with a healthy engine and 503 (degraded) when its probe fails."""
    assert (await client.get("/healthz")).json()["status"] == "ok"
    engine.health_status = 500
    response = await client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["engine"] == "HTTP 500"


async def test_openapi_schema_is_served(client: AsyncTestClient[Litestar]) -> None:
    """The OpenAPI document lists the chat route with its request model."""
    schema = (await client.get("/schema/openapi.json")).json()
    assert "/v1/chat/completions" in schema["paths"]
    assert "ChatCompletionRequest" in json.dumps(schema["components"])
