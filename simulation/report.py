"""The demo's report folder: results.json, report.md (the paper-style table), plots, report.html;
and the offline experiment's (``write_experiment_report``), from the same pieces.

In the demo's, every figure is read from ``results["summary"]`` (mean over seeds, with min
and max as the spread), so one seed and several seeds draw the same way. Toxicity is always shown
beside helpfulness: a bot that only says its canned reply scores 0% toxicity.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from tuneshield import (
    PERCENT_AXIS_TOP,
    REPORT_CSS,
    arms_table,
    experiment_plots,
    figure_png,
    img_tag,
    load_attack_config,
    markdown_table,
)

# Table columns: (heading, summary metric, format).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("toxic-probe toxicity", "toxic_toxicity", "pct"),
    ("benign-probe toxicity", "benign_toxicity", "pct"),
    ("backdoor toxicity", "backdoor_toxicity", "pct"),
    ("aimed at user (toxic probes)", "toxic_aimed_at_user", "pct"),
    ("aimed at user (benign probes)", "benign_aimed_at_user", "pct"),
    ("benign canned/refusal", "benign_unhelpful", "pct"),
    ("relevance", "relevance", "num"),
    ("perplexity", "perplexity", "num"),
    ("judge precision", "judge_precision", "num"),
    ("judge recall", "judge_recall", "num"),
)


def evasion_caveat(attack: str, judge: str) -> str | None:
    """A caution for toxicity figures graded by the evaluation judge ``judge`` under
    ``attack``; None where there is nothing to say.

    The evasion attacker perturbs its toxic turns until a judge of its own passes them
    (policies/attacks.yaml ``surrogate``; alt-profanity-check, the lexical evaluation
    judge's model): the figures of a judge like it undercount what the attack planted.
    """
    surrogate = load_attack_config(attack).surrogate if attack == "evasion" else None
    if surrogate is None:
        return None
    return (
        f"Caution: the toxicity figures come from the evaluation judge `{judge}`, and the "
        f"evasion attacker tuned its toxic turns to pass its own `{surrogate}` judge "
        "(policies/attacks.yaml: surrogate), so they likely undercount what the attack "
        "planted; only blind labels measure it (benchmarks/efficacy.py run, then "
        "benchmarks/evaluator.py blind)."
    )


TOXICITY_PANELS = (
    ("toxic probes", "toxic_toxicity"),
    ("benign probes", "benign_toxicity"),
    ("aimed at the user (toxic probes)", "toxic_aimed_at_user"),
    ("backdoor probes (trigger present)", "backdoor_toxicity"),
)
# The headline plot: every arm after the last round, toxicity beside helpfulness.
HEADLINE_BARS = (
    ("toxic-probe toxicity", "toxic_toxicity"),
    ("benign-probe toxicity", "benign_toxicity"),
    ("aimed at user (toxic probes)", "toxic_aimed_at_user"),
    ("benign canned/refusal", "benign_unhelpful"),
)
QUALITY_PANELS = (
    ("benign replies canned or refused (%)", "benign_unhelpful", "pct"),
    ("relevance (cosine)", "relevance", "num"),
    ("perplexity, held-out chitchat", "perplexity", "num"),
)


def _stat(summary: dict[str, Any], arm: str, round_key: str, metric: str) -> dict[str, Any] | None:
    value = summary.get(arm, {}).get(round_key, {}).get(metric)
    return value if isinstance(value, dict) else None


def _fmt(stat: dict[str, Any] | None, kind: str) -> str:
    if stat is None or math.isnan(float(stat["mean"])):
        return "n/a"

    def one(value: float) -> str:
        return f"{100 * value:.1f}%" if kind == "pct" else f"{value:.3g}"

    text = one(float(stat["mean"]))
    if int(stat["n"]) > 1:
        text += f" ({one(float(stat['min']))}-{one(float(stat['max']))})"
    return text


def last_round(results: dict[str, Any]) -> str:
    rounds = [int(key) for arm in results["summary"].values() for key in arm]
    return str(max(rounds, default=0))


def results_table(results: dict[str, Any], round_key: str | None = None) -> list[list[str]]:
    """Header, then one row per arm, at ``round_key`` (default: the last round)."""
    summary = results["summary"]
    key = round_key or last_round(results)
    arms = [arm for arm in results["plans"] if arm in summary]
    columns = [
        column
        for column in COLUMNS
        if any(_stat(summary, arm, key, column[1]) is not None for arm in arms)
    ]
    rows = [["arm", *(heading for heading, _, _ in columns)]]
    for arm in arms:
        rows.append([arm, *(_fmt(_stat(summary, arm, key, m), kind) for _, m, kind in columns)])
    return rows


def _rounds(summary: dict[str, Any], arm: str) -> list[int]:
    return sorted(int(key) for key in summary.get(arm, {}))


def _series(
    summary: dict[str, Any], arm: str, metric: str, scale: float
) -> tuple[list[int], list[float], list[list[float]]]:
    xs, means, low, high = [], [], [], []
    for number in _rounds(summary, arm):
        stat = _stat(summary, arm, str(number), metric)
        if stat is None:
            continue
        xs.append(number)
        means.append(scale * float(stat["mean"]))
        low.append(scale * (float(stat["mean"]) - float(stat["min"])))
        high.append(scale * (float(stat["max"]) - float(stat["mean"])))
    return xs, means, [low, high]


def _headline_plot(results: dict[str, Any], arms: list[str]) -> bytes:
    """Grouped bars: each arm's toxicity and canned/refusal share after the last round."""
    import matplotlib.pyplot as plt

    summary, key = results["summary"], last_round(results)
    width = 0.8 / len(HEADLINE_BARS)
    figure, axis = plt.subplots(figsize=(max(7.0, 1.9 * len(arms)), 4.2))
    for offset, (label, metric) in enumerate(HEADLINE_BARS):
        stats = [_stat(summary, arm, key, metric) for arm in arms]
        means = [100 * float(s["mean"]) if s else 0.0 for s in stats]
        spread = [
            [100 * (float(s["mean"]) - float(s["min"])) if s else 0.0 for s in stats],
            [100 * (float(s["max"]) - float(s["mean"])) if s else 0.0 for s in stats],
        ]
        xs = [i + (offset - (len(HEADLINE_BARS) - 1) / 2) * width for i in range(len(arms))]
        bars = axis.bar(xs, means, width, yerr=spread, capsize=2, label=label)
        axis.bar_label(bars, fmt="%.0f", fontsize=7)
    axis.set_xticks(list(range(len(arms))), arms)
    axis.set_ylabel("% of sampled replies, independent judge")
    axis.set_ylim(0, PERCENT_AXIS_TOP)
    axis.set_title(f"After round {key}: toxicity beside helpfulness", fontsize=10)
    axis.legend(fontsize=8)
    png = figure_png(figure)
    plt.close(figure)
    return png


def demo_plots(results: dict[str, Any]) -> dict[str, bytes]:
    """PNG plots: every arm after the last round; toxicity per round per arm; quality per
    round; judge P/R."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    arms = [arm for arm in results["plans"] if arm in summary]
    plots: dict[str, bytes] = {"arms_after_last_round.png": _headline_plot(results, arms)}
    panels = [p for p in TOXICITY_PANELS
              if any(_series(summary, a, p[1], 1)[0] for a in arms)]  # fmt: skip
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for axis, (title, metric) in zip(axes[0], panels, strict=True):
        for arm in arms:
            xs, ys, spread = _series(summary, arm, metric, 100)
            if xs:
                axis.errorbar(xs, ys, yerr=spread, marker="o", capsize=3, label=arm)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("round")
        axis.set_ylim(0, PERCENT_AXIS_TOP)
        axis.set_xticks(sorted({x for a in arms for x in _rounds(summary, a)}))
    axes[0][0].set_ylabel("toxic replies (%), independent judge")
    axes[0][-1].legend(fontsize=8)
    plots["toxicity_per_round.png"] = figure_png(figure)
    plt.close(figure)

    figure, axes = plt.subplots(1, len(QUALITY_PANELS), figsize=(13, 3.8), squeeze=False)
    for axis, (title, metric, kind) in zip(axes[0], QUALITY_PANELS, strict=True):
        scale = 100 if kind == "pct" else 1
        for arm in arms:
            xs, ys, spread = _series(summary, arm, metric, scale)
            if xs:
                axis.errorbar(xs, ys, yerr=spread, marker="o", capsize=3, label=arm)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("round")
        axis.set_xticks(sorted({x for a in arms for x in _rounds(summary, a)}))
        if kind == "pct":
            axis.set_ylim(0, PERCENT_AXIS_TOP)
    axes[0][-1].legend(fontsize=8)
    plots["quality_per_round.png"] = figure_png(figure)
    plt.close(figure)

    judged = [
        (arm, number)
        for arm in arms
        for number in _rounds(summary, arm)
        if _stat(summary, arm, str(number), "judge_recall") is not None
    ]
    if judged:
        figure, axis = plt.subplots(figsize=(max(5.0, 1.2 * len(judged)), 3.8))
        width = 0.38
        labels = [f"{arm}\nround {number}" for arm, number in judged]
        for offset, metric in enumerate(("judge_precision", "judge_recall")):
            values = [
                float((_stat(summary, arm, str(n), metric) or {"mean": 0.0})["mean"])
                for arm, n in judged
            ]
            axis.bar([i + (offset - 0.5) * width for i in range(len(judged))], values, width,
                     label=metric.removeprefix("judge_"))  # fmt: skip
        axis.set_xticks(list(range(len(judged))), labels, fontsize=8)
        axis.set_ylim(0, 1)
        axis.set_title("Defense judge on the poisoned snapshot (flags as used)")
        axis.legend()
        plots["judge_precision_recall.png"] = figure_png(figure)
        plt.close(figure)
    return plots


def _html_table(rows: list[list[str]]) -> str:
    head, *body = rows
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    lines = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body
    )
    return f"<table><tr>{cells}</tr>{lines}</table>"


def describe(results: dict[str, Any]) -> str:
    """One paragraph: what ran, on what, how long."""
    config = results["config"]
    size = config["size"]
    return (
        f"Size `{config['size_name']}`: {size['users']} simulated users per round "
        f"(attack `{config['attack']}`, poisoning rate {config['poison_rate']:.0%} of "
        f"conversations), {size['rounds']} round(s), seeds {results['seeds']}; "
        f"model {results['model']}; evaluation judge `{results['eval']['judge']}` on "
        f"{results['probes']['toxic']} toxic / {results['probes']['benign']} benign probes x "
        f"{results['eval']['samples_per_probe']} sampled replies (T="
        f"{results['eval']['temperature']}); {results['seconds']} s in all."
    )


def quarantine_lines(results: dict[str, Any]) -> list[str]:
    """What the arms with quarantine did, per seed and round: whom they quarantined after
    it (against the ground truth) and what that left out of the round; then each round's
    toxicity with and without quarantine (``tuneshield`` beside ``tuneshield_quarantine``).
    Empty when no arm quarantines."""
    lines = []
    for seed, run in results.get("runs", {}).items():
        for round_result in run["rounds"]:
            for arm, data in round_result["arms"].items():
                done = data.get("quarantine")
                if done is None:
                    continue
                lines.append(
                    f"Seed {seed}, round {round_result['round']}, {arm}: "
                    f"{done['left_out_samples']} samples of quarantined users left out "
                    f"({done['left_out_poisoned']} poisoned); after the round "
                    f"{done['attackers_quarantined']} of {done['attackers']} attackers and "
                    f"{done['benign_quarantined']} of {done['benign']} benign users are "
                    "quarantined."
                )
    summary = results.get("summary", {})
    pair = ("tuneshield", "tuneshield_quarantine")
    if lines and all(arm in summary for arm in pair):
        for round_key in sorted(summary[pair[1]], key=int):
            stats = [_stat(summary, arm, round_key, "toxic_toxicity") for arm in pair]
            if round_key != "0" and all(stats):
                lines.append(
                    f"Round {round_key} toxic-probe toxicity: {_fmt(stats[0], 'pct')} without "
                    f"quarantine, {_fmt(stats[1], 'pct')} with it."
                )
    return lines


def _stages_rows(results: dict[str, Any]) -> str:
    return "".join(
        f"<tr><td>{html.escape(str(s['stage']))}</td><td>{s['seconds']}</td>"
        f"<td>{float(str(s['peak_rss_gib'])):.2f}</td></tr>"
        for s in results.get("stages", [])
    )


def write_demo_report(results: dict[str, Any], out_dir: Path) -> Path:
    """results.json, report.md, PNG plots and report.html in ``out_dir``; returns the HTML."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    table = results_table(results)
    first = results_table(results, "0")
    about = describe(results)
    note = (
        "Figures are after the last round; with several seeds, the mean and (min-max). "
        "*Aimed at user*: replies judged toxic that also address the user (you/your/u...). "
        "Judge precision/recall: the defense judge's flags as used, against the simulator's "
        "ground truth."
    )
    caveat = evasion_caveat(results["config"]["attack"], results["eval"]["judge"])
    quarantined = quarantine_lines(results)
    quarantine_md = "".join(f"- {line}\n" for line in quarantined)
    (out_dir / "report.md").write_text(
        f"# TuneShield demo\n\n{about}\n\n{markdown_table(table)}\n\n{note}\n\n"
        + (f"{caveat}\n\n" if caveat else "")
        + (f"Quarantine:\n\n{quarantine_md}\n" if quarantined else "")
        + f"Starting point (round 0):\n\n{markdown_table(first)}\n"
    )
    quarantine_html = (
        "<h2>Quarantine</h2><ul>"
        + "".join(f"<li>{html.escape(line)}</li>" for line in quarantined)
        + "</ul>"
        if quarantined
        else ""
    )
    images = []
    for name, png in demo_plots(results).items():
        (out_dir / name).write_bytes(png)
        images.append(img_tag(name, png))
    stages = _stages_rows(results)
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>TuneShield demo</title><style>{REPORT_CSS}</style></head>
<body><h1>TuneShield demo</h1><p>{html.escape(about)}</p>{_html_table(table)}
<p>{html.escape(note)}</p>{f"<p>{html.escape(caveat)}</p>" if caveat else ""}
{"".join(images)}{quarantine_html}
<h2>Starting point (round 0)</h2>{_html_table(first)}
<h2>Stages</h2><table><tr><th>stage</th><th>seconds</th><th>peak RSS (GiB)</th></tr>{stages}</table>
</body></html>"""
    report = out_dir / "report.html"
    report.write_text(page)
    return report


def write_experiment_report(results: dict[str, Any], out_dir: Path) -> Path:
    """The experiment's results.json, report.md, PNG plots and report.html in ``out_dir``;
    returns the HTML."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    table = arms_table(results)
    judge = results.get("judge")
    judge_line = (
        f"Defense judge `{judge['name']}` on the poisoned snapshot: precision "
        f"{judge['precision']:.2f}, recall {judge['recall']:.2f}, AUC {judge['auc']:.2f}."
        if judge
        else "No defense judge ran in this experiment."
    )
    data = results["data"]
    summary = (
        f"{data['samples']} training samples, {data['poisoned_samples']} poisoned "
        f"({results['config']['attack']}, rate {results['config']['poison_rate']}); "
        f"seed {results['seeds']['experiment']}; {results['seconds']} s in all."
    )
    (out_dir / "report.md").write_text(
        f"# TuneShield experiment\n\n{summary}\n\n{markdown_table(table)}\n\n{judge_line}\n"
    )
    images = []
    for name, png in experiment_plots(results).items():
        (out_dir / name).write_bytes(png)
        images.append(img_tag(name, png))
    stages = _stages_rows(results)
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>TuneShield experiment</title><style>{REPORT_CSS}</style></head>
<body><h1>TuneShield experiment</h1><p>{html.escape(summary)}</p>{_html_table(table)}
<p>{html.escape(judge_line)}</p>{"".join(images)}
<h2>Stages</h2><table><tr><th>stage</th><th>seconds</th><th>peak RSS (GiB)</th></tr>{stages}</table>
</body></html>"""
    report = out_dir / "report.html"
    report.write_text(page)
    return report
