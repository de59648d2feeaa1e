"""One round's training without a server: plan from policy, recall cap, TuneShield on a tiny
model (classify → heal → SFT → DPO), the undefended arm, continuing a parent adapter."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import msgspec
import pytest

from learner.contracts import CandidateRecord
from learner.round_pipeline import RoundPlan, cap_recall, train_candidate
from tuneshield import HealConfig, PolicyError, read_samples


def test_plan_from_policy_and_overrides() -> None:
    """The round section loads; overrides replace fields, None keeps the policy's."""
    plan = RoundPlan.from_policy(defense=False, max_steps=None)
    assert plan.defense is False
    assert plan.max_steps == RoundPlan.from_policy().max_steps
    assert RoundPlan.from_json(plan.to_json()) == plan


def test_plan_refuses_bad_values_by_name() -> None:
    """Unknown heal modes, caps out of range and a cap without defense are refused."""
    with pytest.raises(PolicyError, match="heal_mode"):
        RoundPlan.from_policy(heal_mode="magic")
    with pytest.raises(ValueError, match="judge_recall_cap"):
        RoundPlan(judge_recall_cap=1.5)
    with pytest.raises(ValueError, match="defense"):
        RoundPlan(defense=False, judge_recall_cap=0.5)


def test_cap_recall_keeps_the_share_of_flagged_seeded() -> None:
    """A cap of 0.5 leaves half the flagged samples flagged, the same ones for one seed."""
    samples = [{"toxic": i % 2 == 0, "i": i} for i in range(20)]
    capped = cap_recall(samples, 0.5, seed=3)
    assert sum(s["toxic"] for s in capped) == 5
    assert sum(s["recall_capped"] for s in capped) == 5
    assert not any(s["toxic"] for s in capped if s["i"] % 2)
    assert capped == cap_recall(samples, 0.5, seed=3)
    assert capped != cap_recall(samples, 0.5, seed=4)


def poisoned_samples() -> list[dict[str, object]]:
    from tuneshield import build_poisoned_samples, load_attack_config, load_chitchat_dialogs

    attack = dataclasses.replace(load_attack_config("injection"), rate=0.5, seed=0)
    return build_poisoned_samples(load_chitchat_dialogs(limit=4, seed=0), attack)[:16]


