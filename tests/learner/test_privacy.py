"""Privacy that reaches training data: deletions recorded with the adapters trained on the
turns, copies purged from snapshots and round files, retention run by the learner's
schedule, PII scrubbed before a snapshot is written, conversations scoped to their key."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from learner_fakes import adapter_folder

from learner.privacy import (
    PrivacyConfig,
    apply_retention,
    privacy_pass,
    purge_pending,
)
from learner.rounds import ROUNDS_FOLDER
from learner.scheduler import PRIVACY_JOB_ID, build_privacy_scheduler
from learner.snapshot import SNAPSHOTS_FOLDER, export_snapshot, turns_to_samples
from store import (
    AdapterRegistry,
    AmbiguousConversation,
    AuditLog,
    DialogStore,
    TurnRecord,
    open_database,
    utcnow,
)
from tuneshield import write_samples


@pytest.fixture(params=["duckdb", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store of each backend."""
    if request.param == "duckdb":
        return str(tmp_path / "store.duckdb")
    return str(request.getfixturevalue("postgres_database_url"))


def turn(
    turn_id: str, key_id: str, conversation: str, text: str, at: datetime, reply: str = "ok"
) -> TurnRecord:
    messages = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": text}]
    return TurnRecord(
        turn_id=turn_id,
        conversation_id=conversation,
        key_id=key_id,
        created_at=at,
        alias="chat",
        adapter="chat-v0000",
        request_messages=json.dumps(messages),
        reply=reply,
        finish_reason="stop",
        prompt_tokens=None,
        completion_tokens=None,
        latency_ms=1.0,
        ttft_ms=None,
        stream=False,
        guard_score=None,
        guard_flag=False,
        opt_out=False,
    )


T0 = datetime(2025, 1, 1, 12, 0, 0)


def write_round(data_dir: Path, run_id: str, snapshot: Path) -> Path:
    """A round's sample file as the worker writes it (samples.jsonl of the snapshot)."""
    samples = turns_to_samples(pq.read_table(snapshot))
    return write_samples(samples, data_dir / ROUNDS_FOLDER / run_id / "samples.jsonl")


def test_erase_records_the_deletion_and_marks_the_adapters_trained_on_it(
    store_url: str, tmp_path: Path
) -> None:
    """Deleting a key's turns marks the adapter whose snapshot window held one of them and
    its descendants (not an adapter trained before), records the deletion with its turn
    ids, and audits it as the actor's with the row count."""
    database = open_database(store_url)
    try:
        dialogs = DialogStore(database)
        dialogs.insert(
            [
                turn("a1", "key_a", "ca", "alpha", T0 + timedelta(minutes=10)),
                turn("b1", "key_b", "cb", "beta", T0 + timedelta(minutes=20)),
            ]
        )
        registry = AdapterRegistry(database)
        windows = {
            "chat-v0001": (None, T0, None),
            "chat-v0002": (T0, T0 + timedelta(minutes=15), "chat-v0001"),
            "chat-v0003": (T0 + timedelta(minutes=15), T0 + timedelta(hours=1), "chat-v0002"),
        }
        for version, (since, until, parent) in windows.items():
            registry.register(
                version,
                adapter_folder(tmp_path / "adapters", version),
                parent=parent,
                snapshot_from=since,
                snapshot_to=until,
            )
        deletion = dialogs.erase(actor="key_admin", key_id="key_a")
        marked = database.call(
            lambda c: c.execute(
                "SELECT version FROM adapters WHERE trained_on_deleted_at IS NOT NULL "
                "ORDER BY version"
            ).fetchall()
        )
        pending = dialogs.pending_purges()
        entries = AuditLog(database).list(action="dialogs.delete")
    finally:
        database.close()
    assert deletion.turns == 1 and deletion.turn_ids == ("a1",)
    assert deletion.adapters == ("chat-v0002", "chat-v0003")
    assert [row[0] for row in marked] == ["chat-v0002", "chat-v0003"]
    assert [(d.deletion_id, d.turn_ids) for d in pending] == [(deletion.deletion_id, ("a1",))]
    assert len(entries) == 1
    assert entries[0].actor == "key_admin" and entries[0].target == "key_a"
    assert entries[0].detail["rows"] == 1
    assert entries[0].detail["adapters_marked"] == ["chat-v0002", "chat-v0003"]


