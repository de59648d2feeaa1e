"""What an OpenAI client notices: the model named in replies, ``/v1/models/{id}``, 400 for
bad values, rate-limit headers, and API docs that load without the internet."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import AsyncIterator
from html import escape

import openai
import pytest
from gateway_fakes import ADMIN, ADMIN_KEY, FakeEngine, chat_body, logged_turns, serving, sse_events
from litestar import Litestar
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.auth import openai_duration
from gateway.protocol import with_model
from gateway.settings import GatewaySettings

VERSION = "x-tuneshield-version"
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
SECONDS_PER_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def seconds(duration: str) -> float:
    """An OpenAI reset duration (``6m0s``, ``1.5s``, ``20ms``) in seconds."""
    parts = DURATION_PART.findall(duration)
    assert "".join(number + unit for number, unit in parts) == duration, duration
    return sum(float(number) * SECONDS_PER_UNIT[unit] for number, unit in parts)


async def new_user_key(client: AsyncTestClient[Litestar]) -> dict[str, str]:
    """The Authorization header of a fresh user-role key."""
    created = await client.post("/admin/keys", json={"name": "alice"}, headers=ADMIN)
    assert created.status_code == 201, created.text
    return {"Authorization": f"Bearer {created.json()['key']}"}


@pytest.fixture
def tight_settings(settings: GatewaySettings) -> GatewaySettings:
    """A policy of 3 requests at once and almost no refill during a test."""
    limits = dataclasses.replace(settings.limits, rate_limit_burst=3, rate_limit_per_minute=1.0)
    return dataclasses.replace(settings, limits=limits)


@pytest.fixture
async def live_url(settings: GatewaySettings, engine: FakeEngine) -> AsyncIterator[str]:
    async with serving(settings, engine) as url:
        yield url


# -- the model replies name ------------------------------------------------------------


async def test_json_reply_names_the_alias_and_the_header_the_version(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """The body says the model asked for; x-tuneshield-version and the log say the adapter."""
    async with AsyncTestClient(app=create_app(settings, transport=engine.transport())) as client:
        before = await client.post("/v1/chat/completions", json=chat_body(), headers=ADMIN)
        await client.put("/admin/aliases/chat", json={"adapter": "chat-v0007"}, headers=ADMIN)
        after = await client.post("/v1/chat/completions", json=chat_body(), headers=ADMIN)
    assert [r.json()["model"] for r in (before, after)] == ["chat", "chat"]
    assert [r.headers[VERSION] for r in (before, after)] == ["chat-v0000", "chat-v0007"]
    assert [turn["adapter"] for turn in logged_turns(settings)] == ["chat-v0000", "chat-v0007"]
    # Everything else is the engine's reply as it was.
    assert before.json()["choices"][0]["message"]["content"] == "Hi there, friend."


async def test_every_streamed_chunk_names_the_alias(
    client: AsyncTestClient[Litestar], engine: FakeEngine
) -> None:
    """Role, content, finish and usage chunks all carry "model": "chat", not the adapter."""
    response = await client.post(
        "/v1/chat/completions",
        json=chat_body(stream=True, stream_options={"include_usage": True}),
        headers=ADMIN,
    )
    assert response.status_code == 200
    assert response.headers[VERSION] == "chat-v0000"
    events = sse_events(response.content)
    chunks = [json.loads(event) for event in events[:-1]]
    assert events[-1] == "[DONE]"
    assert len(chunks) == len(engine.reply_words) + 3
    assert {chunk["model"] for chunk in chunks} == {"chat"}
    assert chunks[-1]["usage"]["completion_tokens"] == len(engine.reply_words)
    assert b"chat-v0000" not in response.content


@pytest.mark.parametrize(
    ("engine_json", "expected"),
    [
        (
            b'{"id":"c","model":"chat-v0000","choices":[]}',
            b'{"id":"c","model":"chat","choices":[]}',
        ),
        (b'{"model" :  "a\\"b" , "n":1}', b'{"model" :  "chat" , "n":1}'),
        # A reply quoting a "model" key is text, not a key: only the real key changes.
        (
            b'{"x":"say \\"model\\":\\"v1\\"","model":"v1"}',
            b'{"x":"say \\"model\\":\\"v1\\"","model":"chat"}',
        ),
        (b'{"choices":[],"usage":null}', b'{"choices":[],"usage":null}'),
    ],
)
def test_with_model_replaces_only_the_model_key(engine_json: bytes, expected: bytes) -> None:
    """The rewrite touches the "model" key's value and no other byte."""
    assert with_model(engine_json, b'"chat"') == expected


# -- GET /v1/models/{id} ---------------------------------------------------------------


async def test_retrieve_model_answers_the_listed_card(client: AsyncTestClient[Litestar]) -> None:
    """A public alias answers OpenAI's Model object, the same card /v1/models lists."""
    user = await new_user_key(client)
    card = await client.get("/v1/models/chat", headers=user)
    listed = (await client.get("/v1/models", headers=user)).json()["data"]
    assert card.status_code == 200
    assert set(card.json()) == {"id", "object", "created", "owned_by"}
    assert card.json()["object"] == "model"
    assert [card.json()] == listed


@pytest.mark.parametrize("model", ["nope", "chat-v0000", "judge"])
async def test_retrieve_model_hides_what_the_list_hides(
    client: AsyncTestClient[Litestar], model: str
) -> None:
    """Unknown names, adapter versions and private aliases are 404 model_not_found."""
    await client.put(
        "/admin/aliases/judge", json={"adapter": "judge-v1", "public": False}, headers=ADMIN
    )
    user = await new_user_key(client)
    for headers in (user, ADMIN):
        response = await client.get(f"/v1/models/{model}", headers=headers)
        assert response.status_code == 404
        assert response.json() == {
            "error": {
                "message": f"model {model!r} does not exist",
                "type": "not_found_error",
                "param": "model",
                "code": "model_not_found",
            }
        }


