"""benchmarks/healing.py's settings: a ``--variant`` is checked as policies/healing.yaml
is, before an engine starts, and refused where it would break the pairing of the arms."""

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
