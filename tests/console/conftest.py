"""Console fixtures: a seeded gateway with the console, in process and on a port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from console_stack import console_app, console_settings, fake_engine, seed_store
from learner_fakes import FakeVLLM
from litestar import Litestar
from litestar.testing import AsyncTestClient

from gateway.settings import GatewaySettings


@pytest.fixture
def settings(tmp_path: Path) -> GatewaySettings:
    return console_settings(tmp_path / "data")


@pytest.fixture
def user_key(settings: GatewaySettings, tmp_path: Path) -> str:
    """The seeded store's user key (seeding it is this fixture's doing)."""
    return seed_store(settings, tmp_path / "folders")


@pytest.fixture
def engine() -> FakeVLLM:
    return fake_engine()


@pytest.fixture
async def client(
    settings: GatewaySettings, engine: FakeVLLM, user_key: str
) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app=console_app(settings, engine)) as test:
        yield test
