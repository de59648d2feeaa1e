"""DuckDB storage: schema migrations, API keys, model aliases, the dialog log.

DuckDB allows one read-write process per file, so the gateway process owns the
connection; other processes get Parquet exports (``DialogStore.export``), and the CLI
opens the file only while no gateway runs (``open_database`` says so when it cannot).

The schema grows by numbered, forward-only migrations recorded in ``_migrations``;
``migrate`` is re-runnable and applies only the missing ones, each in one transaction.
Later packages append their own (the learner's adapter registry) to ``MIGRATIONS``.
Timestamps are naive UTC.

One lock serialises every use of the connection: the dialog writer flushes from a worker
thread while admin routes run theirs, and DuckDB connections are not thread-safe.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import duckdb

if TYPE_CHECKING:
    import pyarrow as pa

T = TypeVar("T")
# Exports read a DB-API result as Arrow, which DuckDB 2.0 warns copies the rows once. The
# relation form it suggests (con.sql) left an unfinished result on the shared connection
# (snapshot tests failed); the copy of an export's rows is the cheaper problem.
warnings.filterwarnings("ignore", message="Arrow output on a DB-API result", category=UserWarning)


class DatabaseBusyError(RuntimeError):
    """The DuckDB file is held by another process (a running gateway)."""


def utcnow() -> datetime:
    """Naive UTC now, the form every timestamp column stores."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class Migration:
    """One forward-only schema step."""

    name: str
    statements: tuple[str, ...]


MIGRATIONS: list[Migration] = [
    Migration(
        "m001_dialogs",
        (
            """CREATE TABLE turns (
                turn_id VARCHAR PRIMARY KEY,
                conversation_id VARCHAR NOT NULL,
                key_id VARCHAR NOT NULL,
                created_at TIMESTAMP NOT NULL,
                alias VARCHAR NOT NULL,
                adapter VARCHAR,
                request_messages JSON NOT NULL,
                reply VARCHAR NOT NULL,
                finish_reason VARCHAR,
                prompt_tokens INTEGER,
                completion_tokens INTEGER,
                latency_ms DOUBLE NOT NULL,
                ttft_ms DOUBLE,
                stream BOOLEAN NOT NULL,
                guard_score DOUBLE,
                guard_flag BOOLEAN NOT NULL,
                opt_out BOOLEAN NOT NULL
            )""",
            """CREATE VIEW conversations AS
                SELECT conversation_id, any_value(key_id) AS key_id,
                       min(created_at) AS started_at, max(created_at) AS last_turn_at,
                       count(*) AS turns, bool_or(opt_out) AS opt_out
                FROM turns GROUP BY conversation_id""",
        ),
    ),
    Migration(
        "m002_keys",
        (
            """CREATE TABLE api_keys (
                key_id VARCHAR PRIMARY KEY,
                name VARCHAR NOT NULL,
                key_hash VARCHAR NOT NULL UNIQUE,
                key_prefix VARCHAR NOT NULL,
                role VARCHAR NOT NULL CHECK (role IN ('user', 'admin')),
                opt_out BOOLEAN NOT NULL,
                rate_limit_per_minute DOUBLE,
                created_at TIMESTAMP NOT NULL,
                revoked_at TIMESTAMP
            )""",
        ),
    ),
    Migration(
        "m003_aliases",
        (
            """CREATE TABLE aliases (
                alias VARCHAR PRIMARY KEY,
                adapter VARCHAR NOT NULL,
                public BOOLEAN NOT NULL,
                updated_at TIMESTAMP NOT NULL
            )""",
            """CREATE TABLE alias_history (
                alias VARCHAR NOT NULL,
                adapter VARCHAR NOT NULL,
                previous_adapter VARCHAR,
                changed_at TIMESTAMP NOT NULL
            )""",
        ),
    ),
]


