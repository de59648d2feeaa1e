"""The dialog log: ``turns`` rows, inserted in batches, deleted per user, exported.

Exports feed training, so opted-out turns (and turns of opted-out keys) are left out
unless asked for. An export has the same Arrow schema on both backends.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from store._audit import AuditEntry, insert_entry
from store._database import Connection, Database, utcnow

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
    delivered: bool = True
    """Whether the client was still there to receive the reply: False when it hung up
    first (a stream cut short, a JSON request abandoned). Not training data."""
    end_user: str | None = None
    """The request's OpenAI ``user`` value: who the client says the end user is."""


TURN_COLUMNS = tuple(field.name for field in fields(TurnRecord))
# ``finish_reason`` of a turn whose stream the engine broke off: its reply is partial.
BROKEN_REPLY = "error"
# ``finish_reason`` of a reply the engine ended itself. Every other reason (a length cap,
# an engine error or timeout, a broken stream, the guard's refusal) is not the engine's
# whole reply, and the learner does not learn it as one.
COMPLETE_REPLY = "stop"
# ``finish_reason`` of a reply the gateway's guard replaced with its refusal; the canary
# counts these turns as blocked.
BLOCKED_REPLY = "content_filter"
# Audit actions of deletions: the rows removed from the store, then their copies from the
# learner's files.
DIALOGS_DELETE = "dialogs.delete"
DIALOGS_PURGE = "dialogs.purge"
# Why turns were deleted: someone asked (admin API, CLI), or the retention period passed.
DELETION_REQUEST = "request"
DELETION_RETENTION = "retention"
# The actor of a deletion made with the local command line.
CLI_ACTOR = "cli"
# Turn ids per lookup query (a bound on the statement's parameters).
_LOOKUP_CHUNK = 1000
# What training may use of the turns ``export_table`` selects (alias ``t``): not flagged by
# the live guard, delivered (null: logged before delivery was recorded, when every logged
# turn counted as delivered), and not logged by a quarantined key or end user while
# quarantined (store._quarantine).
TRAINABLE = """NOT t.guard_flag AND coalesce(t.delivered, TRUE) AND NOT EXISTS (
    SELECT 1 FROM quarantine q
    WHERE ((q.kind = 'key' AND q.subject = t.key_id)
           OR (q.kind = 'user' AND q.subject = t.end_user))
      AND t.created_at >= q.excluded_from
      AND (q.released_at IS NULL OR t.created_at < q.released_at))"""


class AmbiguousConversation(ValueError):
    """A conversation id that several keys used, named without the key."""


