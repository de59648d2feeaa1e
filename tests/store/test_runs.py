"""Learner run rows: lifecycle timestamps, validation, crash recovery."""

from __future__ import annotations

from pathlib import Path

import pytest
from learner_fakes import open_registry

from store import RunStore, UnknownRun


def test_run_lifecycle_stamps_times(store_url: str, tmp_path: Path) -> None:
    """queued → running → succeeded stamps started_at and finished_at; fields persist."""
    database, _ = open_registry(store_url)
    try:
        runs = RunStore(database)
        run = runs.create("chat")
        running = runs.update(run.run_id, status="running", stage="classify", progress=0.25)
        done = runs.update(run.run_id, status="succeeded", progress=1.0, version="chat-v0001")
        listed = runs.list()
    finally:
        database.close()
    assert run.status == "queued" and run.started_at is None
    assert (running.stage, running.progress, running.finished_at) == ("classify", 0.25, None)
    assert running.started_at is not None
    assert done.finished_at is not None and done.stage == "classify"
    assert [(r.run_id, r.version) for r in listed] == [(run.run_id, "chat-v0001")]


def test_bad_updates_are_refused(store_url: str, tmp_path: Path) -> None:
    """Unknown status, progress outside [0, 1] and unknown ids raise with the reason."""
    database, _ = open_registry(store_url)
    try:
        runs = RunStore(database)
        run = runs.create("chat")
        with pytest.raises(ValueError, match="status"):
            runs.update(run.run_id, status="done")
        with pytest.raises(ValueError, match="progress"):
            runs.update(run.run_id, progress=1.5)
        with pytest.raises(UnknownRun):
            runs.update("run_missing", stage="x")
    finally:
        database.close()


def test_fail_unfinished_after_crash(store_url: str, tmp_path: Path) -> None:
    """At start, runs left queued or running are marked failed with the reason."""
    database, _ = open_registry(store_url)
    try:
        runs = RunStore(database)
        crashed = runs.create("chat")
        runs.update(crashed.run_id, status="running")
        finished = runs.create("chat")
        runs.update(finished.run_id, status="succeeded")
        failed = runs.fail_unfinished("gateway restarted mid-run")
        record = runs.get(crashed.run_id)
        untouched = runs.get(finished.run_id)
    finally:
        database.close()
    assert failed == [crashed.run_id]
    assert (record.status, record.error) == ("failed", "gateway restarted mid-run")
    assert untouched.status == "succeeded"