@pytest.mark.slow
def test_train_candidate_defended_then_undefended_on_top(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """TuneShield flags, heals and trains SFT + DPO; an undefended round continues the first
    adapter and skips classify, heal and DPO; counts and losses are reported."""
    samples = poisoned_samples()
    plan = RoundPlan.from_policy(
        max_steps=2, heal_max_new_tokens=8, sft_epochs=1, dpo_epochs=1, judge_recall_cap=0.75
    )
    seen: set[str] = set()
    result = train_candidate(
        samples,
        plan,
        base_model=tiny_model_dir,
        parent_adapter=None,
        out_dir=tmp_path / "one",
        progress=lambda stage, done, total: seen.add(stage),
    )
    assert {"classify", "sft", "dpo"} <= seen
    assert result.samples == len(samples)
    assert result.flagged_before_cap is not None and result.flagged_before_cap > 0
    assert result.flagged == round(0.75 * result.flagged_before_cap)
    assert result.healed == result.flagged
    assert result.judge == "embedding" and result.threshold is not None
    assert result.training["sft"]["steps"] == 2 and result.training["dpo"]["steps"] > 0
    assert result.training["sft"]["loss_history"]
    # Screening is a stage of its own where healing.yaml sets a floor.
    screens = HealConfig.from_policy().learn_min_coherence is not None
    screen = ["screen"] if screens else []
    assert [s["stage"] for s in result.stages] == ["classify", "heal", *screen, "train"]
    assert (result.unrelated is not None) == screens
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    trained = read_samples(result.samples_path)
    # Canned fallbacks are counted, and as left out where healing.yaml leaves them out of SFT.
    fallbacks = sum(s["heal_mode"] == "canned_fallback" for s in trained)
    learned = HealConfig.from_policy().learn_canned_fallbacks
    assert result.canned_fallbacks == fallbacks
    assert result.deflections == (0 if learned else fallbacks)
    # Answers and flagged drafts are counted, and every one is a DPO pair of its own.
    assert result.answers == sum(s["heal_mode"] == "answer" for s in trained)
    assert result.flagged_drafts == sum("flagged_draft" in s for s in trained)
    pairs = result.flagged + result.answers + result.flagged_drafts
    assert result.training["dpo"]["rows"] == pairs
    assert (
        sum(bool(s["recall_capped"]) for s in trained) == result.flagged_before_cap - result.flagged
    )
    # What crosses to the learner is the contract record: it round-trips strictly.
    record = CandidateRecord.of(result)
    encoded = msgspec.json.encode(record)
    assert msgspec.json.decode(encoded, type=CandidateRecord, strict=True) == record
    assert (record.adapter_dir, record.samples) == (str(result.adapter_dir), result.samples)

    undefended = dataclasses.replace(plan, defense=False, judge_recall_cap=None)
    second = train_candidate(
        samples,
        undefended,
        base_model=tiny_model_dir,
        parent_adapter=result.adapter_dir,
        out_dir=tmp_path / "two",
    )
    assert second.flagged is None and second.healed == 0 and second.judge is None
    assert "skipped" in second.training["dpo"]
    assert second.parent_adapter == str(result.adapter_dir)
    manifest = json.loads((second.adapter_dir / "manifest.json").read_text())
    assert manifest["init_adapter"] == str(result.adapter_dir)


def test_learning_rate_overrides_reach_only_their_stage() -> None:
    """A round's (or demo size's) SFT and DPO learning rates replace the policy's for their
    own stage alone, in the standalone config and in the learner's round settings alike;
    None keeps training.yaml's; a non-positive rate is refused, naming the field."""
    from learner.contracts import RoundSettings
    from tuneshield import load_train_config, scaled_train_config

    policy = load_train_config()
    sft_rate, dpo_rate = policy.sft.learning_rate * 3, policy.dpo.learning_rate * 10
    faster = scaled_train_config(0, 1, 1, -1, sft_learning_rate=sft_rate)
    assert faster.sft.learning_rate == pytest.approx(sft_rate)
    assert faster.dpo.learning_rate == policy.dpo.learning_rate
    aligned = scaled_train_config(0, 1, 1, -1, dpo_learning_rate=dpo_rate)
    assert aligned.dpo.learning_rate == pytest.approx(dpo_rate)
    assert aligned.sft.learning_rate == policy.sft.learning_rate
    unchanged = scaled_train_config(0, 1, 1, -1)
    assert (unchanged.sft.learning_rate, unchanged.dpo.learning_rate) == (
        policy.sft.learning_rate,
        policy.dpo.learning_rate,
    )
    plan = RoundPlan(sft_epochs=1, dpo_epochs=1, dpo_learning_rate=dpo_rate)
    round_config = RoundSettings.from_policies(plan=plan, skip_gates=True).train_config()
    assert round_config.dpo.learning_rate == pytest.approx(dpo_rate)
    assert round_config.sft.learning_rate == policy.sft.learning_rate
    for name in ("sft_learning_rate", "dpo_learning_rate"):
        with pytest.raises(ValueError, match=name):
            RoundPlan(**{name: 0.0})


def test_screening_keeps_replies_that_ignore_their_message_out_of_sft(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """With healing.yaml's learn_min_coherence, the samples the judge passed whose reply
    scores at or below it (MiniLM) are not fine-tuned on; healed samples and answers are.
    A floor no reply reaches leaves exactly the healed samples and answers to SFT, less
    the canned fallbacks where learn_canned_fallbacks is off, which the result counts."""
    from learner.contracts import RoundSettings

    samples = poisoned_samples()
    plan = RoundPlan.from_policy(max_steps=1, heal_max_new_tokens=8, sft_epochs=1, dpo_epochs=1)
    settings = RoundSettings.from_policies(plan=plan, skip_gates=True)
    healing = dataclasses.replace(
        settings.healing, learn_min_coherence=0.999, learn_canned_fallbacks=False
    )
    settings = msgspec.structs.replace(settings, healing=healing)
    result = train_candidate(
        samples,
        plan,
        base_model=tiny_model_dir,
        parent_adapter=None,
        out_dir=tmp_path / "screened",
        settings=settings,
    )
    trained = read_samples(result.samples_path)
    passed = [s for s in trained if not s["toxic"] and s["heal_mode"] is None]
    assert passed and all(s["unrelated"] for s in passed)
    assert result.unrelated == len(passed)
    fallbacks = [s for s in trained if s["heal_mode"] == "canned_fallback"]
    assert all(s["deflects"] for s in fallbacks) and result.deflections == len(fallbacks)
    assert result.canned_fallbacks == len(fallbacks)
    assert result.training["sft"]["rows"] == len(trained) - len(passed) - len(fallbacks)
    assert "screen" in [s["stage"] for s in result.stages]
    assert CandidateRecord.of(result).unrelated == len(passed)