class Database:
    """The one DuckDB connection of a process, behind a lock."""

    def __init__(self, connection: duckdb.DuckDBPyConnection) -> None:
        self._connection = connection
        self._lock = threading.Lock()

    def call(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run ``fn(connection)`` under the lock (blocking; use a thread from async code)."""
        with self._lock:
            return fn(self._connection)

    def transaction(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run ``fn(connection)`` in one transaction: all of it or none."""

        def run(connection: duckdb.DuckDBPyConnection) -> T:
            connection.execute("BEGIN TRANSACTION")
            try:
                result = fn(connection)
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
            return result

        return self.call(run)

    def close(self) -> None:
        """Close the connection (the file lock is released)."""
        with self._lock:
            self._connection.close()


def migrate(database: Database, migrations: Sequence[Migration] = MIGRATIONS) -> list[str]:
    """Apply the migrations not yet recorded; return the names applied now."""
    database.call(
        lambda c: c.execute(
            "CREATE TABLE IF NOT EXISTS _migrations "
            "(name VARCHAR PRIMARY KEY, applied_at TIMESTAMP NOT NULL)"
        )
    )
    done = {
        row[0]
        for row in database.call(lambda c: c.execute("SELECT name FROM _migrations").fetchall())
    }
    applied = []
    for migration in migrations:
        if migration.name in done:
            continue

        def apply(connection: duckdb.DuckDBPyConnection, step: Migration = migration) -> None:
            for statement in step.statements:
                connection.execute(statement)
            connection.execute("INSERT INTO _migrations VALUES (?, ?)", [step.name, utcnow()])

        database.transaction(apply)
        applied.append(migration.name)
    return applied


def open_database(path: Path | str) -> Database:
    """Open (creating if needed) and migrate the DuckDB file at ``path``."""
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        connection = duckdb.connect(str(path))
    except duckdb.IOException as error:
        raise DatabaseBusyError(
            f"cannot open {path}: {error}. DuckDB allows one writing process: stop the "
            "gateway first, or use its /admin API instead."
        ) from None
    database = Database(connection)
    migrate(database)
    return database


# -- API keys -------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiKeyRecord:
    """An API key as stored: never the key itself, only its SHA-256."""

    key_id: str
    name: str
    key_hash: str
    key_prefix: str
    role: str
    opt_out: bool
    rate_limit_per_minute: float | None
    created_at: datetime
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        """Whether the key was revoked."""
        return self.revoked_at is not None


_KEY_COLUMNS = ", ".join(field.name for field in fields(ApiKeyRecord))


class KeyStore:
    """API key rows, cached in memory by hash (keys change only through this object)."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._by_hash = {record.key_hash: record for record in self.list()}

    def list(self) -> list[ApiKeyRecord]:
        """Every key, oldest first."""
        rows = self._database.call(
            lambda c: c.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY created_at"
            ).fetchall()
        )
        return [ApiKeyRecord(*row) for row in rows]

    def by_hash(self, key_hash: str) -> ApiKeyRecord | None:
        """The key with this hash, revoked or not (from memory: no database hit)."""
        return self._by_hash.get(key_hash)

    def add(self, record: ApiKeyRecord) -> None:
        """Store a new key."""
        values = [getattr(record, field.name) for field in fields(ApiKeyRecord)]
        marks = ", ".join("?" for _ in values)
        self._database.call(
            lambda c: c.execute(f"INSERT INTO api_keys ({_KEY_COLUMNS}) VALUES ({marks})", values)
        )
        self._by_hash[record.key_hash] = record

    def revoke(self, key_id: str) -> ApiKeyRecord | None:
        """Revoke a key (idempotent); None when no key has this id."""
        now = utcnow()

        def run(connection: duckdb.DuckDBPyConnection) -> Any:
            connection.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                [now, key_id],
            )
            return connection.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_id = ?", [key_id]
            ).fetchone()

        row = self._database.transaction(run)
        if row is None:
            return None
        record = ApiKeyRecord(*row)
        self._by_hash[record.key_hash] = record
        return record


# -- Aliases --------------------------------------------------------------------------


@dataclass(frozen=True)
class AliasRecord:
    """A public model name and the adapter version it serves."""

    alias: str
    adapter: str
    public: bool
    updated_at: datetime


class AliasStore:
    """Public model alias → active adapter; ``set`` flips it atomically.

    Reads come from memory (one dict lookup per request); the dict entry is replaced only
    after the database transaction committed, so a reader sees the old or the new
    adapter, never a half-done change.
    """

    def __init__(self, database: Database) -> None:
        self._database = database
        self._aliases = {record.alias: record for record in self._load()}

    def _load(self) -> list[AliasRecord]:
        rows = self._database.call(
            lambda c: c.execute(
                "SELECT alias, adapter, public, updated_at FROM aliases ORDER BY alias"
            ).fetchall()
        )
        return [AliasRecord(*row) for row in rows]

    def get(self, alias: str) -> str | None:
        """The adapter an alias serves, or None for an unknown alias."""
        record = self._aliases.get(alias)
        return None if record is None else record.adapter

    def record(self, alias: str) -> AliasRecord | None:
        """The full record of an alias, or None."""
        return self._aliases.get(alias)

    def list(self) -> list[AliasRecord]:
        """Every alias, sorted by name."""
        return sorted(self._aliases.values(), key=lambda record: record.alias)

    def set(self, alias: str, adapter: str, *, public: bool = True) -> AliasRecord:
        """Point ``alias`` at ``adapter`` (creating it), recording the change in history."""
        if not alias or not adapter:
            raise ValueError(f"alias and adapter must not be empty, got {alias!r} → {adapter!r}")
        now = utcnow()
        previous = self._aliases.get(alias)

        def run(connection: duckdb.DuckDBPyConnection) -> None:
            connection.execute(
                "INSERT INTO aliases VALUES (?, ?, ?, ?) ON CONFLICT (alias) DO UPDATE SET "
                "adapter = excluded.adapter, public = excluded.public, "
                "updated_at = excluded.updated_at",
                [alias, adapter, public, now],
            )
            connection.execute(
                "INSERT INTO alias_history VALUES (?, ?, ?, ?)",
                [alias, adapter, None if previous is None else previous.adapter, now],
            )

        self._database.transaction(run)
        record = AliasRecord(alias, adapter, public, now)
        self._aliases[alias] = record
        return record

    def seed(self, aliases: dict[str, str]) -> None:
        """Create the aliases that do not exist yet; existing ones keep their adapter."""
        for alias, adapter in aliases.items():
            if alias not in self._aliases:
                self.set(alias, adapter)


# -- Dialog log -----------------------------------------------------------------------


@dataclass(frozen=True)
class TurnRecord:
    """One answered (or partly answered) chat turn, as logged."""

    turn_id: str
    conversation_id: str
    key_id: str
    created_at: datetime
    alias: str
    adapter: str | None
    request_messages: str
    reply: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: float
    ttft_ms: float | None
    stream: bool
    guard_score: float | None
    guard_flag: bool
    opt_out: bool


TURN_COLUMNS = tuple(field.name for field in fields(TurnRecord))


class DialogStore:
    """The ``turns`` table: batch inserts, deletion, Parquet export."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def prepare(self) -> None:
        """Load what the first insert needs, before the gateway serves.

        pyarrow imports pandas on its first array: about a second (and the GIL) taken
        from the event loop when that happens in the first flush under load.
        """
        import pyarrow as pa

        pa.array([0])

    def insert(self, turns: Iterable[TurnRecord]) -> int:
        """Insert turns in one transaction (one Arrow batch, not row by row)."""
        import pyarrow as pa

        batch = list(turns)
        if not batch:
            return 0
        columns = {name: [getattr(turn, name) for turn in batch] for name in TURN_COLUMNS}
        table = pa.table(columns)

        def run(connection: duckdb.DuckDBPyConnection) -> None:
            connection.register("_turn_batch", table)
            try:
                connection.execute(
                    f"INSERT INTO turns ({', '.join(TURN_COLUMNS)}) "
                    f"SELECT {', '.join(TURN_COLUMNS)} FROM _turn_batch"
                )
            finally:
                connection.unregister("_turn_batch")

        self._database.transaction(run)
        return len(batch)

    def delete(self, *, key_id: str | None = None, conversation_id: str | None = None) -> int:
        """Delete the turns of one key, one conversation, or (both given) that key's turns
        in that conversation; return how many went."""
        filters = [(c, v) for c, v in (("key_id", key_id), ("conversation_id", conversation_id))]
        given = [(column, value) for column, value in filters if value is not None]
        if not given:
            raise ValueError("give key_id or conversation_id (or both)")
        where = " AND ".join(f"{column} = ?" for column, _ in given)
        values = [value for _, value in given]

        def run(connection: duckdb.DuckDBPyConnection) -> int:
            row = connection.execute(f"SELECT count(*) FROM turns WHERE {where}", values).fetchone()
            connection.execute(f"DELETE FROM turns WHERE {where}", values)
            return int(row[0]) if row else 0

        return self._database.transaction(run)

    def count(self) -> int:
        """Number of logged turns."""
        row = self._database.call(lambda c: c.execute("SELECT count(*) FROM turns").fetchone())
        return int(row[0]) if row else 0

    def export_table(
        self,
        *,
        since: datetime | None = None,
        include_opt_out: bool = False,
        conversation_ids: Sequence[str] | None = None,
    ) -> pa.Table:
        """Turns (oldest first) as an Arrow table: newer than ``since``, of
        ``conversation_ids`` only when given.

        Opted-out turns and turns of opted-out keys are left out unless asked for, since
        exports feed training.
        """
        where = ["TRUE"]
        params: list[Any] = []
        if since is not None:
            where.append("t.created_at > ?")
            params.append(since)
        if conversation_ids is not None:
            where.append("list_contains(?, t.conversation_id)")
            params.append(list(conversation_ids))
        if not include_opt_out:
            where.append("NOT t.opt_out AND NOT coalesce(k.opt_out, FALSE)")
        query = (
            "SELECT t.* FROM turns t LEFT JOIN api_keys k USING (key_id) "
            f"WHERE {' AND '.join(where)} ORDER BY t.created_at"
        )

        def run(connection: duckdb.DuckDBPyConnection) -> pa.Table:
            table = connection.execute(query, params).to_arrow_table()
            if table is None:
                raise RuntimeError("DuckDB returned no result for the export query")
            return table

        return self._database.call(run)

    def export_parquet(
        self, *, conversation_ids: Sequence[str] | None = None, include_opt_out: bool = False
    ) -> bytes:
        """``export_table``'s turns of ``conversation_ids`` as the bytes of a Parquet file."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = self.export_table(
            conversation_ids=conversation_ids, include_opt_out=include_opt_out
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return bytes(sink.getvalue().to_pybytes())

    def export(
        self, path: Path, *, since: datetime | None = None, include_opt_out: bool = False
    ) -> int:
        """Write ``export_table``'s turns to a Parquet file; return the number of rows."""
        import pyarrow.parquet as pq

        path.parent.mkdir(parents=True, exist_ok=True)
        table = self.export_table(since=since, include_opt_out=include_opt_out)
        pq.write_table(table, str(path))
        return int(table.num_rows)
