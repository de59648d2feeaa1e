"""The gateway on a real loopback socket (uvicorn): client disconnects and the OpenAI SDK.

The Litestar test client buffers whole responses, so these run a real server on
127.0.0.1 in front of the fake engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from gateway_fakes import ADMIN, ADMIN_KEY, FakeEngine, chat_body, logged_turns, serving

from gateway.settings import GatewaySettings


@pytest.fixture
async def live_url(settings: GatewaySettings, engine: FakeEngine) -> AsyncIterator[str]:
    async with serving(settings, engine) as url:
        yield url


async def test_client_disconnect_closes_upstream_and_logs_partial_reply(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """Closing the client connection closes the engine stream early; the turn is logged partial."""
    engine.delay_s = 0.3
    async with serving(settings, engine) as live_url:
        await _read_two_events_and_hang_up(live_url)
        for _ in range(100):
            if engine.streams and engine.streams[0].closed:
                break
            await asyncio.sleep(0.02)
    stream = engine.streams[0]
    assert stream.closed
    assert stream.sent < len(stream.events)
    [turn] = logged_turns(settings)
    assert turn["finish_reason"] == "client_disconnected"
    assert turn["reply"] == "Hi"


async def _read_two_events_and_hang_up(live_url: str) -> None:
    async with (
        httpx.AsyncClient(base_url=live_url) as http,
        http.stream(
            "POST", "/v1/chat/completions", json=chat_body(stream=True), headers=ADMIN
        ) as response,
    ):
        assert response.status_code == 200
        received = []
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                received.append(line)
            if len(received) == 2:
                break
    assert "Hi" in received[1]


async def test_openai_sdk_gets_json_and_streamed_completions(live_url: str) -> None:
    """The unmodified openai client works through the gateway, streamed and not."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=f"{live_url}/v1", api_key=ADMIN_KEY, max_retries=0) as sdk:
        completion = await sdk.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}]
        )
        stream = await sdk.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        parts: list[str] = []
        usage = None
        async for chunk in stream:
            parts.extend(choice.delta.content or "" for choice in chunk.choices)
            usage = chunk.usage or usage
        models = await sdk.models.list()
    assert completion.choices[0].message.content == "Hi there, friend."
    assert "".join(parts) == "Hi there, friend."
    assert usage is not None and usage.completion_tokens == 5
    assert [model.id for model in models.data] == ["chat"]
