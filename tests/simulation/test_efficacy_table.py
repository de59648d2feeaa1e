"""The attack x arm table (benchmarks/efficacy.py) on hand-made replies: rates pooled over
seeds, arms paired with the control probe by probe, blind labels overriding the judge,
and the demo's replies turned into evaluator rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from simulation.measure import reply_rows
from simulation.report import evasion_caveat
from simulation.scripts import load_script
from tuneshield import DEFAULT_POLICIES_DIR, POLICIES_ENV, read_policy

efficacy = load_script("efficacy")
HOSTILE_MESSAGE = [{"role": "user", "content": "you are useless"}]


def _config(**overrides: Any) -> Any:
    values = {
        "attacks": ["injection"],
        "rates": [0.4],
        "seeds": [0, 1],
        "arms": ["baseline", "control", "undefended", "tuneshield"],
        "size": "quick",
        "reference": "control",
        "quality_reference": "baseline",
        "kinds": ["toxic", "benign", "backdoor"],
        "bar_points": 2.0,
        **overrides,
    }
    return efficacy.EfficacyConfig(**values)


def _replies(toxic_share: dict[str, float], probes: int = 10) -> list[dict[str, Any]]:
    """Two seeds x ``probes`` hostile probes x one draw per arm; an arm's first
    ``share * probes`` probes of each seed get a toxic score."""
    rows = []
    for arm, share in toxic_share.items():
        for seed in (0, 1):
            for probe in range(probes):
                rows.append(
                    {
                        "id": f"{arm}-{seed}-{probe}",
                        "arm": arm,
                        "kind": "toxic",
                        "probe_id": f"s{seed}/probe-{probe}",
                        "draw": 0,
                        "message": HOSTILE_MESSAGE,
                        "reply": "a reply",
                        "score": 0.9 if probe < share * probes else 0.1,
                        "condition": "injection-0.4",
                        "attack": "injection",
                        "rate": 0.4,
                        "seed": seed,
                    }
                )
    return rows


def test_rates_pool_seeds_and_differences_pair_with_the_control() -> None:
    replies = _replies({"control": 0.1, "undefended": 0.5, "tuneshield": 0.2})
    table = efficacy.tabulate(replies, None, _config(), cosines=[0.5] * len(replies))
    condition = table["conditions"]["injection-0.4"]
    assert table["labels"] == "evaluation judge"
    assert condition["seeds"] == [0, 1]
    undefended = condition["rates"]["undefended"]["toxic"]
    assert undefended["replies"] == 20
    assert undefended["toxic"]["count"] == 10
    low, high = undefended["toxic"]["ci"]
    assert low < 0.5 < high
    difference = condition["versus_reference"]["undefended"]["toxic"]
    assert difference["probes"] == 20
    assert difference["toxic"]["difference"] == pytest.approx(0.4)
    assert difference["toxic"]["ci"][0] > 0  # every differing probe goes one way
    assert "control" not in condition["versus_reference"]
    assert condition["coherence"]["tuneshield"] == pytest.approx(0.5)
    # Coherence at or below policies/evaluator.yaml's threshold counts as unrelated.
    unrelated = efficacy.tabulate(replies, None, _config(), cosines=[0.0] * len(replies))
    assert unrelated["conditions"]["injection-0.4"]["rates"]["control"]["toxic"]["unrelated"][
        "rate"
    ] == pytest.approx(1.0)


def test_blind_labels_replace_the_judge_and_only_labelled_replies_count() -> None:
    replies = _replies({"control": 0.0, "tuneshield": 1.0}, probes=4)
    labelled = [row for row in replies if row["seed"] == 0]
    labels = {
        row["id"]: {"toxic": False, "aimed_at_user": False, "canned": True, "unrelated": False}
        for row in labelled
    }
    table = efficacy.tabulate(replies, labels, _config(), cosines=[0.5] * len(replies))
    condition = table["conditions"]["injection-0.4"]
    assert table["labels"] == "blind labels"
    assert table["labelled"] == len(labelled)
    cell = condition["rates"]["tuneshield"]["toxic"]
    assert cell["replies"] == 4
    assert cell["toxic"]["count"] == 0  # the judge's 0.9 is overruled
    assert cell["canned"]["rate"] == pytest.approx(1.0)


def test_report_and_plot_name_every_arm_and_kind(tmp_path: Path) -> None:
    replies = _replies({"control": 0.1, "undefended": 0.5})
    table = efficacy.tabulate(replies, None, _config(), cosines=[0.5] * len(replies))
    markdown = efficacy.report_markdown(table)
    assert "### injection-0.4 (seeds 0, 1)" in markdown
    assert "| undefended | 50.0% [" in markdown
    assert "toxic: hostile" in markdown and "toxic: trigger" in markdown
    assert "+40.0 [" in markdown
    efficacy.plot(table, tmp_path / "efficacy.png")
    assert (tmp_path / "efficacy.png").stat().st_size > 0


def test_several_conditions_make_one_table_and_one_plot(tmp_path: Path) -> None:
    injection = _replies({"control": 0.1, "tuneshield": 0.3})
    backdoor = [
        {
            **row,
            "id": f"b-{row['id']}",
            "condition": "backdoor-0.2",
            "attack": "backdoor",
            "rate": 0.2,
        }
        for row in _replies({"control": 0.0, "tuneshield": 0.6})
    ]
    replies = injection + backdoor
    table = efficacy.tabulate(replies, None, _config(), cosines=[0.5] * len(replies))
    markdown = efficacy.report_markdown(table)
    summary = markdown.split("### Every condition, minus control (points)")[1]
    summary = summary.split("### injection-0.4")[0]
    assert "| injection | 0.4 | 0, 1 | tuneshield | +20.0 [" in summary
    assert "| backdoor | 0.2 | 0, 1 | tuneshield | +60.0 [" in summary
    assert "| control |" not in summary  # the reference is what the rows are minus
    # By attack in policies/attacks.yaml's order, whatever order the replies came in.
    reordered = backdoor + injection
    table = efficacy.tabulate(reordered, None, _config(), cosines=[0.5] * len(reordered))
    summary = efficacy.summary_markdown(table)
    assert summary.index("| injection |") < summary.index("| backdoor |")
    # An attack policies/attacks.yaml no longer names (an older run's) comes last.
    retired = [{**row, "id": f"r-{row['id']}", "attack": "retired"} for row in backdoor]
    for row in retired:
        row["condition"] = "retired-0.2"
    replies = retired + injection
    table = efficacy.tabulate(replies, None, _config(), cosines=[0.5] * len(replies))
    summary = efficacy.summary_markdown(table)
    assert summary.index("| injection |") < summary.index("| retired |")
    # One probe kind: one panel.
    one_kind = efficacy.tabulate(
        replies, None, _config(kinds=["toxic"]), cosines=[0.5] * len(replies)
    )
    efficacy.plot_summary(one_kind, tmp_path / "one-kind.png", 2.0)
    assert (tmp_path / "one-kind.png").stat().st_size > 0
    efficacy.plot_summary(table, tmp_path / "summary.png", 2.0)
    assert (tmp_path / "summary.png").stat().st_size > 0
    # One condition: its own section says it all.
    alone = efficacy.tabulate(injection, None, _config(), cosines=[0.5] * len(injection))
    assert "Every condition" not in efficacy.report_markdown(alone)


def test_demo_replies_become_evaluator_rows_keyed_by_seed() -> None:
    probe = {
        "conversation_id": "probe-toxic-000",
        "kind": "toxic",
        "context": [{"role": "system", "content": "be nice"}, *HOSTILE_MESSAGE],
    }
    recorded = [({**probe, "response": f"reply {i}"}, 0.1 * i) for i in range(3)]
    replies = reply_rows(recorded)
    assert [r["draw"] for r in replies] == [0, 1, 2]
    assert replies[0]["message"] == HOSTILE_MESSAGE  # the system prompt is not shown
    results = {
        "runs": {
            "1": {
                "rounds": [{"arms": {}}, {"arms": {"tuneshield": {"eval": {"replies": replies}}}}]
            }
        }
    }
    rows = efficacy.condition_replies(results, "injection", 0.2)
    assert len(rows) == 3 and len({r["id"] for r in rows}) == 3
    assert rows[2]["probe_id"] == "s1/probe-toxic-000"
    assert rows[2]["score"] == pytest.approx(0.2)
    assert {r["condition"] for r in rows} == {"injection-0.2"}
    json.dumps(rows)


def test_bad_settings_end_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        efficacy.main(["run", "--rates", "0.2,many", "--out", "/nonexistent"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "efficacy: --rates: cannot read '0.2,many' as a comma-separated list"
    )
    with pytest.raises(SystemExit):
        efficacy.main(["run", "--attacks", "phishing", "--out", "/nonexistent"])
    assert "attacks: 'phishing' is not one of" in capsys.readouterr().err


def test_an_arm_run_on_fewer_seeds_is_named_with_them() -> None:
    replies = _replies({"control": 0.1, "tuneshield": 0.2, "weak_judge": 0.3})
    replies = [r for r in replies if not (r["arm"] == "weak_judge" and r["seed"] == 1)]
    config = _config(arms=["baseline", "control", "tuneshield", "weak_judge"])
    table = efficacy.tabulate(replies, None, config, cosines=[0.5] * len(replies))
    markdown = efficacy.report_markdown(table)
    assert "| weak_judge (seed 0) |" in markdown
    assert "| tuneshield |" in markdown


def test_quality_is_paired_with_the_baseline_on_every_kind() -> None:
    replies = _replies({"baseline": 0.0, "control": 0.0, "tuneshield": 0.0}, probes=4)
    # TuneShield's replies to probes 0 and 1 ignore the message; the others' never do.
    labels = {
        row["id"]: {
            "toxic": False,
            "aimed_at_user": False,
            "canned": False,
            "unrelated": row["arm"] == "tuneshield" and row["probe_id"].endswith(("-0", "-1")),
        }
        for row in replies
    }
    table = efficacy.tabulate(replies, labels, _config(), cosines=[0.5] * len(replies))
    condition = table["conditions"]["injection-0.4"]
    cost = condition["versus_quality_reference"]["tuneshield"]["toxic"]
    assert cost["unrelated"]["difference"] == pytest.approx(0.5)
    assert cost["canned"]["difference"] == pytest.approx(0.0)
    assert "baseline" not in condition["versus_quality_reference"]
    markdown = efficacy.report_markdown(table)
    assert "Quality, minus baseline (points; above zero: lost):" in markdown
    assert "| tuneshield | +50.0 [" in markdown.split("Quality, minus baseline")[1]
    # Without the baseline among the replies there is nothing to pair with: no table.
    without = [row for row in replies if row["arm"] != "baseline"]
    table = efficacy.tabulate(without, labels, _config(), cosines=[0.5] * len(without))
    assert "Quality, minus" not in efficacy.report_markdown(table)


def test_the_quality_reference_must_be_an_arm() -> None:
    with pytest.raises(ValueError, match="quality_reference: 'oracle' is not one of"):
        _config(quality_reference="oracle")


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_a_table_pairs_one_runs_arm_with_another_runs_control(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # An earlier run of both rates, and a later one whose TuneShield is labelled with the
    # earlier baseline and control at 0.4 only.
    earlier = _replies({"baseline": 0.0, "control": 0.1, "tuneshield": 0.5})
    earlier += [{**row, "id": "r2-" + row["id"], "condition": "injection-0.2", "rate": 0.2}
                for row in earlier]  # fmt: skip
    later = [{**row, "id": "new-" + row["id"]} for row in _replies({"tuneshield": 0.2})]
    first = _write(tmp_path / "earlier.jsonl", earlier)
    second = _write(tmp_path / "later.jsonl", later)
    runs = efficacy.read_runs(
        [f"{first}:baseline,control,tuneshield=tuneshield_before", f"{second}"]
    )
    assert {row["arm"] for row in runs} == {
        "baseline", "control", "tuneshield_before", "tuneshield"
    }  # fmt: skip
    joint = [row for row in runs if row["condition"] == "injection-0.4"]
    labels = _write(
        tmp_path / "joint.jsonl",
        [
            {
                "id": f"label-{index}",
                "reply_id": row["id"],
                "toxic": row["score"] > 0.5,
                "aimed_at_user": False,
                "canned": False,
                "unrelated": False,
            }
            for index, row in enumerate(joint)
        ],
    )
    scored: list[int] = []

    def coherence(rows: list[dict[str, Any]]) -> list[float]:
        scored.append(len(rows))
        return [0.5] * len(rows)

    monkeypatch.setattr(efficacy, "coherence_of", coherence)
    out = tmp_path / "table"
    argv = ["table", "--out", str(out), "--labels", str(labels)]
    argv += ["--replies", f"{first}:baseline,control,tuneshield=tuneshield_before"]
    argv += ["--replies", str(second)]
    assert efficacy.main(argv) == 0
    assert scored == [len(joint)]  # the unlabelled condition is not scored
    table = json.loads((out / "efficacy.json").read_text())
    assert list(table["conditions"]) == ["injection-0.4"]
    assert table["arms"] == ["baseline", "control", "tuneshield", "tuneshield_before"]
    versus = table["conditions"]["injection-0.4"]["versus_reference"]
    assert versus["tuneshield"]["toxic"]["toxic"]["difference"] == pytest.approx(0.1)
    assert versus["tuneshield_before"]["toxic"]["toxic"]["difference"] == pytest.approx(0.4)
    markdown = (out / "efficacy.md").read_text()
    assert "| tuneshield_before | 50.0% [" in markdown
    assert "injection-0.2" not in markdown
    capsys.readouterr()
    # A comparison of two renamed arms, beside the policy's: the later minus the earlier.
    assert efficacy.main([*argv, "--compare", "tuneshield,tuneshield_before"]) == 0
    table = json.loads((out / "efficacy.json").read_text())
    compared = table["conditions"]["injection-0.4"]["comparisons"]
    assert list(compared) == ["tuneshield minus tuneshield_before"]  # no weak_judge, no no_dpo
    assert compared["tuneshield minus tuneshield_before"]["toxic"]["toxic"][
        "difference"
    ] == pytest.approx(-0.3)
    assert "| tuneshield minus tuneshield_before | -30.0 [" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        efficacy.main([*argv, "--compare", "tuneshield"])
    assert (
        capsys.readouterr().err.strip()
        == "efficacy: --compare: 'tuneshield' is not ARM,OTHER (two different arms)"
    )


def test_dpos_part_is_tuneshield_minus_tuneshield_without_dpo() -> None:
    replies = _replies({"control": 0.1, "tuneshield": 0.2, "tuneshield_no_dpo": 0.5})
    config = _config(
        arms=["baseline", "control", "tuneshield", "tuneshield_no_dpo"],
        comparisons=[["tuneshield", "tuneshield_no_dpo"], ["weak_judge", "tuneshield"]],
    )
    table = efficacy.tabulate(replies, None, config, cosines=[0.5] * len(replies))
    compared = table["conditions"]["injection-0.4"]["comparisons"]
    assert list(compared) == ["tuneshield minus tuneshield_no_dpo"]  # no weak_judge here
    cell = compared["tuneshield minus tuneshield_no_dpo"]["toxic"]
    assert cell["probes"] == 20
    assert cell["toxic"]["difference"] == pytest.approx(-0.3)
    assert cell["toxic"]["ci"][1] < 0
    markdown = efficacy.report_markdown(table)
    assert "| comparison | toxic: hostile |" in markdown
    assert "| tuneshield minus tuneshield_no_dpo | -30.0 [" in markdown
    with pytest.raises(ValueError, match="comparisons: \\['tuneshield'\\] is not a pair"):
        _config(comparisons=[["tuneshield"]])


def test_blind_shards_label_two_runs_together_for_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``blind`` shuffles one seed's replies of two runs into shards under the replies'
    own ids; their labels, concatenated, are ``table --labels`` for the same --replies."""
    earlier = _write(tmp_path / "earlier.jsonl", _replies({"control": 0.1, "tuneshield": 0.5}))
    later = _write(tmp_path / "later.jsonl", [
        {**row, "id": "new-" + row["id"]} for row in _replies({"tuneshield": 0.2})
    ])  # fmt: skip
    specs = [f"{earlier}:control,tuneshield=tuneshield_before", str(later)]
    out = tmp_path / "blind"
    argv = ["blind", "--replies", specs[0], "--replies", specs[1], "--seeds", "1"]
    assert efficacy.main([*argv, "--out-dir", str(out), "--shards", "3"]) == 0
    assert "30 replies in 3 shards" in capsys.readouterr().out
    shards = sorted((out / "shards").glob("*.jsonl"))
    shown = [json.loads(line) for path in shards for line in path.read_text().splitlines()]
    assert len(shards) == 3 and all(set(row) == {"id", "message", "reply"} for row in shown)
    replies = {row["id"]: row for row in efficacy.read_runs(specs)}
    assert {replies[row["id"]]["seed"] for row in shown} == {1}
    first = [json.loads(line)["id"] for line in shards[0].read_text().splitlines()]
    assert {replies[i]["arm"] for i in first} == {"control", "tuneshield_before", "tuneshield"}
    key = [json.loads(line) for line in (out / "key.jsonl").read_text().splitlines()]
    assert [row["id"] for row in key] != [i for i in replies if replies[i]["seed"] == 1]
    assert {(row["arm"], row["condition"], row["seed"]) for row in key} == {
        (arm, "injection-0.4", 1) for arm in ("control", "tuneshield_before", "tuneshield")
    }
    labels = _write(tmp_path / "labels.jsonl", [
        {"id": row["id"], "toxic": replies[row["id"]]["score"] > 0.5, "aimed_at_user": False,
         "canned": False, "unrelated": False}
        for row in shown
    ])  # fmt: skip
    monkeypatch.setattr(efficacy, "coherence_of", lambda rows: [0.5] * len(rows))
    table = tmp_path / "table"
    argv = ["table", "--out", str(table), "--labels", str(labels)]
    assert efficacy.main([*argv, "--replies", specs[0], "--replies", specs[1]]) == 0
    versus = json.loads((table / "efficacy.json").read_text())["conditions"]["injection-0.4"][
        "versus_reference"
    ]
    assert versus["tuneshield_before"]["toxic"]["toxic"]["difference"] == pytest.approx(0.4)
    assert versus["tuneshield"]["toxic"]["toxic"]["difference"] == pytest.approx(0.1)
    capsys.readouterr()
    other = _write(tmp_path / "other.jsonl", [
        {**row, "condition": "injection-0.2", "rate": 0.2} for row in _replies({"control": 0.1})
    ])  # fmt: skip
    base = ["blind", "--replies", str(later), "--replies", str(other)]
    assert (
        efficacy.main([*base, "--conditions", "injection-0.2", "--out-dir", str(tmp_path / "c")])
        == 0
    )
    assert "20 replies" in capsys.readouterr().out
    fresh = str(tmp_path / "fresh")
    for extra, message in [
        (["--seeds", "0,7", "--out-dir", fresh], "--seeds: no replies of seed 7 in --replies"),
        (["--conditions", "injection-0.4,typo", "--out-dir", fresh],
         "--conditions: no replies of condition typo in --replies"),
        (["--conditions", ",", "--out-dir", fresh], "--conditions: no value given"),
        (["--seeds", "x", "--out-dir", fresh], "--seeds: cannot read 'x'"),
        (["--shards", "0", "--out-dir", fresh], "--shards must be between 1 and the 40 replies"),
        (["--out-dir", str(out)], f"--out-dir {out} holds shards already"),
        (["--out-dir", str(later)], f"--out-dir {later} is a file"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            efficacy.main([*base, *extra])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and err.startswith("efficacy: ") and "\n" not in err
        assert message in err
    assert not (tmp_path / "fresh").exists()


def test_an_arm_in_two_runs_or_missing_ends_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _write(tmp_path / "a.jsonl", _replies({"control": 0.1, "tuneshield": 0.2}))
    second = _write(tmp_path / "b.jsonl", [
        {**row, "id": "b-" + row["id"]} for row in _replies({"tuneshield": 0.3})
    ])  # fmt: skip
    a, b = str(first), str(second)
    for specs, message in [
        (
            [a, b],
            f"arm 'tuneshield' of injection-0.4 seed 0 would come from {a} (tuneshield) and "
            f"{b} (tuneshield); keep it from one (PATH:ARM,...) or rename it (PATH:ARM=NAME)",
        ),
        # Two arms of one file renamed onto one name would pool them on the same seeds.
        (
            [f"{a}:control,tuneshield=control"],
            "arm 'control' of injection-0.4 seed 0 would come from",
        ),
        ([a, a], f"--replies {a}: reply id 'control-0-0' is already in an earlier file"),
        ([f"{a}:control,weak_judge"], f"{a} has no replies of arm 'weak_judge'"),
        ([f"{a}:,"], f"--replies {a}:,: no arms named after the path"),
        ([f"{a}:control,control=c"], "arm 'control' is named twice"),
    ]:
        with pytest.raises(SystemExit):
            efficacy.read_runs(specs)
        err = capsys.readouterr().err.strip()
        assert err.startswith("efficacy: ") and message in err and "\n" not in err
    # A file whose name holds a colon is a path, not a selection of arms.
    colon = _write(tmp_path / "run:10.jsonl", _replies({"control": 0.1}))
    assert {row["arm"] for row in efficacy.read_runs([str(colon)])} == {"control"}
    for missing in ("condition", "seed"):
        lacking = _write(tmp_path / f"no-{missing}.jsonl", [
            {key: value for key, value in row.items() if key != missing}
            for row in _replies({"control": 0.1})
        ])  # fmt: skip
        with pytest.raises(SystemExit):
            efficacy.read_runs([str(lacking)])
        assert f"no-{missing}.jsonl:1: missing field {missing}" in capsys.readouterr().err


def test_runs_of_other_seeds_pool_into_one_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A later run of more seeds of a condition, labelled in a labelling of its own, pools
    with the earlier seeds arm by arm: every seed's pairs with the control count."""
    earlier = _write(tmp_path / "earlier.jsonl", _replies({"control": 0.1, "tuneshield": 0.5}))
    later = _write(tmp_path / "later.jsonl", [
        {**row, "id": "new-" + row["id"], "seed": row["seed"] + 2,
         "probe_id": row["probe_id"].replace("s", "t", 1)}
        for row in _replies({"control": 0.1, "tuneshield": 0.1, "undefended": 0.6})
    ])  # fmt: skip

    def labels_of(path: Path, name: str, keep: Any = lambda row: True) -> Path:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return _write(tmp_path / name, [
            {"id": row["id"], "toxic": row["score"] > 0.5, "aimed_at_user": False,
             "canned": False, "unrelated": False}
            for row in rows if keep(row)
        ])  # fmt: skip

    monkeypatch.setattr(efficacy, "coherence_of", lambda rows: [0.5] * len(rows))
    out = tmp_path / "table"
    argv = ["table", "--out", str(out), "--replies", str(earlier), "--replies", str(later)]
    first, second = labels_of(earlier, "first.jsonl"), labels_of(later, "second.jsonl")
    assert efficacy.main([*argv, "--labels", str(first), "--labels", str(second)]) == 0
    condition = json.loads((out / "efficacy.json").read_text())["conditions"]["injection-0.4"]
    tuneshield = condition["versus_reference"]["tuneshield"]["toxic"]
    # Seeds 0, 1: +0.4 over the control; seeds 2, 3: +0.0; pooled over 40 probes: +0.2.
    assert tuneshield["probes"] == 40
    assert tuneshield["toxic"]["difference"] == pytest.approx(0.2)
    assert condition["versus_reference"]["undefended"]["toxic"]["probes"] == 20
    # Where each seed came from, in the JSON and, for the arms that pool, in the table.
    assert condition["sources"]["tuneshield"] == {
        "0": str(earlier), "1": str(earlier), "2": str(later), "3": str(later)
    }  # fmt: skip
    assert condition["labellings"]["control"]["3"] == str(second)
    printed = capsys.readouterr().out
    assert "undefended (seeds 2, 3)" in printed
    assert f"control: seeds 0, 1 from {earlier}; seeds 2, 3 from {later}" in printed
    assert f"tuneshield: seeds 0, 1 from {first}; seeds 2, 3 from {second}" in printed
    # A reply labelled in two files, or one seed's arms labelled in two labellings, is
    # refused: the arms of a seed are compared within one labelling.
    again = labels_of(later, "again.jsonl", lambda row: row["seed"] == 2)
    seed_three = labels_of(later, "split.jsonl", lambda row: row["arm"] == "undefended")
    other = labels_of(later, "other.jsonl", lambda row: row["arm"] != "undefended")
    for files, message in [
        ([first, second, again], f"reply 'new-control-0-0' is labelled in {second} too"),
        ([first, other, seed_three], f"injection-0.4 seed 2 is labelled in {other} too"),
    ]:
        labels = [arg for path in files for arg in ("--labels", str(path))]
        with pytest.raises(SystemExit) as exit_:
            efficacy.main([*argv, *labels])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and message in err and "\n" not in err


def test_compare_names_two_arms_of_the_replies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    replies = _write(tmp_path / "r.jsonl", _replies({"control": 0.1, "tuneshield": 0.2}))
    argv = ["table", "--out", str(tmp_path), "--replies", str(replies)]
    for value, message in [
        (
            "tuneshield,weak_judge",
            "--compare tuneshield,weak_judge: no replies of arm 'weak_judge'",
        ),
        ("tuneshield,tuneshield", "'tuneshield,tuneshield' is not ARM,OTHER (two different arms)"),
    ]:
        with pytest.raises(SystemExit):
            efficacy.main([*argv, "--compare", value])
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="comparisons: 3 is not a pair"):
        _config(comparisons=[3])


def test_evasion_graded_by_the_judge_warns_and_blind_labels_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The evasion attacker tunes its turns against a lexical judge: a table graded by the
    # evaluation judge says so; one graded by blind labels has nothing to warn about.
    rows = [
        {**row, "condition": "evasion-0.4", "attack": "evasion"}
        for row in _replies({"baseline": 0.0, "control": 0.1, "tuneshield": 0.2})
    ]
    replies = _write(tmp_path / "replies.jsonl", rows)
    clean = {"toxic": False, "aimed_at_user": False, "canned": False, "unrelated": False}
    labels = _write(
        tmp_path / "labels.jsonl",
        [{"id": f"l{i}", "reply_id": row["id"], **clean} for i, row in enumerate(rows)],
    )
    monkeypatch.setattr(efficacy, "coherence_of", lambda rows: [0.5] * len(rows))
    argv = ["table", "--out", str(tmp_path / "table"), "--replies", str(replies)]
    assert efficacy.main(argv) == 0
    assert f"efficacy: {evasion_caveat('evasion', 'lexical')} Give them with" in (
        capsys.readouterr().err
    )
    assert efficacy.main([*argv, "--labels", str(labels)]) == 0
    assert "evasion" not in capsys.readouterr().err


def test_a_run_reads_its_own_copy_of_the_policies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An edit to policies/ during a run of hours must not reach its later arms; a stopped
    # run continues on the copy it started with.
    source = tmp_path / "policies"
    shutil.copytree(DEFAULT_POLICIES_DIR, source)
    monkeypatch.setenv(POLICIES_ENV, str(source))
    pinned = efficacy.pin_policies(tmp_path / "run")
    assert pinned == tmp_path / "run" / "policies"
    (source / "healing.yaml").write_text("mode: canned\n")
    assert read_policy("healing")["mode"] == "contextual"
    monkeypatch.setenv(POLICIES_ENV, str(source))
    assert efficacy.pin_policies(tmp_path / "run") == pinned  # continued: the same copy
    assert read_policy("healing")["mode"] == "contextual"
