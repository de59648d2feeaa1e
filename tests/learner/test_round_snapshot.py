"""Snapshots of the dialog log: DBL samples from turn rows, watermarks, opt-out, settling."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from learner.snapshot import (
    SnapshotError,
    export_snapshot,
    read_snapshot_samples,
    turns_to_samples,
)
from store import (
    BROKEN_REPLY,
    COMPLETE_REPLY,
    ApiKeyRecord,
    DialogStore,
    KeyStore,
    TurnRecord,
    open_database,
    utcnow,
)


def turn(
    conversation: str,
    messages: list[tuple[str, str]],
    reply: str,
    at: datetime,
    *,
    key_id: str = "key_a",
    opt_out: bool = False,
) -> TurnRecord:
    request = [{"role": role, "content": content} for role, content in messages]
    return TurnRecord(
        turn_id=f"{conversation}-{len(messages)}",
        conversation_id=conversation,
        key_id=key_id,
        created_at=at,
        alias="chat",
        adapter="chat-v0000",
        request_messages=json.dumps(request),
        reply=reply,
        finish_reason="stop",
        prompt_tokens=None,
        completion_tokens=None,
        latency_ms=1.0,
        ttft_ms=None,
        stream=False,
        guard_score=None,
        guard_flag=False,
        opt_out=opt_out,
    )


def as_rows(*turns: TurnRecord) -> list[dict[str, object]]:
    return [t.__dict__.copy() for t in turns]


T0 = datetime(2025, 1, 1, 12, 0, 0)
FIRST = turn("c1", [("system", "be kind"), ("user", "hi")], "hello!", T0)
SECOND = turn(
    "c1",
    [("system", "be kind"), ("user", "hi"), ("assistant", "hello!"), ("user", "you smell")],
    "that is rude",
    T0 + timedelta(seconds=5),
)


def test_user_target_takes_the_new_user_turn_with_context() -> None:
    """A row yields its last user message as the target, the bot's turns as user context."""
    samples = turns_to_samples(as_rows(FIRST, SECOND))
    assert len(samples) == 1, "the opening message has no context and gives no sample"
    sample = samples[0]
    assert sample["response"] == "you smell"
    assert sample["context"] == [
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "hello!"},
    ]
    assert sample["turn_id"] == SECOND.turn_id and sample["adapter"] == "chat-v0000"


def test_assistant_target_and_context_cap() -> None:
    """Assistant mode learns the reply; context keeps at most context_turns utterances."""
    samples = turns_to_samples(as_rows(SECOND), target="assistant", context_turns=2)
    assert [s["response"] for s in samples] == ["that is rude"]
    assert samples[0]["context"] == [
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "you smell"},
    ]


@pytest.mark.parametrize("reason", [BROKEN_REPLY, "engine_timeout", "length"])
def test_a_reply_cut_short_is_not_learned(reason: str) -> None:
    """A partial reply (a broken stream, an engine timeout, a length cap) would teach the
    bot to stop mid-sentence: with the assistant as target it gives no sample; the user's
    turn of the same row is still learned with the user as target."""
    cut = dataclasses.replace(SECOND, finish_reason=reason, reply="that is")
    assert turns_to_samples(as_rows(FIRST, cut), target="assistant") == turns_to_samples(
        as_rows(FIRST), target="assistant"
    )
    assert [s["response"] for s in turns_to_samples(as_rows(cut))] == ["you smell"]


@pytest.mark.parametrize("reason", [COMPLETE_REPLY, None])
def test_a_complete_reply_is_learned(reason: str | None) -> None:
    """The engine's own end, or none recorded (rows logged before reasons were), counts."""
    done = dataclasses.replace(SECOND, finish_reason=reason)
    assert [s["response"] for s in turns_to_samples(as_rows(done), target="assistant")] == [
        "that is rude"
    ]


def test_malformed_rows_name_the_field() -> None:
    """A row without request_messages, or with a role-less message, is refused by name."""
    row = as_rows(SECOND)[0]
    del row["request_messages"]
    with pytest.raises(SnapshotError, match="request_messages"):
        turns_to_samples([row])
    bad = as_rows(SECOND)[0] | {"request_messages": json.dumps([{"content": "x"}])}
    with pytest.raises(SnapshotError, match=r"request_messages\[0\]"):
        turns_to_samples([bad])


def test_export_advances_watermark_and_skips_opted_out(tmp_path: Path) -> None:
    """Export holds only rows after the watermark, never opted-out ones; watermark_to is the
    newest exported row."""
    database = open_database(":memory:")
    store = DialogStore(database)
    later = turn("c2", [("user", "a"), ("assistant", "b"), ("user", "c")], "d", T0 + timedelta(1))
    hidden = turn("c3", [("user", "a"), ("assistant", "b"), ("user", "x")], "y", T0, opt_out=True)
    store.insert([FIRST, SECOND, later, hidden])
    first = export_snapshot(store, tmp_path, None, name="one")
    assert (first.rows, first.conversations) == (3, 2)
    assert first.watermark_from is None and first.watermark_to == later.created_at
    assert [s["response"] for s in read_snapshot_samples(first.path)] == ["you smell", "c"]
    assert DialogStore(database).count_new_conversations(first.watermark_to) == 0
    second = export_snapshot(store, tmp_path, first.watermark_to, name="two")
    assert second.rows == 0 and second.watermark_to is None
    assert not list((tmp_path / "snapshots").glob(".*")), "no scratch file is left behind"


def test_opted_out_key_and_settling_rows_wait(tmp_path: Path) -> None:
    """Turns of an opted-out key never count; turns younger than settle_s stay for later."""
    database = open_database(":memory:")
    keys = KeyStore(database)
    keys.add(ApiKeyRecord("key_b", "b", "hash-b", "ts-b", "user", True, None, T0, None))
    store = DialogStore(database)
    now = utcnow()
    fresh = turn("c4", [("user", "a"), ("assistant", "b"), ("user", "c")], "d", now)
    store.insert([SECOND, fresh, turn("c5", [("user", "q")], "r", T0, key_id="key_b")])
    assert DialogStore(database).count_new_conversations(None) == 2
    snapshot = export_snapshot(store, tmp_path, None, settle_s=60)
    assert snapshot.rows == 1 and snapshot.watermark_to == SECOND.created_at
    assert DialogStore(database).count_new_conversations(snapshot.watermark_to) == 1
