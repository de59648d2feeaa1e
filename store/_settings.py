"""Which store a process uses and how: ``policies/store.yaml`` plus the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tuneshield import PolicyError, load_config

DATABASE_URL_ENV = "TUNESHIELD_DATABASE_URL"
DUCKDB_FILENAME = "gateway.duckdb"


@dataclass(frozen=True)
class StoreConfig:
    """policies/store.yaml."""

    pool_min_size: int
    """Connections each process keeps open to PostgreSQL."""
    pool_max_size: int
    """Most connections each process opens to PostgreSQL."""
    connect_timeout_s: float
    """Seconds to wait for the server or for a free pooled connection."""
    cache_refresh_s: float
    """How often aliases and keys changed by other processes are re-read (PostgreSQL)."""

    def __post_init__(self) -> None:
        if not 1 <= self.pool_min_size <= self.pool_max_size:
            raise ValueError(
                f"pool_min_size ({self.pool_min_size}) must be in 1..pool_max_size "
                f"({self.pool_max_size})"
            )
        for name in ("connect_timeout_s", "cache_refresh_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class StoreSettings:
    """The store of one process: where it is, and its policy."""

    url: str
    """A ``postgresql://`` URL, or the path of the DuckDB file."""
    config: StoreConfig


def load_store_settings(
    data_dir: Path,
    *,
    environ: Mapping[str, str] | None = None,
    policies_directory: Path | None = None,
) -> StoreSettings:
    """``$TUNESHIELD_DATABASE_URL`` or ``data_dir/gateway.duckdb``, with policies/store.yaml."""
    env = os.environ if environ is None else environ
    config = load_config(StoreConfig, "store", directory=policies_directory)
    given = env.get(DATABASE_URL_ENV)
    # A value that is no URL at all ("notaurl", "postgresql:/host/db") would otherwise be
    # taken for a DuckDB file name: a gateway silently on an empty store of its own.
    if given and not given.startswith(("postgresql://", "postgres://", "duckdb:///")):
        scheme = f"{given.split('://')[0]}://…" if "://" in given else "no URL"
        raise PolicyError(
            f"{DATABASE_URL_ENV} must be a postgresql:// URL (or unset for the DuckDB file), "
            f"got {scheme}"
        )
    url = given or str(Path(data_dir) / DUCKDB_FILENAME)
    return StoreSettings(url, config)
