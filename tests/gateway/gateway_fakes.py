"""Helpers of the gateway tests: a fake OpenAI engine, request bodies, log readers."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

import duckdb
import httpx
import uvicorn

from gateway.app import create_app
from gateway.settings import GatewaySettings

ADMIN_KEY = "admin-test-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def chat_body(content: str = "hello there", **extra: Any) -> dict[str, Any]:
    """A minimal chat request for the public alias."""
    return {"model": "chat", "messages": [{"role": "user", "content": content}], **extra}


def sse_events(body: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [
        line.removeprefix("data: ")
        for line in body.decode().split("\n")
        if line.startswith("data: ")
    ]


class FakeStream(httpx.AsyncByteStream):
    """An SSE body that yields events one by one and records whether it was closed."""

    def __init__(self, events: list[bytes], delay_s: float, fail_after: int | None) -> None:
        self.events = events
        self.delay_s = delay_s
        self.fail_after = fail_after
        self.sent = 0
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for event in self.events:
            if self.fail_after is not None and self.sent >= self.fail_after:
                raise httpx.ReadTimeout("engine stalled")
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            self.sent += 1
            yield event

    async def aclose(self) -> None:
        # A real close awaits the network: a checkpoint where a pending cancel would land.
        await asyncio.sleep(0)
        self.closed = True


class FakeEngine:
    """An OpenAI-compatible engine behind ``httpx.MockTransport``; records every request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.streams: list[FakeStream] = []
        self.reply_words = ["Hi", " there", ",", " friend", "."]
        self.delay_s = 0.0
        self.fail_after: int | None = None
        self.failure: Callable[[httpx.Request], httpx.Response] | None = None
        self.health_status = 200
        # What GET /v1/models lists (the gateway's engine pool routes on it).
        self.models = ["base", "chat-v0000"]
        # True: every request fails to connect, as to a killed engine.
        self.down = False

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/health":
            return httpx.Response(self.health_status)
        if request.url.path == "/v1/models":
            if self.health_status != 200:
                return httpx.Response(self.health_status)
            listing = [{"id": model, "object": "model"} for model in self.models]
            return httpx.Response(200, json={"object": "list", "data": listing})
        if self.failure is not None:
            return self.failure(request)
        body = json.loads(request.content)
        self.requests.append(body)
        model = body["model"]
        usage = {"prompt_tokens": 7, "completion_tokens": len(self.reply_words), "total_tokens": 12}
        if not body.get("stream"):
            return httpx.Response(
                200,
                json={
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(self.reply_words)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                },
            )
        chunks: list[dict[str, Any]] = [
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        ]
        chunks += [{"choices": [{"index": 0, "delta": {"content": w}}]} for w in self.reply_words]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({"choices": [], "usage": usage})
        events = [
            b"data: "
            + json.dumps(
                {"id": "c1", "object": "chat.completion.chunk", "model": model, **c}
            ).encode()
            + b"\n\n"
            for c in chunks
        ]
        events.append(b"data: [DONE]\n\n")
        stream = FakeStream(events, self.delay_s, self.fail_after)
        self.streams.append(stream)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=stream)


class EngineNetwork:
    """Several fake engines behind one transport, told apart by host (``http://HOST``)."""

    def __init__(self, *hosts: str) -> None:
        self.engines = {host: FakeEngine() for host in hosts}

    @property
    def urls(self) -> list[str]:
        return [f"http://{host}" for host in self.engines]

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(lambda request: self.engines[request.url.host].handle(request))


def logged_turns(settings: GatewaySettings) -> list[dict[str, Any]]:
    """Every logged turn, oldest first (open only after the app shut down)."""
    with duckdb.connect(str(settings.store_url), read_only=True) as connection:
        cursor = connection.execute("SELECT * FROM turns ORDER BY created_at, turn_id")
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


@asynccontextmanager
async def serve_asgi(app: Any, *, lifespan: Literal["on", "off"] = "on") -> AsyncIterator[str]:
    """Run an ASGI app with uvicorn on a free loopback port; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@asynccontextmanager
async def serving(
    settings: GatewaySettings, engine: FakeEngine, *, network: bool = False
) -> AsyncIterator[str]:
    """Run the gateway with uvicorn on a free loopback port; yield its base URL.

    ``network``: reach the engine at ``settings.upstream_url`` with the gateway's own
    transport instead of the in-process fake.
    """
    app = create_app(settings, transport=None if network else engine.transport())
    async with serve_asgi(app) as url:
        yield url
