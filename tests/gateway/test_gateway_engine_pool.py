"""The gateway's engine pool: routing across engines, moving a request on, health."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_fakes import ADMIN, ADMIN_KEY, EngineNetwork, chat_body, logged_turns, sse_events
from litestar import Litestar
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.engine_pool import EnginePool
from gateway.settings import GatewaySettings, load_settings
from tuneshield import PolicyError

CHAT = "/v1/chat/completions"


@pytest.fixture
def network() -> EngineNetwork:
    return EngineNetwork("engine-a.test", "engine-b.test")


@pytest.fixture
def pool_settings(tmp_path: Path, network: EngineNetwork) -> GatewaySettings:
    loaded = load_settings(
        upstream_url=network.urls,
        data_dir=tmp_path / "data",
        environ={"TUNESHIELD_ADMIN_KEY": ADMIN_KEY},
    )
    return dataclasses.replace(
        loaded, dialog_log=dataclasses.replace(loaded.dialog_log, flush_interval_s=0.05)
    )


@pytest.fixture
async def pool_client(
    pool_settings: GatewaySettings, network: EngineNetwork
) -> AsyncIterator[AsyncTestClient[Litestar]]:
    app = create_app(pool_settings, transport=network.transport())
    async with AsyncTestClient(app=app) as test:
        yield test


def served(network: EngineNetwork) -> dict[str, int]:
    return {host: len(engine.requests) for host, engine in network.engines.items()}


async def test_requests_spread_over_engines_and_turns_name_theirs(
    pool_client: AsyncTestClient[Litestar], network: EngineNetwork, pool_settings: GatewaySettings
) -> None:
    """Idle engines share the traffic; each logged turn names the engine that answered."""
    for _ in range(6):
        response = await pool_client.post(CHAT, json=chat_body(), headers=ADMIN)
        assert response.status_code == 200
    assert served(network) == {"engine-a.test": 3, "engine-b.test": 3}
    await pool_client.__aexit__(None, None, None)
    engines = [turn["engine"] for turn in logged_turns(pool_settings)]
    assert sorted(engines) == ["http://engine-a.test"] * 3 + ["http://engine-b.test"] * 3


async def test_route_prefers_holders_then_the_least_busy() -> None:
    """Engines up and holding the version first (fewest in flight first), then engines up
    without it, then engines seen down; equally busy engines take turns being first."""
    clients = [httpx.AsyncClient(base_url=f"http://e{i}.test") for i in range(3)]
    pool = EnginePool(clients, probe_timeout_s=1.0)
    first, second, third = pool.engines
    for engine in pool.engines:
        engine.adapters = frozenset({"base", "chat-v0001"})
    firsts = {pool.route("chat-v0001")[0].url for _ in range(3)}
    assert firsts == {engine.url for engine in pool.engines}
    first.in_flight, second.in_flight = 2, 1
    assert pool.route("chat-v0001") == [third, second, first]
    third.adapters = frozenset({"base"})
    assert pool.route("chat-v0001") == [second, first, third]
    second.up = False
    assert pool.route("chat-v0001") == [first, third, second]
    for client in clients:
        await client.aclose()


async def test_only_engines_holding_the_version_get_it(
    pool_client: AsyncTestClient[Litestar], network: EngineNetwork
) -> None:
    """An engine that lists no adapter (restarted, not reconciled yet) gets no traffic
    while another one holds the version."""
    network.engines["engine-b.test"].models = ["base"]
    await pool_client.get("/healthz")  # a listing now, instead of at the next period
    for _ in range(4):
        assert (await pool_client.post(CHAT, json=chat_body(), headers=ADMIN)).status_code == 200
    assert served(network) == {"engine-a.test": 4, "engine-b.test": 0}


@pytest.mark.parametrize("stream", [False, True])
async def test_a_dead_engine_is_skipped_and_the_request_succeeds(
    pool_client: AsyncTestClient[Litestar], network: EngineNetwork, stream: bool
) -> None:
    """An engine that refuses connections: every request still succeeds on the other
    one, the retry is counted, and the dead engine gets nothing more until it answers."""
    network.engines["engine-a.test"].down = True
    for _ in range(4):
        response = await pool_client.post(CHAT, json=chat_body(stream=stream), headers=ADMIN)
        assert response.status_code == 200, response.text
        if stream:
            assert sse_events(response.content)[-1] == "[DONE]"
    assert served(network)["engine-b.test"] == 4
    metrics = (await pool_client.get("/metrics")).text
    retried = [
        line
        for line in metrics.splitlines()
        if line.startswith("gateway_engine_retries_total{")
        and 'engine="http://engine-a.test"' in line
    ]
    assert retried and retried[0].endswith(" 1.0"), retried
    network.engines["engine-a.test"].down = False
    await pool_client.get("/healthz")
    for _ in range(4):
        await pool_client.post(CHAT, json=chat_body(), headers=ADMIN)
    assert served(network)["engine-a.test"] > 0


class _BrokenBody(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"id": "chatcmpl-1", "choi'
        raise httpx.ReadError("the engine died mid-reply")


async def test_a_json_reply_broken_mid_body_is_retried(
    pool_client: AsyncTestClient[Litestar], network: EngineNetwork, pool_settings: GatewaySettings
) -> None:
    """Nothing of a JSON reply reaches the client before it is whole: an engine dying
    mid-body costs a retry, not a failed request, and one turn is logged."""
    for engine in network.engines.values():
        engine.failure = lambda request: httpx.Response(200, stream=_BrokenBody())
    network.engines["engine-b.test"].failure = None
    for _ in range(3):
        response = await pool_client.post(CHAT, json=chat_body(), headers=ADMIN)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "Hi there, friend."
    await pool_client.__aexit__(None, None, None)
    turns = logged_turns(pool_settings)
    assert [turn["engine"] for turn in turns] == ["http://engine-b.test"] * 3


async def test_an_engine_without_the_adapter_passes_the_request_on(
    pool_client: AsyncTestClient[Litestar], network: EngineNetwork
) -> None:
    """A 404 for the adapter (the listing had not caught up) moves the request on."""
    network.engines["engine-a.test"].failure = lambda request: httpx.Response(
        404, json={"error": {"message": "The model `chat-v0000` does not exist."}}
    )
    for _ in range(4):
        assert (await pool_client.post(CHAT, json=chat_body(), headers=ADMIN)).status_code == 200
    assert served(network)["engine-b.test"] == 4


async def test_no_engine_answers_gives_502_and_healthz_says_which(
    pool_client: AsyncTestClient[Litestar], network: EngineNetwork
) -> None:
    """Both engines dead: 502 engine_unreachable in OpenAI's shape; /healthz is 200 while
    one answers (naming the other by position, not address) and 503 when none does."""
    network.engines["engine-a.test"].down = True
    health = await pool_client.get("/healthz")
    assert health.status_code == 200
    assert health.json()["engine"].startswith("1 of 2 engines answer (engine 1: unreachable")
    assert "engine-a" not in health.text
    network.engines["engine-b.test"].down = True
    response = await pool_client.post(CHAT, json=chat_body(), headers=ADMIN)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "engine_unreachable"
    assert (await pool_client.get("/healthz")).status_code == 503


async def test_a_bad_request_is_not_retried(
    pool_client: AsyncTestClient[Litestar], network: EngineNetwork
) -> None:
    """An engine's 400 is the request's fault: answered as is, never sent to another."""
    for engine in network.engines.values():
        engine.failure = lambda request: httpx.Response(
            400, json={"error": {"message": "max_tokens is too large"}}
        )
    response = await pool_client.post(CHAT, json=chat_body(), headers=ADMIN)
    assert response.status_code == 400
    assert sum(served(network).values()) == 0  # failures are not recorded as requests
    metrics = (await pool_client.get("/metrics")).text
    assert "gateway_engine_retries_total{" not in metrics


def test_upstream_urls_from_the_environment_and_their_checks(tmp_path: Path) -> None:
    """TUNESHIELD_UPSTREAM_URL takes several URLs (spaces or commas); one engine named
    twice, or a URL that is not http(s), is a settings error naming it."""
    env = {"TUNESHIELD_UPSTREAM_URL": "http://a.test:8000/v1, http://b.test:8000"}
    settings = load_settings(data_dir=tmp_path, environ=env)
    assert settings.upstream_urls == ("http://a.test:8000", "http://b.test:8000")
    assert settings.upstream_url == "http://a.test:8000"
    with pytest.raises(PolicyError, match="one engine twice"):
        load_settings(upstream_url=["http://a.test/v1", "http://a.test"], data_dir=tmp_path)
    with pytest.raises(PolicyError, match=r"ftp://a\.test"):
        load_settings(upstream_url=["http://a.test", "ftp://a.test"], data_dir=tmp_path)


async def test_a_request_resolved_before_a_flip_follows_the_alias(
    pool_client: AsyncTestClient[Litestar], network: EngineNetwork
) -> None:
    """The alias flipped and the old version was unloaded after a request was resolved:
    the engines' 404 sends it again once, with the version the alias serves now."""

    def unloaded(request: httpx.Request) -> httpx.Response:
        import json

        model = json.loads(request.content)["model"]
        if model == "chat-v0000":
            flip = pool_client.app.state.resources.aliases
            flip.set("chat", "chat-v0007")
            return httpx.Response(404, json={"error": {"message": f"{model} does not exist"}})
        return httpx.Response(
            200,
            json={"id": "c", "object": "chat.completion", "created": 1, "model": model,
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": model},
                               "finish_reason": "stop"}]},
        )  # fmt: skip

    for engine in network.engines.values():
        engine.failure = unloaded
    response = await pool_client.post(CHAT, json=chat_body(), headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.headers["x-tuneshield-version"] == "chat-v0007"


async def test_an_engine_still_starting_is_news_and_one_that_fails_later_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A gateway started beside its engine lists it before it answers: INFO, not a
    WARNING; an engine that answered once and then stops answering is a WARNING."""
    answering = False

    def engine(request: httpx.Request) -> httpx.Response:
        if not answering:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"object": "list", "data": [{"id": "base"}]})

    client = httpx.AsyncClient(base_url="http://e.test", transport=httpx.MockTransport(engine))
    pool = EnginePool([client], probe_timeout_s=1.0)
    with caplog.at_level(logging.INFO, logger="gateway.engine_pool"):
        await pool.probe()
        answering = True
        await pool.probe()
        answering = False
        await pool.probe()
    await client.aclose()
    levels = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert [level for level, _ in levels] == ["INFO", "INFO", "WARNING"], levels
    assert "not started yet" in levels[0][1] and "answers again" not in levels[1][1]


class StopsItsEngines:
    """An extension that takes the engines down as it closes, as serve's does."""

    def __init__(self, network: EngineNetwork, stopping_s: float) -> None:
        self.network, self.stopping_s = network, stopping_s

    def routers(self) -> list[Any]:
        return []

    def lifespan(
        self, app: Litestar, database: Any, engines: EnginePool
    ) -> AbstractAsyncContextManager[None]:
        @asynccontextmanager
        async def opened() -> AsyncIterator[None]:
            yield
            for engine in self.network.engines.values():
                engine.down = True
            await asyncio.sleep(self.stopping_s)  # an engine takes seconds to stop

        return opened()


async def test_engines_stopped_on_shutdown_are_not_reported_down(
    pool_settings: GatewaySettings, network: EngineNetwork, caplog: pytest.LogCaptureFixture
) -> None:
    """Engines an extension stops while the gateway shuts down are not an outage: the
    health probe stops first, so no warning follows a clean stop."""
    period_s = 0.02
    upstream = dataclasses.replace(pool_settings.upstream, health_probe_s=period_s)
    settings = dataclasses.replace(pool_settings, upstream=upstream)
    app = create_app(
        settings,
        transport=network.transport(),
        extensions=[StopsItsEngines(network, 10 * period_s)],
    )
    with caplog.at_level(logging.INFO, logger="gateway.engine_pool"):
        async with AsyncTestClient(app=app) as test:
            response = await test.post(CHAT, json=chat_body(), headers=ADMIN)
            assert response.status_code == 200, response.text
    assert all(engine.down for engine in network.engines.values())
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == []
