"""Failures become OpenAI error JSON with the right status: bad input and a failing engine."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import httpx
import pytest
from gateway_fakes import ADMIN, FakeEngine, chat_body, logged_turns, sse_events
from litestar import Litestar
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The response has ``status`` and OpenAI's error shape; return the error object."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return dict(error)


async def test_malformed_json_is_400(client: AsyncTestClient[Litestar]) -> None:
    """A body that is not JSON is rejected as invalid_request_error."""
    response = await client.post(
        "/v1/chat/completions",
        content=b'{"model": "chat", "messages": [',
        headers={**ADMIN, "content-type": "application/json"},
    )
    error = assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert "JSON" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "chat", "messages": []}, "messages"),
        ({"model": "chat"}, "messages"),
        ({"model": "chat", "messages": [{"content": "x"}]}, "messages[0].role"),
        ({"model": "chat", "messages": "hi"}, "messages"),
        ({"model": "chat", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "chat", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({**chat_body(), "temperature": 9.0}, "temperature"),
        ({**chat_body(), "max_tokens": 0}, "max_tokens"),
        ({**chat_body(), "model": 3}, "model"),
        ({**chat_body(), "stream": {"yes": 1}}, "stream"),
    ],
)
async def test_wrong_fields_are_400_naming_the_field(
    client: AsyncTestClient[Litestar], engine: FakeEngine, body: dict[str, Any], param: str
) -> None:
    """Well-formed JSON with a wrong field is 400 (as OpenAI answers, not 422) naming that
    field in param and message."""
    response = await client.post("/v1/chat/completions", json=body, headers=ADMIN)
    error = assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert param in error["message"]
    assert engine.requests == []


async def test_too_many_messages_is_400(settings: GatewaySettings, engine: FakeEngine) -> None:
    """More messages than limits.max_messages is refused before the engine is called."""
    tight = dataclasses.replace(
        settings, limits=dataclasses.replace(settings.limits, max_messages=2)
    )
    async with AsyncTestClient(app=create_app(tight, transport=engine.transport())) as client:
        body = {"model": "chat", "messages": [{"role": "user", "content": "x"}] * 3}
        response = await client.post("/v1/chat/completions", json=body, headers=ADMIN)
    assert assert_openai_error(response, 400)["param"] == "messages"


async def test_oversized_body_is_413(client: AsyncTestClient[Litestar], engine: FakeEngine) -> None:
    """A body over limits.max_body_bytes is refused with 413 and never forwarded."""
    response = await client.post(
        "/v1/chat/completions", json=chat_body("x" * 1_100_000), headers=ADMIN
    )
    assert assert_openai_error(response, 413)["code"] == "payload_too_large"
    assert engine.requests == []


async def test_bad_conversation_header_is_400(client: AsyncTestClient[Litestar]) -> None:
    """A conversation id with odd characters is refused, naming the header."""
    response = await client.post(
        "/v1/chat/completions",
        json=chat_body(),
        headers={**ADMIN, "X-Conversation-Id": "a b/../c"},
    )
    assert assert_openai_error(response, 400)["param"] == "X-Conversation-Id"


async def test_unknown_route_is_404_json(client: AsyncTestClient[Litestar]) -> None:
    """Unknown paths answer in the same error shape."""
    assert_openai_error(await client.get("/v1/nothing-here", headers=ADMIN), 404)


def _raise(error: Exception) -> Any:
    def failure(request: httpx.Request) -> httpx.Response:
        raise error

    return failure


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (httpx.ConnectError("refused"), 502, "engine_unreachable"),
        (httpx.ReadTimeout("slow"), 504, "engine_timeout"),
        (httpx.ConnectTimeout("slow"), 504, "engine_timeout"),
        (httpx.PoolTimeout("full"), 503, "engine_busy"),
        (httpx.RemoteProtocolError("garbage"), 502, "engine_error"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_engine_transport_failures_map_to_5xx(
    client: AsyncTestClient[Litestar],
    engine: FakeEngine,
    error: Exception,
    status: int,
    code: str,
    stream: bool,
) -> None:
    """Engine down or slow gives 502/503/504 in OpenAI's shape, JSON and stream alike."""
    engine.failure = _raise(error)
    response = await client.post(
        "/v1/chat/completions", json=chat_body(stream=stream), headers=ADMIN
    )
    body = assert_openai_error(response, status)
    assert body["type"] == "upstream_error"
    assert body["code"] == code
    assert "engine.test" not in response.text


@pytest.mark.parametrize(
    ("engine_status", "status", "code"),
    [
        (400, 400, "engine_rejected"),
        (422, 400, "engine_rejected"),
        (404, 502, "adapter_not_loaded"),
        (503, 503, "engine_busy"),
        (500, 502, "engine_error"),
    ],
)
async def test_engine_error_statuses_map_to_gateway_errors(
    client: AsyncTestClient[Litestar],
    engine: FakeEngine,
    engine_status: int,
    status: int,
    code: str,
) -> None:
    """Engine 4xx/5xx answers keep the engine's message and get a fitting status."""
    engine.failure = lambda request: httpx.Response(
        engine_status, json={"object": "error", "message": "engine says no", "code": engine_status}
    )
    response = await client.post("/v1/chat/completions", json=chat_body(), headers=ADMIN)
    body = assert_openai_error(response, status)
    assert body["code"] == code
    assert "engine says no" in body["message"]


async def test_stream_failing_midway_ends_with_error_event_then_done(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """A stream the engine breaks off sends the error JSON as one data line, then [DONE]."""
    engine.fail_after = 3
    async with AsyncTestClient(app=create_app(settings, transport=engine.transport())) as client:
        response = await client.post(
            "/v1/chat/completions", json=chat_body(stream=True), headers=ADMIN
        )
    assert response.status_code == 200
    events = sse_events(response.content)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert (error["type"], error["code"]) == ("upstream_error", "engine_timeout")
    assert len(events) == 3 + 2
    [turn] = logged_turns(settings)
    assert turn["finish_reason"] == "engine_timeout"
    assert turn["reply"] == "Hi there"
    assert engine.streams[0].closed


async def test_unexpected_exception_is_500_without_details(
    client: AsyncTestClient[Litestar], engine: FakeEngine
) -> None:
    """A bug answers a generic 500 in OpenAI's shape: no stack trace, no exception text."""
    engine.failure = _raise(RuntimeError("secret internals"))
    response = await client.post("/v1/chat/completions", json=chat_body(), headers=ADMIN)
    body = assert_openai_error(response, 500)
    assert "secret internals" not in response.text
    assert body["code"] == "internal_error"
