"""Turns the client never received: an abandoned JSON request stops the engine and is
logged as not delivered, as is a stream cut short; ``n > 1`` is refused (the gateway
guards and logs one reply per turn); the OpenAI ``user`` value is stored as ``end_user``.

The disconnect tests run real loopback servers (uvicorn) for the gateway and the engine:
Litestar's test client cannot hang up halfway, and the engine must see its connection
close, as vLLM does when it aborts a request.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import httpx
import msgspec
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
from litestar import Litestar
from litestar.testing import AsyncTestClient

from gateway.dialog_journal import DialogJournal
from gateway.protocol import MAX_USER_CHARS
from gateway.settings import GatewaySettings
from store import TurnRecord

pytestmark = pytest.mark.slow

WAIT_S = 10.0
# Long enough that a test's client gives up well before the engine would answer.
ENGINE_DELAY_S = 30.0


class SlowEngineApp:
    """The fake engine as an ASGI app whose JSON replies take ``delay_s``; like vLLM, it
    watches each such request's connection and aborts the generation when it closes."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.delay_s = 0.0
        self.started = asyncio.Event()
        self.aborted = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = httpx.Request(scope["method"], f"http://engine{scope['path']}", content=body)
        if scope["path"] != "/v1/models" and self.delay_s:
            self.started.set()
            outcome = await _first(asyncio.sleep(self.delay_s), _disconnect(receive))
            if outcome == "disconnect":
                self.aborted += 1
                return
        response = await self.engine.handle(request)
        await response.aread()
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": [(k.encode(), v.encode()) for k, v in response.headers.items()],
            }
        )
        await send({"type": "http.response.body", "body": response.content})


