"""Idle client connections outlive the clients' own keep-alive (policies/gateway.yaml
``routing.keep_alive_s``), so a pooled connection is never reused as the gateway closes
it: with uvicorn's default of 5 s, equal to httpx's and the openai SDK's, requests sent
just then failed with "Server disconnected without sending a response"."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import httpx
import pytest
import uvicorn
from gateway_fakes import ADMIN, FakeEngine, chat_body

from gateway import create_app, server_options
from gateway.settings import GatewaySettings

pytestmark = pytest.mark.slow

# uvicorn's own default keep-alive: an idle connection longer than this is what changed.
UVICORN_DEFAULT_KEEP_ALIVE_S = 5


async def _idle_then_chat(config: uvicorn.Config, idle_s: float) -> tuple[int, int]:
    """Two chat requests from one client, ``idle_s`` apart; the second's status and how
    many connections they took (1: the pooled one was still open)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        # A client that keeps idle connections longer than the gateway would: it is the
        # gateway's timeout that decides whether the connection is still there.
        limits = httpx.Limits(max_connections=1, keepalive_expiry=idle_s * 4)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with httpx.AsyncClient(limits=limits, headers=ADMIN) as client:
            first = await client.post(url, json=chat_body())
            assert first.status_code == 200
            stream = first.extensions["network_stream"]
            await asyncio.sleep(idle_s)
            second = await client.post(url, json=chat_body())
            reused = second.extensions["network_stream"] is stream
        return second.status_code, 1 if reused else 2
    finally:
        server.should_exit = True
        await task
        sock.close()


async def test_an_idle_connection_outlives_uvicorns_default_keep_alive(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    assert settings.routing.keep_alive_s > UVICORN_DEFAULT_KEEP_ALIVE_S + 2
    app = create_app(settings, transport=engine.transport())
    options = server_options(settings, host="127.0.0.1", port=0, log_level="warning")
    config = uvicorn.Config(app, **options)
    assert config.timeout_keep_alive == settings.routing.keep_alive_s
    status, connections = await _idle_then_chat(config, UVICORN_DEFAULT_KEEP_ALIVE_S + 1.5)
    assert status == 200
    assert connections == 1  # the second request went over the same, still open connection


async def test_a_shorter_keep_alive_closes_the_idle_connection(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """The control: the same client and idle time against a gateway keeping idle
    connections 1 s: the connection is gone, so what the test above shows is the setting."""
    short = dataclasses.replace(
        settings, routing=dataclasses.replace(settings.routing, keep_alive_s=1)
    )
    app = create_app(short, transport=engine.transport())
    config = uvicorn.Config(
        app, **server_options(short, host="127.0.0.1", port=0, log_level="warning")
    )
    try:
        status, connections = await _idle_then_chat(config, 2.5)
    except httpx.RemoteProtocolError:
        return  # the race itself: a request on the connection as it was closed
    assert status == 200 and connections == 2
