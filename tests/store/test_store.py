"""Schema migrations and the stores, on both backends."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from store_types import PG_TYPES

from gateway.auth import create_key
from store import (
    MIGRATIONS,
    TURN_COLUMNS,
    AliasStore,
    Connection,
    DialogStore,
    KeyStore,
    TurnRecord,
    connect,
    migrate,
    open_database,
    utcnow,
)


def _columns(connection: Connection, table: str) -> dict[str, str]:
    rows = connection.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_name = ? AND table_schema NOT IN ('pg_catalog', 'information_schema') "
        "ORDER BY ordinal_position",
        [table],
    ).fetchall()
    return {name: PG_TYPES.get(kind, kind) for name, kind in rows}


def test_migrations_build_the_expected_schema_and_rerun_as_noop(store_url: str) -> None:
    """An empty DB migrates to the documented tables and types; a second run applies nothing."""
    database = open_database(store_url)
    try:
        assert migrate(database) == []
        schema = database.call(
            lambda c: {
                t: _columns(c, t)
                for t in ("turns", "api_keys", "aliases", "alias_history", "rate_buckets")
            }
        )
        names = database.call(
            lambda c: c.execute("SELECT name FROM _migrations ORDER BY name").fetchall()
        )
    finally:
        database.close()
    assert [row[0] for row in names] == [m.name for m in MIGRATIONS]
    assert schema["turns"] == {
        "turn_id": "VARCHAR",
        "conversation_id": "VARCHAR",
        "key_id": "VARCHAR",
        "created_at": "TIMESTAMP",
        "alias": "VARCHAR",
        "adapter": "VARCHAR",
        "request_messages": "JSON",
        "reply": "VARCHAR",
        "finish_reason": "VARCHAR",
        "prompt_tokens": "INTEGER",
        "completion_tokens": "INTEGER",
        "latency_ms": "DOUBLE",
        "ttft_ms": "DOUBLE",
        "stream": "BOOLEAN",
        "guard_score": "DOUBLE",
        "guard_flag": "BOOLEAN",
        "opt_out": "BOOLEAN",
        "engine": "VARCHAR",
        "delivered": "BOOLEAN",
        "end_user": "VARCHAR",
    }
    assert schema["api_keys"] == {
        "key_id": "VARCHAR",
        "name": "VARCHAR",
        "key_hash": "VARCHAR",
        "key_prefix": "VARCHAR",
        "role": "VARCHAR",
        "opt_out": "BOOLEAN",
        "rate_limit_per_minute": "DOUBLE",
        "created_at": "TIMESTAMP",
        "revoked_at": "TIMESTAMP",
    }
    assert schema["aliases"] == {
        "alias": "VARCHAR",
        "adapter": "VARCHAR",
        "public": "BOOLEAN",
        "updated_at": "TIMESTAMP",
    }
    assert schema["alias_history"] == {
        "alias": "VARCHAR",
        "adapter": "VARCHAR",
        "previous_adapter": "VARCHAR",
        "changed_at": "TIMESTAMP",
        "kind": "VARCHAR",
        "actor": "VARCHAR",
    }
    assert schema["rate_buckets"] == {
        "bucket": "VARCHAR",
        "tokens": "DOUBLE",
        "capacity": "DOUBLE",
        "rate_per_s": "DOUBLE",
        "refilled_at": "DOUBLE",
        "taken": "DOUBLE",
    }


def test_alias_set_is_recorded_with_history(store_url: str) -> None:
    """AliasStore.set flips the adapter and records the previous one, the kind and the
    actor; get reads the new one; a seed of an existing alias or a set to the adapter it
    already serves records nothing."""
    database = open_database(store_url)
    try:
        aliases = AliasStore(database)
        aliases.seed({"chat": "chat-v0000"})
        aliases.set("chat", "chat-v0001", kind="promote", actor="key_admin")
        aliases.seed({"chat": "chat-v0000"})
        aliases.set("chat", "chat-v0001", public=False)
        history = database.call(
            lambda c: c.execute(
                "SELECT adapter, previous_adapter, kind, actor FROM alias_history "
                "ORDER BY changed_at"
            ).fetchall()
        )
        assert aliases.get("chat") == "chat-v0001"
        assert AliasStore(database).get("chat") == "chat-v0001"
    finally:
        database.close()
    assert history == [
        ("chat-v0000", None, "seed", None),
        ("chat-v0001", "chat-v0000", "promote", "key_admin"),
    ]


def _turn(turn_id: str, key_id: str, *, opt_out: bool = False) -> TurnRecord:
    return TurnRecord(
        turn_id=turn_id,
        conversation_id="conv-" + turn_id,
        key_id=key_id,
        created_at=utcnow(),
        alias="chat",
        adapter="chat-v0000",
        request_messages='[{"role": "user", "content": "hi"}]',
        reply="hello",
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=1,
        latency_ms=1.0,
        ttft_ms=None,
        stream=False,
        guard_score=None,
        guard_flag=False,
        opt_out=opt_out,
    )


def test_export_leaves_out_opted_out_turns_and_keys(store_url: str, tmp_path: Path) -> None:
    """Parquet exports skip opted-out turns and every turn of an opted-out key."""
    database = open_database(store_url)
    try:
        keys = KeyStore(database)
        quiet = create_key(keys, "quiet", opt_out=True).record.key_id
        dialogs = DialogStore(database)
        dialogs.insert([_turn("a", "k1"), _turn("b", "k1", opt_out=True), _turn("c", quiet)])
        out = tmp_path / "export.parquet"
        assert dialogs.export(out) == 1
        exported = pq.read_table(out).to_pylist()
        assert dialogs.export(tmp_path / "all.parquet", include_opt_out=True) == 3
    finally:
        database.close()
    assert [row["turn_id"] for row in exported] == ["a"]
    assert exported[0]["reply"] == "hello"


def test_an_export_prints_no_warning_even_with_warnings_as_errors(tmp_path: Path) -> None:
    """DuckDB's Arrow-copy warning on exports does not reach users (the demo's output)."""
    script = (
        "import sys; from pathlib import Path; from store import DialogStore, open_database\n"
        "database = open_database(Path(sys.argv[1]))\n"
        "print(DialogStore(database).export_table(conversation_ids=['a']).num_rows)\n"
        "database.close()\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", script, str(tmp_path / "g.duckdb")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "0" and "Warning" not in done.stderr


def test_inserting_a_batch_again_adds_nothing(postgres_database_url: str) -> None:
    """On a server, a dialog-log retry whose first commit did land (its answer lost with
    the connection) stores each turn once, no error."""
    database = open_database(postgres_database_url)
    try:
        dialogs = DialogStore(database)
        dialogs.insert([_turn("a", "k1"), _turn("b", "k1")])
        dialogs.insert([_turn("a", "k1"), _turn("b", "k1"), _turn("c", "k1")])
        assert dialogs.count() == 3
    finally:
        database.close()


def test_turns_logged_before_m010_count_as_delivered(store_url: str) -> None:
    """A turn stored before delivery was recorded reads as delivered with no end user,
    unless it is a stream cut short; a turn logged since keeps both, through an export,
    on both backends."""
    database = connect(store_url)
    try:
        names = [migration.name for migration in MIGRATIONS]
        migrate(database, MIGRATIONS[: names.index("m010_turn_delivery")])
        old = _turn("old", "k1")
        cut = dataclasses.replace(_turn("cut", "k1"), finish_reason="client_disconnected")
        columns = [name for name in TURN_COLUMNS if name not in ("delivered", "end_user")]
        rows = [[getattr(turn, name) for name in columns] for turn in (old, cut)]
        database.insert_rows("turns", columns, rows)
        assert "m010_turn_delivery" in migrate(database)
        dialogs = DialogStore(database)
        dialogs.insert([dataclasses.replace(_turn("new", "k1"), delivered=False, end_user="u-1")])
        rows = dialogs.export_table().to_pylist()
    finally:
        database.close()
    assert [(row["turn_id"], row["delivered"], row["end_user"]) for row in rows] == [
        ("old", True, None),
        ("cut", False, None),
        ("new", False, "u-1"),
    ]
