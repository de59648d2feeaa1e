"""An alias's history: flips with their kind and actor, the promotion chain a rollback
steps back through, and the migration that gave old histories their kinds."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from learner_fakes import adapter_folder

from store import (
    MIGRATIONS,
    AdapterRegistry,
    AliasStore,
    Connection,
    connect,
    migrate,
    open_database,
    utcnow,
)

M007 = "m007_alias_history_kind"


def test_promotion_chain_steps_back_and_skips_what_was_rolled_back_from(store_url: str) -> None:
    """Promotes push, a rollback pops: after v0→v1→v2, rolling back to v1 and promoting v3,
    the step back from v3 is v1 (never v2), and from v1 it is v0."""
    database = open_database(store_url)
    try:
        aliases = AliasStore(database)
        aliases.seed({"chat": "chat-v0"})
        chains = []
        for adapter, kind in [
            ("chat-v1", "promote"),
            ("chat-v2", "promote"),
            ("chat-v1", "rollback"),
            ("chat-v3", "promote"),
            ("chat-v1", "rollback"),
            ("chat-v0", "rollback"),
        ]:
            aliases.set("chat", adapter, kind=kind)  # type: ignore[arg-type]
            chains.append(aliases.promotion_chain("chat"))
        unknown = aliases.promotion_chain("support")
    finally:
        database.close()
    assert chains == [
        ["chat-v0", "chat-v1"],
        ["chat-v0", "chat-v1", "chat-v2"],
        ["chat-v0", "chat-v1"],
        ["chat-v0", "chat-v1", "chat-v3"],
        ["chat-v0", "chat-v1"],
        ["chat-v0"],
    ]
    assert unknown == []


def test_rollback_to_a_named_step_goes_back_to_its_nearest_entry(store_url: str) -> None:
    """A rollback to an earlier step drops every step after its nearest entry; a version
    promoted again is a new step of its own."""
    database = open_database(store_url)
    try:
        aliases = AliasStore(database)
        aliases.seed({"chat": "chat-v0"})
        for adapter in ("chat-v1", "chat-v0", "chat-v2", "chat-v3"):
            aliases.set("chat", adapter, kind="promote")
        aliases.set("chat", "chat-v0", kind="rollback")
        chain = aliases.promotion_chain("chat")
    finally:
        database.close()
    assert chain == ["chat-v0", "chat-v1", "chat-v0"]


def test_history_lists_flips_newest_first_with_kind_and_actor(store_url: str) -> None:
    """history answers the alias's own flips, newest first, with who made them; limit keeps
    the newest."""
    database = open_database(store_url)
    try:
        aliases = AliasStore(database)
        aliases.seed({"chat": "chat-v0", "support": "support-v0"})
        aliases.set("chat", "chat-v1", kind="promote", actor="key_ops")
        aliases.set("chat", "chat-v0", kind="rollback", actor="key_ops")
        history = aliases.history("chat")
        newest = aliases.history("chat", limit=1)
    finally:
        database.close()
    assert [(c.adapter, c.previous_adapter, c.kind, c.actor) for c in history] == [
        ("chat-v0", "chat-v1", "rollback", "key_ops"),
        ("chat-v1", "chat-v0", "promote", "key_ops"),
        ("chat-v0", None, "seed", None),
    ]
    assert history[0].changed_at > history[1].changed_at > history[2].changed_at
    assert newest == history[:1]


def test_m007_gives_old_flips_a_kind_and_retires_replaced_versions(
    store_url: str, tmp_path: Path
) -> None:
    """A database migrated before m007 keeps its history: the first flip becomes a seed,
    the others promotes; a version that served and was replaced is retired, one that never
    served stays a candidate."""
    database = connect(store_url)
    try:
        migrate(database, MIGRATIONS[: [m.name for m in MIGRATIONS].index(M007)])
        registry = AdapterRegistry(database)
        for version in ("chat-v0000", "chat-v0001", "chat-v0002"):
            registry.register(version, adapter_folder(tmp_path, version))
        start = utcnow()
        flips = [("chat-v0000", None), ("chat-v0001", "chat-v0000")]

        def old_release(connection: Connection) -> None:
            for minutes, (adapter, previous) in enumerate(flips):
                connection.execute(
                    "INSERT INTO alias_history VALUES (?, ?, ?, ?)",
                    ["chat", adapter, previous, start + timedelta(minutes=minutes)],
                )
            # As releases before m007 left a replaced version: a candidate again.
            connection.execute(
                "UPDATE adapters SET activated_at = ? WHERE version IN (?, ?)",
                [start, "chat-v0000", "chat-v0001"],
            )
            connection.execute(
                "UPDATE adapters SET status = 'active' WHERE version = ?", ["chat-v0001"]
            )

        database.transaction(old_release)
        applied = migrate(database)
        history = AliasStore(database).history("chat")
        statuses = {record.version: record.status for record in registry.list("chat")}
    finally:
        database.close()
    assert M007 in applied
    assert [(change.adapter, change.kind, change.actor) for change in history] == [
        ("chat-v0001", "promote", None),
        ("chat-v0000", "seed", None),
    ]
    assert statuses == {
        "chat-v0000": "retired",
        "chat-v0001": "active",
        "chat-v0002": "candidate",
    }