@dataclass(frozen=True)
class Deletion:
    """One recorded deletion of turns (``DialogStore.erase``)."""

    deletion_id: str
    actor: str
    reason: str
    turns: int
    turn_ids: tuple[str, ...]
    adapters: tuple[str, ...]
    """Adapter versions trained on a deleted turn (marked ``trained_on_deleted_at``)."""


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
        "delivered": pa.bool_(),
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

    def get(self, turn_id: str) -> TurnRecord | None:
        """The logged turn with this id (None when there is none, or none yet: the log
        writes in batches)."""
        columns = ", ".join(TURN_COLUMNS)
        row = self._database.call(
            lambda c: c.execute(
                f"SELECT {columns} FROM turns WHERE turn_id = ?", [turn_id]
            ).fetchone()
        )
        return None if row is None else TurnRecord(*row)

    def delete(
        self,
        *,
        key_id: str | None = None,
        conversation_id: str | None = None,
        actor: str = CLI_ACTOR,
    ) -> int:
        """Delete the turns of one key, one conversation, or (both given) that key's turns
        in that conversation; return how many went (``erase``, recorded as ``actor``'s)."""
        return self.erase(actor=actor, key_id=key_id, conversation_id=conversation_id).turns

    def erase(
        self,
        *,
        actor: str,
        key_id: str | None = None,
        conversation_id: str | None = None,
        created_before: datetime | None = None,
        reason: str = DELETION_REQUEST,
        record_empty: bool = True,
    ) -> Deletion:
        """Delete the turns matching every filter given, in one transaction with what must
        go with them: a ``deletions`` row holding the deleted turn ids (the learner purges
        their copies from its snapshots and round files with them, ``files_purged_at``),
        the mark on every adapter trained on one of them (its snapshot window held the
        turn, or its parent is marked), and the audit entry.

        A conversation belongs to the key that logged it (a second key sending the same
        ``X-Conversation-Id`` starts its own): a conversation id alone names one key's
        conversation, and one that several keys used raises ``AmbiguousConversation``
        rather than deleting another key's turns with it. ``record_empty``: whether a
        deletion that found nothing is recorded too (a request is; a periodic job's
        empty pass is not).
        """
        filters = (
            ("key_id = ?", key_id),
            ("conversation_id = ?", conversation_id),
            ("created_at < ?", created_before),
        )
        given = [(clause, value) for clause, value in filters if value is not None]
        if not given:
            raise ValueError("give key_id, conversation_id or created_before")
        where = " AND ".join(clause for clause, _ in given)
        values = [value for _, value in given]
        deletion_id = "del_" + uuid.uuid4().hex
        now = utcnow()

        def run(connection: Connection) -> Deletion:
            if conversation_id is not None and key_id is None:
                _check_one_owner(connection, [conversation_id])
            rows = connection.execute(
                f"SELECT turn_id, created_at FROM turns WHERE {where}", values
            ).fetchall()
            connection.execute(f"DELETE FROM turns WHERE {where}", values)
            turn_ids = tuple(str(row[0]) for row in rows)
            if not turn_ids and not record_empty:
                return Deletion(deletion_id, actor, reason, 0, (), ())
            adapters = _mark_trained_on(connection, [row[1] for row in rows], now)
            deletion = Deletion(deletion_id, actor, reason, len(turn_ids), turn_ids, adapters)
            connection.execute(
                "INSERT INTO deletions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                [
                    deletion_id,
                    now,
                    actor,
                    reason,
                    key_id,
                    conversation_id,
                    created_before,
                    len(turn_ids),
                    json.dumps(turn_ids),
                    json.dumps(adapters),
                ],
            )
            detail = {
                "deletion_id": deletion_id,
                "reason": reason,
                "key_id": key_id,
                "conversation_id": conversation_id,
                "created_before": created_before,
                "rows": len(turn_ids),
                "adapters_marked": list(adapters),
            }
            target = key_id or conversation_id
            insert_entry(connection, AuditEntry(now, actor, DIALOGS_DELETE, target, detail))
            return deletion

        return self._database.transaction(run)

    def pending_purges(self) -> list[Deletion]:
        """The deletions whose copies in the learner's files are not purged yet, oldest
        first."""
        rows = self._database.call(
            lambda c: c.execute(
                "SELECT deletion_id, actor, reason, turns, turn_ids, adapters FROM deletions "
                "WHERE files_purged_at IS NULL ORDER BY requested_at"
            ).fetchall()
        )
        return [
            Deletion(str(d), str(a), str(r), int(n), _strings(ids), _strings(versions))
            for d, a, r, n, ids, versions in rows
        ]

    def record_purge(
        self,
        deletion_ids: Sequence[str],
        *,
        actor: str,
        files: Sequence[str],
        learner_files: bool = True,
    ) -> None:
        """Audit the purge of ``deletion_ids``' copies from ``files``; ``learner_files``:
        the learner's snapshot and round files are done (``files_purged_at``), else the
        purge was another copy's (a gateway's journal)."""
        if not deletion_ids:
            return
        now = utcnow()
        marks = ", ".join("?" for _ in deletion_ids)

        def run(connection: Connection) -> None:
            if learner_files:
                connection.execute(
                    f"UPDATE deletions SET files_purged_at = ? WHERE deletion_id IN ({marks})",
                    [now, *deletion_ids],
                )
            detail = {
                "deletion_ids": list(deletion_ids),
                "files": list(files),
                "copies": "learner" if learner_files else "journal",
            }
            insert_entry(connection, AuditEntry(now, actor, DIALOGS_PURGE, None, detail))

        self._database.transaction(run)

    def count(self) -> int:
        """Number of logged turns."""
        row = self._database.call(lambda c: c.execute("SELECT count(*) FROM turns").fetchone())
        return int(row[0]) if row else 0

    def count_new_conversations(self, since: datetime | None) -> int:
        """Conversations with a turn newer than ``since`` that a snapshot would export."""
        # TRAINABLE too: quarantined or flagged traffic alone must not start rounds that
        # find nothing to train on.
        where = f"NOT t.opt_out AND NOT coalesce(k.opt_out, FALSE) AND {TRAINABLE}"
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
        training: bool = False,
        key_id: str | None = None,
    ) -> pa.Table:
        """Turns (oldest first) as an Arrow table: newer than ``since``, of
        ``conversation_ids`` only when given; ``training``: only those training may use
        (``TRAINABLE``); of ``key_id`` only when given.

        A conversation is one key's: ``conversation_ids`` without ``key_id`` raise
        ``AmbiguousConversation`` when one of them was used by several keys.

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
            if key_id is None and ids:
                self._database.call(lambda c: _check_one_owner(c, ids))
        if key_id is not None:
            where.append("t.key_id = ?")
            params.append(key_id)
        if not include_opt_out:
            where.append("NOT t.opt_out AND NOT coalesce(k.opt_out, FALSE)")
        if training:
            where.append(TRAINABLE)
        columns = ", ".join(f"t.{name}" for name in TURN_COLUMNS)
        query = (
            f"SELECT {columns} FROM turns t LEFT JOIN api_keys k USING (key_id) "
            f"WHERE {' AND '.join(where)} ORDER BY t.created_at, t.turn_id"
        )
        return self._database.query_arrow(query, params, turn_schema())

    def export_parquet(
        self,
        *,
        conversation_ids: Sequence[str] | None = None,
        include_opt_out: bool = False,
        key_id: str | None = None,
    ) -> bytes:
        """``export_table``'s turns of ``conversation_ids`` (of ``key_id``, when given) as
        the bytes of a Parquet file."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = self.export_table(
            conversation_ids=conversation_ids, include_opt_out=include_opt_out, key_id=key_id
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return bytes(sink.getvalue().to_pybytes())

    def export(
        self, path: Path, *, since: datetime | None = None, include_opt_out: bool = False
    ) -> int:
        """Write the turns training may use (``export_table`` with ``training``) to a
        Parquet file; return the number of rows.

        The training export (learner snapshots, ``tuneshield dialogs export``): besides
        opted-out turns it leaves out turns the live guard flagged, turns never delivered
        (the client abandoned the request), and turns of a quarantined key or end user
        created from the quarantine on (its ``excluded_from``: the quarantine's time, or
        for the learner's own the oldest judged turn behind it) until its release: from
        then on, as the quarantine is decided, never the turns already trained on.
        """
        import pyarrow.parquet as pq

        path.parent.mkdir(parents=True, exist_ok=True)
        table = self.export_table(since=since, include_opt_out=include_opt_out, training=True)
        pq.write_table(table, str(path))
        return int(table.num_rows)


