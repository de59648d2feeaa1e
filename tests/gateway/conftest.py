"""Gateway test fixtures: settings in a temp data dir, a fake engine, a test client."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from gateway_fakes import ADMIN_KEY, FakeEngine
from litestar import Litestar
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings, load_settings


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def settings(tmp_path: Path) -> GatewaySettings:
    loaded = load_settings(
        upstream_url="http://engine.test/v1",
        data_dir=tmp_path / "data",
        environ={"TUNESHIELD_ADMIN_KEY": ADMIN_KEY},
    )
    return dataclasses.replace(
        loaded, dialog_log=dataclasses.replace(loaded.dialog_log, flush_interval_s=0.05)
    )


@pytest.fixture
async def client(
    settings: GatewaySettings, engine: FakeEngine
) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app=create_app(settings, transport=engine.transport())) as test:
        yield test
