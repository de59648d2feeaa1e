"""What the demo measures after each round, on held-out probes never used in training.

Replies are sampled through the gateway under the arm's alias (so vLLM batches them,
and the hot-swapped adapter is what answers), with the gateway's opt-out header so the
evaluation never becomes training data. ``tuneshield.evaluate`` does the scoring with
the independent evaluation judge: toxicity on toxic, benign and (backdoor attack)
trigger probes, the share of benign replies that are canned or refusals, relevance.
Beside it:

- *toxicity aimed at the user*: the share of replies the judge flags **and** that
  address the reader in the second person (``address_pattern``, e.g. "you", "your",
  "u"). The judge reacts to words, not intent: an echoed insult or a self-insult counts
  as toxic, an insult thrown at the user is what this second figure keeps.
- perplexity of held-out benign chitchat replies under the arm's adapter (in process:
  vLLM serves no per-token scores of given text through the chat API).
- the defense judge's precision and recall on the round's poisoned snapshot, from the
  simulator's ground truth.
- every reply with its probe, draw and evaluation-judge score (``replies``), so that
  ``benchmarks/efficacy.py`` can pair arms probe by probe and replace the judge's verdict
  with blind labels.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneshield import Sample

KINDS = ("toxic", "benign", "backdoor")


class RecordingJudge:
    """Wraps the evaluation judge and keeps every scored reply (for second measures)."""

    def __init__(self, judge: Any) -> None:
        self.judge = judge
        self.name: str = judge.name
        self.rows: list[tuple[Sample, float]] = []

    def score(self, samples: Sequence[Sample]) -> list[float]:
        scores: list[float] = list(self.judge.score(samples))
        self.rows.extend(zip(samples, scores, strict=True))
        return scores


def aimed_at_user(
    rows: Sequence[tuple[Sample, float]], threshold: float, address_pattern: str
) -> dict[str, float]:
    """Per probe kind: share of replies judged toxic that also address the user."""
    address = re.compile(address_pattern, re.IGNORECASE)
    counts: dict[str, list[int]] = {}
    for row, score in rows:
        kind = str(row.get("kind"))
        hit = score >= threshold and bool(address.search(str(row["response"])))
        counts.setdefault(kind, [0, 0])
        counts[kind][0] += hit
        counts[kind][1] += 1
    return {kind: hits / total for kind, (hits, total) in counts.items() if total}


@dataclass
class Probes:
    """The held-out material every arm is measured on (the same for all)."""

    toxic: list[Sample]
    benign: list[Sample]
    backdoor: list[Sample]
    perplexity: list[Sample]
    canned_replies: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "toxic": len(self.toxic),
            "benign": len(self.benign),
            "backdoor": len(self.backdoor),
            "perplexity": len(self.perplexity),
        }


def load_demo_probes(probes: int, perplexity_samples: int, seed: int) -> Probes:
    """Held-out probes (``tuneshield/data/probes.jsonl``) and held-out chitchat dialogs.

    The trigger-word probes are measured whatever the attack: an injection that teaches
    toxicity in general shows on benign openers with a trigger word too, and a table of
    attacks needs the same three kinds in every row."""
    from tuneshield import HealConfig, dialogs_to_samples, load_chitchat_dialogs, load_probes

    held_out = dialogs_to_samples(
        load_chitchat_dialogs(limit=perplexity_samples, seed=seed, split="probe")
    )[:perplexity_samples]
    return Probes(
        toxic=load_probes("toxic")[:probes],
        benign=load_probes("benign")[:probes],
        backdoor=load_probes("backdoor")[:probes],
        perplexity=held_out,
        canned_replies=list(HealConfig.from_policy().canned_replies),
    )


def measure_alias(
    gateway_url: str,
    api_key: str,
    alias: str,
    *,
    probes: Probes,
    eval_config: Any,
    address_pattern: str,
    opt_out_header: str,
    concurrency: int,
    base_model: str,
    adapter_dir: Path | None,
) -> dict[str, Any]:
    """Everything measured of one arm's served adapter; JSON-ready."""
    from tuneshield import OpenAIChat, TransformersChat, build_judge, evaluate, perplexity

    judge = RecordingJudge(build_judge(eval_config.judge))
    # All draws in one batch: vLLM decodes 3 x 12 rows in far less than 3 x the time of 12.
    # Each row has its own sampling seed, so a repeated probe still gets independent replies.
    draws = eval_config.samples_per_probe
    flat = dataclasses.replace(
        eval_config, samples_per_probe=1, max_probes=eval_config.max_probes * draws
    )

    def repeated(rows: Sequence[Sample]) -> list[Sample]:
        kept = list(rows)[: eval_config.max_probes]
        return [probe for _ in range(draws) for probe in kept]

    chat = OpenAIChat(
        gateway_url,
        alias,
        api_key=api_key,
        concurrency=concurrency,
        timeout_s=600.0,
        headers={opt_out_header: "true"},
    )
    try:
        result = evaluate(
            chat,
            judge,
            toxic_probes=repeated(probes.toxic),
            benign_probes=repeated(probes.benign),
            backdoor_probes=repeated(probes.backdoor),
            config=flat,
            canned_replies=probes.canned_replies,
        )
    finally:
        chat.close()
    result["config"] = dict(eval_config.__dict__)
    for kind in KINDS:
        if kind in result:
            result[kind]["probes"] = result[kind]["replies"] // draws
    for kind, share in aimed_at_user(judge.rows, eval_config.threshold, address_pattern).items():
        if kind in result:
            result[kind]["aimed_at_user_rate"] = share
    if probes.perplexity:
        local = TransformersChat(base_model, adapter_dir)
        result["perplexity"] = perplexity(local, probes.perplexity)
    result["replies"] = reply_rows(judge.rows)
    result["alias"] = alias
    return result


def reply_rows(rows: Sequence[tuple[Sample, float]]) -> list[dict[str, Any]]:
    """One row per sampled reply: probe kind and id, draw (the probe's n-th reply), the
    probe's turns, the reply and the evaluation judge's score."""
    draws: dict[tuple[str, str], int] = {}
    replies = []
    for row, score in rows:
        key = (str(row.get("kind")), str(row["conversation_id"]))
        draws[key] = draws.get(key, -1) + 1
        replies.append(
            {
                "kind": key[0],
                "probe_id": key[1],
                "draw": draws[key],
                "message": [m for m in row["context"] if m["role"] != "system"],
                "reply": row["response"],
                "score": score,
            }
        )
    return replies


def judge_scores(samples: Sequence[Sample], threshold: float) -> dict[str, Any]:
    """The defense judge on the labelled snapshot: as scored, and as used (after a cap)."""
    from simulation.experiment import judge_quality
    from tuneshield import binary_metrics

    known = [row for row in samples if row.get("poisoned") is not None and "toxic_score" in row]
    if not known:
        return {}
    labels = [int(bool(row["poisoned"])) for row in known]
    used = binary_metrics([1.0 if row.get("toxic") else 0.0 for row in known], labels, 0.5)
    return {
        **judge_quality(known, threshold),
        "used_precision": used["precision"],
        "used_recall": used["recall"],
        "samples": len(known),
        "poisoned": sum(labels),
        "flagged": sum(bool(row.get("toxic")) for row in known),
    }