def _strings(stored: Any) -> tuple[str, ...]:
    # DuckDB hands JSON back as text, psycopg as the decoded value.
    values = json.loads(stored) if isinstance(stored, str) else stored
    return tuple(str(value) for value in values or ())


def _check_one_owner(connection: Connection, conversation_ids: Sequence[str]) -> None:
    """Raise ``AmbiguousConversation`` when a conversation id of ``conversation_ids``
    was used by more than one key."""
    for start in range(0, len(conversation_ids), _LOOKUP_CHUNK):
        chunk = list(conversation_ids[start : start + _LOOKUP_CHUNK])
        marks = ", ".join("?" for _ in chunk)
        shared = connection.execute(
            f"SELECT conversation_id FROM turns WHERE conversation_id IN ({marks}) "
            "GROUP BY conversation_id HAVING count(DISTINCT key_id) > 1 "
            "ORDER BY conversation_id LIMIT 1",
            chunk,
        ).fetchone()
        if shared is not None:
            raise AmbiguousConversation(
                f"conversation {shared[0]!r} was used by several keys: name the key_id"
            )


def _mark_trained_on(
    connection: Connection, created: Sequence[datetime], now: datetime
) -> tuple[str, ...]:
    """Mark the adapters trained on turns created at ``created``: a round's adapter
    learnt from the snapshot window (snapshot_from, snapshot_to], and every adapter
    continued from a marked one carries what it learnt. Return the versions marked now
    or before, by name."""
    if not created:
        return ()
    rows = connection.execute(
        "SELECT version, parent, snapshot_from, snapshot_to FROM adapters"
    ).fetchall()
    marked = {
        str(version)
        for version, _, since, until in rows
        if until is not None
        and any((since is None or since < at) and at <= until for at in created)
    }
    # Children after their parents: follow the lineage until nothing new is marked.
    grew = True
    while grew:
        children = {str(v) for v, parent, _, _ in rows if parent in marked and str(v) not in marked}
        marked |= children
        grew = bool(children)
    versions = sorted(marked)
    if versions:
        marks = ", ".join("?" for _ in versions)
        connection.execute(
            "UPDATE adapters SET trained_on_deleted_at = coalesce(trained_on_deleted_at, ?) "
            f"WHERE version IN ({marks})",
            [now, *versions],
        )
    return tuple(versions)
