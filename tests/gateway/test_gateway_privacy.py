"""Privacy through the admin API: a conversation id is one key's, and deleting a user's
dialogs leaves no copy of them anywhere under the data dir or in the database."""

from __future__ import annotations

import io
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from gateway_fakes import ADMIN, FakeEngine, chat_body, logged_turns
from litestar import Litestar
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.dialog_journal import JOURNAL_DIRNAME, DialogJournal
from gateway.settings import GatewaySettings
from learner.privacy import purge_pending
from learner.rounds import ROUNDS_FOLDER
from learner.snapshot import export_snapshot, read_snapshot_samples
from store import AuditLog, Database, DialogStore, TurnRecord, open_database
from tuneshield import write_samples

ALICE_MARK = "alice-marker-5d1a9c"
BOB_MARK = "bob-marker-e27b40"


async def new_key(client: AsyncTestClient[Litestar], name: str) -> dict[str, Any]:
    created = (await client.post("/admin/keys", json={"name": name}, headers=ADMIN)).json()
    return {"key_id": created["key_id"], "headers": {"Authorization": f"Bearer {created['key']}"}}


async def say(client: AsyncTestClient[Litestar], user: dict[str, Any], mark: str, n: int) -> None:
    """One turn of a two-message conversation holding ``mark`` (a sample once snapshotted)."""
    body = chat_body()
    body["messages"] = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi, how can I help?"},
        {"role": "user", "content": f"{mark} number {n}"},
    ]
    reply = await client.post(
        "/v1/chat/completions",
        json=body,
        headers={**user["headers"], "X-Conversation-Id": f"{user['key_id']}-{n}"},
    )
    assert reply.status_code == 200, reply.text


def files_holding(data_dir: Path, mark: str) -> list[Path]:
    """Every file under ``data_dir`` whose bytes hold ``mark``; Parquet files also by their
    decoded text (a compressed page need not hold the bytes as written)."""
    found = []
    for path in sorted(p for p in data_dir.rglob("*") if p.is_file()):
        held = mark.encode() in path.read_bytes()
        if not held and path.suffix == ".parquet":
            held = mark in str(pq.read_table(path).to_pylist())
        if held:
            found.append(path)
    return found


def rows_holding(database: Database, mark: str) -> dict[str, int]:
    """Rows holding ``mark`` in any text column of any table of the database."""
    columns = database.call(
        lambda c: c.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() "
            "AND upper(data_type) IN ('VARCHAR', 'JSON', 'TEXT', 'CHARACTER VARYING')"
        ).fetchall()
    )
    hits: dict[str, int] = {}
    for table, column in columns:
        row = database.call(
            lambda c, t=table, k=column: c.execute(
                f"SELECT count(*) FROM {t} WHERE CAST({k} AS VARCHAR) LIKE ?", [f"%{mark}%"]
            ).fetchone()
        )
        if row and row[0]:
            hits[f"{table}.{column}"] = int(row[0])
    return hits


