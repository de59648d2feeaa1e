"""Numbered, forward-only migrations, the same list for both backends.

Each step is written once, in DuckDB's dialect; ``Database.ddl`` translates the few type
names PostgreSQL spells otherwise. ``migrate`` is re-runnable: it applies only the steps
not yet recorded in ``_migrations``, each in one transaction. Several processes may start
at once on PostgreSQL: an advisory lock makes them migrate one after the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from store._database import Connection, Database, utcnow

AdapterStatus = Literal["candidate", "active", "rejected", "retired", "failed"]
ADAPTER_STATUSES: tuple[AdapterStatus, ...] = get_args(AdapterStatus)
AliasChangeKind = Literal["seed", "promote", "rollback", "set"]
ALIAS_CHANGE_KINDS: tuple[AliasChangeKind, ...] = get_args(AliasChangeKind)
CanaryState = Literal["running", "promoted", "rolled_back", "aborted"]
CANARY_STATES: tuple[CanaryState, ...] = get_args(CanaryState)
RUN_STATUSES = ("queued", "running", "succeeded", "failed", "rejected")
# Any constant the migrating processes agree on: pg_advisory_xact_lock's key.
MIGRATION_LOCK_KEY = 7_302_114_001


def _in(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{value}'" for value in values)


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
    Migration(
        "m004_adapters",
        (
            f"""CREATE TABLE adapters (
                version VARCHAR PRIMARY KEY,
                alias VARCHAR NOT NULL,
                parent VARCHAR,
                path VARCHAR NOT NULL,
                status VARCHAR NOT NULL CHECK (status IN ({_in(ADAPTER_STATUSES)})),
                snapshot_from TIMESTAMP,
                snapshot_to TIMESTAMP,
                samples INTEGER,
                flagged INTEGER,
                healed INTEGER,
                judge VARCHAR,
                threshold DOUBLE,
                hyperparameters JSON,
                gate_metrics JSON,
                error VARCHAR,
                forced_promote_at TIMESTAMP,
                activated_at TIMESTAMP,
                created_at TIMESTAMP NOT NULL,
                updated_at TIMESTAMP NOT NULL
            )""",
            # Highest number handed out per alias: names stay unique after a removal.
            """CREATE TABLE adapter_sequences (
                alias VARCHAR PRIMARY KEY,
                last_number INTEGER NOT NULL
            )""",
            f"""CREATE TABLE learner_runs (
                run_id VARCHAR PRIMARY KEY,
                alias VARCHAR NOT NULL,
                status VARCHAR NOT NULL CHECK (status IN ({_in(RUN_STATUSES)})),
                stage VARCHAR,
                progress DOUBLE,
                version VARCHAR,
                log_path VARCHAR,
                error VARCHAR,
                created_at TIMESTAMP NOT NULL,
                started_at TIMESTAMP,
                finished_at TIMESTAMP,
                updated_at TIMESTAMP NOT NULL
            )""",
        ),
    ),
    # A round carries the settings it was queued with (its worker runs with those) and
    # the learner that claimed it.
    Migration(
        "m005_round_settings",
        (
            "ALTER TABLE learner_runs ADD COLUMN settings JSON",
            "ALTER TABLE learner_runs ADD COLUMN claimed_by VARCHAR",
        ),
    ),
    Migration(
        "m006_audit",
        (
            """CREATE TABLE audit_log (
                recorded_at TIMESTAMP NOT NULL,
                actor VARCHAR NOT NULL,
                action VARCHAR NOT NULL,
                target VARCHAR,
                detail JSON
            )""",
        ),
    ),
    # Rollback steps back through the promotions, so each flip says what it was and who
    # made it. Flips recorded before cannot tell a rollback from a promote: they count as
    # promotes. A version that served once and was replaced is ``retired`` from now on
    # (it was ``candidate`` again, like one that never served).
    Migration(
        "m007_alias_history_kind",
        (
            "ALTER TABLE alias_history ADD COLUMN kind VARCHAR NOT NULL DEFAULT 'promote'",
            "ALTER TABLE alias_history ADD COLUMN actor VARCHAR",
            "UPDATE alias_history SET kind = 'seed' WHERE previous_adapter IS NULL",
            "UPDATE adapters SET status = 'retired' "
            "WHERE status = 'candidate' AND activated_at IS NOT NULL",
        ),
    ),
    # Token buckets every gateway replica shares (store._rate_limits): a key's request
    # limit, a client address's failed authentications. refilled_at is epoch seconds by
    # the database's clock; allowed is the last request's verdict, which RETURNING reports.
    Migration(
        "m008_rate_buckets",
        (
            """CREATE TABLE rate_buckets (
                bucket VARCHAR PRIMARY KEY,
                tokens DOUBLE NOT NULL,
                capacity DOUBLE NOT NULL,
                rate_per_s DOUBLE NOT NULL,
                refilled_at DOUBLE NOT NULL,
                taken DOUBLE NOT NULL
            )""",
        ),
    ),
    # A gateway routes over several engines: each turn records which one answered it.
    Migration("m009_turn_engine", ("ALTER TABLE turns ADD COLUMN engine VARCHAR",)),
    # Whether the client received the reply (an abandoned one must not become training
    # data) and the OpenAI `user` value. Of the rows before this step, a stream cut short
    # says so in its finish_reason; an abandoned JSON request cannot be told apart.
    Migration(
        "m010_turn_delivery",
        (
            "ALTER TABLE turns ADD COLUMN delivered BOOLEAN NOT NULL DEFAULT TRUE",
            "ALTER TABLE turns ADD COLUMN end_user VARCHAR",
            "UPDATE turns SET delivered = FALSE WHERE finish_reason = 'client_disconnected'",
        ),
    ),
    # Keys and end users whose turns stay out of training (store._quarantine); released rows
    # stay as history, active_subject ("kind:subject" until released) keeps one open each.
    Migration(
        "m011_quarantine",
        (
            """CREATE TABLE quarantine (
                quarantine_id VARCHAR PRIMARY KEY,
                kind VARCHAR NOT NULL CHECK (kind IN ('key', 'user')),
                subject VARCHAR NOT NULL,
                quarantined_at TIMESTAMP NOT NULL,
                excluded_from TIMESTAMP NOT NULL,
                actor VARCHAR NOT NULL,
                reason VARCHAR NOT NULL,
                run_id VARCHAR,
                released_at TIMESTAMP,
                released_by VARCHAR,
                release_reason VARCHAR,
                active_subject VARCHAR UNIQUE
            )""",
        ),
    ),
    # Deletion that reaches every copy (store._turns erase): each deletion keeps the ids of
    # the turns it removed, so the learner can purge their copies from its files later
    # (files_purged_at), and the adapters trained on them are marked; a conversation is
    # one key's (a second key reusing its id has its own), so the view groups by both.
    Migration(
        "m012_privacy",
        (
            """CREATE TABLE deletions (
                deletion_id VARCHAR PRIMARY KEY,
                requested_at TIMESTAMP NOT NULL,
                actor VARCHAR NOT NULL,
                reason VARCHAR NOT NULL,
                key_id VARCHAR,
                conversation_id VARCHAR,
                created_before TIMESTAMP,
                turns INTEGER NOT NULL,
                turn_ids JSON NOT NULL,
                adapters JSON NOT NULL,
                files_purged_at TIMESTAMP
            )""",
            "ALTER TABLE adapters ADD COLUMN trained_on_deleted_at TIMESTAMP",
            "DROP VIEW conversations",
            """CREATE VIEW conversations AS
                SELECT conversation_id, key_id,
                       min(created_at) AS started_at, max(created_at) AS last_turn_at,
                       count(*) AS turns, bool_or(opt_out) AS opt_out
                FROM turns GROUP BY key_id, conversation_id""",
        ),
    ),
    # Canary rollouts (store._canary): a candidate serves a share of its alias until the
    # learner's monitor promotes or rolls it back; running_alias (NULL once decided) is
    # UNIQUE, so the database refuses a second running canary of one alias.
    Migration(
        "m013_canaries",
        (
            f"""CREATE TABLE canaries (
                canary_id VARCHAR PRIMARY KEY,
                alias VARCHAR NOT NULL,
                candidate VARCHAR NOT NULL,
                stable VARCHAR NOT NULL,
                share DOUBLE NOT NULL CHECK (share > 0 AND share < 1),
                state VARCHAR NOT NULL CHECK (state IN ({_in(CANARY_STATES)})),
                started_at TIMESTAMP NOT NULL,
                actor VARCHAR NOT NULL,
                decided_at TIMESTAMP,
                decided_by VARCHAR,
                reason VARCHAR,
                statistics JSON,
                released_at TIMESTAMP,
                running_alias VARCHAR UNIQUE
            )""",
        ),
    ),
]


def migrate(database: Database, migrations: Sequence[Migration] = MIGRATIONS) -> list[str]:
    """Apply the migrations not yet recorded; return the names applied now."""

    def run(connection: Connection) -> list[str]:
        if database.backend == "postgresql":
            # Held to the end of this transaction: concurrent starters wait here.
            connection.execute("SELECT pg_advisory_xact_lock(?)", [MIGRATION_LOCK_KEY])
        connection.execute(
            "CREATE TABLE IF NOT EXISTS _migrations "
            "(name VARCHAR PRIMARY KEY, applied_at TIMESTAMP NOT NULL)"
        )
        done = {row[0] for row in connection.execute("SELECT name FROM _migrations").fetchall()}
        applied = []
        for migration in migrations:
            if migration.name in done:
                continue
            for statement in migration.statements:
                connection.execute(database.ddl(statement))
            connection.execute("INSERT INTO _migrations VALUES (?, ?)", [migration.name, utcnow()])
            applied.append(migration.name)
        return applied

    # One transaction for all pending steps: a crash leaves none of them half done.
    return database.transaction(run)