def test_a_conversation_id_is_one_keys(store_url: str) -> None:
    """Two keys that used one conversation id each have their own conversation: without
    the key, deleting or exporting by that id is refused; with it, only that key's turns."""
    database = open_database(store_url)
    try:
        dialogs = DialogStore(database)
        dialogs.insert(
            [
                turn("a1", "key_a", "shared", "alpha", T0),
                turn("b1", "key_b", "shared", "beta", T0 + timedelta(seconds=1)),
                turn("a2", "key_a", "own", "gamma", T0 + timedelta(seconds=2)),
            ]
        )
        with pytest.raises(AmbiguousConversation, match="shared"):
            dialogs.erase(actor="x", conversation_id="shared")
        with pytest.raises(AmbiguousConversation):
            dialogs.export_table(conversation_ids=["own", "shared"])
        only_a = dialogs.export_table(conversation_ids=["shared"], key_id="key_a")
        alone = dialogs.export_table(conversation_ids=["own"])
        deleted = dialogs.erase(actor="x", key_id="key_b", conversation_id="shared")
        left = database.call(
            lambda c: c.execute("SELECT turn_id FROM turns ORDER BY turn_id").fetchall()
        )
        unambiguous = dialogs.erase(actor="x", conversation_id="shared")
    finally:
        database.close()
    assert only_a.column("turn_id").to_pylist() == ["a1"]
    assert alone.column("turn_id").to_pylist() == ["a2"]
    assert deleted.turn_ids == ("b1",)
    assert [row[0] for row in left] == ["a1", "a2"]
    # Once only one key holds the id, the id alone names that key's conversation.
    assert unambiguous.turn_ids == ("a1",)


def test_purge_rewrites_snapshots_and_round_files_without_the_deleted_turns(
    tmp_path: Path,
) -> None:
    """After a deletion the learner's purge rewrites each snapshot and round file that
    held a deleted turn (and no other), records the files, and compacts the DuckDB file:
    no byte of the deleted text is left anywhere, the other key's text stays."""
    data_dir = tmp_path / "data"
    database = open_database(data_dir / "store.duckdb")
    try:
        dialogs = DialogStore(database)
        dialogs.insert(
            [
                turn("a1", "key_a", "ca", "alpha-marker-7f3e", T0, reply="re alpha-marker-7f3e"),
                turn("b1", "key_b", "cb", "beta-marker-91c2", T0 + timedelta(seconds=1)),
            ]
        )
        snapshot = export_snapshot(dialogs, data_dir, None, name="run_1")
        samples = write_round(data_dir, "run_1", snapshot.path)
        untouched = export_snapshot(dialogs, data_dir, T0, name="run_2").path
        dialogs.erase(actor="key_admin", key_id="key_a")
        report = purge_pending(database, data_dir)
        again = purge_pending(database, data_dir)
        entries = AuditLog(database).list(action="dialogs.purge")
    finally:
        database.close()
    assert sorted(report.files) == sorted([snapshot.path, samples])
    assert report.compacted and again.deletions == []
    assert entries[0].actor == "learner"
    assert sorted(entries[0].detail["files"]) == sorted(str(p) for p in report.files)
    assert pq.read_table(snapshot.path).column("turn_id").to_pylist() == ["b1"]
    assert pq.read_table(untouched).column("turn_id").to_pylist() == ["b1"]
    assert "beta-marker-91c2" in samples.read_text()
    for path in data_dir.rglob("*"):
        if path.is_file():
            assert b"alpha-marker-7f3e" not in path.read_bytes(), path
    assert not list(data_dir.rglob(".*.purging"))


