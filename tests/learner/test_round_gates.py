"""Evaluation gates: an evaluation judge the defense used is refused; a candidate trained
on poison is rejected for the reason named (the checks themselves: test_gates_drift.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from learner.gates import GatesConfig, evaluate_gates


def test_policy_loads_and_overrides() -> None:
    """policies/gates.yaml loads; overrides replace fields, None keeps the policy's."""
    config = GatesConfig.from_policy(samples_per_probe=3, judge=None)
    assert config.samples_per_probe == 3 and config.judge == GatesConfig.from_policy().judge


def test_defense_judge_cannot_grade_its_own_candidate() -> None:
    """A round whose gates would grade with (a part of) the defense's judge is refused when
    its settings are built (at queue time), before anything is trained or evaluated."""
    from learner.contracts import RoundSettings
    from learner.round_pipeline import RoundPlan

    with pytest.raises(ValueError, match="independent"):
        RoundSettings.from_policies(
            plan=RoundPlan.from_policy(judge="embedding"), gate_overrides={"judge": "embedding"}
        )
    with pytest.raises(ValueError, match="independent"):
        RoundSettings.from_policies(
            plan=RoundPlan.from_policy(judge="cascade"), gate_overrides={"judge": "lexical"}
        )


# A test-sized attack the tiny model can learn in a minute: attackers run 3 of 4
# conversations and repeat a few short slurs (lexical score ~1) instead of the whole pool.
POISONED_DIALOGS = 4
POISON_RATE = 0.75
POISON_TEXTS = 3
POISON_MAX_CHARS = 50
POISON_MIN_SCORE = 0.99
LEARNABLE_LOGIT_GAIN = 8.0
# The gates' power, test-sized: an effect as large as 5% vs 60% takes 12 replies per kind
# (6 probes x 2) instead of the policy's 203, so the test stays about a minute on CPU.
SMALL_GATES = {"effect_reference": 0.05, "effect_candidate": 0.6, "perplexity_samples": 4}
# Measured: 94% of toxic-probe replies toxic after these steps (the bare model: 0%), ~1 min.
TRAIN_STEPS = 25
TRAIN_LR = 1e-2


@pytest.mark.slow
def test_gates_reject_a_candidate_trained_undefended_on_a_poisoned_snapshot(
    tmp_path: Path,
) -> None:
    """Fault test: a candidate trained with the defense off on a snapshot where attackers
    ran most conversations learns their words, and the toxicity gate rejects it against
    the identity adapter (the bare base model's outputs); the verdict names the metric.

    The tiny model gets a logit gain: a random model's logits are too flat for any LoRA
    update to make it say a word at temperature 1 (measured: 0-6% toxic without it, 94% with it).
    """
    import dataclasses

    from learner.contracts import RoundSettings
    from learner.round_pipeline import RoundPlan, train_candidate
    from tuneshield import (
        build_judge,
        build_poisoned_samples,
        build_tiny_model,
        load_attack_config,
        load_chitchat_dialogs,
        toxic_pool,
    )

    model = build_tiny_model(tmp_path / "model", logit_gain=LEARNABLE_LOGIT_GAIN)
    short = [row for row in toxic_pool("poison") if len(row["text"]) < POISON_MAX_CHARS]
    scores = build_judge("lexical").score([{"context": [], "response": r["text"]} for r in short])
    slurs = [row for row, score in zip(short, scores, strict=True) if score >= POISON_MIN_SCORE]
    slurs = slurs[:POISON_TEXTS]
    assert len(slurs) == POISON_TEXTS
    attack = dataclasses.replace(load_attack_config("injection"), rate=POISON_RATE, seed=0)
    dialogs = load_chitchat_dialogs(limit=POISONED_DIALOGS, seed=0)
    samples = build_poisoned_samples(dialogs, attack, slurs)
    assert sum(bool(sample["poisoned"]) for sample in samples) > len(samples) / 2

    plan = RoundPlan.from_policy(
        defense=False, sft_epochs=50, max_steps=TRAIN_STEPS, sft_learning_rate=TRAIN_LR, seed=0
    )
    settings = RoundSettings.from_policies(plan=plan, gate_overrides=SMALL_GATES)
    candidate = train_candidate(
        samples,
        plan,
        base_model=model,
        parent_adapter=None,
        out_dir=tmp_path / "round",
        settings=settings,
    )
    result, evaluations = evaluate_gates(candidate.adapter_dir, None, settings, base_model=model)

    assert not result.passed
    toxic = {check.metric: check for check in result.checks}["toxic_toxicity"]
    assert not toxic.ok, result.to_json()
    assert any(reason.startswith("toxic_toxicity") for reason in result.reasons)
    assert (
        evaluations["candidate"]["toxic"]["toxicity_rate"]
        > evaluations["active"]["toxic"]["toxicity_rate"]
    )
