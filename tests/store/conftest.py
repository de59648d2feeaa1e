"""Every storage test runs on both backends: a DuckDB file and a real PostgreSQL server
(started once per session by the ``postgres_url`` fixture, a fresh database per test)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(params=["duckdb", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store of each backend."""
    if request.param == "duckdb":
        return str(tmp_path / "store.duckdb")
    return str(request.getfixturevalue("postgres_database_url"))
