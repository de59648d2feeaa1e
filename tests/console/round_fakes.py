"""A finished round's folder as the learner leaves it, for the admin API's and the
console's tests and the schema test: its worker log, its training samples
(``samples.jsonl``, as ``learner.round_pipeline`` writes them: classified, healed, with
the key each turn came from) and its ``summary.json`` (the learner's stages, the
worker's result with its own stages)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from learner.round_pipeline import SAMPLES_FILE
from learner.round_report import SUMMARY_FILE
from learner.worker import LOG_FILE
from store import RunRecord, RunStore

JUDGE = "lexical"
THRESHOLD = 0.5
# Wall seconds as learner/rounds.py (the learner's) and the worker (its own, with peak
# RSS in GiB) record them.
LEARNER_STAGES = [("snapshot", 0.4), ("worker", 96.0), ("register", 0.3), ("hotswap", 1.2)]
WORKER_STAGES = [("classify", 3.1, 1.2), ("heal", 21.5, 2.4), ("train", 60.2, 3.1),
                 ("gates", 9.8, 3.3)]  # fmt: skip


def sample(
    number: int,
    key_id: str | None,
    score: float,
    reply: str,
    healed: str | None = None,
) -> dict[str, Any]:
    """A sample as a round trains on it: a user's turn after two messages, scored by the
    defense judge, healed when flagged (``healed``: the reply it trained on instead)."""
    flagged = score >= THRESHOLD
    return {
        "conversation_id": f"conv-{number}",
        "turn_index": 2,
        "context": [
            {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"},
        ],
        "response": healed if flagged and healed is not None else reply,
        "source": "gateway:turns",
        "turn_id": f"turn-{number}",
        "created_at": "2026-05-01 10:00:00",
        "adapter": "chat-v0000",
        "key_id": key_id,
        "toxic_score": score,
        "toxic": flagged,
        "judge": JUDGE,
        "original_response": reply if flagged and healed is not None else None,
        "heal_mode": "contextual" if flagged and healed is not None else None,
    }


def samples_for(key_id: str | None, other_key: str | None = "key_other") -> list[dict[str, Any]]:
    """Six samples: four of ``key_id`` (two flagged and healed), two of ``other_key``
    (one flagged)."""
    return [
        sample(1, key_id, 0.02, "tell me about cats"),
        sample(2, key_id, 0.91, "you are a useless idiot", "you are not much help today"),
        sample(3, other_key, 0.12, "what is the weather like"),
        sample(4, key_id, 0.77, "shut up, stupid bot", "please stop for a moment, bot"),
        sample(5, other_key, 0.64, "I hate you", "I am upset with you"),
        sample(6, key_id, 0.31, "recommend a book"),
    ]


def summary(run_id: str) -> dict[str, Any]:
    """``summary.json`` of a round that ended: its stages and its worker's."""
    return {
        "run_id": run_id,
        "alias": "chat",
        "plan": {},
        "stages": [{"stage": name, "seconds": seconds} for name, seconds in LEARNER_STAGES],
        "result": {
            "candidate": {
                "stages": [
                    {"stage": name, "seconds": seconds, "peak_rss_gib": rss}
                    for name, seconds, rss in WORKER_STAGES
                ]
            }
        },
        "status": "succeeded",
    }


def write_round(round_dir: Path, run_id: str, samples: list[dict[str, Any]] | None) -> Path:
    """The round's folder with its log, summary and (unless None) samples; its log path."""
    round_dir.mkdir(parents=True, exist_ok=True)
    log = round_dir / LOG_FILE
    log.write_text("fake worker: classify\nfake worker: train\n")
    (round_dir / SUMMARY_FILE).write_text(json.dumps(summary(run_id)))
    if samples is not None:
        lines = [json.dumps(row, ensure_ascii=False) for row in samples]
        (round_dir / SAMPLES_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return log


def finished_round(
    runs: RunStore,
    folders: Path,
    samples: list[dict[str, Any]] | None,
    *,
    status: str = "succeeded",
    version: str | None = "chat-v0001",
) -> RunRecord:
    """A run row of ``status`` whose folder (under ``folders``) holds ``samples``."""
    run = runs.create("chat")
    log = write_round(folders / run.run_id, run.run_id, samples)
    runs.update(run.run_id, status="running", stage="train", progress=0.4, log_path=str(log))
    return runs.update(run.run_id, status=status, stage="done", progress=1.0, version=version)
