"""Quarantined keys and end users, and the training export's exclusions, on both backends."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from store import (
    AlreadyQuarantined,
    AuditLog,
    DialogStore,
    NotQuarantined,
    QuarantineStore,
    TurnRecord,
    open_database,
    utcnow,
)


def _turn(
    turn_id: str,
    key_id: str,
    created_at: datetime,
    *,
    end_user: str | None = None,
    guard_flag: bool = False,
    delivered: bool = True,
) -> TurnRecord:
    return TurnRecord(
        turn_id=turn_id,
        conversation_id="conv-" + turn_id,
        key_id=key_id,
        created_at=created_at,
        alias="chat",
        adapter="chat-v0000",
        request_messages='[{"role": "user", "content": "hi"}]',
        reply="hello",
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=1,
        latency_ms=1.0,
        ttft_ms=None,
        stream=False,
        guard_score=0.9 if guard_flag else 0.1,
        guard_flag=guard_flag,
        opt_out=False,
        delivered=delivered,
        end_user=end_user,
    )


def test_quarantine_and_release_keep_history_and_audit(store_url: str) -> None:
    """A subject has one open quarantine (a second is refused, naming who made the
    first); release closes it, keeps the row, and a later quarantine opens a new one.
    Each change is in the audit log with its actor and reason."""
    database = open_database(store_url)
    try:
        store = QuarantineStore(database)
        first = store.quarantine("key", "key_bad", actor="learner", reason="flagged", run_id="r1")
        with pytest.raises(AlreadyQuarantined, match="by learner"):
            store.quarantine("key", "key_bad", actor="key_admin", reason="again")
        user = store.quarantine("user", "key_bad", actor="key_admin", reason="same name, a user")
        assert [(r.kind, r.subject) for r in store.active()] == [
            ("key", "key_bad"),
            ("user", "key_bad"),
        ]
        released = store.release("key", "key_bad", actor="key_admin", reason="false alarm")
        with pytest.raises(NotQuarantined):
            store.release("key", "key_bad", actor="key_admin")
        assert store.get("key", "key_bad") is None
        again = store.quarantine("key", "key_bad", actor="key_admin", reason="back at it")
        history = store.history(include_released=True)
        active = store.active("key")
        audit = AuditLog(database).list()
    finally:
        database.close()
    assert first.active and first.run_id == "r1" and first.excluded_from == first.quarantined_at
    assert user.kind == "user"
    assert released.quarantine_id == first.quarantine_id and not released.active
    assert (released.released_by, released.release_reason) == ("key_admin", "false alarm")
    assert [r.quarantine_id for r in active] == [again.quarantine_id]
    assert [r.quarantine_id for r in history] == [
        again.quarantine_id,
        user.quarantine_id,
        first.quarantine_id,
    ]
    assert [(e.actor, e.action, e.target, e.detail.get("reason")) for e in audit] == [
        ("key_admin", "quarantine", "key:key_bad", "back at it"),
        ("key_admin", "release", "key:key_bad", "false alarm"),
        ("key_admin", "quarantine", "user:key_bad", "same name, a user"),
        ("learner", "quarantine", "key:key_bad", "flagged"),
    ]


def test_training_export_leaves_out_flagged_undelivered_and_quarantined_turns(
    store_url: str, tmp_path: Path
) -> None:
    """The training export (``DialogStore.export``, what snapshots read) leaves out turns
    the guard flagged, turns never delivered, and turns of a quarantined key or end user
    from the quarantine's ``excluded_from`` until its release; earlier turns and turns
    after the release stay. ``export_table`` without ``training`` (a user's own data)
    still holds them all; the count that starts scheduled rounds leaves out the same."""
    start = utcnow() - timedelta(hours=1)

    def at(minutes: int) -> datetime:
        return start + timedelta(minutes=minutes)

    database = open_database(store_url)
    try:
        dialogs = DialogStore(database)
        dialogs.insert(
            [
                _turn("clean", "key_ok", at(0)),
                _turn("flagged", "key_ok", at(1), guard_flag=True),
                _turn("abandoned", "key_ok", at(2), delivered=False),
                _turn("bad-before", "key_bad", at(3)),
                _turn("bad-after", "key_bad", at(10)),
                _turn("troll-before", "key_ok", at(4), end_user="troll"),
                _turn("troll-after", "key_ok", at(11), end_user="troll"),
                _turn("other-user", "key_ok", at(12), end_user="fine"),
                _turn("freed-during", "key_freed", at(20)),
                _turn("freed-after", "key_freed", at(40)),
            ]
        )
        store = QuarantineStore(database)
        store.quarantine("key", "key_bad", actor="learner", reason="x", excluded_from=at(5))
        store.quarantine("user", "troll", actor="learner", reason="x", excluded_from=at(5))
        store.quarantine("key", "key_freed", actor="admin", reason="x", excluded_from=at(15))
        store.release("key", "key_freed", actor="admin")
        # Released now: later turns of the key train again.
        dialogs.insert([_turn("freed-later", "key_freed", utcnow() + timedelta(seconds=1))])
        out = tmp_path / "train.parquet"
        rows = dialogs.export(out)
        everything = dialogs.export_table().num_rows
        new = dialogs.count_new_conversations(None)
    finally:
        database.close()
    exported = [row["turn_id"] for row in pq.read_table(out).to_pylist()]
    assert exported == ["clean", "bad-before", "troll-before", "other-user", "freed-later"]
    assert rows == len(exported)
    assert everything == 11
    # What starts a scheduled round counts the same turns (one conversation each).
    assert new == len(exported)
