"""Hot-swap, promote, rollback and restore against a faked vLLM (the store on both
backends); identity bootstrap."""

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


@pytest.fixture(params=["duckdb", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store of each backend: promotion chains are read back from the store."""
    if request.param == "duckdb":
        return str(tmp_path / "db.duckdb")
    return str(request.getfixturevalue("postgres_database_url"))


@pytest.fixture
async def stack(store_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    database = open_database(store_url)
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
    assert (result.previous, result.unloaded) == ("chat-v0000", ())
    assert stack.statuses() == {"chat-v0000": "retired", "chat-v0001": "active"}
    assert set(stack.engine.loaded) == {"chat-v0000", "chat-v0001"}


async def test_two_steps_back_is_unloaded(stack: Stack) -> None:
    """After a second swap the version two steps back leaves vLLM; the previous stays
    loaded for an instant rollback; both are retired."""
    stack.add("chat-v0001")
    stack.add("chat-v0002")
    stack.add("chat-v0003")
    await stack.swap.activate("chat-v0001")
    result = await stack.swap.activate("chat-v0002")
    assert result.unloaded == ("chat-v0000",)
    assert set(stack.engine.loaded) == {"chat-v0001", "chat-v0002"}
    assert stack.statuses() == {
        "chat-v0000": "retired",
        "chat-v0001": "retired",
        "chat-v0002": "active",
        "chat-v0003": "candidate",
    }


async def test_reactivating_the_served_version_keeps_the_previous(stack: Stack) -> None:
    """Activating the version already served changes nothing: no flip, no unload, no step."""
    stack.add("chat-v0001")
    await stack.swap.activate("chat-v0001")
    result = await stack.swap.activate("chat-v0001")
    assert (result.previous, result.unloaded) == (None, ())
    assert set(stack.engine.loaded) == {"chat-v0000", "chat-v0001"}
    assert stack.aliases.promotion_chain("chat") == ["chat-v0000", "chat-v0001"]


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
    assert stack.aliases.promotion_chain("chat") == ["chat-v0000"]


async def test_failed_probe_leaves_alias(stack: Stack) -> None:
    """A load that vLLM accepts but whose probe fails does not flip the alias."""
    stack.add("chat-v0001")
    stack.engine.probe_status = 500
    with pytest.raises(AdapterRejected, match="broken"):
        await stack.swap.activate("chat-v0001")
    assert stack.aliases.get("chat") == "chat-v0000"
    assert stack.statuses() == {"chat-v0000": "active", "chat-v0001": "candidate"}


async def test_rollback_twice_goes_back_two_steps_then_is_refused(stack: Stack) -> None:
    """v0→v1→v2: rollback serves v1, rollback again v0 (never v2 again), and a third one is
    refused: v0 is the first version the alias served."""
    for version in ("chat-v0001", "chat-v0002"):
        stack.add(version)
        await stack.swap.promote(version)
    first = await stack.swap.rollback("chat")
    assert (first.version, first.previous) == ("chat-v0001", "chat-v0002")
    assert first.unloaded == ("chat-v0002",)
    assert set(stack.engine.loaded) == {"chat-v0001"}
    second = await stack.swap.rollback("chat")
    assert (second.version, second.previous) == ("chat-v0000", "chat-v0001")
    assert stack.aliases.get("chat") == "chat-v0000"
    with pytest.raises(SwapRefused, match=r"no earlier version.*chat-v0000 is the first"):
        await stack.swap.rollback("chat")
    assert stack.aliases.get("chat") == "chat-v0000"
    assert stack.statuses() == {
        "chat-v0000": "active",
        "chat-v0001": "retired",
        "chat-v0002": "retired",
    }


async def test_rollback_skips_versions_rolled_back_from(stack: Stack) -> None:
    """After rolling back from v2 to v1 and promoting v3, a rollback serves v1 again."""
    for version in ("chat-v0001", "chat-v0002", "chat-v0003"):
        stack.add(version)
    await stack.swap.promote("chat-v0001")
    await stack.swap.promote("chat-v0002")
    await stack.swap.rollback("chat")
    await stack.swap.promote("chat-v0003")
    back = await stack.swap.rollback("chat")
    assert (back.version, back.previous) == ("chat-v0001", "chat-v0003")
    assert back.unloaded == ("chat-v0003",)
    kinds = [(change.adapter, change.kind) for change in stack.aliases.history("chat")]
    assert kinds[:2] == [("chat-v0001", "rollback"), ("chat-v0003", "promote")]


async def test_retired_version_can_be_promoted_again(stack: Stack) -> None:
    """A version rolled back from is retired; promoting it serves it again as a new step."""
    stack.add("chat-v0001")
    await stack.swap.promote("chat-v0001")
    await stack.swap.rollback("chat")
    assert stack.registry.get("chat-v0001").status == "retired"
    again = await stack.swap.promote("chat-v0001")
    assert (again.version, stack.registry.get("chat-v0001").status) == ("chat-v0001", "active")
    assert (await stack.swap.rollback("chat")).version == "chat-v0000"


async def test_rollback_to_named_version_reloads_dropped_adapter(stack: Stack) -> None:
    """Rolling back to an earlier step that vLLM dropped loads it again from its folder
    first, and unloads the steps it left."""
    stack.add("chat-v0001")
    stack.add("chat-v0002")
    await stack.swap.activate("chat-v0001")
    await stack.swap.activate("chat-v0002")
    assert "chat-v0000" not in stack.engine.loaded
    result = await stack.swap.rollback("chat", "chat-v0000")
    assert stack.engine.loaded["chat-v0000"] == str(stack.root.resolve() / "chat-v0000")
    assert (result.version, stack.aliases.get("chat")) == ("chat-v0000", "chat-v0000")
    assert result.unloaded == ("chat-v0001", "chat-v0002")
    assert stack.aliases.promotion_chain("chat") == ["chat-v0000"]


async def test_rollback_to_refuses_what_is_no_earlier_step(stack: Stack) -> None:
    """--to refuses another alias's version, the version served now, one rolled back from
    and one never served, each with its reason; the alias stays put."""
    for version in ("chat-v0001", "chat-v0002", "chat-v0003"):
        stack.add(version)
    await stack.swap.promote("chat-v0001")
    await stack.swap.promote("chat-v0002")
    await stack.swap.rollback("chat")
    refusals = {
        ("support", "chat-v0000"): "belongs to alias 'chat'",
        ("chat", "chat-v0001"): "already serves chat-v0001",
        ("chat", "chat-v0002"): r"no earlier version.*chat-v0000.*promote it",
        ("chat", "chat-v0003"): "no earlier version",
    }
    for (alias, version), reason in refusals.items():
        with pytest.raises(SwapRefused, match=reason):
            await stack.swap.rollback(alias, version)
    assert stack.aliases.get("chat") == "chat-v0001"


async def test_rollback_without_history_is_refused(stack: Stack) -> None:
    """With only one version ever served, a plain rollback is refused with a reason."""
    with pytest.raises(SwapRefused, match="no earlier version"):
        await stack.swap.rollback("chat")


async def test_flips_record_kind_and_actor(stack: Stack) -> None:
    """Each flip names its kind and the admin who made it in the alias's history."""
    stack.add("chat-v0001")
    await stack.swap.promote("chat-v0001", actor="key_ops")
    await stack.swap.rollback("chat", actor="key_oncall")
    history = [(c.adapter, c.kind, c.actor) for c in stack.aliases.history("chat")]
    assert history == [
        ("chat-v0000", "rollback", "key_oncall"),
        ("chat-v0001", "promote", "key_ops"),
        ("chat-v0000", "set", None),
    ]


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


@pytest.fixture
async def pair(stack: Stack) -> AsyncIterator[tuple[HotSwap, FakeVLLM, FakeVLLM]]:
    """The stack's engine and a second one behind one hot-swap (version 0 on both)."""
    second = FakeVLLM()
    second.loaded["chat-v0000"] = stack.engine.loaded["chat-v0000"]
    clients = [
        VLLMClient("http://engine.test", client=stack.engine.client()),
        VLLMClient("http://engine-2.test", client=second.client()),
    ]
    yield HotSwap(stack.registry, stack.aliases, clients), stack.engine, second
    for client in clients:
        await client.aclose()


async def test_a_swap_loads_and_probes_every_engine_before_the_flip(
    stack: Stack, pair: tuple[HotSwap, FakeVLLM, FakeVLLM]
) -> None:
    """Both engines load and answer the new version before the alias flips; a later flip
    unloads the version two steps back from both."""
    swap, first, second = pair
    stack.add("chat-v0001")
    stack.add("chat-v0002")
    await swap.activate("chat-v0001")
    for engine in (first, second):
        assert engine.calls == [("load", "chat-v0001"), ("chat", "chat-v0001")]
    assert stack.aliases.get("chat") == "chat-v0001"
    result = await swap.activate("chat-v0002")
    assert result.unloaded == ("chat-v0000",)
    for engine in (first, second):
        assert set(engine.loaded) == {"chat-v0001", "chat-v0002"}


async def test_a_swap_skips_a_dead_engine_and_reconcile_catches_it_up(
    stack: Stack, pair: tuple[HotSwap, FakeVLLM, FakeVLLM]
) -> None:
    """One engine down: the flip happens on the one that answers; once back, the
    reconciliation loads the active version into it. Both down: no flip."""
    swap, first, second = pair
    stack.add("chat-v0001")
    stack.add("chat-v0002")
    second.down = True
    await swap.activate("chat-v0001")
    assert stack.aliases.get("chat") == "chat-v0001"
    assert "chat-v0001" not in second.loaded
    second.down = False
    second.loaded.clear()  # it restarted
    assert await swap.reconcile(swap.clients[1]) == ["chat-v0001"]
    assert "chat-v0001" in second.loaded
    assert await swap.reconcile(swap.clients[0]) == []
    first.down = second.down = True
    with pytest.raises(EngineUnavailable):
        await swap.activate("chat-v0002")
    assert stack.aliases.get("chat") == "chat-v0001"


async def test_a_refusing_engine_stops_the_swap(
    stack: Stack, pair: tuple[HotSwap, FakeVLLM, FakeVLLM]
) -> None:
    """An engine that answers but fails the probe: the alias stays, statuses unchanged."""
    swap, _, second = pair
    stack.add("chat-v0001")
    second.probe_status = 500
    with pytest.raises(AdapterRejected):
        await swap.activate("chat-v0001")
    assert stack.aliases.get("chat") == "chat-v0000"
    assert stack.statuses() == {"chat-v0000": "active", "chat-v0001": "candidate"}
