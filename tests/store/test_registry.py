"""The adapter registry: schema, version names, lineage, immutable folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from learner_fakes import adapter_folder, open_registry
from store_types import PG_TYPES

from store import (
    IncompleteAdapter,
    RegistryError,
    UnknownVersion,
)


def test_migration_adds_registry_and_runs_tables(store_url: str, tmp_path: Path) -> None:
    """An empty database gains the adapters and learner_runs tables with their key columns."""
    database, _ = open_registry(store_url)
    try:
        columns = database.call(
            lambda c: c.execute(
                "SELECT table_name, column_name, data_type FROM information_schema.columns "
                "WHERE table_name IN ('adapters', 'learner_runs')"
            ).fetchall()
        )
        names = database.call(lambda c: c.execute("SELECT name FROM _migrations").fetchall())
    finally:
        database.close()
    found = {(table, column): PG_TYPES.get(kind, kind) for table, column, kind in columns}
    assert ("m004_adapters",) in names
    assert found[("adapters", "status")] == "VARCHAR"
    assert found[("adapters", "gate_metrics")] == "JSON"
    assert found[("adapters", "snapshot_to")] == "TIMESTAMP"
    assert found[("adapters", "threshold")] == "DOUBLE"
    assert found[("learner_runs", "progress")] == "DOUBLE"
    assert found[("learner_runs", "log_path")] == "VARCHAR"
    assert found[("learner_runs", "settings")] == "JSON"


def test_next_version_never_reuses_a_name(store_url: str, tmp_path: Path) -> None:
    """Version numbers grow per alias and stay unique after a version is removed."""
    database, registry = open_registry(store_url)
    try:
        first = registry.next_version("chat")
        registry.register(first, adapter_folder(tmp_path, first))
        second = registry.next_version("chat")
        other = registry.next_version("support")
        registry.register(second, adapter_folder(tmp_path, second))
        registry.remove(second)
        third = registry.next_version("chat")
    finally:
        database.close()
    assert (first, second, other, third) == (
        "chat-v0000",
        "chat-v0001",
        "support-v0000",
        "chat-v0002",
    )
    assert not (tmp_path / second).exists()


def test_register_keeps_lineage_and_metrics(store_url: str, tmp_path: Path) -> None:
    """A registered row keeps parent, counts, judge, hyper-parameters and gate metrics."""
    database, registry = open_registry(store_url)
    try:
        record = registry.register(
            "chat-v0003",
            adapter_folder(tmp_path, "chat-v0003"),
            parent="chat-v0002",
            samples=100,
            flagged=7,
            healed=7,
            judge="embedding",
            threshold=0.5,
            hyperparameters={"lora_r": 8},
            gate_metrics={"toxicity": 0.1},
        )
        again = registry.get("chat-v0003")
    finally:
        database.close()
    assert record == again
    assert (again.alias, again.parent, again.status) == ("chat", "chat-v0002", "candidate")
    assert (again.samples, again.flagged, again.healed, again.judge) == (100, 7, 7, "embedding")
    assert again.hyperparameters == {"lora_r": 8}
    assert again.gate_metrics == {"toxicity": 0.1}
    assert again.to_json()["created_at"].endswith("Z")


def test_register_refuses_incomplete_folder_and_duplicates(store_url: str, tmp_path: Path) -> None:
    """A folder without the safetensors file, or a taken version name, is never registered."""
    folder = adapter_folder(tmp_path, "chat-v0001")
    (folder / "adapter_model.safetensors").unlink()
    database, registry = open_registry(store_url)
    try:
        with pytest.raises(IncompleteAdapter, match=r"adapter_model\.safetensors"):
            registry.register("chat-v0001", folder)
        registry.register("chat-v0002", adapter_folder(tmp_path, "chat-v0002"))
        with pytest.raises(RegistryError, match="already registered"):
            registry.register("chat-v0002", tmp_path / "chat-v0002")
        with pytest.raises(ValueError, match="chat-v0007"):
            registry.register("chat-7", tmp_path / "chat-v0002")
        with pytest.raises(UnknownVersion):
            registry.get("chat-v0001")
    finally:
        database.close()


def test_statuses_follow_activation(store_url: str, tmp_path: Path) -> None:
    """One active version per alias; a replaced one is retired (not a candidate again) and
    can be activated again; one never served stays a candidate."""
    database, registry = open_registry(store_url)
    try:
        for number in range(3):
            version = f"chat-v000{number}"
            registry.register(version, adapter_folder(tmp_path, version))
        registry.set_status("chat-v0000", "active")
        registry.set_status("chat-v0001", "active")
        active = registry.active("chat")
        statuses = {record.version: record.status for record in registry.list("chat")}
        registry.set_status("chat-v0000", "active")
        again = {record.version: record.status for record in registry.list("chat")}
        with pytest.raises(RegistryError, match="active"):
            registry.remove("chat-v0000")
        with pytest.raises(ValueError, match="status"):
            registry.set_status("chat-v0002", "live")  # type: ignore[arg-type]
    finally:
        database.close()
    assert active is not None and active.version == "chat-v0001"
    assert statuses == {
        "chat-v0000": "retired",
        "chat-v0001": "active",
        "chat-v0002": "candidate",
    }
    assert again == {
        "chat-v0000": "active",
        "chat-v0001": "retired",
        "chat-v0002": "candidate",
    }


def test_install_moves_a_complete_folder_into_place(store_url: str, tmp_path: Path) -> None:
    """install renames a finished build to adapters/<version> and registers it there."""
    built = adapter_folder(tmp_path / "scratch", "build-1")
    database, registry = open_registry(store_url)
    try:
        version = registry.next_version("chat")
        record = registry.install(built, tmp_path / "adapters", version, samples=5)
        broken = adapter_folder(tmp_path / "scratch", "build-2")
        (broken / "adapter_config.json").unlink()
        with pytest.raises(IncompleteAdapter):
            registry.install(broken, tmp_path / "adapters", registry.next_version("chat"))
    finally:
        database.close()
    assert Path(record.path) == (tmp_path / "adapters" / "chat-v0000").resolve()
    assert (Path(record.path) / "adapter_model.safetensors").is_file()
    assert not built.exists()
    assert not (tmp_path / "adapters" / "chat-v0001").exists()
    assert record.samples == 5