async def _disconnect(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _first(
    sleep: Awaitable[None], disconnect: Awaitable[None]
) -> Literal["sleep", "disconnect"]:
    tasks = {asyncio.ensure_future(sleep): "sleep", asyncio.ensure_future(disconnect): "disconnect"}
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return "disconnect" if any(tasks[task] == "disconnect" for task in done) else "sleep"


def real_upstream(settings: GatewaySettings, url: str) -> GatewaySettings:
    # No periodic listing during a test: only the chat request talks to the engine.
    upstream = dataclasses.replace(settings.upstream, health_probe_s=3600.0)
    return dataclasses.replace(settings, upstream_urls=(url,), upstream=upstream)


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(int(WAIT_S / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def test_abandoned_json_request_stops_the_engine_and_is_logged_undelivered(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """A client that hangs up before its JSON reply: the gateway closes the engine's
    connection (the engine aborts), and the turn is logged not delivered; a request
    answered in full is logged delivered."""
    app = SlowEngineApp(engine)
    app.delay_s = ENGINE_DELAY_S
    async with serve_asgi(app, lifespan="off") as engine_url:
        upstream = real_upstream(settings, engine_url)
        async with serving(upstream, engine, network=True) as url, httpx.AsyncClient() as http:
            endpoint = f"{url}/v1/chat/completions"
            asking = asyncio.create_task(
                http.post(endpoint, json=chat_body("left early", user="u-left"), headers=ADMIN)
            )
            await asyncio.wait_for(app.started.wait(), WAIT_S)
            asking.cancel()  # the client hangs up: httpx closes its connection
            with pytest.raises(asyncio.CancelledError):
                await asking
            await _until(lambda: app.aborted == 1)
            app.delay_s = 0.0
            answered = await http.post(endpoint, json=chat_body("stayed"), headers=ADMIN)
            metrics = (await http.get(f"{url}/metrics")).text
    assert answered.status_code == 200
    left, stayed = logged_turns(settings)
    assert (left["delivered"], left["finish_reason"], left["reply"]) == (
        False,
        "client_disconnected",
        "",
    )
    assert left["end_user"] == "u-left"
    assert (stayed["delivered"], stayed["finish_reason"]) == (True, "stop")
    assert stayed["reply"] == "Hi there, friend."
    # The abandoned request is counted as nginx counts one (499), not as answered.
    assert 'route="/v1/chat/completions",status="499"' in metrics


async def test_stream_cut_short_is_logged_undelivered(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """A stream whose client goes away before its end: engine stream closed early, turn
    not delivered; a stream read to ``[DONE]`` is delivered."""
    engine.delay_s = 0.3
    async with (
        serving(settings, engine) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        async with http.stream(
            "POST", "/v1/chat/completions", json=chat_body(stream=True), headers=ADMIN
        ) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and "Hi" in line:
                    break
        await _until(lambda: engine.streams[0].closed)
        engine.delay_s = 0.0
        whole = await http.post("/v1/chat/completions", json=chat_body(stream=True), headers=ADMIN)
    assert sse_events(whole.content)[-1] == "[DONE]"
    cut, full = logged_turns(settings)
    assert (cut["delivered"], cut["finish_reason"]) == (False, "client_disconnected")
    assert (full["delivered"], full["finish_reason"]) == (True, "stop")


@pytest.mark.parametrize("stream", [False, True])
async def test_several_choices_are_refused_naming_n(
    client: AsyncTestClient[Litestar], engine: FakeEngine, stream: bool
) -> None:
    """``n > 1`` is a 400 naming ``n`` that says why, before the engine is asked."""
    response = await client.post(
        "/v1/chat/completions", json=chat_body(n=2, stream=stream), headers=ADMIN
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["type"]) == ("n", "invalid_request_error")
    assert "one reply per turn" in error["message"]
    assert engine.requests == []


async def test_one_choice_works_and_the_schema_says_n_is_at_most_one(
    client: AsyncTestClient[Litestar], engine: FakeEngine
) -> None:
    """``n: 1`` is answered and forwarded as before; the OpenAPI schema documents the bound."""
    response = await client.post("/v1/chat/completions", json=chat_body(n=1), headers=ADMIN)
    assert response.status_code == 200
    assert engine.requests[0]["n"] == 1
    schema = (await client.get("/schema/openapi.json")).json()
    n = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]["n"]
    [bounded] = [arm for arm in n["anyOf"] if arm.get("type") == "integer"]
    assert (bounded["minimum"], bounded["maximum"]) == (1, 1)


async def test_user_is_stored_as_end_user_and_bounded(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """The request's ``user`` is logged as ``end_user`` (absent: null); a longer one than
    the gateway stores is a 400 naming ``user``."""
    async with serving(settings, engine) as url, httpx.AsyncClient(base_url=url) as http:
        named = await http.post(
            "/v1/chat/completions", json=chat_body(user="alice-42"), headers=ADMIN
        )
        anonymous = await http.post("/v1/chat/completions", json=chat_body(), headers=ADMIN)
        too_long = await http.post(
            "/v1/chat/completions",
            json=chat_body(user="x" * (MAX_USER_CHARS + 1)),
            headers=ADMIN,
        )
    assert (named.status_code, anonymous.status_code) == (200, 200)
    assert too_long.status_code == 400
    assert too_long.json()["error"]["param"] == "user"
    assert [(t["end_user"], t["delivered"]) for t in logged_turns(settings)] == [
        ("alice-42", True),
        (None, True),
    ]


def _turn(turn_id: str, **extra: Any) -> TurnRecord:
    return TurnRecord(
        turn_id=turn_id,
        conversation_id="conv-" + turn_id,
        key_id="k1",
        created_at=datetime(2026, 1, 2, 3, 4, 5),
        alias="chat",
        adapter="chat-v0000",
        request_messages='[{"role": "user", "content": "hi"}]',
        reply="hello",
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=1,
        latency_ms=1.0,
        ttft_ms=None,
        stream=False,
        guard_score=None,
        guard_flag=False,
        opt_out=False,
        **extra,
    )


def test_journal_keeps_delivery_and_end_user_and_reads_older_lines(tmp_path: Path) -> None:
    """A journaled turn comes back with ``delivered`` and ``end_user``; a line journaled
    before they existed reads as delivered, with no end user."""
    abandoned = _turn("new", delivered=False, end_user="u-1", engine="http://e1")
    older = msgspec.json.decode(msgspec.json.encode(_turn("old")))
    del older["delivered"], older["end_user"]
    killed = tmp_path / "killed-gateway"
    killed.mkdir()
    lines = [msgspec.json.encode(abandoned), msgspec.json.encode(older)]
    (killed / "00000001.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    journal = DialogJournal(tmp_path, segment_bytes=1024)
    try:
        recovered = {turn.turn_id: turn for turn in journal.recover()}
    finally:
        journal.close()
    assert recovered["new"] == abandoned
    assert (recovered["old"].delivered, recovered["old"].end_user) == (True, None)
    assert recovered["old"] == _turn("old")
