"""The dialog log: ``turns`` rows, inserted in batches, deleted per user, exported.

Exports feed training, so opted-out turns (and turns of opted-out keys) are left out
unless asked for. An export has the same Arrow schema on both backends.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from store._database import Connection, Database

if TYPE_CHECKING:
    import pyarrow as pa


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
    engine: str | None = None
    """Root URL of the engine that wrote the reply (None: no engine did, or logged before
    the gateway had an engine pool)."""


TURN_COLUMNS = tuple(field.name for field in fields(TurnRecord))
# Turn ids per lookup query (a bound on the statement's parameters).
_LOOKUP_CHUNK = 1000


def turn_schema() -> pa.Schema:
    """The Arrow schema of exported turns (both backends)."""
    import pyarrow as pa

    types = {
        "created_at": pa.timestamp("us"),
        "prompt_tokens": pa.int32(),
        "completion_tokens": pa.int32(),
        "latency_ms": pa.float64(),
        "ttft_ms": pa.float64(),
        "guard_score": pa.float64(),
        "stream": pa.bool_(),
        "guard_flag": pa.bool_(),
        "opt_out": pa.bool_(),
    }
    return pa.schema([(name, types.get(name, pa.string())) for name in TURN_COLUMNS])


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
        """Insert turns in one transaction (one batch, not row by row). Idempotent: a retry
        after a commit whose answer was lost finds its turns stored and adds nothing."""
        rows = [tuple(getattr(turn, name) for name in TURN_COLUMNS) for turn in turns]
        return self._database.insert_rows("turns", TURN_COLUMNS, rows, skip_existing="turn_id")

    def insert_missing(self, turns: Sequence[TurnRecord]) -> int:
        """Insert those of ``turns`` whose ``turn_id`` is not stored yet (a journal's
        replay after a crash: some of its turns may have been committed); return how many."""
        ids = [turn.turn_id for turn in turns]
        if not ids:
            return 0

        def stored(connection: Connection) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(ids), _LOOKUP_CHUNK):
                chunk = ids[start : start + _LOOKUP_CHUNK]
                marks = ", ".join("?" for _ in chunk)
                query = f"SELECT turn_id FROM turns WHERE turn_id IN ({marks})"
                found.update(str(row[0]) for row in connection.execute(query, chunk).fetchall())
            return found

        present = self._database.call(stored)
        # One row per turn id, even where a replay holds a turn twice.
        missing = {turn.turn_id: turn for turn in turns if turn.turn_id not in present}
        return self.insert(list(missing.values())) if missing else 0

    def delete(self, *, key_id: str | None = None, conversation_id: str | None = None) -> int:
        """Delete the turns of one key, one conversation, or (both given) that key's turns
        in that conversation; return how many went."""
        filters = [(c, v) for c, v in (("key_id", key_id), ("conversation_id", conversation_id))]
        given = [(column, value) for column, value in filters if value is not None]
        if not given:
            raise ValueError("give key_id or conversation_id (or both)")
        where = " AND ".join(f"{column} = ?" for column, _ in given)
        values = [value for _, value in given]

        def run(connection: Connection) -> int:
            row = connection.execute(f"SELECT count(*) FROM turns WHERE {where}", values).fetchone()
            connection.execute(f"DELETE FROM turns WHERE {where}", values)
            return int(row[0]) if row else 0

        return self._database.transaction(run)

    def count(self) -> int:
        """Number of logged turns."""
        row = self._database.call(lambda c: c.execute("SELECT count(*) FROM turns").fetchone())
        return int(row[0]) if row else 0

    def count_new_conversations(self, since: datetime | None) -> int:
        """Conversations with a turn newer than ``since`` that a snapshot would export."""
        where = "NOT t.opt_out AND NOT coalesce(k.opt_out, FALSE)"
        params: list[Any] = []
        if since is not None:
            where += " AND t.created_at > ?"
            params.append(since)
        query = (
            "SELECT count(DISTINCT t.conversation_id) FROM turns t "
            f"LEFT JOIN api_keys k USING (key_id) WHERE {where}"
        )
        row = self._database.call(lambda c: c.execute(query, params).fetchone())
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
            ids = list(conversation_ids)
            marks = ", ".join("?" for _ in ids)
            where.append(f"t.conversation_id IN ({marks})" if ids else "FALSE")
            params.extend(ids)
        if not include_opt_out:
            where.append("NOT t.opt_out AND NOT coalesce(k.opt_out, FALSE)")
        columns = ", ".join(f"t.{name}" for name in TURN_COLUMNS)
        query = (
            f"SELECT {columns} FROM turns t LEFT JOIN api_keys k USING (key_id) "
            f"WHERE {' AND '.join(where)} ORDER BY t.created_at, t.turn_id"
        )
        return self._database.query_arrow(query, params, turn_schema())

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
