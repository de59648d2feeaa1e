"""benchmarks/healing.py's settings and figures: a ``--variant`` is checked as
policies/healing.yaml is, before an engine starts, and refused where it would break the
pairing of the arms; paired differences come with the evaluator's bootstrap interval."""

from __future__ import annotations

import pytest

from simulation.scripts import load_script
from tuneshield import HealConfig

healing = load_script("healing")


def test_a_variant_changes_only_what_it_names() -> None:
    policy = HealConfig.from_policy(answer_hostile_turns=False)
    variant = healing.variant_config(policy, ["healer_context_turns=1", "candidates = 2"])
    assert (variant.healer_context_turns, variant.candidates) == (1, 2)
    assert variant.system_prompt == policy.system_prompt
    whole = healing.variant_config(policy, ["healer_context_turns=null"])
    assert whole.healer_context_turns is None


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("nope=1", "--variant: unknown key(s) nope"),
        ("healer_context_turns", "--variant 'healer_context_turns' is not FIELD=VALUE"),
        ("healer_context_turns=0", "healer_context_turns must be >= 1 or null"),
        ("healer_context_turns=1.5", "healer_context_turns must be"),
        ("system_prompt=be kind: always", "system_prompt must be"),
        ("canned_replies=sorry", "canned_replies must be"),
        ("candidates=[1", "the value is not YAML"),
        ("answer_hostile_turns=true", "adds rows, so it cannot be paired"),
    ],
)
def test_a_bad_variant_ends_with_one_line_naming_it(setting: str, message: str) -> None:
    policy = HealConfig.from_policy(answer_hostile_turns=False)
    with pytest.raises(SystemExit) as exit_:
        healing.variant_config(policy, [setting])
    text = str(exit_.value)
    assert text.startswith("healing: ") and message in text and "\n" not in text


def test_the_paired_difference_follows_the_samples_and_its_interval_covers_it() -> None:
    """b minus a per sample, averaged; the bootstrap interval over the samples covers the
    mean, shrinks to it where every sample moves alike, and tells a real change from none.
    One sample in 40 that loses its flag gives an interval that stays at or below zero,
    where a normal interval (the benchmark's before) reached +2.4 points."""
    config = load_script("evaluator").load_evaluator_config()
    before = [True] * 10 + [False] * 30
    after = [False] * 10 + [False] * 30
    fewer = healing.paired_difference(before, after, config)
    assert fewer["difference"] == pytest.approx(-0.25)
    low, high = fewer["ci"]
    assert low <= -0.25 <= high < 0
    same = healing.paired_difference(before, before, config)
    assert same == {"difference": 0.0, "ci": [0.0, 0.0]}
    swapped = healing.paired_difference([True, False] * 20, [False, True] * 20, config)
    assert swapped["difference"] == 0.0 and swapped["ci"][0] < 0 < swapped["ci"][1]
    one = healing.paired_difference([True] + [False] * 39, [False] * 40, config)
    assert one["ci"][1] <= 0.0
    assert healing.share(before, config.confidence)["share"] == pytest.approx(0.25)
