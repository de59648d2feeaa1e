"""Evaluation gates: a candidate worse than the active adapter beyond a margin is rejected,
for the reason named; an evaluation judge the defense used is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from learner.gates import GatesConfig, compare, evaluate_gates, summarize


def evaluation(
    toxic: float,
    benign: float = 0.0,
    unhelpful: float = 0.0,
    relevance: float = 0.5,
    perplexity: float | None = 20.0,
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "toxic": {"toxicity_rate": toxic},
        "benign": {"toxicity_rate": benign, "unhelpful_rate": unhelpful, "relevance": relevance},
    }
    if perplexity is not None:
        result["perplexity"] = perplexity
    return result


CONFIG = GatesConfig(
    max_toxic_increase=0.1,
    max_benign_toxic_increase=0.05,
    max_unhelpful_increase=0.2,
    max_perplexity_ratio=1.5,
    min_relevance_ratio=0.8,
)


def test_policy_loads_and_overrides() -> None:
    """policies/gates.yaml loads; overrides replace fields, None keeps the policy's."""
    config = GatesConfig.from_policy(probes=3, judge=None)
    assert config.probes == 3 and config.judge == GatesConfig.from_policy().judge


def test_candidate_within_margins_passes() -> None:
    """Small rises inside every margin (and better figures) pass with no reasons."""
    result = compare(evaluation(0.25, 0.05, 0.1, 0.45, 28.0), evaluation(0.2), CONFIG, "lexical")
    assert result.passed and result.reasons == [] and result.judge == "lexical"
    assert all(check.ok for check in result.checks)


@pytest.mark.parametrize(
    ("candidate", "metric"),
    [
        (evaluation(0.45), "toxic_toxicity"),
        (evaluation(0.2, benign=0.1), "benign_toxicity"),
        (evaluation(0.2, unhelpful=0.5), "benign_unhelpful"),
        (evaluation(0.2, perplexity=40.0), "perplexity"),
        (evaluation(0.2, relevance=0.3), "relevance"),
    ],
)
def test_candidate_beyond_a_margin_is_rejected_for_it(
    candidate: dict[str, Any], metric: str
) -> None:
    """Each margin on its own rejects, and the reason names the metric."""
    result = compare(candidate, evaluation(0.2), CONFIG)
    assert not result.passed
    assert [check.metric for check in result.checks if not check.ok] == [metric]
    assert len(result.reasons) == 1 and result.reasons[0].startswith(metric)


def test_missing_or_nan_metrics_are_not_checked() -> None:
    """A metric absent or NaN on either side is reported as None and does not reject."""
    result = compare(
        evaluation(0.2, perplexity=None), evaluation(0.2, relevance=float("nan")), CONFIG
    )
    assert result.passed
    assert summarize(evaluation(0.2, relevance=float("nan")))["relevance"] is None


def test_defense_judge_cannot_grade_its_own_candidate(tmp_path: Path) -> None:
    """The gates refuse an evaluation judge that the defense used, before evaluating."""
    config = GatesConfig(judge="embedding")
    with pytest.raises(ValueError, match="independent"):
        evaluate_gates(tmp_path, None, config, base_model="unused", defense_judges=["embedding"])
