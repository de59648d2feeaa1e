"""simulation.PostgresServer: a real, throwaway PostgreSQL on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest

from simulation.postgres import PostgresServer, PostgresUnavailable, find_bin_dir


def test_session_server_stores_and_reads_back(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql://")
    assert "@127.0.0.1:" in postgres_url and postgres_url.endswith("/tuneshield")
    with psycopg.connect(postgres_url) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS notes (id int PRIMARY KEY, body text)")
        connection.execute("INSERT INTO notes VALUES (1, 'hello') ON CONFLICT DO NOTHING")
        connection.commit()
        assert connection.execute("SELECT body FROM notes WHERE id = 1").fetchone() == ("hello",)
        assert connection.execute("SHOW fsync").fetchone() == ("on",)
        assert connection.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)


def test_each_test_gets_a_database_of_its_own(
    postgres_url: str, postgres_database_url: str
) -> None:
    assert postgres_database_url != postgres_url
    with psycopg.connect(postgres_database_url) as connection:
        tables = connection.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        assert tables == (0,)
        connection.execute("CREATE TABLE mine (x int)")


def test_committed_row_survives_a_crash_and_restart(tmp_path: Path) -> None:
    try:
        first = PostgresServer(tmp_path / "pg")
    except PostgresUnavailable as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(error))
    try:
        first.start()
        with psycopg.connect(first.url) as connection:
            connection.execute("CREATE TABLE turns (id int PRIMARY KEY, body text)")
            connection.execute("INSERT INTO turns VALUES (7, 'durable')")
            connection.commit()
        first.stop(mode="immediate")  # no shutdown checkpoint: recovery replays the WAL
    finally:
        first.stop()
    log = first.log_path.read_text()
    assert "immediate shutdown" in log

    with PostgresServer(tmp_path / "pg") as second:
        with psycopg.connect(second.url) as connection:
            row = connection.execute("SELECT body FROM turns WHERE id = 7").fetchone()
        assert row == ("durable",)
        assert "not properly shut down" in second.log_path.read_text()
        second.stop()
        second.stop()  # idempotent
    assert (tmp_path / "pg" / "data" / "PG_VERSION").exists()  # a given root is kept


def test_missing_binaries_say_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PG_BIN", str(tmp_path))
    with pytest.raises(PostgresUnavailable, match=r"deploy/install\.sh --dev"):
        find_bin_dir()
