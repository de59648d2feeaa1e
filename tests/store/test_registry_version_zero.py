"""The alias's version 0 in the registry: what the learner's gates check every candidate
against as well as the active version (on both backends)."""

from __future__ import annotations

from pathlib import Path

from store import AdapterRegistry, AliasStore, open_database


def test_version_zero_is_the_seed_of_the_alias_history(store_url: str, tmp_path: Path) -> None:
    """The registry's version 0 is the version the alias was seeded with, whatever was
    promoted or rolled back since; an alias never seeded falls back to its oldest version
    ever served; an unknown alias has none."""
    database = open_database(store_url)
    try:
        registry, aliases = AdapterRegistry(database), AliasStore(database)
        for number in range(3):
            folder = tmp_path / f"v{number}"
            folder.mkdir()
            (folder / "adapter_config.json").write_text("{}")
            (folder / "adapter_model.safetensors").write_text("{}")
            registry.register(f"chat-v000{number}", folder, status="candidate")
        aliases.seed({"chat": "chat-v0000"})
        registry.set_status("chat-v0000", "active")
        for version in ("chat-v0001", "chat-v0002"):
            aliases.set("chat", version, kind="promote")
            registry.set_status(version, "active")
        zero = registry.version_zero("chat")
        assert zero is not None and zero.version == "chat-v0000"
        assert zero.path == str((tmp_path / "v0").resolve())
        assert registry.version_zero("other") is None
        registry.register("solo-v0004", tmp_path / "v1", status="active")
        solo = registry.version_zero("solo")
        assert solo is not None and solo.version == "solo-v0004"
    finally:
        database.close()
