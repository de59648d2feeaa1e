"""Durable acknowledgement: a reply is sent only after its turn is on disk, in the dialog
journal (the default) or committed to the store (``journal: false``, group commit).

The store's insert (and the journal's append) is replaced by one that records each call
and can be held on an event, so a test sees exactly what the client got while the write
was still running.
Litestar's test client blocks the test's event loop until a reply is complete, so the
tests that watch a reply wait run a real server on loopback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

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
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.dialog_journal import JOURNAL_DIRNAME, DialogJournal
from gateway.settings import GatewaySettings
from store import DialogStore, TurnRecord, open_database

WAIT_S = 10.0
QUIET_S = 0.2


class Inserts:
    """Calls of a write (``DialogStore.insert``, ``DialogJournal.append``): their sizes;
    ``hold`` makes them wait for ``release``."""

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
        def insert(owner: Any, turns: Sequence[TurnRecord]) -> int:
            turns = list(turns)
            self.sizes.append(len(turns))
            self.started.set()
            if not self.released.wait(WAIT_S):
                raise TimeoutError("the test never released the insert")
            if self.failing:
                raise OSError("disk full")
            return int(original(owner, turns))

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


@pytest.fixture
def appends(monkeypatch: pytest.MonkeyPatch) -> Iterator[Inserts]:
    calls = Inserts()
    monkeypatch.setattr(DialogJournal, "append", calls.wrap(DialogJournal.append))
    try:
        yield calls
    finally:
        calls.release()


@pytest.fixture
def committing(settings: GatewaySettings) -> GatewaySettings:
    """Durable acknowledgement by store commit (no journal)."""
    return dataclasses.replace(
        settings, dialog_log=dataclasses.replace(settings.dialog_log, journal=False)
    )


def journal_files(settings: GatewaySettings) -> list[Path]:
    return sorted((settings.data_dir / JOURNAL_DIRNAME).glob("*/*.jsonl"))


async def test_json_reply_waits_for_its_commit(
    committing: GatewaySettings, engine: FakeEngine, inserts: Inserts
) -> None:
    """The JSON body is not sent until the turn's row is committed."""
    inserts.hold()
    async with serving(committing, engine) as url, httpx.AsyncClient(base_url=url) as http:
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
    assert len(logged_turns(committing)) == 1


