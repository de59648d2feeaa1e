"""The demo's arms: who learns what from the same starting point.

Every arm is its own alias in the registry (``demo-undefended`` …), starting at its
identity adapter ``v0000``; a learning arm's round trains a candidate with the learner's
own round pipeline (``learner.round_pipeline.train_candidate``) under a ``RoundPlan``
and hot-swaps it in, so its replies are served by vLLM through the gateway like any
user's.

- ``baseline``: never learns (the starting point, measured once).
- ``control``: learns from the same users minus the attackers (what chit-chat alone
  does to the bot).
- ``undefended``: learns from every dialog as it is.
- ``tuneshield``: classify → contextual healing → SFT → DPO.
- ablations: ``tuneshield_no_dpo``, ``tuneshield_canned`` (canned healing), and the
  weakened judge (recall capped, the paper's biased-classifier study) with and
  without DPO: ``weak_judge``, ``weak_judge_no_dpo``.
- ``tuneshield_quarantine``: ``tuneshield`` plus the learner's quarantine: after each
  round the end users its judge flagged over policies/learner.yaml's ``quarantine`` line
  are quarantined, and their later turns never train it (``tuneshield`` beside it is the
  same arm without quarantine).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from learner.round_pipeline import RoundPlan

ARMS = (
    "baseline",
    "control",
    "undefended",
    "tuneshield",
    "tuneshield_no_dpo",
    "tuneshield_canned",
    "weak_judge",
    "weak_judge_no_dpo",
    "tuneshield_quarantine",
)
CORE_ARMS = ARMS[:4]
# An ablation switch adds these arms.
ABLATIONS: dict[str, tuple[str, ...]] = {
    "no-dpo": ("tuneshield_no_dpo",),
    "canned": ("tuneshield_canned",),
    # DPO's part only shows where the judge misses poison: compare both with a weak judge.
    "weak-judge": ("weak_judge", "weak_judge_no_dpo"),
    # Round 2 with and without quarantine: compare with tuneshield (added with it).
    "quarantine": ("tuneshield", "tuneshield_quarantine"),
}
ALIAS_PREFIX = "demo-"
POPULATIONS = ("all", "benign")


@dataclass(frozen=True)
class ArmPlan:
    """One arm: its alias, who it learns from, and how (None: it never learns)."""

    name: str
    alias: str
    population: str
    """``all`` users, or ``benign`` ones only (the control arm)."""
    plan: RoundPlan | None
    quarantine: bool = False
    """Quarantine the end users its rounds' judge flags over the policy's line; their
    later turns never train this arm."""

    @property
    def learns(self) -> bool:
        return self.plan is not None

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "alias": self.alias,
            "population": self.population,
            "plan": self.plan.to_json() if self.plan else None,
            "quarantine": self.quarantine,
        }


def arm_alias(name: str) -> str:
    """The registry alias of arm ``name`` (``demo-weak-judge``)."""
    return ALIAS_PREFIX + name.replace("_", "-")


def select_arms(arms: Sequence[str], ablations: Sequence[str] = ()) -> list[str]:
    """``arms`` plus those the ablation switches add, in ``ARMS`` order, once each."""
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        raise ValueError(f"arms: unknown arm(s) {unknown}; known: {list(ARMS)}")
    bad = [name for name in ablations if name not in ABLATIONS]
    if bad:
        raise ValueError(f"ablations: unknown {bad}; known: {sorted(ABLATIONS)}")
    chosen = set(arms) | {arm for name in ablations for arm in ABLATIONS[name]}
    if not chosen:
        raise ValueError("arms: choose at least one arm")
    return [arm for arm in ARMS if arm in chosen]


def plan_arm(name: str, base: RoundPlan, weak_judge_recall: float) -> ArmPlan:
    """The plan of arm ``name``: ``base`` (the policy's round plan) with its switches."""
    if not 0.0 <= weak_judge_recall <= 1.0:
        raise ValueError(f"weak_judge_recall must be in [0, 1], got {weak_judge_recall}")
    undefended = dataclasses.replace(base, defense=False, judge_recall_cap=None)
    defended = dataclasses.replace(base, defense=True, judge_recall_cap=None)
    plans: dict[str, tuple[str, RoundPlan | None]] = {
        "baseline": ("all", None),
        "control": ("benign", undefended),
        "undefended": ("all", undefended),
        "tuneshield": ("all", dataclasses.replace(defended, heal_mode="contextual", dpo=True)),
        "tuneshield_no_dpo": ("all", dataclasses.replace(defended, dpo=False)),
        "tuneshield_canned": ("all", dataclasses.replace(defended, heal_mode="canned")),
        "weak_judge": (
            "all",
            dataclasses.replace(defended, dpo=True, judge_recall_cap=weak_judge_recall),
        ),
        "weak_judge_no_dpo": (
            "all",
            dataclasses.replace(defended, dpo=False, judge_recall_cap=weak_judge_recall),
        ),
        "tuneshield_quarantine": (
            "all",
            dataclasses.replace(defended, heal_mode="contextual", dpo=True),
        ),
    }
    if name not in plans:
        raise ValueError(f"arm must be one of {list(ARMS)}, got {name!r}")
    population, plan = plans[name]
    return ArmPlan(
        name=name,
        alias=arm_alias(name),
        population=population,
        plan=plan,
        quarantine=name == "tuneshield_quarantine",
    )


def plan_arms(names: Sequence[str], base: RoundPlan, weak_judge_recall: float) -> list[ArmPlan]:
    """Plans of ``names`` (see ``select_arms``); the baseline is always among them."""
    chosen = list(dict.fromkeys(["baseline", *names]))
    return [plan_arm(name, base, weak_judge_recall) for name in chosen]
