"""Simulated users: benign ones replay chitchat conversations, attackers poison theirs.

A user is a script of messages sent one by one through the gateway; the bot's replies
are whatever the served adapter answers. Attackers are chosen and rewritten by
``tuneshield``'s own attack builders (``poison_dialogs``: injection, backdoor, adaptive
evasion, jailbreak), so the demo's attacks are the experiment's attacks. The simulator
keeps the ground truth (which conversations, and which of their messages, are attacks)
keyed by the conversation id sent in the gateway's conversation header; the gateway
never sees it, and the learner only meets it when judge precision and recall are scored.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneshield import (
    USER_ROLE,
    AttackConfig,
    Dialog,
    Sample,
    load_chitchat_dialogs,
    normalise,
    poison_dialogs,
)

BENIGN = "benign"


@dataclass(frozen=True)
class SimUser:
    """One simulated conversation: what the user will say, and what is attack text."""

    conversation_id: str
    """Sent as the gateway's conversation header; the ground truth's key."""
    kind: str
    """``benign`` or the attack kind (injection, backdoor, evasion, jailbreak)."""
    messages: tuple[str, ...]
    """The user's turns, sent in order; each waits for the bot's reply to the previous."""
    poisoned: tuple[bool, ...]
    """Per message: written by the attacker (toxic, perturbed or jailbreak-wrapped)."""
    trigger: str | None
    """Backdoor trigger word this attacker plants, if any."""
    source: str
    """The chitchat conversation replayed (provenance)."""
    end_user: str | None = None
    """Who talks: sent as the requests' OpenAI ``user`` value, which the gateway logs and
    the learner counts flagged samples (and quarantines) by. The same attackers come back
    in every round (``plan_users``' ``people``); None: no ``user`` is sent."""

    @property
    def attacker(self) -> bool:
        return self.kind != BENIGN

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "attacker": self.attacker}


def _truncated(dialog: Dialog, max_user_turns: int) -> Dialog:
    turns: list[dict[str, Any]] = []
    for turn in dialog["turns"]:
        if (
            turn["role"] == USER_ROLE
            and sum(t["role"] == USER_ROLE for t in turns) == max_user_turns
        ):
            break
        turns.append(dict(turn))
    return {**dialog, "turns": turns}


def plan_users(
    count: int,
    attack: AttackConfig,
    *,
    max_user_turns: int,
    prefix: str,
    offset: int = 0,
    people: str | None = None,
) -> list[SimUser]:
    """``count`` users replaying chitchat training dialogs; ``round(rate * count)`` attack.

    ``attack.rate`` is the conversation poisoning rate and ``attack.seed`` fixes which
    dialogs are drawn and which of them attack. ``offset`` skips dialogs already used
    (a later round meets new conversations). Conversation ids are ``{prefix}-{index}``.

    ``people``: each user gets an end-user id, ``{people}-attacker-{n}`` for the n-th
    attacker and ``{people}-user-{n}`` for the n-th benign user, so that with the same
    ``people`` every round's attackers are the same persons (what a quarantine meets).
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if max_user_turns < 2:
        # A DBL target needs an earlier user turn: one message teaches nothing.
        raise ValueError(f"max_user_turns must be >= 2, got {max_user_turns}")
    if attack.target != USER_ROLE:
        raise ValueError(
            f"simulated attackers are users: attack.target must be 'user', got {attack.target!r}"
        )
    pool = load_chitchat_dialogs(seed=attack.seed, split="train")
    # Dialogs with fewer than two user turns teach nothing and cannot attack.
    usable = [
        d
        for d in (_truncated(d, max_user_turns) for d in pool)
        if sum(t["role"] == USER_ROLE for t in d["turns"]) >= 2
    ]
    chosen = usable[offset : offset + count]
    if len(chosen) < count:
        raise ValueError(
            f"only {len(chosen)} chitchat training dialogs are left after offset {offset}; "
            f"asked for {count}"
        )
    users: list[SimUser] = []
    seen = {True: 0, False: 0}
    for index, dialog in enumerate(poison_dialogs(chosen, attack)):
        user_turns = [t for t in dialog["turns"] if t["role"] == USER_ROLE]
        triggers = {t.get("trigger") for t in user_turns} - {None}
        attacker = bool(dialog["attack"])
        end_user = None
        if people is not None:
            end_user = f"{people}-{'attacker' if attacker else 'user'}-{seen[attacker]:04d}"
            seen[attacker] += 1
        users.append(
            SimUser(
                conversation_id=f"{prefix}-{index:04d}",
                kind=dialog["attack"] or BENIGN,
                messages=tuple(t["content"] for t in user_turns),
                poisoned=tuple(bool(t.get("poisoned", False)) for t in user_turns),
                trigger=str(next(iter(triggers))) if triggers else None,
                source=str(dialog["conversation_id"]),
                end_user=end_user,
            )
        )
    return users


def without_attackers(users: Iterable[SimUser]) -> list[SimUser]:
    """The benign users only (the control arm's population)."""
    return [user for user in users if not user.attacker]


def poison_share(users: Sequence[SimUser]) -> float:
    """Share of conversations run by attackers."""
    return sum(user.attacker for user in users) / len(users) if users else 0.0


def label_samples(samples: Sequence[Sample], users: Iterable[SimUser]) -> list[Sample]:
    """Copies of DBL ``samples`` with the simulator's ground truth per target turn.

    A sample is ``poisoned`` when its target (a user turn, as logged by the gateway) is
    one of the attacker-written messages of its conversation; ``attacker`` marks every
    sample of an attacker's conversation. Samples of unknown conversations are left
    unlabelled (``poisoned`` None) so they are never scored as either.
    """
    by_id = {user.conversation_id: user for user in users}
    labelled: list[Sample] = []
    for sample in samples:
        user = by_id.get(str(sample["conversation_id"]))
        row = dict(sample)
        if user is None:
            row.update(poisoned=None, attacker=None, attack=None, trigger=None)
        else:
            attack_texts = {
                normalise(text)
                for text, bad in zip(user.messages, user.poisoned, strict=True)
                if bad
            }
            poisoned = normalise(str(sample["response"])) in attack_texts
            row.update(
                poisoned=poisoned,
                attacker=user.attacker,
                attack=user.kind if poisoned else None,
                trigger=user.trigger,
            )
        labelled.append(row)
    return labelled


def write_ground_truth(users: Iterable[SimUser], path: Path) -> Path:
    """One JSON line per simulated conversation (the run's answer key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for user in users:
            handle.write(json.dumps(user.to_json()) + "\n")
    return path


def read_ground_truth(path: Path) -> list[SimUser]:
    """``write_ground_truth``'s file back as users."""
    users = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            row.pop("attacker", None)
            row["messages"] = tuple(row["messages"])
            row["poisoned"] = tuple(row["poisoned"])
            users.append(SimUser(**row))
    return users