async def test_deleting_a_users_dialogs_leaves_no_copy_under_the_data_dir(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """Two users' turns reach a snapshot, a round's sample files and the gateway's journal;
    deleting one user's dialogs (admin API), then the learner's purge pass, leaves 0 hits
    of that user's marker in every file under the data dir (bytes and decoded Parquet, the
    DuckDB file included) and in every text column of the database, while the other
    user's marker is still there; the audit log names the actor, the rows and the files."""
    data_dir = settings.data_dir
    app = create_app(settings, transport=engine.transport())
    async with AsyncTestClient(app=app) as client:
        alice, bob = await new_key(client, "alice"), await new_key(client, "bob")
        for n in range(2):
            await say(client, alice, ALICE_MARK, n)
            await say(client, bob, BOB_MARK, n)
    # Round 1's files, as the learner and its worker write them.
    database = open_database(settings.store_url)
    try:
        snapshot = export_snapshot(DialogStore(database), data_dir, None, name="run_1")
        samples = read_snapshot_samples(snapshot.path)
        rounds = data_dir / ROUNDS_FOLDER
        write_samples(samples, rounds / "run_1" / "samples.jsonl")
        write_samples(samples, rounds / "train-launch" / "samples.jsonl")
    finally:
        database.close()
    assert len(files_holding(data_dir, ALICE_MARK)) >= 3  # snapshot, samples, training copy
    async with AsyncTestClient(app=create_app(settings, transport=engine.transport())) as client:
        for n in range(2, 4):
            await say(client, alice, ALICE_MARK, n)
            await say(client, bob, BOB_MARK, n)
        journal = data_dir / JOURNAL_DIRNAME
        assert files_holding(journal, ALICE_MARK), "the journal holds the turns"
        deleted = await client.delete(f"/admin/dialogs?key_id={alice['key_id']}", headers=ADMIN)
        assert deleted.status_code == 200, deleted.text
        # The gateway's own copies go at once, while it runs.
        assert files_holding(journal, ALICE_MARK) == []
    assert deleted.json() == {"deleted_turns": 4}
    database = open_database(settings.store_url)
    try:
        report = purge_pending(database, data_dir)
        alice_rows, bob_rows = rows_holding(database, ALICE_MARK), rows_holding(database, BOB_MARK)
        audit = AuditLog(database)
        deletes, purges = audit.list(action="dialogs.delete"), audit.list(action="dialogs.purge")
    finally:
        database.close()
    assert report.compacted
    assert alice_rows == {}
    assert bob_rows == {"turns.request_messages": 4}
    assert files_holding(data_dir, ALICE_MARK) == []
    # The search reads what it searches: the other user's marker is found, in the
    # snapshot and in the database file's own bytes.
    assert {snapshot.path, Path(settings.store_url)} <= set(files_holding(data_dir, BOB_MARK))
    assert [t["key_id"] for t in logged_turns(settings)] == [bob["key_id"]] * 4
    assert [(e.actor, e.target, e.detail["rows"]) for e in deletes] == [
        ("env-admin", alice["key_id"], 4)
    ]
    by_copy = {entry.detail["copies"]: entry for entry in purges}
    assert by_copy["journal"].actor == "env-admin" and by_copy["journal"].detail["files"]
    assert by_copy["learner"].actor == "learner"
    assert sorted(by_copy["learner"].detail["files"]) == sorted(
        str(p)
        for p in (
            snapshot.path,
            rounds / "run_1/samples.jsonl",
            rounds / "train-launch/samples.jsonl",
        )
    )


async def test_a_conversation_id_is_scoped_to_its_key(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """A second key sending the first key's X-Conversation-Id logs its own conversation:
    deleting or exporting by that id alone is a 409 naming the field, with the key only
    that key's turns."""
    async with AsyncTestClient(app=create_app(settings, transport=engine.transport())) as client:
        alice, bob = await new_key(client, "alice"), await new_key(client, "bob")
        for user in (alice, bob):
            await client.post(
                "/v1/chat/completions",
                json=chat_body(),
                headers={**user["headers"], "X-Conversation-Id": "shared-1"},
            )
        url = "/admin/dialogs/export"
        ambiguous_delete = await client.delete(
            "/admin/dialogs?conversation_id=shared-1", headers=ADMIN
        )
        ambiguous_export = await client.post(
            url, json={"conversation_ids": ["shared-1"]}, headers=ADMIN
        )
        alices = await client.post(
            url, json={"conversation_ids": ["shared-1"], "key_id": alice["key_id"]}, headers=ADMIN
        )
        bobs_deleted = await client.delete(
            f"/admin/dialogs?conversation_id=shared-1&key_id={bob['key_id']}", headers=ADMIN
        )
    for answer, param in ((ambiguous_delete, "key_id"), (ambiguous_export, "conversation_ids")):
        assert answer.status_code == 409, answer.text
        error = answer.json()["error"]
        assert (error["code"], error["param"]) == ("ambiguous_conversation", param)
    exported = pq.read_table(io.BytesIO(alices.content))
    assert exported.column("key_id").to_pylist() == [alice["key_id"]]
    assert bobs_deleted.json() == {"deleted_turns": 1}
    assert [(t["key_id"], t["conversation_id"]) for t in logged_turns(settings)] == [
        (alice["key_id"], "shared-1")
    ]


def journal_turn(turn_id: str) -> TurnRecord:
    return TurnRecord(
        turn_id=turn_id,
        conversation_id="c1",
        key_id="key_a",
        created_at=datetime(2026, 12, 1, 12, 0, 0),
        alias="chat",
        adapter="chat-v0000",
        request_messages=json.dumps([{"role": "user", "content": f"words of {turn_id}"}]),
        reply="ok",
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


def journaled(journal: DialogJournal) -> list[str]:
    """The turn ids in the journal's own segment files, in order."""
    return [
        json.loads(line)["turn_id"]
        for path in sorted(journal.directory.glob("*.jsonl"))
        for line in path.read_bytes().splitlines()
    ]


def test_journal_purge_never_rewrites_the_segment_being_appended_to(tmp_path: Path) -> None:
    """A closed segment is rewritten without the deleted turns' lines (the others kept for
    recovery); the open one is not rewritten while it holds uncommitted turns (an append
    may be writing it), and once all its turns are committed a purge deletes it at once."""
    journal = DialogJournal(tmp_path, segment_bytes=1)  # every append closes the last one
    try:
        closed = journal.append([journal_turn("gone-1"), journal_turn("kept-1")])
        current = journal.append([journal_turn("gone-2")])
        touched = journal.purge(["gone-1", "gone-2"])
        assert [p.name for p in touched] == [f"{closed:08d}.jsonl"]
        assert journaled(journal) == ["kept-1", "gone-2"]
        journal.committed([closed, closed, current])
        assert [p.name for p in journal.purge(["gone-2"])] == [f"{current:08d}.jsonl"]
        assert journaled(journal) == []
        assert journal.append([journal_turn("after")]) == current
        assert journaled(journal) == ["after"]
    finally:
        journal.close()
