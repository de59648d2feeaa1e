"""Shared fixtures. Add fixtures here; do not rewrite other people's."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from simulation.postgres import PostgresServer

# No model hub on these machines: anything that tries one must fail fast, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _roles_logging_undone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo a role's ``configure_logging`` after a test that ran its CLI in-process.

    The role binds a handler to the ``sys.stderr`` of that moment, which is pytest's
    capture of the test; a thread that logs after the capture closed would print
    "Logging error ... I/O operation on closed file" into the run's output.

    Within a test the process's registry of handlers holds the test's own only:
    ``configure_logging`` (``dictConfig``) closes every handler in it, and absl's (imported
    with Keras by an evaluation judge) closes its stream when that is not the sys.stderr
    of the moment: pytest's capture of an earlier test, which then failed on a closed file.
    """
    monkeypatch.setattr(logging, "_handlerList", [])
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        # Exactly StreamHandler: pytest's own capture handlers are subclasses of it.
        if type(handler) is logging.StreamHandler and handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template, built once per session."""
    from tuneshield import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (Debian's binaries, loopback only).

    Where the binaries are missing the tests that need it skip, except in CI (``CI`` set),
    where the storage suite must run on both backends: there they fail.
    """
    from simulation.postgres import PostgresServer, PostgresUnavailable

    try:
        server = PostgresServer()
    except PostgresUnavailable as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(error))
    with server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """The session server's ``tuneshield`` database."""
    return postgres_server.url


@pytest.fixture
def postgres_database_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database of its own on the session's server, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    url = postgres_server.create_database(name)
    yield url
    postgres_server.drop_database(name)
