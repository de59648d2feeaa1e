"""The two backends behind one ``Database``: a DuckDB file or a PostgreSQL server.

Every store class (keys, aliases, turns, registry, runs, audit) is written once against
``Database.call``/``Database.transaction``, whose callback gets a ``Connection`` with
DuckDB's DB-API shape: ``execute(sql, params)`` with ``?`` placeholders, returning
something with ``fetchone``/``fetchall``. The PostgreSQL connection translates the
placeholders; what really differs between the two (bulk inserts, Arrow results, DDL
types) is a method of the backend, not a branch in the stores.

- **DuckDB** allows one read-write process per file: the process that opens it owns it,
  and one lock serialises every use of its one connection (DuckDB connections are not
  thread-safe; the dialog writer and the admin routes call from worker threads).
- **PostgreSQL** (psycopg 3 with a pool) serves any number of gateway and learner
  processes. Each ``call`` borrows a pooled connection and is one transaction.

Timestamps are naive UTC in both.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

    from store._settings import StoreConfig

T = TypeVar("T")
# Exports read a DB-API result as Arrow, which DuckDB 2.0 warns copies the rows once. The
# relation form it suggests (con.sql) left an unfinished result on the shared connection
# (snapshot tests failed); the copy of an export's rows is the cheaper problem.
warnings.filterwarnings("ignore", message="Arrow output on a DB-API result", category=UserWarning)
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# The leader lock's own connection: a dead peer or server is noticed within ~15 s.
DEDICATED_CONNECT_TIMEOUT_S = 10
KEEPALIVE_IDLE_S = 5
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_COUNT = 3
DEDICATED_STATEMENT_TIMEOUT_MS = 10_000
DUCKDB_SCHEME = "duckdb:///"


class DatabaseBusyError(RuntimeError):
    """The DuckDB file is held by another process (a running gateway or learner)."""


class DatabaseUnavailableError(RuntimeError):
    """The database server cannot be reached or refused the connection."""


def utcnow() -> datetime:
    """Naive UTC now, the form every timestamp column stores."""
    return datetime.now(UTC).replace(tzinfo=None)


class Cursor(Protocol):
    """What a store reads back from ``execute``."""

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """The part of a DB-API connection the stores use (``?`` placeholders)."""

    def execute(self, query: str, parameters: Sequence[Any] | None = None, /) -> Cursor: ...


class Database(ABC):
    """One store's connection(s), whichever the backend."""

    backend: str
    """``duckdb`` or ``postgresql``."""
    multi_process: bool
    """Whether other processes may write at the same time (caches must then be refreshed)."""

    @abstractmethod
    def call(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(connection)`` (blocking; use a thread from async code)."""

    @abstractmethod
    def transaction(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(connection)`` in one transaction: all of it or none."""

    @abstractmethod
    def insert_rows(
        self,
        table: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        *,
        skip_existing: str | None = None,
    ) -> int:
        """Insert many rows in one transaction (one batch, not row by row).

        ``skip_existing`` (a unique column) makes a retry safe where a commit can land
        without its caller learning so (a server's answer lost with the connection): rows
        already stored are then left as they are.
        """

    @abstractmethod
    def query_arrow(self, query: str, parameters: Sequence[Any], schema: pa.Schema) -> pa.Table:
        """A query's rows as an Arrow table of ``schema``."""

    @abstractmethod
    def ddl(self, statement: str) -> str:
        """A migration statement (written in DuckDB's dialect) in this backend's dialect."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection(s)."""

    def compact(self) -> bool:
        """Rewrite the store's file without the bytes of deleted rows (a deletion that
        must reach the disk); return whether this backend did. Only an embedded file
        needs it: a server's storage is the server's."""
        return False


# -- DuckDB ---------------------------------------------------------------------------


class DuckDBDatabase(Database):
    """The one DuckDB connection of a process, behind a lock."""

    backend = "duckdb"
    multi_process = False

    def __init__(self, path: Path | str) -> None:
        import duckdb

        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._connection: duckdb.DuckDBPyConnection | None = duckdb.connect(self.path)
        except duckdb.IOException as error:
            raise DatabaseBusyError(
                f"cannot open {self.path}: {error}. DuckDB allows one writing process: stop "
                "the server first, use its /admin API, or run the roles on PostgreSQL."
            ) from None
        self._lock = threading.Lock()

    @property
    def _live(self) -> duckdb.DuckDBPyConnection:
        """The open connection; DuckDB's own error once ``close`` has run."""
        import duckdb

        if self._connection is None:
            raise duckdb.ConnectionException("Connection already closed!")
        return self._connection

    def call(self, fn: Callable[[Connection], T]) -> T:
        with self._lock:
            return fn(self._live)

    def transaction(self, fn: Callable[[Connection], T]) -> T:
        def run(connection: Connection) -> T:
            connection.execute("BEGIN TRANSACTION")
            try:
                result = fn(connection)
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
            return result

        return self.call(run)

    def insert_rows(
        self,
        table: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        *,
        skip_existing: str | None = None,
    ) -> int:
        import pyarrow as pa

        # skip_existing is not needed here: an in-process commit either returns or raises
        # (nothing stored), so a retry never meets its own rows, and DuckDB's conflict check
        # would cost every commit ~2.4 ms (measured on the turns table).
        if not rows:
            return 0
        names = ", ".join(columns)
        if len(rows) == 1:
            # One row: a plain VALUES insert costs half of an Arrow batch's registration.
            marks = ", ".join("?" for _ in columns)
            self.transaction(
                lambda c: c.execute(f"INSERT INTO {table} ({names}) VALUES ({marks})", rows[0])
            )
            return 1
        # One Arrow batch: DuckDB inserts it in one statement, not row by row.
        batch = pa.table({name: [row[i] for row in rows] for i, name in enumerate(columns)})

        def run(connection: Connection) -> None:
            self._live.register("_insert_batch", batch)
            try:
                connection.execute(
                    f"INSERT INTO {table} ({names}) SELECT {names} FROM _insert_batch"
                )
            finally:
                self._live.unregister("_insert_batch")

        self.transaction(run)
        return len(rows)

    def query_arrow(self, query: str, parameters: Sequence[Any], schema: pa.Schema) -> pa.Table:
        def run(connection: Connection) -> pa.Table:
            table = self._live.execute(query, list(parameters)).to_arrow_table()
            if table is None:
                raise RuntimeError("DuckDB returned no result")
            return table.cast(schema)

        return self.call(run)

    def ddl(self, statement: str) -> str:
        return statement

    def compact(self) -> bool:
        """Copy the database into a fresh file and put that in its place.

        DuckDB keeps a deleted row's bytes in its file: a checkpoint reclaims only part of
        the space, VACUUM none, and freed blocks are reused, not zeroed. Its documented way
        to compact ("Reclaiming space", operations manual) is ``COPY FROM DATABASE`` into a
        new file, done here under the connection's lock (every other call waits), then
        the new file replaces the old one and the connection reopens on it.
        """
        import duckdb

        if self.path == ":memory:":
            return False
        target = f"{self.path}.compact"
        Path(target).unlink(missing_ok=True)
        with self._lock:
            connection = self._live
            name = connection.execute("SELECT current_database()").fetchone()
            assert name is not None
            quoted = target.replace("'", "''")
            connection.execute(f"ATTACH '{quoted}' AS compact_target")
            try:
                source = str(name[0]).replace('"', '""')
                connection.execute(f'COPY FROM DATABASE "{source}" TO compact_target')
            finally:
                connection.execute("DETACH compact_target")
            connection.close()
            self._connection = None
            os.replace(target, self.path)
            Path(f"{self.path}.wal").unlink(missing_ok=True)
            self._connection = duckdb.connect(self.path)
        return True

    def close(self) -> None:
        # Dropped, not only closed: a closed connection object that is still referenced at
        # interpreter exit (by a daemon thread's frame, say) keeps DuckDB's nanobind module
        # alive, and nanobind then prints every DuckDB type and function as "leaked".
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


# -- PostgreSQL -----------------------------------------------------------------------

# Type names of DuckDB's DDL that PostgreSQL spells otherwise; any_value() is PG 16+ only.
_PG_DDL = ((re.compile(r"\bDOUBLE\b(?! PRECISION)"), "DOUBLE PRECISION"),
           (re.compile(r"\bany_value\("), "min("))  # fmt: skip


def to_pyformat(query: str) -> str:
    """``?`` placeholders as psycopg's ``%s``, outside quoted literals; ``%`` escaped."""
    parts = query.split("'")
    for index in range(0, len(parts), 2):  # even parts are outside quotes
        parts[index] = parts[index].replace("%", "%%").replace("?", "%s")
    return "'".join(parts)


class _PostgresConnection:
    """A psycopg connection that takes DuckDB-style ``?`` queries."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    def execute(self, query: str, parameters: Sequence[Any] | None = None, /) -> Cursor:
        return self._connection.execute(to_pyformat(query), parameters)


class PostgresDatabase(Database):
    """A psycopg 3 connection pool; every ``call`` is one transaction on one connection."""

    backend = "postgresql"
    multi_process = True

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 8, timeout_s: float = 30.0):
        import psycopg
        from psycopg.types.string import TextLoader
        from psycopg_pool import ConnectionPool

        self.url = url

        def configure(connection: psycopg.Connection[Any]) -> None:
            # JSON columns come back as their text, as DuckDB returns them.
            connection.adapters.register_loader("json", TextLoader)

        self._pool = ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout_s,
            configure=configure,
            open=False,
            name="tuneshield-store",
        )
        try:
            self._pool.open(wait=True, timeout=timeout_s)
        except Exception as error:
            self._pool.close()
            raise DatabaseUnavailableError(
                f"cannot connect to PostgreSQL at {redact(url)}: {error}"
            ) from None

    def call(self, fn: Callable[[Connection], T]) -> T:
        with self._pool.connection() as connection:
            return fn(_PostgresConnection(connection))

    def transaction(self, fn: Callable[[Connection], T]) -> T:
        # A pooled connection's block commits on success and rolls back on an exception.
        return self.call(fn)

    def insert_rows(
        self,
        table: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        *,
        skip_existing: str | None = None,
    ) -> int:
        if not rows:
            return 0
        names = ", ".join(columns)
        marks = ", ".join("%s" for _ in columns)
        conflict = f" ON CONFLICT ({skip_existing}) DO NOTHING" if skip_existing else ""
        with self._pool.connection() as connection, connection.cursor() as cursor:
            # One transaction, the rows pipelined in one round trip.
            cursor.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks}){conflict}", rows)
        return len(rows)

    def query_arrow(self, query: str, parameters: Sequence[Any], schema: pa.Schema) -> pa.Table:
        import pyarrow as pa

        def run(connection: Connection) -> list[Any]:
            return connection.execute(query, list(parameters)).fetchall()

        rows = self.call(run)
        columns = {name: [row[i] for row in rows] for i, name in enumerate(schema.names)}
        return pa.table(columns, schema=schema)

    def ddl(self, statement: str) -> str:
        for pattern, replacement in _PG_DDL:
            statement = pattern.sub(replacement, statement)
        return statement

    def connect_dedicated(self, application_name: str = "tuneshield") -> Any:
        """A connection of its own, outside the pool (a session-level lock lives on it)."""
        import psycopg

        # Timeouts and keepalives: a learner whose lock connection silently died must
        # notice (and stop leading) in seconds, not after TCP gives up.
        return psycopg.connect(
            self.url,
            autocommit=True,
            application_name=application_name,
            connect_timeout=DEDICATED_CONNECT_TIMEOUT_S,
            keepalives=1,
            keepalives_idle=KEEPALIVE_IDLE_S,
            keepalives_interval=KEEPALIVE_INTERVAL_S,
            keepalives_count=KEEPALIVE_COUNT,
            options=f"-c statement_timeout={DEDICATED_STATEMENT_TIMEOUT_MS}",
        )

    def close(self) -> None:
        self._pool.close()


def redact(url: str) -> str:
    """A database URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def is_postgres_url(url: str) -> bool:
    """Whether ``url`` names a PostgreSQL server (else it is a DuckDB file)."""
    return url.startswith(POSTGRES_SCHEMES)


def connect(url: str | Path, config: StoreConfig | None = None) -> Database:
    """A ``postgresql://`` URL → the pool; a path (or ``duckdb:///path``) → the DuckDB file."""
    text = str(url)
    if is_postgres_url(text):
        if config is None:
            return PostgresDatabase(text)
        return PostgresDatabase(
            text,
            min_size=config.pool_min_size,
            max_size=config.pool_max_size,
            timeout_s=config.connect_timeout_s,
        )
    return DuckDBDatabase(text.removeprefix(DUCKDB_SCHEME))