async def test_stream_sends_chunks_at_once_and_done_after_commit(
    committing: GatewaySettings, engine: FakeEngine, inserts: Inserts
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

    async with serving(committing, engine) as url:
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
    assert logged_turns(committing)[0]["reply"] == "Hi there, friend."


async def test_failed_commit_answers_503_and_the_stream_error_event(
    committing: GatewaySettings, engine: FakeEngine, inserts: Inserts
) -> None:
    """When every attempt fails, JSON gets a 503 dialog_log_unavailable and a stream ends
    with that error event instead of a bare [DONE]; the loss is counted."""
    inserts.failing = True
    quick = dataclasses.replace(
        committing,
        dialog_log=dataclasses.replace(committing.dialog_log, write_attempts=2, retry_delay_s=0.01),
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
    committing: GatewaySettings, engine: FakeEngine, inserts: Inserts
) -> None:
    """Turns that finish while a commit runs are committed together: one insert, not one
    per turn; every reply waits for its own batch."""
    inserts.hold()
    app = create_app(committing, transport=engine.transport())
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
    assert len(logged_turns(committing)) == 9


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


# -- the dialog journal (the default) ------------------------------------------------------


async def test_journaled_reply_waits_for_the_journal_not_the_store(
    settings: GatewaySettings, engine: FakeEngine, appends: Inserts, inserts: Inserts
) -> None:
    """The JSON body waits for the journal's append, not for the store: with the store's
    insert held, the reply still arrives, and its turn is in a journal file."""
    appends.hold()
    inserts.hold()
    async with serving(settings, engine) as url, httpx.AsyncClient(base_url=url) as http:
        request = asyncio.create_task(
            http.post("/v1/chat/completions", json=chat_body(), headers=ADMIN)
        )
        await appends.wait_started()
        await asyncio.sleep(QUIET_S)
        assert not request.done()
        appends.release()
        response = await asyncio.wait_for(request, WAIT_S)
        assert response.status_code == 200
        assert inserts.sizes == []  # the store has not even been asked yet
        (segment,) = journal_files(settings)
        (line,) = segment.read_bytes().splitlines()
        assert json.loads(line)["reply"] == "Hi there, friend."
        inserts.release()
    assert appends.sizes == [1]
    assert [turn["reply"] for turn in logged_turns(settings)] == ["Hi there, friend."]
    assert journal_files(settings) == []  # a clean stop leaves no journal behind


async def test_failed_journal_answers_503_and_the_turn_still_reaches_the_store(
    settings: GatewaySettings, engine: FakeEngine, appends: Inserts
) -> None:
    """A journal that cannot be written (disk full) refuses the acknowledgement with 503,
    and loses nothing: the turn is queued for the store all the same."""
    appends.failing = True
    async with AsyncTestClient(app=create_app(settings, transport=engine.transport())) as client:
        response = await client.post("/v1/chat/completions", json=chat_body(), headers=ADMIN)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "dialog_log_unavailable"
    assert len(logged_turns(settings)) == 1


def recorded_turn(turn_id: str) -> TurnRecord:
    return TurnRecord(
        turn_id=turn_id,
        conversation_id=f"conversation-{turn_id}",
        key_id="admin",
        created_at=datetime(2026, 12, 1, 12, 0, 0),
        alias="chat",
        adapter="chat-v0000",
        request_messages=json.dumps([{"role": "user", "content": "hello"}]),
        reply=f"reply {turn_id}",
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=2,
        latency_ms=12.5,
        ttft_ms=None,
        stream=False,
        guard_score=None,
        guard_flag=False,
        opt_out=False,
    )


async def test_a_starting_gateway_inserts_what_a_killed_one_left_in_its_journal(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """What a crash leaves: a segment whose first turn was committed before the kill,
    whose second was not, and whose last line was cut mid-write (never acknowledged).
    The next start stores the missing turn once, skips the torn line, deletes the file."""
    async with AsyncTestClient(app=create_app(settings, transport=engine.transport())):
        pass  # the store exists, migrated
    committed, missing = recorded_turn("t-committed"), recorded_turn("t-missing")
    database = open_database(settings.store_url)
    try:
        DialogStore(database).insert([committed])
    finally:
        database.close()
    folder = settings.data_dir / JOURNAL_DIRNAME / "killed-gateway"
    folder.mkdir(parents=True)
    lines = [msgspec.json.encode(turn) for turn in (committed, missing)]
    (folder / "00000007.jsonl").write_bytes(b"\n".join(lines) + b"\n" + lines[1][:40])

    async with AsyncTestClient(app=create_app(settings, transport=engine.transport())):
        assert journal_files(settings) == []
        assert not folder.exists()
    rows = logged_turns(settings)
    assert sorted(row["turn_id"] for row in rows) == ["t-committed", "t-missing"]
    restored = next(row for row in rows if row["turn_id"] == "t-missing")
    assert (restored["reply"], restored["created_at"]) == ("reply t-missing", missing.created_at)


def test_gateways_sharing_a_data_dir_keep_their_own_journals(tmp_path: Path) -> None:
    """Each process writes its own folder; a live one's folder is never recovered by
    another, a closed one with nothing outstanding is gone, and one left with turns the
    store lacks is recovered once by the next start."""
    first, second = (DialogJournal(tmp_path, segment_bytes=1024) for _ in range(2))
    first.append([recorded_turn("a")])
    third = DialogJournal(tmp_path, segment_bytes=1024)  # both others are alive
    assert third.recover() == []
    second.close()  # nothing outstanding: its folder goes
    first.close()  # "a" is not stored: its folder stays for the next start
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [first.directory.name, third.directory.name]
    )
    fourth = DialogJournal(tmp_path, segment_bytes=1024)
    assert [turn.turn_id for turn in fourth.recover()] == ["a"]
    fourth.discard_recovered()
    assert not first.directory.exists()
    assert DialogJournal(tmp_path, segment_bytes=1024).recover() == []
    for journal in (third, fourth):
        journal.close()


def test_segments_are_deleted_once_closed_and_stored(tmp_path: Path) -> None:
    """Past segment_bytes a new segment starts; a closed one goes when the store has all
    its turns, not before; a close with turns outstanding leaves them for the next start."""
    journal = DialogJournal(tmp_path, segment_bytes=1)  # every append starts a segment
    first = journal.append([recorded_turn("a"), recorded_turn("b")])
    second = journal.append([recorded_turn("c")])
    assert second == first + 1
    journal.committed([first])  # one of two turns stored: the segment stays
    assert len(list(tmp_path.glob("*/*.jsonl"))) == 2
    journal.committed([first])
    assert [path.stem for path in tmp_path.glob("*/*.jsonl")] == [f"{second:08d}"]
    journal.close()  # "c" is not stored: its segment stays for the next start
    assert [path.stem for path in tmp_path.glob("*/*.jsonl")] == [f"{second:08d}"]
    again = DialogJournal(tmp_path, segment_bytes=1)
    assert [turn.turn_id for turn in again.recover()] == ["c"]
    again.discard_recovered()
    again.close()
    assert list(tmp_path.glob("*/*.jsonl")) == []
    assert list(tmp_path.iterdir()) == []
