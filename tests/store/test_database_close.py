"""Closing a DuckDB store releases DuckDB's objects: a process that still holds the closed
store when it exits prints no nanobind leak report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from store import open_database

# A daemon thread's frame is never freed at exit, so what it holds outlives the interpreter
# (the way a store can stay referenced by a thread that is still running at exit).
HOLDS_A_CLOSED_STORE = """
import sys, threading, time
from store import open_database
database = open_database(sys.argv[1])
database.call(lambda c: c.execute("SELECT 42").fetchall())
database.close()
threading.Thread(target=lambda held=database: time.sleep(60), daemon=True).start()
print("exiting")
"""
EXIT_TIMEOUT_S = 60


def test_closed_store_refuses_calls_as_duckdb_does(tmp_path: Path) -> None:
    """After close, a call raises DuckDB's own "connection closed" error; close is idempotent."""
    database = open_database(tmp_path / "store.duckdb")
    database.close()
    database.close()
    with pytest.raises(duckdb.ConnectionException):
        database.call(lambda c: c.execute("SELECT 1").fetchall())


def test_process_exits_quietly_while_a_closed_store_is_still_held(tmp_path: Path) -> None:
    """A closed store no longer holds a DuckDB connection, so exiting with the store still
    referenced prints nothing after the process's last line."""
    result = subprocess.run(
        [sys.executable, "-c", HOLDS_A_CLOSED_STORE, str(tmp_path / "store.duckdb")],
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_S,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "exiting\n"
    assert result.stderr == ""
