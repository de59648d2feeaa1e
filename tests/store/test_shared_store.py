"""What several processes on one store rely on: the leader lock, the run queue, caches
that see other processes' changes, the audit log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gateway.auth import create_key, hash_key
from store import (
    AliasStore,
    AuditLog,
    KeyStore,
    LeaderLock,
    RunStore,
    leader,
    open_database,
)

HOLD_LOCK = """
import sys, time
from store import LeaderLock, open_database
lock = LeaderLock(open_database(sys.argv[1]), "child")
assert lock.try_acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_runs_are_claimed_oldest_first_with_their_settings(store_url: str) -> None:
    """Queued runs are claimed one at a time, oldest first, by the learner that claims
    them; each keeps the settings it was queued with; running ones fail on takeover."""
    database = open_database(store_url)
    try:
        runs = RunStore(database)
        first = runs.create("chat", '{"version": 1, "plan": "a"}')
        time.sleep(0.002)
        second = runs.create("chat", '{"version": 1, "plan": "b"}')
        claimed = runs.claim_next("learner-1")
        assert claimed is not None and claimed.run_id == first.run_id
        assert (claimed.status, claimed.claimed_by) == ("running", "learner-1")
        assert runs.settings(second.run_id) == '{"version": 1, "plan": "b"}'
        assert runs.fail_running("its learner stopped") == [first.run_id]
        assert [run.run_id for run in runs.unfinished()] == [second.run_id]
        assert runs.claim_next("learner-2", second.run_id) is not None
        assert runs.claim_next("learner-2") is None
    finally:
        database.close()


def test_audit_entries_are_listed_newest_first(store_url: str) -> None:
    """The audit log keeps actor, action, target and detail; filters by action."""
    database = open_database(store_url)
    try:
        audit = AuditLog(database)
        audit.record("key_admin", "promote", "chat-v0001", reason="gates passed")
        time.sleep(0.002)
        audit.record("learner", "rollback", "chat-v0000")
        entries = audit.list()
        assert [(e.actor, e.action, e.target) for e in entries] == [
            ("learner", "rollback", "chat-v0000"),
            ("key_admin", "promote", "chat-v0001"),
        ]
        assert entries[1].detail == {"reason": "gates passed"}
        assert [e.action for e in audit.list(action="promote")] == ["promote"]
    finally:
        database.close()


def test_other_processes_changes_reach_the_caches(postgres_database_url: str) -> None:
    """On PostgreSQL a key created, revoked or an alias flipped by another process is seen
    after one refresh (never by a query per lookup: unknown keys cost no round trip)."""
    mine, theirs = open_database(postgres_database_url), open_database(postgres_database_url)
    try:
        keys, aliases = KeyStore(mine), AliasStore(mine)
        aliases.seed({"chat": "chat-v0000"})
        created = create_key(KeyStore(theirs), "elsewhere")
        assert keys.by_hash(hash_key(created.key)) is None
        keys.refresh()
        found = keys.by_hash(hash_key(created.key))
        assert found is not None and not found.revoked
        AliasStore(theirs).set("chat", "chat-v0001")
        KeyStore(theirs).revoke(created.record.key_id)
        assert aliases.get("chat") == "chat-v0000"
        aliases.refresh()
        keys.refresh()
        assert aliases.get("chat") == "chat-v0001"
        revoked = keys.by_hash(hash_key(created.key))
        assert revoked is not None and revoked.revoked
    finally:
        mine.close()
        theirs.close()


def test_one_leader_at_a_time_and_a_dead_leaders_lock_is_free(
    postgres_database_url: str,
) -> None:
    """While a learner process holds the lock, no other can take it, and gateways can name
    the holder; once it is killed (SIGKILL), the lock is free at once."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, postgres_database_url],
        stdout=subprocess.PIPE,
        text=True,
    )
    database = open_database(postgres_database_url)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        waiting = LeaderLock(database, "waiting")
        assert not waiting.try_acquire()
        assert leader(database) == "child"
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 10
        while not waiting.try_acquire():
            assert time.monotonic() < deadline, "the dead learner's lock was never released"
            time.sleep(0.1)
        assert waiting.check() and leader(database) == "waiting"
        waiting.release()
        assert leader(database) is None
    finally:
        if child.poll() is None:
            child.kill()
        database.close()


def test_duckdb_has_one_process_so_its_learner_leads(tmp_path: Path) -> None:
    """On the DuckDB file the process that owns it is the only possible learner."""
    database = open_database(tmp_path / "store.duckdb")
    try:
        lock = LeaderLock(database)
        assert lock.try_acquire() and lock.check()
        assert leader(database) is None
    finally:
        database.close()


def test_concurrent_processes_never_share_a_version_or_queue_two_rounds(
    postgres_database_url: str,
) -> None:
    """Two connections (as two processes) reserving versions and queueing rounds at once:
    every version number is handed out once, and only one round is queued."""
    from concurrent.futures import ThreadPoolExecutor

    from store import AdapterRegistry

    first, second = open_database(postgres_database_url), open_database(postgres_database_url)
    try:
        registries = [AdapterRegistry(first), AdapterRegistry(second)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            versions = list(pool.map(lambda i: registries[i % 2].next_version("chat"), range(16)))
            runs = [RunStore(first), RunStore(second)]
            queued = list(pool.map(lambda i: runs[i % 2].queue("chat", None), range(8)))
        assert sorted(versions) == [f"chat-v{n:04d}" for n in range(16)]
        assert sum(record is not None for record in queued) == 1
        assert len(RunStore(first).unfinished()) == 1
    finally:
        first.close()
        second.close()
