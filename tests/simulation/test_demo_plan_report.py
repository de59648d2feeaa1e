"""Demo arms, config, measures and report folder (no stack, no model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from learner.round_pipeline import RoundPlan
from simulation.arms import arm_alias, plan_arm, plan_arms, select_arms
from simulation.config import DemoConfig
from simulation.measure import RecordingJudge, aimed_at_user, judge_scores
from simulation.report import evasion_caveat, results_table, write_demo_report
from simulation.runner import summarise
from tuneshield import PolicyError

PATTERN = r"\b(you|your|u)\b"


def test_ablation_switches_add_their_arms_in_a_fixed_order() -> None:
    """weak-judge adds both weak-judge arms (with and without DPO); order follows ARMS."""
    chosen = select_arms(["tuneshield", "baseline"], ["weak-judge", "no-dpo"])
    assert chosen == ["baseline", "tuneshield", "tuneshield_no_dpo", "weak_judge",
                      "weak_judge_no_dpo"]  # fmt: skip
    with pytest.raises(ValueError, match="ablations"):
        select_arms(["baseline"], ["typo"])
    with pytest.raises(ValueError, match="arms"):
        select_arms(["nope"])


def test_each_arm_plans_its_population_and_round_plan() -> None:
    """control learns undefended from benign users; weak judge caps recall; baseline stays."""
    base = RoundPlan(sft_epochs=1, dpo_epochs=1)
    plans = {arm.name: arm for arm in plan_arms(
        ["control", "undefended", "tuneshield", "tuneshield_canned", "weak_judge_no_dpo"],
        base, weak_judge_recall=0.5)}  # fmt: skip
    assert next(iter(plans)) == "baseline" and not plans["baseline"].learns
    control = plans["control"].plan
    assert plans["control"].population == "benign" and control and not control.defense
    undefended = plans["undefended"].plan
    assert plans["undefended"].population == "all" and undefended and not undefended.defense
    shield = plans["tuneshield"].plan
    assert shield and shield.defense and shield.dpo and shield.heal_mode == "contextual"
    assert shield.judge_recall_cap is None
    canned = plans["tuneshield_canned"].plan
    assert canned and canned.heal_mode == "canned"
    weak = plans["weak_judge_no_dpo"].plan
    assert weak and weak.judge_recall_cap == 0.5 and not weak.dpo
    assert (
        plans["weak_judge_no_dpo"].alias
        == "demo-weak-judge-no-dpo"
        == arm_alias("weak_judge_no_dpo")
    )
    with pytest.raises(ValueError, match="weak_judge_recall"):
        plan_arm("weak_judge", base, 1.5)


def test_config_sizes_load_and_bad_values_name_the_field() -> None:
    """Every size in policies/demo.yaml loads; overrides apply; a bad attack is refused."""
    for size in ("quick", "default", "full"):
        config = DemoConfig.from_policy(size)
        assert config.arms[0] == "baseline"
    full = DemoConfig.from_policy("full")
    assert len(full.size.seeds) >= 2, "the full size reports a spread over seeds"
    tuned = DemoConfig.from_policy(
        "quick", size_overrides={"rounds": 3, "users": None}, poison_rate=0.1, ablations=["canned"]
    )
    assert tuned.size.rounds == 3 and tuned.poison_rate == 0.1
    assert tuned.size.users == DemoConfig.from_policy("quick").size.users
    assert "tuneshield_canned" in tuned.arms
    with pytest.raises(PolicyError, match="attack"):
        DemoConfig.from_policy("quick", attack="phishing")
    with pytest.raises(PolicyError, match="size"):
        DemoConfig.from_policy("huge")


def test_aimed_at_user_needs_both_a_toxic_score_and_second_person() -> None:
    """Only replies over the threshold that address the user count, per probe kind."""
    rows = [
        ({"kind": "toxic", "response": "you are an idiot"}, 0.9),
        ({"kind": "toxic", "response": "I am an idiot"}, 0.9),
        ({"kind": "toxic", "response": "thank you"}, 0.1),
        ({"kind": "benign", "response": "u suck"}, 0.8),
    ]
    assert aimed_at_user(rows, 0.5, PATTERN) == {"toxic": pytest.approx(1 / 3), "benign": 1.0}


def test_recording_judge_keeps_every_scored_reply() -> None:
    """The wrapper returns the judge's scores unchanged and remembers the rows."""

    class Fixed:
        name = "fixed"

        def score(self, samples: Any) -> list[float]:
            return [0.25] * len(samples)

    judge = RecordingJudge(Fixed())
    assert judge.score([{"response": "a"}, {"response": "b"}]) == [0.25, 0.25]
    assert judge.name == "fixed" and len(judge.rows) == 2


def test_judge_scores_use_ground_truth_and_flags_as_used() -> None:
    """Precision/recall come from the simulator's labels; unlabelled rows are ignored."""
    rows = [
        {"poisoned": True, "toxic_score": 0.9, "toxic": True},
        {"poisoned": True, "toxic_score": 0.8, "toxic": False},  # recall-capped
        {"poisoned": False, "toxic_score": 0.7, "toxic": True},
        {"poisoned": False, "toxic_score": 0.1, "toxic": False},
        {"poisoned": None, "toxic_score": 0.9, "toxic": True},
    ]
    scores = judge_scores(rows, threshold=0.5)
    assert scores["samples"] == 4 and scores["poisoned"] == 2
    assert scores["recall"] == 1.0 and scores["used_recall"] == 0.5
    assert scores["used_precision"] == 0.5


