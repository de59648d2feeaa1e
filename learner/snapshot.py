"""Snapshots: the dialogs logged since the last round, as Parquet and as DBL samples.

The gateway logs one row per answered turn: the request's messages (the whole
conversation so far) and the reply. A round learns only from what is new since its
watermark, so each row contributes the one utterance it added to its conversation: the
last user message (``target="user"``, DBL: the bot learns to talk like its users) or the
reply (``target="assistant"``), with up to ``context_turns`` earlier utterances as
context, re-rendered by ``tuneshield``'s DBL rule (``dialogs_to_samples``).

The export runs on the gateway's own DuckDB connection (the one writing process); the
worker subprocess reads the Parquet file. Rows that might still sit in the dialog log's
write buffer are left to the next round: the snapshot stops ``settle_s`` before now, and
its watermark is the newest row it holds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from store import COMPLETE_REPLY, utcnow
from tuneshield import ROLES, Message, Sample, dialogs_to_samples

if TYPE_CHECKING:
    import pyarrow as pa

    from learner.privacy import PiiScrubber
    from store import DialogStore

SNAPSHOTS_FOLDER = "snapshots"
# Columns a snapshot row must carry to become samples.
TURN_FIELDS = ("turn_id", "conversation_id", "created_at", "request_messages", "reply")


class SnapshotError(ValueError):
    """A snapshot or a turn row cannot be used; the message names the row and field."""


@dataclass(frozen=True)
class Snapshot:
    """One exported slice of the dialog log."""

    path: Path
    rows: int
    conversations: int
    watermark_from: datetime | None
    """Exclusive lower bound: the previous round's watermark (None: from the start)."""
    watermark_to: datetime | None
    """The newest row's ``created_at`` (None when the snapshot is empty)."""
    pii_found: dict[str, int] = field(default_factory=dict)
    """PII scrubbed from its texts before it was written, per entity kind."""


def _messages(row: dict[str, Any], index: int) -> list[Message]:
    raw = row.get("request_messages")
    messages = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(messages, list):
        raise SnapshotError(f"turn {index}: field 'request_messages' must be a list of messages")
    out: list[Message] = []
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise SnapshotError(f"turn {index}: request_messages[{position}] has no chat role")
        content = message.get("content")
        if isinstance(content, list):
            # OpenAI content parts: the text parts are what a text model saw.
            content = " ".join(
                str(part.get("text", "")) for part in content if isinstance(part, dict)
            )
        if not isinstance(content, str):
            raise SnapshotError(f"turn {index}: request_messages[{position}].content is not text")
        if message["role"] != "system":
            out.append({"role": message["role"], "content": content})
    return out


def turns_to_samples(
    turns: pa.Table | Sequence[dict[str, Any]],
    *,
    target: str = "user",
    context_turns: int = 3,
) -> list[Sample]:
    """DBL samples from logged turn rows, one per row at most (its new utterance).

    A row whose new utterance has no earlier utterance (a conversation's opening user
    message), or is empty, gives no sample; with ``target="assistant"`` neither does a
    reply the engine did not end itself (``finish_reason`` other than ``COMPLETE_REPLY``:
    a length cap, a broken stream, an engine error): learned, it would teach stopping
    mid-sentence. A row without a finish reason counts as complete.
    Samples carry ``turn_id``, ``created_at``, ``adapter`` (the version that served the
    turn) and ``key_id`` for provenance.
    """
    if target not in ("user", "assistant"):
        raise SnapshotError(f"target must be 'user' or 'assistant', got {target!r}")
    rows = turns.to_pylist() if hasattr(turns, "to_pylist") else list(turns)
    samples: list[Sample] = []
    for index, row in enumerate(rows):
        missing = [name for name in TURN_FIELDS if name not in row]
        if missing:
            raise SnapshotError(f"turn {index}: missing field(s) {', '.join(missing)}")
        utterances = _messages(row, index)
        if target == "assistant":
            if row.get("finish_reason") not in (None, COMPLETE_REPLY):
                continue
            utterances.append({"role": "assistant", "content": str(row["reply"])})
        # The row's new utterance is the last one of the target's role.
        if not utterances or utterances[-1]["role"] != target:
            continue
        dialog = {
            "conversation_id": str(row["conversation_id"]),
            "turns": utterances,
            "source": "gateway:turns",
        }
        new = [
            sample
            for sample in dialogs_to_samples([dialog], target=target, max_context=context_turns)
            if sample["turn_index"] == len(utterances) - 1 and sample["response"].strip()
        ]
        for sample in new:
            sample.update(
                turn_id=str(row["turn_id"]),
                created_at=str(row["created_at"]),
                adapter=row.get("adapter"),
                key_id=row.get("key_id"),
                # The OpenAI `user` value: flagged samples are counted per end user too.
                end_user=row.get("end_user"),
            )
        samples.extend(new)
    return samples


def read_snapshot_samples(
    path: Path, *, target: str = "user", context_turns: int = 3
) -> list[Sample]:
    """``turns_to_samples`` of a snapshot's Parquet file."""
    import pyarrow.parquet as pq

    return turns_to_samples(pq.read_table(path), target=target, context_turns=context_turns)


def export_snapshot(
    store: DialogStore,
    data_dir: Path,
    since: datetime | None,
    *,
    name: str | None = None,
    settle_s: float = 0.0,
    scrubber: Callable[[], PiiScrubber | None] | None = None,
) -> Snapshot:
    """Export the turns newer than ``since`` that training may use (``DialogStore.export``:
    not opted out, not guard-flagged, delivered, not of a quarantined key or end user) to
    ``data_dir/snapshots``.

    Rows newer than ``now - settle_s`` stay for the next round (the dialog log writes in
    batches; a turn logged late must not fall behind a watermark). With a ``scrubber``
    (called only when there are rows: building one takes seconds) the texts are scrubbed
    of PII before the file is written (the unscrubbed export
    exists only under a hidden scratch name, removed at once). The file appears complete
    or not at all. A conversation is counted per key (a conversation id is one key's).
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    folder = Path(data_dir) / SNAPSHOTS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name or f'snapshot_{utcnow():%Y%m%dT%H%M%S%f}'}.parquet"
    scratch = folder / f".{path.name}.exporting"
    try:
        store.export(scratch, since=since)
        table = pq.read_table(scratch)
        if settle_s > 0 and table.num_rows:
            cutoff = utcnow() - timedelta(seconds=settle_s)
            table = table.filter(pc.less_equal(table["created_at"], cutoff))
        pii_found: dict[str, int] = {}
        pii = scrubber() if scrubber is not None and table.num_rows else None
        if pii is not None:
            from learner.privacy import scrub_turns

            table, pii_found = scrub_turns(table, pii)
        pq.write_table(table, scratch)
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)
    watermark_to: datetime | None = None
    conversations = 0
    if table.num_rows:
        watermark_to = pc.max(table["created_at"]).as_py()
        owners = table.select(["key_id", "conversation_id"]).group_by(["key_id", "conversation_id"])
        conversations = owners.aggregate([]).num_rows
    return Snapshot(path, table.num_rows, conversations, since, watermark_to, pii_found)
