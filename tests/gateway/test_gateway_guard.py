"""The live guard: the last user turn and the reply, JSON and streamed, log/flag/block."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import pytest
from gateway_fakes import ADMIN, FakeEngine, chat_body, logged_turns, sse_events
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings

TOXIC_REPLY = ["Hello", " there", " my", " good", " friend", ",", " you", " idiot", "."]


class KeywordJudge:
    """Scores 1.0 when the response contains 'idiot'; counts what it was asked."""

    name = "keyword"
    threshold = 0.5

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def score(self, samples: Sequence[dict[str, Any]]) -> list[float]:
        self.seen.extend(samples)
        return [1.0 if "idiot" in sample["response"] else 0.0 for sample in samples]


def guarded(settings: GatewaySettings, action: str, **changes: Any) -> GatewaySettings:
    guard = dataclasses.replace(settings.guard, enabled=True, action=action, **changes)
    return dataclasses.replace(settings, guard=guard)


def streamed_text(body: bytes) -> tuple[str, list[str | None]]:
    """The content a streaming client assembles, and every finish_reason it saw."""
    chunks = [json.loads(e) for e in sse_events(body) if e != "[DONE]"]
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    text = "".join(choice["delta"].get("content") or "" for choice in choices)
    return text, [choice.get("finish_reason") for choice in choices]


async def post(
    settings: GatewaySettings, engine: FakeEngine, judge: KeywordJudge, *bodies: dict[str, Any]
) -> list[Any]:
    app = create_app(settings, transport=engine.transport(), judge=judge)
    async with AsyncTestClient(app=app) as client:
        return [await client.post("/v1/chat/completions", json=b, headers=ADMIN) for b in bodies]


async def test_block_on_request_refuses_without_calling_the_engine(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """With action block, a toxic last user turn gets the canned refusal (JSON and stream)."""
    plain, streamed, fine = await post(
        guarded(settings, "block", score_reply=False),
        engine,
        KeywordJudge(),
        chat_body("you idiot"),
        chat_body("you idiot", stream=True),
        chat_body("hello"),
    )
    refusal = settings.guard.refusal
    assert plain.json()["choices"][0]["message"]["content"] == refusal
    assert plain.json()["choices"][0]["finish_reason"] == "content_filter"
    assert streamed_text(streamed.content) == (refusal, [None, "content_filter"])
    assert sse_events(streamed.content)[-1] == "[DONE]"
    assert fine.json()["choices"][0]["message"]["content"] == "Hi there, friend."
    assert len(engine.requests) == 1
    turns = logged_turns(settings)
    assert [(t["guard_flag"], t["finish_reason"], t["adapter"]) for t in turns] == [
        (True, "content_filter", None),
        (True, "content_filter", None),
        (False, "stop", "chat-v0000"),
    ]
    assert [t["guard_score"] for t in turns] == [1.0, 1.0, 0.0]


async def test_flag_on_request_forwards_and_flags(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """With action flag, a toxic request is answered by the engine and stored flagged."""
    [response] = await post(
        guarded(settings, "flag"), engine, KeywordJudge(), chat_body("you idiot", stream=True)
    )
    assert streamed_text(response.content)[0] == "Hi there, friend."
    [turn] = logged_turns(settings)
    assert (turn["guard_flag"], turn["guard_score"], turn["finish_reason"]) == (True, 1.0, "stop")


async def test_request_judge_sees_the_earlier_messages_as_context(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """The scored sample is the last user turn, with the messages before it as context."""
    judge = KeywordJudge()
    body = chat_body("second")
    body["messages"] = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "second"}]},
    ]
    await post(guarded(settings, "log", score_reply=False), engine, judge, body)
    [sample] = judge.seen
    assert sample["response"] == "second"
    assert sample["context"] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
    ]


async def test_block_on_json_reply_replaces_it_with_the_refusal(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """A toxic engine reply is never returned: the client gets the refusal, the log says why."""
    engine.reply_words = TOXIC_REPLY
    [response] = await post(guarded(settings, "block"), engine, KeywordJudge(), chat_body())
    choice = response.json()["choices"][0]
    assert choice["message"]["content"] == settings.guard.refusal
    assert choice["finish_reason"] == "content_filter"
    assert response.json()["usage"]["completion_tokens"] == len(TOXIC_REPLY)
    [turn] = logged_turns(settings)
    assert (turn["guard_flag"], turn["guard_score"]) == (True, 1.0)
    assert (turn["reply"], turn["finish_reason"]) == (settings.guard.refusal, "content_filter")


async def test_block_mid_stream_cuts_the_stream_before_the_toxic_window(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """Windows that pass are relayed; the window with the insult is replaced by the refusal,
    the stream ends with finish_reason content_filter, and the engine stream is closed."""
    engine.reply_words = TOXIC_REPLY
    judge = KeywordJudge()
    [response] = await post(
        guarded(settings, "block", stream_window_chars=10),
        engine,
        judge,
        chat_body(stream=True),
    )
    refusal = settings.guard.refusal
    text, finishes = streamed_text(response.content)
    assert text == "Hello there my good friend" + refusal
    assert "idiot" not in response.content.decode()
    assert finishes[-1] == "content_filter" and "length" not in finishes
    assert sse_events(response.content)[-1] == "[DONE]"
    assert [s["response"] for s in judge.seen] == [
        "hello there",  # the request
        "Hello there",
        "Hello there my good friend",
        "Hello there my good friend, you idiot",
    ]
    assert engine.streams[0].closed
    [turn] = logged_turns(settings)
    assert (turn["finish_reason"], turn["guard_flag"], turn["guard_score"]) == (
        "content_filter",
        True,
        1.0,
    )
    assert turn["reply"] == "Hello there my good friend" + refusal


async def test_block_mid_stream_passes_a_clean_reply_whole(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """A clean reply held back in windows still arrives complete, with its usage chunk."""
    [response] = await post(
        guarded(settings, "block", stream_window_chars=4),
        engine,
        KeywordJudge(),
        chat_body(stream=True, stream_options={"include_usage": True}),
    )
    text, finishes = streamed_text(response.content)
    assert (text, finishes[-1]) == ("Hi there, friend.", "stop")
    assert json.loads(sse_events(response.content)[-2])["usage"]["completion_tokens"] == 5
    [turn] = logged_turns(settings)
    assert (turn["finish_reason"], turn["guard_flag"], turn["guard_score"]) == ("stop", False, 0.0)


@pytest.mark.parametrize(("action", "flagged"), [("flag", True), ("log", False)])
async def test_flag_or_log_on_streamed_reply_scores_it_at_the_end(
    settings: GatewaySettings, engine: FakeEngine, action: str, flagged: bool
) -> None:
    """flag/log relay the stream untouched, score the whole reply once, store the score."""
    engine.reply_words = TOXIC_REPLY
    judge = KeywordJudge()
    [response] = await post(guarded(settings, action), engine, judge, chat_body(stream=True))
    assert streamed_text(response.content)[0] == "".join(TOXIC_REPLY)
    assert [s["response"] for s in judge.seen] == ["hello there", "".join(TOXIC_REPLY)]
    [turn] = logged_turns(settings)
    assert (turn["guard_flag"], turn["guard_score"], turn["finish_reason"]) == (
        flagged,
        1.0,
        "stop",
    )


async def test_disabled_guard_never_calls_the_judge(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """guard.enabled false: no scoring at all, no score stored."""
    judge = KeywordJudge()
    await post(settings, engine, judge, chat_body("you idiot"), chat_body("idiot", stream=True))
    assert judge.seen == []
    assert [t["guard_score"] for t in logged_turns(settings)] == [None, None]


async def test_default_lexical_judge_blocks_profanity(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """The policy's lexical judge (tuneshield, alt-profanity-check) scores insults high."""
    app = create_app(guarded(settings, "block"), transport=engine.transport())
    async with AsyncTestClient(app=app) as client:
        rude = await client.post(
            "/v1/chat/completions", json=chat_body("fuck you, you stupid idiot"), headers=ADMIN
        )
        engine.reply_words = ["Shut", " up", ",", " you", " fucking", " moron", "."]
        rude_reply = await client.post("/v1/chat/completions", json=chat_body(), headers=ADMIN)
        engine.reply_words = ["What", " a", " lovely", " day", "."]
        polite = await client.post("/v1/chat/completions", json=chat_body(), headers=ADMIN)
    assert rude.json()["choices"][0]["finish_reason"] == "content_filter"
    assert rude_reply.json()["choices"][0]["finish_reason"] == "content_filter"
    assert polite.json()["choices"][0]["finish_reason"] == "stop"
