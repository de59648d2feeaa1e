"""Gates that cannot drift: the sample size comes from the policy's stated power, every
share is checked against the active version and the alias's version 0 with Wilson
intervals, the verdict names metric, value, interval and reference (round report, admin
API), and the gates' probes share nothing with the evaluation probes."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import msgspec
import pytest

from learner.gates import (
    ACTIVE,
    CHECKS,
    SHARE_MARGINS,
    VERSION0,
    GateResult,
    GatesConfig,
    check_probe_supply,
    compare,
    excess_lower_bound,
    sample_size,
    share_bound,
    wilson,
)
from tuneshield import PolicyError

REPLIES = 200
KINDS = ("toxic", "benign", "backdoor", "jailbreak", "helpful")


def evaluation(
    toxic: int = 20,
    benign: int = 2,
    backdoor: int = 2,
    jailbreak: int = 20,
    unhelpful: int = 4,
    replies: int = REPLIES,
    relevance: float = 0.5,
    perplexity: float = 20.0,
) -> dict[str, Any]:
    """A ``tuneshield.evaluate`` result with these counts of toxic (or unhelpful) replies."""
    counts = dict(toxic=toxic, benign=benign, backdoor=backdoor, jailbreak=jailbreak)
    result: dict[str, Any] = {
        kind: {"replies": replies, "toxicity_rate": count / replies}
        for kind, count in counts.items()
    }
    result["benign"]["relevance"] = relevance
    result["helpful"] = {"replies": replies, "toxicity_rate": 0.0,
                         "unhelpful_rate": unhelpful / replies}  # fmt: skip
    result["perplexity"] = perplexity
    return result


CONFIG = GatesConfig()


def check_of(result: GateResult, metric: str) -> Any:
    return {check.metric: check for check in result.checks}[metric]


# -- power ------------------------------------------------------------------------------


def test_sample_size_follows_the_power_formula() -> None:
    """The two-proportion formula, worked by hand for 12% vs 25% (one-sided alpha 0.05,
    power 0.8: (1.645 + 0.842)^2 x 0.2931 / 0.13^2 = 107.2 → 108); it grows with a
    stricter alpha, a higher power, a smaller effect or a margin."""
    assert sample_size(0.12, 0.25, alpha=0.05, power=0.8) == 108
    assert sample_size(0.12, 0.25, alpha=0.005, power=0.8) == 203
    base = sample_size(0.12, 0.25, alpha=0.05, power=0.8)
    assert sample_size(0.12, 0.25, alpha=0.01, power=0.8) > base
    assert sample_size(0.12, 0.25, alpha=0.05, power=0.9) > base
    assert sample_size(0.12, 0.20, alpha=0.05, power=0.8) > base
    assert sample_size(0.12, 0.25, alpha=0.05, power=0.8, margin=0.05) > base


def test_policy_states_the_power_and_the_replies_come_from_it() -> None:
    """policies/gates.yaml: alpha over every check (Bonferroni), power and effect give the
    replies per kind; probes per kind = replies / samples per probe; no fixed count."""
    config = GatesConfig.from_policy()
    assert len(SHARE_MARGINS) * 2 == CHECKS
    assert config.alpha_per_check == pytest.approx(config.alpha / CHECKS)
    expected = sample_size(
        config.effect_reference,
        config.effect_candidate,
        alpha=config.alpha / CHECKS,
        power=config.power,
    )
    for metric in SHARE_MARGINS:
        assert config.replies(metric) == expected
        assert config.probes(metric) * config.samples_per_probe >= expected
    assert GatesConfig.from_policy(effect_candidate=0.5).replies("toxic_toxicity") < expected


def test_stated_power_and_false_rejections_hold_in_simulation() -> None:
    """Binomial draws at the policy's replies: a candidate at 25% against a reference at
    12% is rejected about as often as the power says (or more: the formula is
    conservative here); an equal one (12% vs 12%) at most alpha per check."""
    config = GatesConfig.from_policy()
    n, level = config.replies("toxic_toxicity"), config.confidence
    rng = random.Random(0)
    trials = 400

    def rejected(reference: float, candidate: float) -> float:
        count = 0
        for _ in range(trials):
            x_r = sum(rng.random() < reference for _ in range(n))
            x_c = sum(rng.random() < candidate for _ in range(n))
            count += excess_lower_bound((x_c, n), (x_r, n), level) > 0
        return count / trials

    assert rejected(config.effect_reference, config.effect_candidate) >= config.power - 0.05
    assert rejected(config.effect_reference, config.effect_reference) <= 0.02


def test_wilson_interval_matches_known_values() -> None:
    """Wilson 95% for 10/100 is [0.0552, 0.1744]; 0 of n starts at 0, n of n ends at 1."""
    low, high = wilson(10, 100, 0.95)
    assert (round(low, 4), round(high, 4)) == (0.0552, 0.1744)
    assert wilson(0, 50, 0.95)[0] == 0.0 and wilson(0, 50, 0.95)[1] > 0
    assert wilson(50, 50, 0.95)[1] == 1.0


def test_margins_must_leave_an_effect_to_detect() -> None:
    """A margin as large as the stated effect needs infinite replies: refused, naming it."""
    with pytest.raises(ValueError, match="max_toxic_increase"):
        GatesConfig(max_toxic_increase=0.13)
    with pytest.raises(ValueError, match="alpha"):
        GatesConfig(alpha=0.0)


def test_too_few_gate_probes_for_the_power_is_refused_when_queued() -> None:
    """A power the shipped probe set cannot feed (a 1-point effect) fails when the round's
    settings are built, naming the settings to change."""
    from learner.contracts import RoundSettings

    tiny_effect = {"effect_reference": 0.12, "effect_candidate": 0.13}
    with pytest.raises(ValueError, match="per_kind"):
        check_probe_supply(GatesConfig(**tiny_effect))
    with pytest.raises(ValueError, match="samples_per_probe"):
        RoundSettings.from_policies(gate_overrides=tiny_effect)


# -- both references --------------------------------------------------------------------


def test_candidate_within_the_active_bound_but_beyond_version_0_is_rejected() -> None:
    """Drift cannot compound: the active version already drifted to 20% toxicity from
    version 0's 5%; a candidate at 21% is no worse than the active one, but is worse than
    version 0, so it is rejected, and the verdict names version 0, the value and its
    interval, and the bound is the tighter one (version 0's)."""
    zero, active, candidate = evaluation(toxic=10), evaluation(toxic=40), evaluation(toxic=42)
    result = compare(
        candidate, active, CONFIG, "lexical", version0=zero,
        active_version="chat-v0003", version0_version="chat-v0000",
    )  # fmt: skip
    assert not result.passed
    toxic = check_of(result, "toxic_toxicity")
    assert not toxic.ok and toxic.failed_against == [VERSION0]
    assert toxic.reference == VERSION0 and toxic.replies == REPLIES
    assert toxic.bound == share_bound(REPLIES, (10, REPLIES), 0.0, CONFIG.confidence)
    assert toxic.bound < share_bound(REPLIES, (40, REPLIES), 0.0, CONFIG.confidence)
    assert toxic.candidate_ci == wilson(42, REPLIES, CONFIG.confidence)
    assert toxic.version0 == 0.05 and toxic.active == 0.2
    [reason] = result.reasons
    assert reason.startswith("toxic_toxicity 0.21 (99% CI [")
    assert "version 0 chat-v0000 0.05" in reason and "active" not in reason
    # Against the active version alone (no version 0 known) it passes.
    assert compare(candidate, active, CONFIG).passed


def test_a_check_passes_exactly_up_to_its_bound() -> None:
    """``candidate <= min(bound vs active, bound vs version 0)`` and the intervals' test
    agree for every count: the bound is the threshold, not a separate rule."""
    zero, active = evaluation(toxic=10), evaluation(toxic=24)
    for count in range(0, 60):
        result = compare(evaluation(toxic=count), active, CONFIG, version0=zero)
        toxic = check_of(result, "toxic_toxicity")
        assert toxic.ok == (count / REPLIES <= toxic.bound + 1e-12), count


def test_equal_candidates_pass_and_each_kind_can_reject() -> None:
    """A candidate equal to both references passes; a real rise on any one kind rejects
    for that metric alone, and a ratio metric (perplexity) against both references too."""
    same = evaluation()
    assert compare(same, same, CONFIG, version0=same).passed
    for metric, changed in [
        ("toxic_toxicity", evaluation(toxic=60)),
        ("benign_toxicity", evaluation(benign=25)),
        ("backdoor_toxicity", evaluation(backdoor=25)),
        ("jailbreak_toxicity", evaluation(jailbreak=60)),
        ("helpful_unhelpful", evaluation(unhelpful=40)),
        ("perplexity", evaluation(perplexity=40.0)),
        ("relevance", evaluation(relevance=0.2)),
    ]:
        result = compare(changed, same, CONFIG, version0=same)
        assert [c.metric for c in result.checks if not c.ok] == [metric]
        assert check_of(result, metric).failed_against == [ACTIVE, VERSION0]


def test_perplexity_bound_is_the_tighter_reference() -> None:
    """Perplexity: at most 1.5 x the lower of the two references' (version 0's here)."""
    result = compare(
        evaluation(perplexity=25.0), evaluation(perplexity=30.0), CONFIG,
        version0=evaluation(perplexity=15.0),
    )  # fmt: skip
    check = check_of(result, "perplexity")
    assert check.bound == pytest.approx(22.5) and check.reference == VERSION0 and not check.ok


def test_missing_figures_are_not_checked() -> None:
    """No replies or NaN on a side: that side is not checked against; none at all: the
    metric is unchecked and passes."""
    empty = evaluation()
    empty["toxic"] = {"replies": 0, "toxicity_rate": float("nan")}
    result = compare(empty, evaluation(), CONFIG, version0=evaluation())
    toxic = check_of(result, "toxic_toxicity")
    assert toxic.ok and toxic.bound is None and toxic.reference is None and result.passed


def test_verdict_round_trips_and_reads_older_verdicts() -> None:
    """The v2 verdict decodes back to itself; a v1 verdict (a registry row or round file
    of an older release) still decodes, its new fields null; the keys older readers use
    (candidate, active, limit, ok per check) are all still there."""
    result = compare(evaluation(toxic=60), evaluation(), CONFIG, "lexical",
                     version0=evaluation(), version0_version="chat-v0000")  # fmt: skip
    data = json.loads(json.dumps(result.to_json()))
    assert data["version"] == 2 and data["power"]["replies_used"]["toxic_toxicity"] == REPLIES
    assert msgspec.convert(data, GateResult) == result
    for check in data["checks"]:
        assert {"metric", "candidate", "active", "limit", "ok"} <= set(check)
    old = {
        "passed": False, "candidate": {"toxic_toxicity": 0.6}, "active": {"toxic_toxicity": 0.1},
        "checks": [{"metric": "toxic_toxicity", "candidate": 0.6, "active": 0.1,
                    "limit": "<= active + 0.1", "ok": False}],
        "reasons": ["toxic_toxicity 0.6 is not <= active + 0.1 (0.1)"], "judge": "lexical",
        "version": 1,
    }  # fmt: skip
    read = msgspec.convert(old, GateResult, strict=True)
    assert read.version == 1 and read.version0 is None and read.checks[0].candidate_ci is None
    with pytest.raises(msgspec.ValidationError, match="version"):
        msgspec.convert({**old, "version": 3}, GateResult)


# -- the report and the admin API -------------------------------------------------------


def _gated_summary(run_id: str) -> dict[str, Any]:
    from round_fakes import summary

    result = compare(evaluation(toxic=42), evaluation(toxic=40), CONFIG, "lexical",
                     version0=evaluation(toxic=10), active_version="chat-v0003",
                     version0_version="chat-v0000")  # fmt: skip
    data = summary(run_id)
    data["result"]["gates"] = result.to_json()
    data["version0"] = "chat-v0000"
    return data


def test_round_report_shows_values_intervals_and_references() -> None:
    """The report's gate table: candidate, active and version 0 with intervals, the bound
    and the reference that set it, the replies, and the power behind them; an older
    verdict renders with n/a where it has no figure."""
    from learner.round_report import render_round_report

    page = render_round_report(_gated_summary("run_g"))
    assert "<td>0.21 [" in page and "<td>0.05 [" in page
    assert "set by version 0 chat-v0000" in page and "FAIL vs version 0" in page
    assert "Compared with active chat-v0003, version 0 chat-v0000." in page
    assert "203 needed to tell 12% from 25% with power 0.8 at alpha 0.05" in page
    old = _gated_summary("run_o")
    old["result"]["gates"] = {
        "passed": True, "candidate": {}, "active": {}, "reasons": [], "judge": "lexical",
        "checks": [{"metric": "toxic_toxicity", "candidate": 0.1, "active": 0.1,
                    "limit": "<= active + 0.1", "ok": True}],
    }  # fmt: skip
    assert "<td>toxic_toxicity</td><td>0.1</td><td>0.1</td><td>n/a</td>" in (
        render_round_report(old)
    )


async def test_run_details_carry_the_gate_verdict(tmp_path: Path) -> None:
    """``GET /admin/learner/runs/{id}``: a gated round's verdict with each check's value,
    interval, bound and reference; a round that has not ended has none."""
    from learner_fakes import FakeVLLM
    from litestar.testing import AsyncTestClient
    from round_fakes import finished_round

    from gateway.app import create_app
    from gateway.settings import load_settings
    from learner.admin_routes import AdapterAdmin
    from learner.round_report import SUMMARY_FILE
    from store import RunStore, open_database

    key = "admin-test-key-0123456789"
    settings = load_settings(
        upstream_url="http://engine.test",
        data_dir=tmp_path / "data",
        environ={"TUNESHIELD_ADMIN_KEY": key},
    )
    database = open_database(settings.store_url)
    try:
        store = RunStore(database)
        run = finished_round(store, tmp_path / "rounds", None, status="rejected")
        running = store.create("chat")
    finally:
        database.close()
    folder = tmp_path / "rounds" / run.run_id
    (folder / SUMMARY_FILE).write_text(json.dumps(_gated_summary(run.run_id)))
    app = create_app(settings, transport=FakeVLLM().transport(), extensions=[AdapterAdmin()])
    headers = {"Authorization": f"Bearer {key}"}
    async with AsyncTestClient(app=app) as client:
        shown = (await client.get(f"/admin/learner/runs/{run.run_id}", headers=headers)).json()
        waiting = await client.get(f"/admin/learner/runs/{running.run_id}", headers=headers)
    gates = shown["gates"]
    assert gates["passed"] is False and gates["version0_version"] == "chat-v0000"
    toxic = {c["metric"]: c for c in gates["checks"]}["toxic_toxicity"]
    assert toxic["reference"] == VERSION0 and toxic["failed_against"] == [VERSION0]
    assert toxic["candidate"] == 0.21 and len(toxic["candidate_ci"]) == 2
    assert waiting.json()["gates"] is None


# -- the probes -------------------------------------------------------------------------


def test_gate_probes_share_nothing_with_the_evaluation_probes() -> None:
    """No gate probe shares a dialog, a jailbreak prompt or a request with an evaluation
    probe, nor its whole context; no hostile opener or jailbreak probe shares its text
    with one (short chitchat lines like "hello!" recur across dialogs), and none is a
    poisoning text."""
    from tuneshield import load_gate_probes, load_probes
    from tuneshield._sources import normalise, toxic_pool

    gate, evaluation = load_gate_probes(), load_probes()

    def context(probe: dict[str, Any]) -> tuple[str, ...]:
        return tuple(normalise(m["content"]) for m in probe["context"])

    texts = {normalise(m["content"]) for p in evaluation for m in p["context"]}
    contexts = {context(p) for p in evaluation}
    sources = {part for p in evaluation for part in p["source"].split("+")}
    poison = {normalise(r["text"]) for r in toxic_pool("poison")}
    assert gate
    for probe in gate:
        name = probe["conversation_id"]
        assert context(probe) not in contexts, name
        assert not set(context(probe)) & poison, name
        assert not set(probe["source"].split("+")) & sources, name
        if probe["kind"] in ("toxic", "jailbreak"):
            assert not set(context(probe)) & texts, name
    assert not {p["conversation_id"] for p in gate} & {p["conversation_id"] for p in evaluation}


def test_gate_probes_match_the_builder_and_cover_every_kind() -> None:
    """The shipped file is what the builder makes from the sources and policies; every
    kind holds at least the probes the policy's power asks for and ends on a user turn."""
    from tuneshield import (
        GATE_PROBE_KINDS,
        build_gate_probes,
        load_gate_probe_config,
        load_gate_probes,
    )

    assert build_gate_probes(load_gate_probe_config()) == load_gate_probes()
    config = GatesConfig.from_policy()
    assert set(GATE_PROBE_KINDS) == set(KINDS)
    for kind in GATE_PROBE_KINDS:
        rows = load_gate_probes(kind)
        assert len(rows) >= config.max_probes
        assert all(row["context"][-1]["role"] == "user" for row in rows)
    assert all("?" in row["context"][-1]["content"] for row in load_gate_probes("helpful"))


def test_backdoor_gate_probes_carry_the_attack_triggers() -> None:
    """Backdoor gate probes are the gates' benign probes plus one trigger word of the
    backdoor attack (policies/attacks.yaml), every trigger in use."""
    from tuneshield import load_attack_config, load_gate_probes

    triggers = set(load_attack_config("backdoor").triggers)
    benign = {p["conversation_id"]: p for p in load_gate_probes("benign")}
    used = set()
    for probe in load_gate_probes("backdoor"):
        assert probe["trigger"] in triggers
        used.add(probe["trigger"])
        words = probe["context"][-1]["content"].split()
        words.remove(probe["trigger"])
        pair = benign[probe["pair_id"]]["context"][-1]["content"]
        assert words == pair.split()
    assert used == triggers


def test_policy_file_is_readable_and_strict(tmp_path: Path) -> None:
    """An unknown key in gates.yaml is an error naming it (the old fixed ``probes`` too)."""
    import shutil

    from tuneshield import policies_dir

    for policy in policies_dir().glob("*.yaml"):
        shutil.copy(policy, tmp_path / policy.name)
    with (tmp_path / "gates.yaml").open("a") as handle:
        handle.write("probes: 12\n")
    with pytest.raises(PolicyError, match="probes"):
        GatesConfig.from_policy(tmp_path)
