"""``tuneshield serve``'s bootstrap and stack, on the tiny model with the engine faked."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
from learner_fakes import FakeVLLM
from litestar.testing import AsyncTestClient

from engine import EngineError, EngineSupervisor
from gateway.app import create_app
from gateway.auth import hash_key
from gateway.settings import GatewaySettings, load_settings
from learner.admin_routes import AdapterAdmin
from learner.serve import BootstrapReport, OnReady, ServeStack, bootstrap, ensure_admin_key
from store import AdapterRegistry, AliasStore, KeyStore, open_database

ENGINE_URL = "http://engine.test"


class FakeEngine:
    """Calls ``on_ready`` on start, as ``EngineSupervisor`` does once vLLM answers."""

    base_url = f"{ENGINE_URL}/v1"

    def __init__(self, on_ready: OnReady, fail: bool = False) -> None:
        self.on_ready = on_ready
        self.fail = fail
        self.events: list[str] = []

    def start(self) -> None:
        self.events.append("start")
        if self.fail:
            raise EngineError("engine exited with code 1 while starting")
        self.on_ready(cast(EngineSupervisor, self))

    def stop(self) -> None:
        self.events.append("stop")


@pytest.fixture
def settings(tmp_path: Path) -> GatewaySettings:
    return load_settings(upstream_url=ENGINE_URL, data_dir=tmp_path / "data", environ={})


def run_bootstrap(settings: GatewaySettings, model: Path) -> tuple[BootstrapReport, list[str]]:
    database = open_database(settings.store_url)
    try:
        registry = AdapterRegistry(database)
        report = bootstrap(
            registry,
            AliasStore(database),
            KeyStore(database),
            settings,
            model,
            settings.data_dir / "adapters",
        )
        rows = [f"{r.version}:{r.status}:{r.created_at}" for r in registry.list()]
        return report, rows
    finally:
        database.close()


def test_bootstrap_registers_identity_once(settings: GatewaySettings, tiny_model_dir: Path) -> None:
    """The first start builds chat-v0000, active behind alias chat; a second one is a no-op."""
    first, rows = run_bootstrap(settings, tiny_model_dir)
    assert first.identity_versions == ["chat-v0000"]
    assert [row.split(":")[:2] for row in rows] == [["chat-v0000", "active"]]
    folder = settings.data_dir / "adapters" / "chat-v0000"
    assert (folder / "adapter_model.safetensors").is_file()
    stamp = (folder / "adapter_model.safetensors").stat().st_mtime_ns

    second, rows_again = run_bootstrap(settings, tiny_model_dir)
    assert second == BootstrapReport([], None)
    assert rows_again == rows
    assert (folder / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    database = open_database(settings.store_url)
    try:
        assert AliasStore(database).get("chat") == "chat-v0000"
    finally:
        database.close()


def test_admin_key_made_once_unless_env_key(tmp_path: Path) -> None:
    """An admin key is created only when neither the environment nor the store has one."""
    database = open_database(tmp_path / "keys.duckdb")
    try:
        keys = KeyStore(database)
        assert ensure_admin_key(keys, "env-admin-key-0123456789") is None
        key = ensure_admin_key(keys, None)
        assert key is not None
        record = keys.by_hash(hash_key(key))
        assert record is not None and record.role == "admin"
        assert ensure_admin_key(keys, None) is None
        keys.revoke(record.key_id)
        assert ensure_admin_key(keys, None) is not None
    finally:
        database.close()


async def test_stack_restores_then_serves_alias(
    settings: GatewaySettings, tiny_model_dir: Path
) -> None:
    """Through the app: the identity adapter is loaded before traffic, the printed admin key
    works, chat is answered by chat-v0000, and the engine stops when the gateway does."""
    vllm = FakeVLLM()
    engines: list[FakeEngine] = []
    reports: list[BootstrapReport] = []

    def make_engine(on_ready: OnReady) -> FakeEngine:
        engines.append(FakeEngine(on_ready))
        return engines[-1]

    stack = ServeStack(
        make_engine,
        tiny_model_dir,
        settings.data_dir / "adapters",
        on_bootstrap=reports.append,
        restore_transport=vllm.transport(),
    )
    app = create_app(settings, transport=vllm.transport(), extensions=[AdapterAdmin(), stack])
    async with AsyncTestClient(app=app) as client:
        assert list(vllm.loaded) == ["chat-v0000"]
        key = reports[0].admin_key
        assert key is not None
        headers = {"Authorization": f"Bearer {key}"}
        adapters = await client.get("/admin/adapters", headers=headers)
        assert adapters.status_code == 200
        assert [row["version"] for row in adapters.json()] == ["chat-v0000"]
        reply = await client.post(
            "/v1/chat/completions",
            headers=headers,
            json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == "from chat-v0000"
        assert engines[0].events == ["start"]
    assert engines[0].events == ["start", "stop"]
    assert ("chat", "base") not in vllm.calls


async def test_stack_engine_failure_is_reported(
    settings: GatewaySettings, tiny_model_dir: Path
) -> None:
    """An engine that cannot start fails the gateway's startup and is kept for the CLI."""
    stack = ServeStack(
        lambda on_ready: FakeEngine(on_ready, fail=True),
        tiny_model_dir,
        settings.data_dir / "adapters",
    )
    app = create_app(settings, transport=FakeVLLM().transport(), extensions=[stack])
    with pytest.raises(ExceptionGroup):
        async with AsyncTestClient(app=app):
            pass
    assert isinstance(stack.error, EngineError)