async def test_retrieve_model_needs_a_key(client: AsyncTestClient[Litestar]) -> None:
    """Like every /v1 route, no key is 401."""
    assert (await client.get("/v1/models/chat")).status_code == 401


# -- 400, not 422 ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"temperature": 5}, "temperature"), ({"n": 0}, "n"), ({"top_p": "high"}, "top_p")],
)
async def test_invalid_values_are_400_in_openai_shape(
    client: AsyncTestClient[Litestar], engine: FakeEngine, extra: dict[str, object], param: str
) -> None:
    """A bad value is 400 invalid_request_error naming the parameter, never 422."""
    response = await client.post("/v1/chat/completions", json=chat_body(**extra), headers=ADMIN)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert param in error["message"]
    assert engine.requests == []


async def test_other_failures_keep_their_status(client: AsyncTestClient[Litestar]) -> None:
    """No key stays 401, an unknown model 404."""
    missing_key = await client.post("/v1/chat/completions", json=chat_body())
    unknown = await client.post(
        "/v1/chat/completions", json={**chat_body(), "model": "nope"}, headers=ADMIN
    )
    assert (missing_key.status_code, unknown.status_code) == (401, 404)


# -- rate-limit headers ----------------------------------------------------------------


def test_openai_duration_format() -> None:
    """Durations read like OpenAI's (Go's): ms below a second, then h/m/s, rounded up."""
    cases = {0.0: "0s", 0.02: "20ms", 0.07: "70ms", 1.0: "1s", 1.5: "1.5s", 360.0: "6m0s"}
    cases |= {3723.5: "1h2m3.5s", 59.9999: "1m0s"}
    assert {value: openai_duration(value) for value in cases} == cases


async def test_rate_limit_headers_follow_the_bucket(
    tight_settings: GatewaySettings, engine: FakeEngine
) -> None:
    """Each reply says the bucket's capacity, what is left and when it is full; the 429 too."""
    app = create_app(tight_settings, transport=engine.transport())
    async with AsyncTestClient(app=app) as client:
        user = await new_user_key(client)
        replies = [
            await client.post("/v1/chat/completions", json=chat_body(stream=stream), headers=user)
            for stream in (False, True, False, False)
        ]
    assert [r.status_code for r in replies] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-limit-requests"] for r in replies] == ["3"] * 4
    assert [r.headers["x-ratelimit-remaining-requests"] for r in replies] == ["2", "1", "0", "0"]
    resets = [seconds(r.headers["x-ratelimit-reset-requests"]) for r in replies]
    # One token refills in 60 s at 1 request a minute: full again 1, 2, 3 minutes on.
    assert resets[0] < resets[1] < resets[2]
    assert [round(reset / 60.0) for reset in resets] == [1, 2, 3, 3]
    assert replies[3].json()["error"]["type"] == "rate_limit_error"
    assert int(replies[3].headers["retry-after"]) >= 1


# -- offline docs ----------------------------------------------------------------------


async def test_docs_page_is_self_contained_html(client: AsyncTestClient[Litestar]) -> None:
    """/schema is HTML rendered by the gateway: every route and schema, no script, no URL
    outside the gateway; the JSON schema it links to is served beside it."""
    page = await client.get("/schema")
    schema = await client.get("/schema/openapi.json")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    # No absolute or protocol-relative URL at all, so nothing is fetched from elsewhere.
    assert re.findall(r"(?i)(?:https?:)?//[^\s\"'<>]*", html) == []
    assert "<script" not in html.lower()
    assert '<a href="/schema/openapi.json">' in html
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert "/v1/models/{model}" in paths
    for path, item in paths.items():
        assert f"<code>{path}</code>" in html
        for operation in item.values():
            assert escape(operation["summary"]) in html
    for name in schema.json()["components"]["schemas"]:
        assert f'id="schema-{name}"' in html
    assert 'href="#schema-ChatCompletionRequest"' in html


# -- the OpenAI SDK ----------------------------------------------------------------------


async def test_openai_sdk_sees_openai_behaviour(live_url: str) -> None:
    """The unmodified SDK: a bad temperature raises BadRequestError naming it; a reply and
    models.retrieve name the alias; an unknown model raises NotFoundError."""
    async with openai.AsyncOpenAI(
        base_url=f"{live_url}/v1",
        api_key=ADMIN_KEY,
        max_retries=0,
    ) as sdk:
        with pytest.raises(openai.BadRequestError) as bad:
            await sdk.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}], temperature=5
            )
        raw = await sdk.chat.completions.with_raw_response.create(
            model="chat", messages=[{"role": "user", "content": "hi"}]
        )
        card = await sdk.models.retrieve("chat")
        with pytest.raises(openai.NotFoundError) as missing:
            await sdk.models.retrieve("chat-v0000")
    assert (bad.value.status_code, bad.value.param) == (400, "temperature")
    assert bad.value.type == "invalid_request_error"
    assert raw.parse().model == "chat"
    assert raw.headers[VERSION] == "chat-v0000"
    assert int(raw.headers["x-ratelimit-remaining-requests"]) >= 0
    assert (card.id, card.object) == ("chat", "model")
    assert missing.value.code == "model_not_found"