async def test_retention_runs_on_the_learners_privacy_schedule(tmp_path: Path) -> None:
    """With a retention period of a minute, the privacy job (APScheduler, first pass at
    once) deletes the older turns and purges their snapshot copy; newer turns stay."""
    data_dir = tmp_path / "data"
    database = open_database(data_dir / "store.duckdb")
    dialogs = DialogStore(database)
    now = utcnow()
    dialogs.insert(
        [
            turn("old", "key_a", "c1", "old words", now - timedelta(minutes=5)),
            turn("new", "key_a", "c1", "new words", now),
        ]
    )
    snapshot = export_snapshot(dialogs, data_dir, None, name="run_1")
    config = PrivacyConfig(retention_days=1 / (24 * 60), scrub_pii=False)
    passes: list[int] = []

    async def job() -> None:
        await asyncio.to_thread(privacy_pass, database, data_dir, config)
        passes.append(1)

    scheduler = build_privacy_scheduler(job, config.purge_interval_minutes)
    scheduler.start()
    try:
        assert scheduler.get_job(PRIVACY_JOB_ID) is not None
        for _ in range(200):
            if passes:
                break
            await asyncio.sleep(0.05)
    finally:
        scheduler.shutdown(wait=False)
    try:
        left = [
            row[0]
            for row in database.call(lambda c: c.execute("SELECT turn_id FROM turns").fetchall())
        ]
        entries = AuditLog(database).list(action="dialogs.delete")
        nothing_more = apply_retention(database, config)
    finally:
        database.close()
    assert passes, "the privacy job did not run"
    assert left == ["new"]
    assert pq.read_table(snapshot.path).column("turn_id").to_pylist() == ["new"]
    assert entries[0].actor == "learner" and entries[0].detail["reason"] == "retention"
    assert nothing_more is None


def test_pii_is_scrubbed_before_a_snapshot_is_written(tmp_path: Path) -> None:
    """E-mail addresses, phone numbers and card numbers leave the snapshot's messages and
    replies as <KIND> placeholders (counted), and ordinary text is left as it is."""
    database = open_database(tmp_path / "store.duckdb")
    text = (
        "write to jane.doe@example.com or call +1 415 555 0132; "
        "card 4111 1111 1111 1111. meet me at noon"
    )
    try:
        dialogs = DialogStore(database)
        dialogs.insert([turn("a1", "key_a", "c1", text, T0, reply="mail ops@example.org")])
        snapshot = export_snapshot(
            dialogs, tmp_path, None, name="s", scrubber=PrivacyConfig().scrubber
        )
    finally:
        database.close()
    row = pq.read_table(snapshot.path).to_pylist()[0]
    user = json.loads(row["request_messages"])[-1]["content"]
    assert user == (
        "write to <EMAIL_ADDRESS> or call <PHONE_NUMBER>; card <CREDIT_CARD>. meet me at noon"
    )
    assert row["reply"] == "mail <EMAIL_ADDRESS>"
    assert snapshot.pii_found == {"EMAIL_ADDRESS": 2, "PHONE_NUMBER": 1, "CREDIT_CARD": 1}
    raw = snapshot.path.read_bytes()
    for secret in (b"jane.doe", b"555 0132", b"4111 1111", b"ops@"):
        assert secret not in raw
    assert not list((tmp_path / SNAPSHOTS_FOLDER).glob(".*"))


def test_privacy_policy_refuses_what_cannot_be_found_offline() -> None:
    """Person names need an NER model that is not installable offline: listing PERSON is
    an error naming it, as is a retention period that is not positive."""
    with pytest.raises(ValueError, match="PERSON"):
        PrivacyConfig(pii_entities=("EMAIL_ADDRESS", "PERSON"))
    with pytest.raises(ValueError, match="retention_days"):
        PrivacyConfig(retention_days=0)
    assert PrivacyConfig(scrub_pii=False).scrubber() is None
