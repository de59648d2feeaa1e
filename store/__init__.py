"""The store: keys, aliases, the dialog log, the adapter registry, learner runs, audit.

One interface, two real backends (``open_database``): a DuckDB file for the embedded
single-process default, PostgreSQL for any number of gateway and learner processes.
Every store class is written once against ``Database``; numbered migrations are the same
list for both backends. ``LeaderLock`` keeps exactly one learner active; ``RateBucketStore``
holds the token buckets every gateway replica shares.
"""

from __future__ import annotations

from pathlib import Path

from store._aliases import AliasChange, AliasRecord, AliasStore
from store._audit import KEY_CREATE, KEY_REVOKE, AuditEntry, AuditLog
from store._canary import CanaryConflict, CanaryRecord, CanaryRoute, CanaryStore
from store._database import (
    Connection,
    Database,
    DatabaseBusyError,
    DatabaseUnavailableError,
    DuckDBDatabase,
    PostgresDatabase,
    connect,
    is_postgres_url,
    redact,
    utcnow,
)
from store._keys import ApiKeyRecord, KeyStore
from store._leader import LeaderLock, leader
from store._migrations import (
    ADAPTER_STATUSES,
    ALIAS_CHANGE_KINDS,
    CANARY_STATES,
    MIGRATIONS,
    RUN_STATUSES,
    AdapterStatus,
    AliasChangeKind,
    CanaryState,
    Migration,
    migrate,
)
from store._quarantine import (
    SUBJECT_KINDS,
    AlreadyQuarantined,
    NotQuarantined,
    QuarantineRecord,
    QuarantineStore,
    SubjectKind,
)
from store._rate_limits import BucketTake, RateBucketStore
from store._registry import (
    ADAPTERS_FOLDER,
    REQUIRED_FILES,
    VERSION_NAME,
    AdapterImportRefused,
    AdapterRecord,
    AdapterRegistry,
    IncompleteAdapter,
    RegistryError,
    UnknownVersion,
    check_adapter_folder,
)
from store._runs import FINISHED, RunRecord, RunStore, UnknownRun
from store._settings import (
    DATABASE_URL_ENV,
    DUCKDB_FILENAME,
    StoreConfig,
    StoreSettings,
    load_store_settings,
)
from store._turns import (
    BLOCKED_REPLY,
    BROKEN_REPLY,
    COMPLETE_REPLY,
    DELETION_REQUEST,
    DELETION_RETENTION,
    TURN_COLUMNS,
    AmbiguousConversation,
    Deletion,
    DialogStore,
    TurnRecord,
    turn_schema,
)


def open_database(url: str | Path, config: StoreConfig | None = None) -> Database:
    """Connect to ``url`` (a DuckDB file path or a ``postgresql://`` URL) and migrate it."""
    database = connect(url, config)
    try:
        migrate(database)
    except BaseException:
        database.close()
        raise
    return database


__all__ = [
    "ADAPTERS_FOLDER",
    "ADAPTER_STATUSES",
    "ALIAS_CHANGE_KINDS",
    "BLOCKED_REPLY",
    "BROKEN_REPLY",
    "CANARY_STATES",
    "COMPLETE_REPLY",
    "DATABASE_URL_ENV",
    "DELETION_REQUEST",
    "DELETION_RETENTION",
    "DUCKDB_FILENAME",
    "FINISHED",
    "KEY_CREATE",
    "KEY_REVOKE",
    "MIGRATIONS",
    "REQUIRED_FILES",
    "RUN_STATUSES",
    "SUBJECT_KINDS",
    "TURN_COLUMNS",
    "VERSION_NAME",
    "AdapterImportRefused",
    "AdapterRecord",
    "AdapterRegistry",
    "AdapterStatus",
    "AliasChange",
    "AliasChangeKind",
    "AliasRecord",
    "AliasStore",
    "AlreadyQuarantined",
    "AmbiguousConversation",
    "ApiKeyRecord",
    "AuditEntry",
    "AuditLog",
    "BucketTake",
    "CanaryConflict",
    "CanaryRecord",
    "CanaryRoute",
    "CanaryState",
    "CanaryStore",
    "Connection",
    "Database",
    "DatabaseBusyError",
    "DatabaseUnavailableError",
    "Deletion",
    "DialogStore",
    "DuckDBDatabase",
    "IncompleteAdapter",
    "KeyStore",
    "LeaderLock",
    "Migration",
    "NotQuarantined",
    "PostgresDatabase",
    "QuarantineRecord",
    "QuarantineStore",
    "RateBucketStore",
    "RegistryError",
    "RunRecord",
    "RunStore",
    "StoreConfig",
    "StoreSettings",
    "SubjectKind",
    "TurnRecord",
    "UnknownRun",
    "UnknownVersion",
    "check_adapter_folder",
    "connect",
    "is_postgres_url",
    "leader",
    "load_store_settings",
    "migrate",
    "open_database",
    "redact",
    "turn_schema",
    "utcnow",
]