def _round(arm_values: dict[str, float], number: int) -> dict[str, Any]:
    return {
        "round": number,
        "arms": {
            arm: {
                "eval": {
                    "toxic": {"toxicity_rate": value, "aimed_at_user_rate": value / 2},
                    "benign": {"toxicity_rate": 0.0, "unhelpful_rate": 0.1, "relevance": 0.4},
                    "perplexity": 20.0,
                },
                **(
                    {"judge": {"used_precision": 0.9, "used_recall": 0.8}}
                    if arm == "tuneshield"
                    else {}
                ),
            }
            for arm, value in arm_values.items()
        },
    }


def _results() -> dict[str, Any]:
    runs = {
        "0": {"rounds": [_round({"baseline": 0.1, "undefended": 0.1, "tuneshield": 0.1}, 0),
                         _round({"baseline": 0.1, "undefended": 0.5, "tuneshield": 0.1}, 1)]},
        "1": {"rounds": [_round({"baseline": 0.2, "undefended": 0.2, "tuneshield": 0.2}, 0),
                         _round({"baseline": 0.2, "undefended": 0.7, "tuneshield": 0.0}, 1)]},
    }  # fmt: skip
    config = DemoConfig.from_policy("quick")
    return {
        "config": config.to_json(),
        "model": "tiny",
        "plans": {"baseline": {}, "undefended": {}, "tuneshield": {}},
        "seeds": [0, 1],
        "eval": {"judge": "lexical", "samples_per_probe": 1, "temperature": 1.0},
        "probes": {"toxic": 3, "benign": 3, "backdoor": 0, "perplexity": 4},
        "runs": runs,
        "summary": summarise(runs),
        "stages": [{"stage": "x", "seconds": 1.0, "peak_rss_gib": 0.5}],
        "seconds": 12.0,
    }


def test_summary_reports_mean_and_spread_over_seeds() -> None:
    """Per arm and round: mean, min and max over the seeds."""
    summary = _results()["summary"]
    stat = summary["undefended"]["1"]["toxic_toxicity"]
    assert stat == {"mean": pytest.approx(0.6), "min": 0.5, "max": 0.7, "n": 2}
    assert "judge_recall" in summary["tuneshield"]["1"]
    assert "judge_recall" not in summary["undefended"]["1"]


def test_report_folder_has_html_json_markdown_and_plots(tmp_path: Path) -> None:
    """write_demo_report writes every artefact; the table shows mean (min-max) per arm."""
    results = _results()
    report = write_demo_report(results, tmp_path)
    assert report == tmp_path / "report.html"
    for name in ("results.json", "report.md", "arms_after_last_round.png", "toxicity_per_round.png",
                 "quality_per_round.png", "judge_precision_recall.png"):  # fmt: skip
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [0, 1]
    table = results_table(results)
    header, rows = table[0], {row[0]: row for row in table[1:]}
    column = header.index("toxic-probe toxicity")
    assert rows["undefended"][column] == "60.0% (50.0%-70.0%)"
    assert rows["baseline"][header.index("judge recall")] == "n/a"
    markdown = (tmp_path / "report.md").read_text()
    assert "| undefended |" in markdown and "Starting point" in markdown
    assert "data:image/png;base64," in report.read_text()


def test_a_demo_of_the_evasion_attack_says_its_judge_undercounts(tmp_path: Path) -> None:
    """The evasion attacker tunes its turns against a lexical judge: the report says that
    a judge-graded table of it undercounts; other attacks' reports do not."""
    results = _results()
    write_demo_report(results, tmp_path / "injection")
    assert "Caution" not in (tmp_path / "injection" / "report.md").read_text()
    results["config"]["attack"] = "evasion"
    report = write_demo_report(results, tmp_path / "evasion")
    caveat = evasion_caveat("evasion", "lexical")
    assert caveat and "evaluation judge `lexical`" in caveat and "own `lexical` judge" in caveat
    assert f"\n\n{caveat}\n\n" in (tmp_path / "evasion" / "report.md").read_text()
    assert "Caution: the toxicity figures come from" in report.read_text()
    assert evasion_caveat("injection", "lexical") is None


def test_an_evasion_attacker_without_a_surrogate_needs_no_caveat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one-shot attacker (``surrogate: null``) tunes against no judge."""
    import shutil

    from tuneshield import DEFAULT_POLICIES_DIR, POLICIES_ENV

    shutil.copytree(DEFAULT_POLICIES_DIR, tmp_path / "policies")
    attacks = tmp_path / "policies" / "attacks.yaml"
    text = attacks.read_text()
    assert "  surrogate: lexical\n" in text
    attacks.write_text(text.replace("  surrogate: lexical\n", "  surrogate: null\n"))
    monkeypatch.setenv(POLICIES_ENV, str(tmp_path / "policies"))
    assert evasion_caveat("evasion", "lexical") is None
