"""The gateway's own HTTP/1.1 transport (gateway/transport.py) against a real loopback engine."""

from __future__ import annotations

import dataclasses
import json
import socket
from typing import Any, cast

import httpx
import pytest
from gateway_fakes import (
    ADMIN,
    FakeEngine,
    chat_body,
    logged_turns,
    serve_asgi,
    serving,
    sse_events,
)

from gateway.settings import GatewaySettings
from gateway.transport import available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not available(), reason="httptools not installed"),
]


class EngineApp:
    """The fake engine as an ASGI app; records the client port of every request."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.ports: list[int] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != "/v1/models":  # the pool's listings are not chat traffic
            self.ports.append(scope["client"][1])
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = httpx.Request(scope["method"], f"http://engine{scope['path']}", content=body)
        response = await self.engine.handle(request)
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": [(k.encode(), v.encode()) for k, v in response.headers.items()],
            }
        )
        async for part in cast(httpx.AsyncByteStream, response.stream):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def real_upstream(settings: GatewaySettings, url: str) -> GatewaySettings:
    # No periodic listing during a test: it would take a connection of its own beside a
    # chat request, and these tests count connections.
    upstream = dataclasses.replace(settings.upstream, health_probe_s=3600.0)
    return dataclasses.replace(settings, upstream_urls=(url,), upstream=upstream)


async def test_json_and_stream_over_one_reused_connection(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """Replies arrive whole through a real socket; sequential requests share one connection."""
    app = EngineApp(engine)
    async with serve_asgi(app, lifespan="off") as engine_url:
        upstream = real_upstream(settings, engine_url)
        async with serving(upstream, engine, network=True) as url, httpx.AsyncClient() as http:
            endpoint = f"{url}/v1/chat/completions"
            plain = await http.post(endpoint, json=chat_body(), headers=ADMIN)
            streamed = await http.post(
                endpoint,
                json=chat_body(stream=True, stream_options={"include_usage": True}),
                headers=ADMIN,
            )
            again = await http.post(endpoint, json=chat_body(), headers=ADMIN)
    assert plain.json()["choices"][0]["message"]["content"] == "Hi there, friend."
    assert again.status_code == 200
    events = sse_events(streamed.content)
    text = "".join(
        (json.loads(e)["choices"] or [{"delta": {}}])[0]["delta"].get("content") or ""
        for e in events[:-1]
    )
    assert (text, events[-1]) == ("Hi there, friend.", "[DONE]")
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 5
    assert len(set(app.ports)) == 1
    assert [t["completion_tokens"] for t in logged_turns(settings)] == [5, 5, 5]


async def test_engine_down_is_502_and_slow_engine_is_504(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """No listener: 502 engine_unreachable; no byte within the read timeout: 504."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    down = real_upstream(settings, f"http://127.0.0.1:{closed_port}")
    async with serving(down, engine, network=True) as url, httpx.AsyncClient() as http:
        unreachable = await http.post(f"{url}/v1/chat/completions", json=chat_body(), headers=ADMIN)
    assert unreachable.status_code == 502
    assert unreachable.json()["error"]["code"] == "engine_unreachable"

    engine.delay_s = 0.5
    app = EngineApp(engine)
    async with serve_asgi(app, lifespan="off") as engine_url:
        slow = real_upstream(settings, engine_url)
        slow = dataclasses.replace(
            slow, upstream=dataclasses.replace(slow.upstream, read_timeout_s=0.2)
        )
        async with serving(slow, engine, network=True) as url, httpx.AsyncClient() as http:
            streamed = await http.post(
                f"{url}/v1/chat/completions", json=chat_body(stream=True), headers=ADMIN
            )
    assert streamed.status_code == 200
    assert json.loads(sse_events(streamed.content)[0])["error"]["code"] == "engine_timeout"
