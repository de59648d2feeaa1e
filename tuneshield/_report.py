"""Pieces of the reports people read: the arms table (Markdown), plots as PNG bytes, and
what makes one self-contained HTML page (inline images, one style sheet)."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

# Columns of the arms table: (heading, path into an arm's eval result, format).
_COLUMNS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("toxic-probe toxicity", ("toxic", "toxicity_rate"), "pct"),
    ("benign-probe toxicity", ("benign", "toxicity_rate"), "pct"),
    ("backdoor toxicity", ("backdoor", "toxicity_rate"), "pct"),
    ("benign canned/refusal", ("benign", "unhelpful_rate"), "pct"),
    ("relevance", ("benign", "relevance"), "num"),
    ("perplexity", ("perplexity",), "num"),
)


# Shares are plotted on a fixed 0-100% axis so arms and runs compare at a glance.
PERCENT_AXIS_TOP = 100
REPORT_CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
    "table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}"
)


def metric_at(data: dict[str, Any], path: tuple[str, ...]) -> float | None:
    """The number at ``path`` in nested results; None where it is missing or NaN."""
    value: Any = data
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    # NaN != NaN: an undefined metric (e.g. no replies of a kind) reads as missing.
    return float(value) if isinstance(value, (int, float)) and value == value else None


def _fmt(value: float | None, kind: str) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{100 * value:.1f}%" if kind == "pct" else f"{value:.3g}"


def arms_table(results: dict[str, Any]) -> list[list[str]]:
    """Header row, then one row per arm, of the figures that matter side by side."""
    columns = [
        c
        for c in _COLUMNS
        if any(metric_at(arm["eval"], c[1]) is not None for arm in results["arms"].values())
    ]
    rows = [["arm", *(c[0] for c in columns)]]
    for name, arm in results["arms"].items():
        rows.append([name, *(_fmt(metric_at(arm["eval"], c[1]), c[2]) for c in columns)])
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def img_tag(name: str, png: bytes) -> str:
    """An ``<img>`` carrying the PNG itself, so a report is one self-contained file."""
    return f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def figure_png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def experiment_plots(results: dict[str, Any]) -> dict[str, bytes]:
    """PNG plots: toxicity and helpfulness per arm; training loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results["arms"])
    plots: dict[str, bytes] = {}
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.38
    positions = range(len(arms))
    for offset, (label, path) in enumerate(
        [
            ("toxic probes", ("toxic", "toxicity_rate")),
            ("benign probes", ("benign", "toxicity_rate")),
        ]
    ):
        values = [100 * (metric_at(results["arms"][a]["eval"], path) or 0.0) for a in arms]
        left.bar([p + (offset - 0.5) * width for p in positions], values, width, label=label)
    left.set_xticks(list(positions), arms, rotation=20)
    left.set_ylim(0, PERCENT_AXIS_TOP)
    left.set_ylabel("toxic replies (%)")
    left.set_title("Toxicity (independent judge)")
    left.legend()
    unhelpful = [
        100 * (metric_at(results["arms"][a]["eval"], ("benign", "unhelpful_rate")) or 0.0)
        for a in arms
    ]
    relevance = [
        metric_at(results["arms"][a]["eval"], ("benign", "relevance")) or 0.0 for a in arms
    ]
    right.bar(list(positions), unhelpful, color="tab:gray", label="canned/refusal (%)")
    right.set_xticks(list(positions), arms, rotation=20)
    right.set_ylim(0, PERCENT_AXIS_TOP)
    right.set_ylabel("benign replies canned or refused (%)")
    twin = right.twinx()
    twin.set_ylim(0, 1)
    twin.plot(list(positions), relevance, "o-", color="tab:green", label="relevance")
    twin.set_ylabel("relevance (cosine)")
    right.set_title("Helpfulness on benign probes")
    plots["toxicity_helpfulness.png"] = figure_png(figure)
    plt.close(figure)

    curves = [
        (arm, stage, entry["loss_history"])
        for arm, data in results["arms"].items()
        for stage, entry in data.get("train", {}).get("stages", {}).items()
        if isinstance(entry, dict) and entry.get("loss_history")
    ]
    if curves:
        figure, axis = plt.subplots(figsize=(7, 4))
        for arm, stage, history in curves:
            axis.plot(
                [h["step"] for h in history], [h["loss"] for h in history], label=f"{arm} {stage}"
            )
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("loss")
        axis.set_title("Training loss")
        axis.legend(fontsize=7)
        plots["training_loss.png"] = figure_png(figure)
        plt.close(figure)
    return plots
