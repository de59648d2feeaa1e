"""Hot-swap, promote, rollback and restore against a faked vLLM; identity bootstrap."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from learner_fakes import FakeVLLM, adapter_folder

from engine import (
    AdapterRejected,
    EngineUnavailable,
    HotSwap,
    SwapRefused,
    VLLMClient,
    ensure_identity_adapter,
    restore_on_ready,
)
from store import AdapterRegistry, AliasStore, Database, open_database


@dataclass
class Stack:
    database: Database
    registry: AdapterRegistry
    aliases: AliasStore
    engine: FakeVLLM
    swap: HotSwap
    root: Path

    def add(self, version: str, **kwargs: object) -> None:
        self.registry.register(version, adapter_folder(self.root, version), **kwargs)  # type: ignore[arg-type]

    def statuses(self) -> dict[str, str]:
        return {record.version: record.status for record in self.registry.list("chat")}


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    database = open_database(tmp_path / "db.duckdb")
    registry, aliases, engine = AdapterRegistry(database), AliasStore(database), FakeVLLM()
    client = VLLMClient("http://engine.test", client=engine.client())
    built = Stack(database, registry, aliases, engine, HotSwap(registry, aliases, client), tmp_path)
    built.add("chat-v0000", status="active")
    aliases.set("chat", "chat-v0000")
    engine.loaded["chat-v0000"] = str(tmp_path / "chat-v0000")
    yield built
    await client.aclose()
    database.close()


async def test_activate_loads_probes_then_flips(stack: Stack) -> None:
    """The new version is loaded and probed before the alias flips to it."""
    stack.add("chat-v0001")
    result = await stack.swap.activate("chat-v0001")
    assert stack.engine.calls == [("load", "chat-v0001"), ("chat", "chat-v0001")]
    assert stack.aliases.get("chat") == "chat-v0001"
    assert (result.previous, result.retired) == ("chat-v0000", None)
    assert stack.statuses() == {"chat-v0000": "candidate", "chat-v0001": "active"}
    assert set(stack.engine.loaded) == {"chat-v0000", "chat-v0001"}


async def test_two_steps_back_is_unloaded_and_retired(stack: Stack) -> None:
    """After a second swap the version two steps back leaves vLLM; the previous stays."""
    stack.add("chat-v0001")
    stack.add("chat-v0002")
    await stack.swap.activate("chat-v0001")
    result = await stack.swap.activate("chat-v0002")
    assert result.retired == "chat-v0000"
    assert set(stack.engine.loaded) == {"chat-v0001", "chat-v0002"}
    assert stack.statuses() == {
        "chat-v0000": "retired",
        "chat-v0001": "candidate",
        "chat-v0002": "active",
    }


async def test_reactivating_the_served_version_keeps_the_previous(stack: Stack) -> None:
    """Activating the version already served changes nothing and retires nothing."""
    stack.add("chat-v0001")
    await stack.swap.activate("chat-v0001")
    result = await stack.swap.activate("chat-v0001")
    assert (result.previous, result.retired) == (None, None)
    assert set(stack.engine.loaded) == {"chat-v0000", "chat-v0001"}
    previous = stack.registry.previous_active("chat")
    assert previous is not None and previous.version == "chat-v0000"


async def test_already_loaded_is_not_reloaded(stack: Stack) -> None:
    """A version vLLM already holds is used as is: no unload, no second load."""
    stack.add("chat-v0001")
    stack.engine.loaded["chat-v0001"] = "elsewhere"
    await stack.swap.activate("chat-v0001")
    assert ("unload", "chat-v0001") not in stack.engine.calls
    assert stack.engine.loaded["chat-v0001"] == "elsewhere"
    assert stack.aliases.get("chat") == "chat-v0001"


async def test_engine_down_leaves_alias_and_statuses(stack: Stack) -> None:
    """Engine unreachable mid-swap: a typed error, the alias and the registry unchanged."""
    stack.add("chat-v0001")
    stack.engine.down = True
    with pytest.raises(EngineUnavailable):
        await stack.swap.activate("chat-v0001")
    assert stack.aliases.get("chat") == "chat-v0000"
    assert stack.statuses() == {"chat-v0000": "active", "chat-v0001": "candidate"}


async def test_failed_probe_leaves_alias(stack: Stack) -> None:
    """A load that vLLM accepts but whose probe fails does not flip the alias."""
    stack.add("chat-v0001")
    stack.engine.probe_status = 500
    with pytest.raises(AdapterRejected, match="broken"):
        await stack.swap.activate("chat-v0001")
    assert stack.aliases.get("chat") == "chat-v0000"
    assert stack.statuses() == {"chat-v0000": "active", "chat-v0001": "candidate"}


async def test_rollback_flips_back_in_one_step(stack: Stack) -> None:
    """Rollback serves the previous version again; a second rollback returns."""
    stack.add("chat-v0001")
    await stack.swap.activate("chat-v0001")
    back = await stack.swap.rollback("chat")
    assert (back.version, stack.aliases.get("chat")) == ("chat-v0000", "chat-v0000")
    forth = await stack.swap.rollback("chat")
    assert forth.version == "chat-v0001"


async def test_rollback_to_named_version_reloads_dropped_adapter(stack: Stack) -> None:
    """Rolling back to a retired version loads it again from its folder first."""
    stack.add("chat-v0001")
    stack.add("chat-v0002")
    await stack.swap.activate("chat-v0001")
    await stack.swap.activate("chat-v0002")
    assert "chat-v0000" not in stack.engine.loaded
    result = await stack.swap.rollback("chat", "chat-v0000")
    assert stack.engine.loaded["chat-v0000"] == str(stack.root.resolve() / "chat-v0000")
    assert (result.version, stack.aliases.get("chat")) == ("chat-v0000", "chat-v0000")
    with pytest.raises(SwapRefused, match="alias"):
        await stack.swap.rollback("support", "chat-v0001")


async def test_rollback_without_history_is_refused(stack: Stack) -> None:
    """With only one version ever served, a plain rollback is refused with a reason."""
    with pytest.raises(SwapRefused, match="no previously served"):
        await stack.swap.rollback("chat")


async def test_promote_rejected_needs_force_and_is_recorded(stack: Stack) -> None:
    """A rejected version is refused unless forced; a forced promote is stamped."""
    stack.add("chat-v0001", status="rejected", gate_metrics={"toxicity": 0.9})
    with pytest.raises(SwapRefused, match="force"):
        await stack.swap.promote("chat-v0001")
    with pytest.raises(SwapRefused, match="rejected"):
        await stack.swap.activate("chat-v0001")
    assert stack.aliases.get("chat") == "chat-v0000"
    await stack.swap.promote("chat-v0001", force=True)
    record = stack.registry.get("chat-v0001")
    assert (record.status, stack.aliases.get("chat")) == ("active", "chat-v0001")
    assert record.forced_promote_at is not None


async def test_restore_active_after_engine_restart(stack: Stack) -> None:
    """An engine that lost its adapters gets every alias's active version back."""
    stack.engine.loaded.clear()
    assert await stack.swap.restore_active() == ["chat-v0000"]
    assert set(stack.engine.loaded) == {"chat-v0000"}
    assert await stack.swap.restore_active() == ["chat-v0000"]


async def test_on_ready_hook_restores_from_another_thread(stack: Stack) -> None:
    """The supervisor's on_ready hook (run in its own thread) reloads the active version."""
    stack.engine.loaded.clear()
    hook = restore_on_ready(stack.registry, stack.aliases, transport=stack.engine.transport())
    supervisor = SimpleNamespace(base_url="http://engine.test")
    await asyncio.to_thread(hook, supervisor)  # type: ignore[arg-type]
    assert set(stack.engine.loaded) == {"chat-v0000"}


def test_identity_adapter_bootstrap(tmp_path: Path, tiny_model_dir: Path) -> None:
    """First start builds chat-v0000 as an active identity LoRA; the next start reuses it."""
    database = open_database(tmp_path / "db.duckdb")
    try:
        registry = AdapterRegistry(database)
        first = ensure_identity_adapter(registry, "chat", tiny_model_dir, tmp_path / "adapters")
        again = ensure_identity_adapter(registry, "chat", tiny_model_dir, tmp_path / "adapters")
        following = registry.next_version("chat")
    finally:
        database.close()
    assert (first.version, first.status) == ("chat-v0000", "active")
    assert again == first
    assert (Path(first.path) / "adapter_model.safetensors").is_file()
    assert following == "chat-v0001"
