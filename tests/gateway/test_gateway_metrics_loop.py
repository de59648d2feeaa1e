"""The learning loop on the gateway's /metrics: the version each alias serves (on every
replica) and whether the engine answers."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path

from gateway_fakes import ADMIN, ADMIN_KEY, FakeEngine
from litestar import Litestar
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.settings import GatewaySettings, load_settings

# Short periods, so that the tests wait milliseconds for what takes seconds in production.
FAST_PERIOD_S = 0.05
WAIT_S = 10.0


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample named ``name`` in a Prometheus text exposition: (labels, value)."""
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def active_versions(text: str) -> dict[str, list[str]]:
    """``tuneshield_alias_active_version``: alias → the versions reported for it."""
    found: dict[str, list[str]] = {}
    for labels, value in samples(text, "tuneshield_alias_active_version"):
        assert value == 1.0, "an info metric is always 1"
        found.setdefault(labels["alias"], []).append(labels["version"])
    return found


def engine_up(text: str) -> dict[str, float]:
    return {labels["engine"]: value for labels, value in samples(text, "tuneshield_engine_up")}


async def until(client: AsyncTestClient[Litestar], check: Callable[[str], bool]) -> str:
    """Scrape /metrics until ``check(text)`` holds (``WAIT_S`` at most)."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while True:
        text = (await client.get("/metrics")).text
        if check(text):
            return text
        assert asyncio.get_running_loop().time() < deadline, f"timed out; last scrape:\n{text}"
        await asyncio.sleep(FAST_PERIOD_S)


def with_fast_probe(settings: GatewaySettings) -> GatewaySettings:
    upstream = dataclasses.replace(settings.upstream, health_probe_s=FAST_PERIOD_S)
    return dataclasses.replace(settings, upstream=upstream)


async def test_active_version_follows_an_alias_flip(client: AsyncTestClient[Litestar]) -> None:
    """The seeded alias reports its version 0; after a flip it reports the new version
    only (the old series disappears instead of staying at 0)."""
    text = (await client.get("/metrics")).text
    assert active_versions(text) == {"chat": ["chat-v0000"]}
    assert 'tuneshield_alias_active_version{alias="chat",version="chat-v0000"} 1.0' in text
    response = await client.put(
        "/admin/aliases/chat", json={"adapter": "chat-v0003"}, headers=ADMIN
    )
    assert response.status_code == 200, response.text
    assert active_versions((await client.get("/metrics")).text) == {"chat": ["chat-v0003"]}


async def test_every_replica_reports_a_flip_made_on_another(
    postgres_database_url: str, tmp_path: Path, engine: FakeEngine
) -> None:
    """Two gateways on one PostgreSQL store: a flip made through one shows on the other's
    /metrics once its alias cache refreshes."""
    replicas = []
    for name in ("a", "b"):
        settings = load_settings(
            upstream_url="http://engine.test/v1",
            data_dir=tmp_path / name,
            environ={
                "TUNESHIELD_ADMIN_KEY": ADMIN_KEY,
                "TUNESHIELD_DATABASE_URL": postgres_database_url,
            },
        )
        store = dataclasses.replace(
            settings.store,
            config=dataclasses.replace(settings.store.config, cache_refresh_s=FAST_PERIOD_S),
        )
        replicas.append(dataclasses.replace(settings, store=store))
    first_app = create_app(replicas[0], transport=engine.transport())
    second_app = create_app(replicas[1], transport=engine.transport())
    async with AsyncTestClient(app=first_app) as first, AsyncTestClient(app=second_app) as second:
        assert active_versions((await second.get("/metrics")).text) == {"chat": ["chat-v0000"]}
        response = await first.put(
            "/admin/aliases/chat", json={"adapter": "chat-v0001"}, headers=ADMIN
        )
        assert response.status_code == 200, response.text
        await until(second, lambda text: active_versions(text) == {"chat": ["chat-v0001"]})


async def test_engine_up_follows_the_health_probe(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """The gateway probes its engine on its own: 1 while it answers, 0 once its health
    check fails, 1 again when it recovers; labelled by the engine's root URL."""
    app = create_app(with_fast_probe(settings), transport=engine.transport())
    async with AsyncTestClient(app=app) as client:
        await until(client, lambda text: engine_up(text) == {"http://engine.test": 1.0})
        engine.health_status = 503
        await until(client, lambda text: engine_up(text) == {"http://engine.test": 0.0})
        engine.health_status = 200
        await until(client, lambda text: engine_up(text) == {"http://engine.test": 1.0})
