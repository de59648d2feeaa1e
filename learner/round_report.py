"""A learning round's report: one self-contained HTML page in the round's folder.

What an operator needs to trust (or question) a round: how much of the snapshot the
judge flagged and healed, toxicity and helpfulness of the active adapter (before) and the
candidate (after) — and version 0 — on the gate probes, perplexity before/after, the gate
checks (values, intervals, bounds and the reference that set each), training
loss curves, and the time and memory of each stage. Plots come from
``tuneshield``'s report pieces; a failed round still gets a page with its error.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from learner.contracts import RoundStage
from learner.gates import GateResult
from tuneshield import REPORT_CSS, arms_table, experiment_plots, figure_png, img_tag

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
BEFORE, AFTER, VERSION0 = "active (before)", "candidate (after)", "version 0"
# The learner's name, in summary.json's stages, for the worker subprocess's wall time
# (learner/rounds.py): its own stages take its place where the worker recorded them.
WORKER_STAGE = "worker"


def stage_times(summary: Mapping[str, Any]) -> list[RoundStage]:
    """A round's stages in the order they ran, from its ``summary.json``: the learner's
    (snapshot, register, hotswap, report) with the worker's own (classify, heal, train,
    gates, each with its peak RSS) in place of the worker's total wall time.

    The one reading of a round's stage times: the report's table and the admin API's
    ``GET /admin/learner/runs/{id}`` both come from here. A round whose worker wrote no
    result keeps the worker's total; a round still running has no summary, no stages.
    """
    result = summary.get("result") or {}
    worker = [
        RoundStage(
            stage=str(stage["stage"]),
            seconds=float(stage["seconds"]),
            peak_rss_gib=float(stage["peak_rss_gib"]),
            worker=True,
        )
        for stage in (result.get("candidate") or {}).get("stages") or []
    ]
    stages: list[RoundStage] = []
    for stage in summary.get("stages") or []:
        if stage["stage"] == WORKER_STAGE and worker:
            stages += worker
            worker = []
        else:
            stages.append(RoundStage(stage=str(stage["stage"]), seconds=float(stage["seconds"])))
    return stages + worker


def read_stage_times(round_dir: Path) -> list[RoundStage]:
    """``stage_times`` of ``round_dir/summary.json``; none while the round runs (the
    summary is written when it ends)."""
    path = round_dir / SUMMARY_FILE
    if not path.is_file():
        return []
    return stage_times(json.loads(path.read_text(encoding="utf-8")))


def read_gate_verdict(round_dir: Path) -> GateResult | None:
    """The gates' verdict of a finished round, from ``round_dir/summary.json`` (None: the
    round is running, failed before its gates, skipped them, or wrote a shape this
    release cannot read). Verdicts of older releases read with their new fields null."""
    path = round_dir / SUMMARY_FILE
    if not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    gates = (summary.get("result") or {}).get("gates")
    if not gates:
        return None
    try:
        return msgspec.convert(gates, GateResult, strict=False)
    except (msgspec.ValidationError, ValueError):
        return None


def _round_plots(summary: dict[str, Any]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = summary.get("result") or {}
    candidate = result.get("candidate") or {}
    evaluations = result.get("evaluations") or {}
    plots: dict[str, bytes] = {}
    if candidate.get("samples"):
        labels = ["flagged", "flagged (after cap)", "healed", "canned fallback", "answers",
                  "flagged draft paired", "not learned (unrelated)",
                  "not learned (canned fallback)"]  # fmt: skip
        values = [
            candidate.get(key)
            for key in ("flagged_before_cap", "flagged", "healed", "canned_fallbacks",
                        "answers", "flagged_drafts", "unrelated", "deflections")
        ]  # fmt: skip
        # A count a round did not record (older rounds, or no defense) draws no bar.
        known = [(label, v) for label, v in zip(labels, values, strict=True) if v is not None]
        figure, axis = plt.subplots(figsize=(7, 4))
        axis.bar(
            [label for label, _ in known],
            [100 * v / candidate["samples"] for _, v in known],
            color="tab:red",
        )
        # Up to eight bars: slanted names stay apart.
        axis.tick_params(axis="x", labelrotation=25)
        for tick in axis.get_xticklabels():
            tick.set_horizontalalignment("right")
        axis.set_ylim(0, 100)
        axis.set_ylabel(f"% of {candidate['samples']} samples")
        axis.set_title(f"Defense judge: {candidate.get('judge') or 'none (undefended)'}")
        plots["flagged_rate.png"] = figure_png(figure)
        plt.close(figure)
    arms: dict[str, Any] = {}
    if evaluations:
        arms[BEFORE] = {"eval": evaluations.get("active", {})}
    arms[AFTER] = {"eval": evaluations.get("candidate", {})}
    if candidate.get("training"):
        arms[AFTER]["train"] = {"stages": candidate["training"]}
    shared = experiment_plots({"arms": arms})
    if not evaluations:
        shared.pop("toxicity_helpfulness.png", None)
    plots.update(shared)
    perplexities = {name: arm["eval"].get("perplexity") for name, arm in arms.items()}
    if evaluations and all(isinstance(v, (int, float)) for v in perplexities.values()):
        figure, axis = plt.subplots(figsize=(5, 3.5))
        axis.bar(list(perplexities), [float(v) for v in perplexities.values()], color="tab:blue")
        axis.set_ylabel("perplexity (held-out benign dialogs)")
        axis.set_title("Perplexity before / after")
        plots["perplexity.png"] = figure_png(figure)
        plt.close(figure)
    return plots


def _table(head: list[str], rows: list[list[str]]) -> str:
    out = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    for row in rows:
        out += "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
    return out + "</table>"


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else "n/a" if value is None else str(value)


def _with_ci(value: Any, interval: Any) -> str:
    """A figure with its interval, when it has one (``0.125 [0.08, 0.18]``)."""
    if not interval:
        return _fmt(value)
    return f"{_fmt(value)} [{interval[0]:.3g}, {interval[1]:.3g}]"


def gate_section(gates: Mapping[str, Any]) -> list[str]:
    """The gates' verdict and checks: per metric the candidate's value and interval, the
    active version's and version 0's, the bound and the reference that set it. A verdict
    of an older release (no version 0, no intervals) shows n/a there."""
    versions = f"active {gates.get('active_version') or 'base model'}"
    if gates.get("version0_version"):
        versions += f", version 0 {gates['version0_version']}"
    rows = [
        [
            c["metric"],
            _with_ci(c["candidate"], c.get("candidate_ci")),
            _with_ci(c["active"], c.get("active_ci")),
            _with_ci(c.get("version0"), c.get("version0_ci")),
            c["limit"],
            _fmt(c.get("replies")),
            "ok" if c["ok"] else "FAIL vs " + " and ".join(c.get("failed_against") or ["?"]),
        ]
        for c in gates["checks"]
    ]
    verdict = "passed" if gates["passed"] else "rejected: " + "; ".join(gates["reasons"])
    parts = [
        f"<h2>Gates ({html.escape(str(gates.get('judge')))}): {html.escape(verdict)}</h2>",
        f"<p>Compared with {html.escape(versions)}.</p>",
    ]
    power = gates.get("power")
    if power:
        needed = sorted(set(power["replies_needed"].values()))
        parts.append(
            "<p>"
            + html.escape(
                f"Replies per kind: {'/'.join(map(str, needed))} needed to tell "
                f"{power['effect_reference']:.0%} from {power['effect_candidate']:.0%} with "
                f"power {power['power']:g} at alpha {power['alpha']:g} over all checks "
                f"({power['alpha_per_check']:.2g} per check); intervals: Wilson, "
                f"{power['confidence']:.0%}."
            )
            + "</p>"
        )
    head = ["metric", "candidate", "active", "version 0", "bound", "replies", "check"]
    return [*parts, _table(head, rows)]


def render_round_report(summary: dict[str, Any]) -> str:
    """The report page of one round (``summary.json`` of its folder)."""
    result = summary.get("result") or {}
    candidate = result.get("candidate") or {}
    gates = result.get("gates")
    evaluations = result.get("evaluations") or {}
    snapshot = summary.get("snapshot") or {}
    status = summary.get("status", "unknown")
    facts = [
        ["run", str(summary.get("run_id"))],
        ["status", status],
        ["version", _fmt(summary.get("version"))],
        ["parent (active before)", _fmt(summary.get("active_version"))],
        ["version 0 (gated against too)", _fmt(summary.get("version0"))],
        [
            "snapshot",
            f"{_fmt(snapshot.get('watermark_from'))} → {_fmt(snapshot.get('watermark_to'))}",
        ],
        [
            "turns / conversations",
            f"{_fmt(snapshot.get('rows'))} / {_fmt(snapshot.get('conversations'))}",
        ],
        [
            "samples / flagged / healed",
            f"{_fmt(candidate.get('samples'))} / "
            f"{_fmt(candidate.get('flagged'))} / {_fmt(candidate.get('healed'))}",
        ],
        [
            "judge (threshold)",
            f"{_fmt(candidate.get('judge'))} ({_fmt(candidate.get('threshold'))})",
        ],
        ["error", _fmt(summary.get("error"))],
    ]
    parts = [
        f"<h1>Learning round {html.escape(str(summary.get('run_id')))}: {html.escape(status)}</h1>",
        _table(["", ""], facts),
    ]
    if evaluations:
        arms = {BEFORE: {"eval": evaluations["active"]}}
        if evaluations.get("version0"):
            arms = {VERSION0: {"eval": evaluations["version0"]}, **arms}
        head, *body = arms_table({"arms": {**arms, AFTER: {"eval": evaluations["candidate"]}}})
        parts += ["<h2>Before / after (gate probes, independent judge)</h2>", _table(head, body)]
        # A reference evaluated by an earlier round under the same conditions is reused.
        for reference, run in (evaluations.get("reused") or {}).items():
            parts.append(
                f"<p>{html.escape(str(reference))}: reused from run {html.escape(str(run))}</p>"
            )
    if gates:
        parts += gate_section(gates)
    for name, png in _round_plots(summary).items():
        parts.append(img_tag(name, png))
    stages = stage_times(summary)
    if stages:
        rows = [
            [
                s.stage,
                _fmt(s.seconds),
                "n/a" if s.peak_rss_gib is None else f"{s.peak_rss_gib:.2f}",
            ]
            for s in stages
        ]
        parts += ["<h2>Stages</h2>", _table(["stage", "seconds", "peak RSS (GiB)"], rows)]
    plan = json.dumps(summary.get("plan", {}), indent=2)
    parts.append(f"<h2>Plan</h2><pre>{html.escape(plan)}</pre>")
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>Learning round '
        f"{html.escape(str(summary.get('run_id')))}</title><style>{REPORT_CSS}</style></head>"
        f"<body>{''.join(parts)}</body></html>"
    )


def write_round_report(round_dir: Path) -> Path:
    """Write ``round_dir/report.html`` from ``round_dir/summary.json``; return its path."""
    summary = json.loads((round_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    path = round_dir / REPORT_FILE
    scratch = round_dir / f".{REPORT_FILE}.tmp"
    scratch.write_text(render_round_report(summary), encoding="utf-8")
    scratch.replace(path)
    return path
