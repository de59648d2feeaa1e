"""Training rows from samples: SFT conversations and DPO preference pairs (TRL formats).

SFT learns from every sample's reply as it stands after healing (a flagged sample's
``response`` is already the healing reply), never from its context. DPO learns from the
flagged samples and the answers to them, preferring the healing reply (chosen) over the
original toxic one (rejected) in the same context, and over the healing candidate the
judge flagged most strongly where one is kept (a second pair); this is what keeps the
defense working when the judge misses some toxic samples. Both row
kinds are TRL's *conversational* formats, so the trainer applies the chat template.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

from tuneshield._samples import ANSWER_MODE, FLAGGED_DRAFT, Message, Sample

Row = dict[str, Any]


class DatasetError(ValueError):
    """Samples cannot be turned into training rows; the message names the row and field."""


def _assistant(content: str) -> list[Message]:
    return [{"role": "assistant", "content": content}]


def _context(sample: Sample) -> list[Message]:
    return [{"role": m["role"], "content": m["content"]} for m in sample["context"]]


def is_flagged(sample: Sample) -> bool:
    """Whether the judge flagged this sample as toxic (unclassified samples are not)."""
    return bool(sample.get("toxic"))


def is_answer(sample: Sample) -> bool:
    """Whether healing added this sample, answering a flagged turn (not one of the data's)."""
    return sample.get("heal_mode") == ANSWER_MODE


def is_healed(samples: Sequence[Sample]) -> bool:
    """Whether these samples went through healing (a healer records the heal mode)."""
    return any(s.get("heal_mode") is not None or "original_response" in s for s in samples)


def sft_rows(samples: Iterable[Sample]) -> list[Row]:
    """One ``{"prompt": context, "completion": [assistant response]}`` row per sample,
    except samples marked ``unrelated`` (``screen_unrelated``: the reply ignores the
    message it answers) or ``deflects`` (``heal``: a canned fallback, with
    ``learn_canned_fallbacks`` off).

    Prompt and completion, not one conversation: TRL then computes the loss on the
    completion only. A conversation would be trained on every assistant turn, and in DBL
    the context's assistant turns are the target speaker's earlier turns as sent, never
    judged or healed as targets of their own row: an attacker's first insult (no sample
    of its own) and the originals of healed turns would be learned after all.
    """
    rows = []
    for index, sample in enumerate(samples):
        if not isinstance(sample.get("response"), str):
            raise DatasetError(f"row {index}: field 'response' must be a string")
        if sample.get("unrelated") or sample.get("deflects"):
            continue
        rows.append({"prompt": _context(sample), "completion": _assistant(sample["response"])})
    return rows


def flagged_draft(sample: Sample) -> str | None:
    """The healing candidate DPO also rejects for ``sample``, if healing kept one (a file
    read back may hold the column as null)."""
    draft = sample.get(FLAGGED_DRAFT)
    return draft if isinstance(draft, str) else None


def dpo_rows(samples: Iterable[Sample]) -> list[Row]:
    """One ``{prompt, chosen, rejected}`` row per flagged sample and per answer to one
    (``heal_mode`` "answer"): chosen is the healing reply (``response``), rejected the
    original reply (``original_response``; for an answer, the flagged turn itself); and
    a second row with the same prompt and chosen reply where healing kept the candidate
    the judge flagged most strongly (``flagged_draft``), that candidate rejected: what
    the model itself writes in that context, where the original is often another
    speaker's text."""
    rows: list[Row] = []
    for index, sample in enumerate(samples):
        if not (is_flagged(sample) or is_answer(sample)):
            continue
        original = sample.get("original_response")
        if not isinstance(original, str):
            raise DatasetError(
                f"row {index}: flagged sample lacks field 'original_response' (the reply that "
                "healing replaced); heal the samples first, or train without DPO"
            )
        rejected = [original]
        draft = flagged_draft(sample)
        if draft is not None and draft != original:
            rejected.append(draft)
        rows.extend(
            {
                "prompt": _context(sample),
                "chosen": _assistant(sample["response"]),
                "rejected": _assistant(reply),
            }
            for reply in rejected
        )
    return rows


def data_hash(rows: Iterable[Any]) -> str:
    """``sha256:<hex>`` over the rows as canonical JSON, one per line (order matters)."""
    digest = hashlib.sha256()
    for row in rows:
        line = json.dumps(
            row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str
        )
        digest.update(line.encode("utf-8"))
        digest.update(b"\n")
    return f"sha256:{digest.hexdigest()}"
