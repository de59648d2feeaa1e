"""Charts as inline SVG, drawn on the server: no chart library, no script, no style.

Functions here turn numbers into geometry (coordinates in an SVG ``viewBox``) and text (a
summary that screen readers get as the chart's description); the templates draw it. The
sizes below are the drawing's own units, scaled to the page width by CSS.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# A line chart's drawing: its viewBox and the margins that hold the axis labels.
LINE_WIDTH, LINE_HEIGHT = 480.0, 150.0
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 52.0, 10.0, 10.0, 22.0
# Horizontal lines (and labels) on a line chart's value axis, zero included.
GRID_LINES = 3
# A bar chart's drawing: each row is a label line (name left, value right) over its bar.
BAR_WIDTH, BAR_ROW_HEIGHT, BAR_TEXT_BASELINE, BAR_TOP, BAR_THICKNESS = 320.0, 38.0, 14.0, 20.0, 12.0
NICE_STEPS = (1.0, 2.0, 2.5, 5.0, 10.0)

Format = Callable[[float], str]


@dataclass(frozen=True)
class Tick:
    """A value-axis line: its height in the drawing and its label."""

    y: float
    label: str


@dataclass(frozen=True)
class Trace:
    """One series of a line chart: an SVG path (gaps where a value is missing)."""

    label: str
    css: str
    path: str
    latest: str
    """The newest value, formatted (``n/a`` when missing)."""


@dataclass(frozen=True)
class LineChart:
    """A line chart over time: what the template needs to draw it."""

    title: str
    traces: list[Trace]
    ticks: list[Tick]
    start_label: str
    end_label: str
    summary: str
    """The chart in words (its accessible description)."""
    empty: bool
    """No value to draw at all: the template says so instead."""
    width: float = LINE_WIDTH
    height: float = LINE_HEIGHT
    left: float = MARGIN_LEFT
    right: float = LINE_WIDTH - MARGIN_RIGHT
    top: float = MARGIN_TOP
    bottom: float = LINE_HEIGHT - MARGIN_BOTTOM


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least ``value``."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(step * power for step in NICE_STEPS if step * power >= value)


def line_chart(
    title: str,
    series: Sequence[tuple[str, str, Sequence[float | None]]],
    fmt: Format,
    *,
    span_label: str,
    floor_max: float = 0.0,
    tick_fmt: Format | None = None,
) -> LineChart:
    """A chart of ``series`` (label, CSS class, values at evenly spaced times, oldest
    first); the value axis starts at zero and ends at a round number at least the largest
    value (and at least ``floor_max``, so that a quiet minute does not look dramatic);
    ``tick_fmt`` writes the axis labels (default: ``fmt``)."""
    values = [v for _, _, points in series for v in points if v is not None]
    top = nice_ceiling(max([*values, floor_max]))
    plot_w = LINE_WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = LINE_HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def y_of(value: float) -> float:
        return MARGIN_TOP + plot_h * (1.0 - value / top)

    traces = []
    for label, css, points in series:
        step = plot_w / max(len(points) - 1, 1)
        commands: list[str] = []
        pen_down = False
        for index, value in enumerate(points):
            if value is None:
                pen_down = False
                continue
            x = MARGIN_LEFT + index * step
            commands.append(f"{'L' if pen_down else 'M'}{x:.1f},{y_of(value):.1f}")
            pen_down = True
        latest = points[-1] if points else None
        traces.append(
            Trace(label, css, " ".join(commands), "n/a" if latest is None else fmt(latest))
        )
    ticks = [
        Tick(
            y_of(top * index / (GRID_LINES - 1)), (tick_fmt or fmt)(top * index / (GRID_LINES - 1))
        )
        for index in range(GRID_LINES)
    ]
    summary = f"{title}, {span_label}: " + "; ".join(
        f"{trace.label} now {trace.latest}" for trace in traces
    )
    return LineChart(
        title=title,
        traces=traces,
        ticks=ticks,
        start_label=span_label,
        end_label="now",
        summary=summary,
        empty=not values,
    )


@dataclass(frozen=True)
class Bar:
    """One bar: its label, its value as text, its row and its length in the drawing."""

    label: str
    value: str
    y: float
    """Top of the row (the label line; the bar lies below it)."""
    length: float
    css: str


@dataclass(frozen=True)
class BarChart:
    """Horizontal bars on one scale (the largest value fills the width)."""

    title: str
    bars: list[Bar]
    summary: str
    width: float = BAR_WIDTH
    height: float = 0.0
    text_baseline: float = BAR_TEXT_BASELINE
    bar_top: float = BAR_TOP
    thickness: float = BAR_THICKNESS


def bar_chart(title: str, rows: Sequence[tuple[str, float | None, str]], fmt: Format) -> BarChart:
    """Bars for ``rows`` (label, value or None, CSS class); a missing value has no bar."""
    largest = max((abs(value) for _, value, _ in rows if value is not None), default=0.0)
    bars = [
        Bar(
            label=label,
            value="n/a" if value is None else fmt(value),
            y=index * BAR_ROW_HEIGHT,
            length=0.0 if value is None or not largest else BAR_WIDTH * abs(value) / largest,
            css=css,
        )
        for index, (label, value, css) in enumerate(rows)
    ]
    summary = f"{title}: " + "; ".join(f"{bar.label} {bar.value}" for bar in bars)
    return BarChart(title=title, bars=bars, summary=summary, height=len(bars) * BAR_ROW_HEIGHT)
