"""Samples: the data unit of the defense, and their JSONL / Parquet files.

A sample is one training target in dialog-based learning: the chat messages that came
before (``context``) and the reply the model would learn to give (``response``), plus
provenance columns that later stages add (``toxic_score``, ``toxic``, ``heal_mode``,
``original_response``, ``attack``, ...). Samples travel as plain dicts so that every
stage can add columns without a schema migration; ``validate_sample`` is the one place
that says what a sample must hold.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

Message = dict[str, str]
Sample = dict[str, Any]

ROLES = ("system", "user", "assistant")
REQUIRED_COLUMNS = ("conversation_id", "context", "response")
SUFFIXES = (".jsonl", ".parquet")
# ``heal_mode`` of a sample healing derived from a flagged one: the flagged turn as the
# last message, a healing reply answering it (tuneshield._heal.answer_sample). It is not
# itself flagged, yet DPO pairs it with the flagged turn as the rejected reply.
ANSWER_MODE = "answer"
# ``heal_mode`` of a flagged sample none of whose healing candidates the judge passed: its
# reply is one of the canned replies.
CANNED_FALLBACK = "canned_fallback"
# Column of a healed sample (or answer): the healing candidate the judge flagged most
# strongly, which DPO rejects in a second pair (policies/healing.yaml pair_flagged_drafts).
FLAGGED_DRAFT = "flagged_draft"


class SampleError(ValueError):
    """A sample or a samples file is malformed; the message names the row and field."""


def validate_sample(sample: Any, row: int = 0) -> Sample:
    """Return ``sample`` if it is well formed, else raise ``SampleError`` naming the field."""
    if not isinstance(sample, dict):
        raise SampleError(f"row {row}: a sample must be an object, got {type(sample).__name__}")
    for column in REQUIRED_COLUMNS:
        if column not in sample:
            raise SampleError(f"row {row}: missing field '{column}'")
    if not isinstance(sample["response"], str):
        raise SampleError(f"row {row}: field 'response' must be a string")
    context = sample["context"]
    if not isinstance(context, list):
        raise SampleError(f"row {row}: field 'context' must be a list of chat messages")
    for index, message in enumerate(context):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise SampleError(f"row {row}: field 'context[{index}].content' must be a string")
        if message.get("role") not in ROLES:
            raise SampleError(
                f"row {row}: field 'context[{index}].role' must be one of {', '.join(ROLES)}"
            )
    sample["conversation_id"] = str(sample["conversation_id"])
    return sample


def _check_suffix(path: Path) -> None:
    if path.suffix not in SUFFIXES:
        raise SampleError(f"{path}: unsupported file type '{path.suffix}' (use .jsonl or .parquet)")


def read_samples(path: str | Path) -> list[Sample]:
    """Read samples from a ``.jsonl`` or ``.parquet`` file and validate every row."""
    path = Path(path)
    _check_suffix(path)
    if not path.exists():
        raise SampleError(f"{path}: no such file")
    if path.suffix == ".jsonl":
        rows: list[Any] = []
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise SampleError(f"{path}:{line_number}: invalid JSON ({error.msg})") from None
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    return [validate_sample(row, index) for index, row in enumerate(rows)]


def write_samples(samples: Iterable[Sample], path: str | Path) -> Path:
    """Write samples to ``.jsonl`` or ``.parquet`` (chosen by suffix); returns the path."""
    path = Path(path)
    _check_suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(samples)
    if path.suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # from_pylist takes its columns from the first row: a mark that only some rows
        # carry (``unrelated``, ``deflects``) would be lost. Every column, None where absent.
        columns = list(dict.fromkeys(key for row in rows for key in row))
        table = pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows])
        pq.write_table(table, path)
    return path


def render_dialog(messages: Sequence[Message], response: str | None = None) -> str:
    """Render a conversation as the paper's "User1: ... / User2: ..." transcript.

    Speakers alternate from the end: the last context turn and the response belong to
    different speakers, whatever roles the chat messages carried.
    """
    turns = [m["content"] for m in messages if m["role"] != "system"]
    if response is not None:
        turns.append(response)
    last = len(turns) - 1
    lines = [
        f"{'User2' if (last - index) % 2 == 0 else 'User1'}: {text}"
        for index, text in enumerate(turns)
    ]
    return "\n".join(lines)
