"""Durable acknowledgement: a reply is sent only after its turn is committed (group commit).

The store's insert is replaced by one that records each call and can be held on an
event, so a test sees exactly what the client got while the commit was still running.
Litestar's test client blocks the test's event loop until a reply is complete, so the
tests that watch a reply wait run a real server on loopback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import Iterator, Sequence
from typing import Any

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
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings
from store import DialogStore, TurnRecord

WAIT_S = 10.0
QUIET_S = 0.2


class Inserts:
    """Calls of ``DialogStore.insert``: their sizes; ``hold`` makes them wait for ``release``."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.started = threading.Event()
        self.released = threading.Event()
        self.released.set()
        self.failing = False

    def hold(self) -> None:
        self.released.clear()

    def release(self) -> None:
        self.released.set()

    def wrap(self, original: Any) -> Any:
        def insert(store: DialogStore, turns: Sequence[TurnRecord]) -> int:
            turns = list(turns)
            self.sizes.append(len(turns))
            self.started.set()
            if not self.released.wait(WAIT_S):
                raise TimeoutError("the test never released the insert")
            if self.failing:
                raise OSError("disk full")
            return int(original(store, turns))

        return insert

    async def wait_started(self) -> None:
        for _ in range(int(WAIT_S / 0.01)):
            if self.started.is_set():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("no insert started")


@pytest.fixture
def inserts(monkeypatch: pytest.MonkeyPatch) -> Iterator[Inserts]:
    calls = Inserts()
    monkeypatch.setattr(DialogStore, "insert", calls.wrap(DialogStore.insert))
    try:
        yield calls
    finally:
        calls.release()  # never leave a worker thread blocked


async def test_json_reply_waits_for_its_commit(
    settings: GatewaySettings, engine: FakeEngine, inserts: Inserts
) -> None:
    """The JSON body is not sent until the turn's row is committed."""
    inserts.hold()
    async with serving(settings, engine) as url, httpx.AsyncClient(base_url=url) as http:
        request = asyncio.create_task(
            http.post("/v1/chat/completions", json=chat_body(), headers=ADMIN)
        )
        await inserts.wait_started()
        await asyncio.sleep(QUIET_S)
        assert not request.done()
        inserts.release()
        response = await asyncio.wait_for(request, WAIT_S)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "Hi there, friend."
    assert inserts.sizes == [1]
    assert len(logged_turns(settings)) == 1


async def test_stream_sends_chunks_at_once_and_done_after_commit(
    settings: GatewaySettings, engine: FakeEngine, inserts: Inserts
) -> None:
    """A stream's content arrives before the commit; its final [DONE] only after it."""
    inserts.hold()
    received: list[str] = []

    async def read(url: str) -> None:
        async with (
            httpx.AsyncClient(base_url=url) as http,
            http.stream(
                "POST", "/v1/chat/completions", json=chat_body(stream=True), headers=ADMIN
            ) as response,
        ):
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    received.append(line.removeprefix("data: "))

    async with serving(settings, engine) as url:
        reader = asyncio.create_task(read(url))
        await inserts.wait_started()
        await asyncio.sleep(QUIET_S)
        before_commit = list(received)
        inserts.release()
        await asyncio.wait_for(reader, WAIT_S)
    content = "".join(
        choice["delta"].get("content") or ""
        for event in before_commit
        for choice in json.loads(event)["choices"]
    )
    assert content == "Hi there, friend."
    assert "[DONE]" not in before_commit
    assert received == [*before_commit, "[DONE]"]
    assert logged_turns(settings)[0]["reply"] == "Hi there, friend."


async def test_failed_commit_answers_503_and_the_stream_error_event(
    settings: GatewaySettings, engine: FakeEngine, inserts: Inserts
) -> None:
    """When every attempt fails, JSON gets a 503 dialog_log_unavailable and a stream ends
    with that error event instead of a bare [DONE]; the loss is counted."""
    inserts.failing = True
    quick = dataclasses.replace(
        settings,
        dialog_log=dataclasses.replace(settings.dialog_log, write_attempts=2, retry_delay_s=0.01),
    )
    async with AsyncTestClient(app=create_app(quick, transport=engine.transport())) as client:
        plain = await client.post("/v1/chat/completions", json=chat_body(), headers=ADMIN)
        streamed = await client.post(
            "/v1/chat/completions", json=chat_body(stream=True), headers=ADMIN
        )
        metrics = (await client.get("/metrics")).text
    assert plain.status_code == 503
    error = plain.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "dialog_log_unavailable")
    assert streamed.status_code == 200
    events = sse_events(streamed.content)
    assert json.loads(events[-2])["error"]["code"] == "dialog_log_unavailable"
    assert events[-1] == "[DONE]"
    assert "Hi" in "".join(events[:-2])
    assert inserts.sizes == [1, 1, 1, 1]
    assert 'gateway_dialog_turns_total{outcome="lost"} 2.0' in metrics


async def test_turns_finished_during_a_commit_share_the_next_transaction(
    settings: GatewaySettings, engine: FakeEngine, inserts: Inserts
) -> None:
    """Turns that finish while a commit runs are committed together: one insert, not one
    per turn; every reply waits for its own batch."""
    inserts.hold()
    app = create_app(settings, transport=engine.transport())
    async with serve_asgi(app) as url, httpx.AsyncClient(base_url=url) as http:
        log = app.state.resources.log

        def ask(index: int) -> asyncio.Task[httpx.Response]:
            body = chat_body(f"message {index}", stream=index % 2 == 0)
            return asyncio.create_task(http.post("/v1/chat/completions", json=body, headers=ADMIN))

        first = ask(0)
        await inserts.wait_started()
        rest = [ask(index) for index in range(1, 9)]
        for _ in range(int(WAIT_S / 0.01)):
            if log.depth == 9:
                break
            await asyncio.sleep(0.01)
        assert log.depth == 9
        assert not any(task.done() for task in [first, *rest])
        inserts.release()
        responses = await asyncio.wait_for(asyncio.gather(first, *rest), WAIT_S)
    assert [response.status_code for response in responses] == [200] * 9
    assert inserts.sizes == [1, 8]
    assert len(logged_turns(settings)) == 9


async def test_without_durable_ack_the_reply_does_not_wait(
    settings: GatewaySettings, engine: FakeEngine, inserts: Inserts
) -> None:
    """durable_ack off: the reply is sent while its turn still waits in memory."""
    inserts.hold()
    fast = dataclasses.replace(
        settings,
        dialog_log=dataclasses.replace(
            settings.dialog_log, durable_ack=False, flush_interval_s=0.01
        ),
    )
    async with AsyncTestClient(app=create_app(fast, transport=engine.transport())) as client:
        response = await asyncio.wait_for(
            client.post("/v1/chat/completions", json=chat_body(), headers=ADMIN), WAIT_S
        )
        assert response.status_code == 200
        await inserts.wait_started()
        inserts.release()
    assert len(logged_turns(settings)) == 1
