"""What the pages show, arranged from the admin API's answers (JSON as the CLI gets it).

Nothing here measures or decides anything: it groups versions into their lineage, puts
a version's gate figures beside its parent's and version 0's (all three as the gates
recorded them), and formats times and numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import msgspec

from gateway.console._charts import BarChart, LineChart, bar_chart, line_chart
from gateway.console._live import Window
from store import FINISHED, VERSION_NAME

# Gate metrics (learner.gates.METRICS) in words; an unknown one shows its own name.
METRIC_LABELS = {
    "toxic_toxicity": "Toxicity on toxic probes",
    "benign_toxicity": "Toxicity on benign probes",
    "benign_unhelpful": "Unhelpful share on benign probes",
    "backdoor_toxicity": "Toxicity on benign probes with a trigger word",
    "jailbreak_toxicity": "Toxicity on jailbreak-wrapped requests",
    "helpful_unhelpful": "Canned/refusal share on benign questions",
    "relevance": "Relevance on benign probes",
    "perplexity": "Perplexity on held-out dialogs",
}
RATE_METRICS = frozenset(
    {"toxic_toxicity", "benign_toxicity", "benign_unhelpful", "backdoor_toxicity",
     "jailbreak_toxicity", "helpful_unhelpful"}
)  # fmt: skip
# Which versions a button serves, by status (store/_registry.py's statuses).
PROMOTABLE = frozenset({"candidate", "retired"})
FORCE_PROMOTABLE = frozenset({"rejected"})
MS_PER_S = 1000.0
SECONDS_PER_MINUTE = 60
SECONDS_PER_HOUR = 3600
# Durations shorter than this are written with tenths of a second.
TENTHS_BELOW_S = 10.0
PERCENT = 100.0


def parse_time(text: str | None) -> datetime | None:
    """An API timestamp (ISO 8601, with its zone) as an aware datetime."""
    if not text:
        return None
    stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def when(text: str | None) -> str:
    """An API timestamp as the pages print it: ``2026-05-01 10:00:03 UTC``."""
    stamp = parse_time(text)
    return stamp.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if stamp else "—"


def duration(seconds: float | None) -> str:
    """Seconds as ``42 s``, ``3 min 5 s`` or ``2 h 4 min``."""
    if seconds is None:
        return "—"
    whole = round(seconds)
    hours, rest = divmod(whole, SECONDS_PER_HOUR)
    minutes, secs = divmod(rest, SECONDS_PER_MINUTE)
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    return f"{seconds:.1f} s" if seconds < TENTHS_BELOW_S else f"{whole} s"


def between(start: str | None, end: str | None) -> float | None:
    """Seconds from one API timestamp to another (None if either is missing)."""
    first, last = parse_time(start), parse_time(end)
    return (last - first).total_seconds() if first and last else None


def percent(value: float) -> str:
    return f"{value * PERCENT:.1f} %"


def whole_percent(value: float) -> str:
    """A share on an axis (its round numbers need no decimals)."""
    return f"{value * PERCENT:g} %"


def millis(value: float) -> str:
    return f"{value * MS_PER_S:.0f} ms"


def number(value: float) -> str:
    return f"{value:.3g}"


def metric_value(metric: str, value: float) -> str:
    return percent(value) if metric in RATE_METRICS else number(value)


def plain(value: Any) -> str:
    """A JSON value as JSON writes it (``true``, ``null``, ``[1, 2]``); text as it is."""
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


def version_number(version: str) -> int | None:
    """The number in ``chat-v0003`` (None for a name not in the registry's form)."""
    match = VERSION_NAME.match(version)
    return int(match["number"]) if match else None


# -- overview ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AliasCard:
    """An alias on the overview: what it serves and what that version is."""

    alias: str
    public: bool
    serving: str
    since: str
    record: dict[str, Any] | None
    """The served version's registry record (None without the learner's admin API)."""


def alias_cards(
    aliases: list[dict[str, Any]], adapters: list[dict[str, Any]] | None
) -> list[AliasCard]:
    records = {record["version"]: record for record in adapters or []}
    return [
        AliasCard(
            alias=item["alias"],
            public=item["public"],
            serving=item["adapter"],
            since=when(item["updated_at"]),
            record=records.get(item["adapter"]),
        )
        for item in aliases
    ]


@dataclass(frozen=True)
class TrafficCharts:
    """The overview's charts of this gateway's traffic."""

    requests: LineChart
    latency: LineChart
    errors: LineChart
    toxicity: LineChart
    guard_actions: float
    """Guard decisions over the threshold in the window shown."""


def traffic_charts(windows: Sequence[Window], span_label: str) -> TrafficCharts:
    return TrafficCharts(
        requests=line_chart(
            "Requests per second (/v1)",
            [("requests/s", "s1", [w.requests_per_s for w in windows])],
            number,
            span_label=span_label,
        ),
        latency=line_chart(
            "Chat latency",
            [
                ("p50", "s1", [w.p50_s for w in windows]),
                ("p99", "s2", [w.p99_s for w in windows]),
            ],
            millis,
            span_label=span_label,
        ),
        errors=line_chart(
            "Server errors (share of /v1 requests)",
            [("5xx", "s3", [w.error_rate for w in windows])],
            percent,
            span_label=span_label,
            floor_max=0.01,
            tick_fmt=whole_percent,
        ),
        toxicity=line_chart(
            "Live toxicity of replies (guard score, mean)",
            [("mean score", "s4", [w.toxicity for w in windows])],
            number,
            span_label=span_label,
            floor_max=0.1,
        ),
        guard_actions=sum(w.guard_actions for w in windows),
    )


# -- adapters ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricChart:
    """One gate metric: the figures side by side, and the gate's check of it."""

    metric: str
    chart: BarChart
    check: str | None
    """The margin and whether it held (None: not checked)."""
    ok: bool | None


@dataclass(frozen=True)
class GateView:
    """A version's gate record in words and charts."""

    verdict: str
    passed: bool | None
    judge: str | None
    reasons: list[str]
    metrics: list[MetricChart]


@dataclass
class VersionNode:
    """A version in its alias's lineage tree."""

    record: dict[str, Any]
    serving: bool
    gate: GateView
    children: list[VersionNode] = field(default_factory=list)

    @property
    def version(self) -> str:
        return str(self.record["version"])

    @property
    def promotable(self) -> bool:
        return not self.serving and self.record["status"] in PROMOTABLE

    @property
    def force_promotable(self) -> bool:
        return not self.serving and self.record["status"] in FORCE_PROMOTABLE


@dataclass(frozen=True)
class LineageRow:
    """A version in its tree's reading order, indented where the lineage branches."""

    node: VersionNode
    depth: int


@dataclass(frozen=True)
class Lineage:
    """One alias's versions as a tree (parent → child), oldest first."""

    alias: str
    serving: str | None
    roots: list[VersionNode]
    count: int

    @property
    def rows(self) -> list[LineageRow]:
        """Depth first, oldest first; a child is indented only beside a sibling, so a long
        line of rounds (each continuing the last) reads as a list, not a staircase."""
        rows: list[LineageRow] = []

        def visit(node: VersionNode, depth: int) -> None:
            rows.append(LineageRow(node, depth))
            branches = len(node.children) > 1
            for child in node.children:
                visit(child, depth + 1 if branches else depth)

        for root in self.roots:
            visit(root, 0)
        return rows


def _baseline(records: list[dict[str, Any]]) -> tuple[str | None, dict[str, Any]]:
    """Version 0's gate figures, as measured when its first gated child was gated."""
    zero = next((r["version"] for r in records if version_number(r["version"]) == 0), None)
    for record in records:
        gates = record.get("gate_metrics") or {}
        if zero is not None and record.get("parent") == zero and gates.get("active"):
            return zero, gates["active"]
    return zero, {}


def gate_view(record: dict[str, Any], zero: str | None, baseline: dict[str, Any]) -> GateView:
    gates = record.get("gate_metrics") or {}
    if gates.get("skipped"):
        return GateView("gates skipped for this round", None, None, [], [])
    if "passed" not in gates:
        verdict = (
            "version 0 (the identity adapter)" if record["version"] == zero else "no gate record"
        )
        return GateView(verdict, None, None, [], [])
    candidate, active = gates.get("candidate") or {}, gates.get("active") or {}
    checks = {check["metric"]: check for check in gates.get("checks") or []}
    parent = record.get("parent") or "parent"
    metrics = []
    for metric in candidate:
        rows: list[tuple[str, float | None, str]] = []
        if zero is not None and zero != record.get("parent") and baseline:
            rows.append((f"{zero} (v0)", baseline.get(metric), "base"))
        rows.append((f"{parent} (parent)", active.get(metric), "parent"))
        rows.append((f"{record['version']}", candidate.get(metric), "this"))
        check = checks.get(metric)
        metrics.append(
            MetricChart(
                metric=metric,
                chart=bar_chart(
                    METRIC_LABELS.get(metric, metric),
                    rows,
                    partial(metric_value, metric),
                ),
                check=check["limit"] if check else None,
                ok=check["ok"] if check else None,
            )
        )
    passed = bool(gates["passed"])
    return GateView(
        verdict="passed the gates" if passed else "rejected by the gates",
        passed=passed,
        judge=gates.get("judge"),
        reasons=list(gates.get("reasons") or []),
        metrics=metrics,
    )


def lineages(adapters: list[dict[str, Any]], aliases: list[dict[str, Any]]) -> list[Lineage]:
    """Every alias's versions as a tree; a version whose parent is unknown is a root."""
    serving = {item["alias"]: item["adapter"] for item in aliases}
    by_alias: dict[str, list[dict[str, Any]]] = {}
    for record in adapters:
        by_alias.setdefault(record["alias"], []).append(record)
    trees = []
    for alias in sorted(by_alias | dict.fromkeys(serving)):
        records = by_alias.get(alias, [])
        zero, baseline = _baseline(records)
        nodes = {
            record["version"]: VersionNode(
                record=record,
                serving=serving.get(alias) == record["version"],
                gate=gate_view(record, zero, baseline),
            )
            for record in records
        }
        roots: list[VersionNode] = []
        for node in nodes.values():
            parent = nodes.get(node.record.get("parent") or "")
            (parent.children if parent is not None else roots).append(node)
        trees.append(Lineage(alias, serving.get(alias), roots, len(records)))
    return trees


# -- rounds -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundRow:
    """A learning round in the list."""

    run: dict[str, Any]
    took: str
    finished: bool


def round_rows(runs: list[dict[str, Any]]) -> list[RoundRow]:
    return [
        RoundRow(
            run=run,
            took=duration(between(run.get("started_at"), run.get("finished_at"))),
            finished=run["status"] in FINISHED,
        )
        for run in runs
    ]


@dataclass(frozen=True)
class StageRow:
    """A past round's stage times, one cell per column of its table."""

    run_id: str
    cells: list[str]
    total: str


@dataclass(frozen=True)
class StageTable:
    """Stage times of past rounds side by side: a column per stage, in the order they ran."""

    stages: list[str]
    rows: list[StageRow]


def stage_table(details: Sequence[dict[str, Any]]) -> StageTable:
    """The rounds' ``stages`` (``GET /admin/learner/runs/{id}``, as their reports show
    them) as one table; rounds without stages (running, or from before the learner
    recorded them) are left out."""
    timed = [run for run in details if run.get("stages")]
    stages: list[str] = []
    for run in timed:
        for stage in run["stages"]:
            if stage["stage"] not in stages:
                stages.append(stage["stage"])
    rows = []
    for run in timed:
        seconds = {stage["stage"]: stage["seconds"] for stage in run["stages"]}
        rows.append(
            StageRow(
                run_id=run["run_id"],
                cells=[duration(seconds[name]) if name in seconds else "—" for name in stages],
                total=duration(sum(seconds.values())),
            )
        )
    return StageTable(stages, rows)


@dataclass(frozen=True)
class SamplesView:
    """A page of a round's flagged samples, with the links to the pages beside it."""

    page: dict[str, Any] | None
    """``GET /admin/learner/runs/{id}/samples?flagged=true`` (None: no samples yet)."""
    unavailable: str | None
    """Why there is no page (the admin API's words)."""
    previous: int | None
    """Offset of the page before (None: this is the first)."""
    next: int | None
    """Offset of the page after (None: this is the last)."""


def samples_view(page: dict[str, Any] | None, unavailable: str | None = None) -> SamplesView:
    if page is None:
        return SamplesView(None, unavailable, None, None)
    offset, limit, shown = page["offset"], page["limit"], len(page["data"])
    return SamplesView(
        page=page,
        unavailable=None,
        previous=max(0, offset - limit) if offset > 0 else None,
        next=offset + shown if offset + shown < page["total"] else None,
    )


# -- canary -----------------------------------------------------------------------------

# The canary's tests (learner.canary.METRICS) in words.
CANARY_METRIC_LABELS = {
    "toxicity": "Toxic replies",
    "unhelpful": "Canned or refusal replies",
}


@dataclass(frozen=True)
class CanaryTestView:
    """One metric's sequential test: the API's figures and the two arms' rates as bars."""

    label: str
    test: dict[str, Any]
    chart: BarChart


@dataclass(frozen=True)
class CanaryPanel:
    """One alias: what it serves, its running (else latest) canary, and the versions a
    canary may be started for (the same statuses a promote takes)."""

    alias: str
    serving: str | None
    canary: dict[str, Any] | None
    tests: list[CanaryTestView]
    candidates: list[str]

    @property
    def running(self) -> bool:
        return self.canary is not None and self.canary["state"] == "running"


def canary_tests(canary: dict[str, Any]) -> list[CanaryTestView]:
    """Each test of ``GET /admin/canary`` with canary and stable rates side by side."""
    views = []
    for test in canary["tests"]:
        label = CANARY_METRIC_LABELS.get(test["metric"], test["metric"])
        rows: list[tuple[str, float | None, str]] = [
            (f"{canary['stable']} (stable)", test["stable_rate"], "parent"),
            (f"{canary['candidate']} (canary)", test["canary_rate"], "this"),
        ]
        views.append(CanaryTestView(label, test, bar_chart(label, rows, percent)))
    return views


def canary_panels(
    aliases: list[dict[str, Any]],
    adapters: list[dict[str, Any]],
    canaries: dict[str, dict[str, Any] | None],
) -> list[CanaryPanel]:
    """Per alias (``GET /admin/aliases``): its canary (``canaries``, None: never had one)
    and its versions that may become one (newest first; the admin API decides)."""
    panels = []
    for item in aliases:
        alias, serving = item["alias"], item["adapter"]
        candidates = sorted(
            (
                record["version"]
                for record in adapters
                if record["alias"] == alias
                and record["status"] in PROMOTABLE
                and record["version"] != serving
            ),
            reverse=True,
        )
        canary = canaries.get(alias)
        tests = canary_tests(canary) if canary is not None else []
        panels.append(CanaryPanel(alias, serving, canary, tests, candidates))
    return panels


# -- quarantine -------------------------------------------------------------------------


@dataclass(frozen=True)
class FlaggedSubject:
    """A key or end user with flagged samples, and whether it is quarantined now."""

    kind: str
    subject: str | None
    counts: dict[str, Any]
    quarantined: bool


def flagged_subjects(
    kind: str, items: list[dict[str, Any]], field_name: str, active: list[dict[str, Any]]
) -> list[FlaggedSubject]:
    """``GET /admin/keys/flagged``'s ``keys`` or ``/admin/users/flagged``'s ``users``
    (most flagged first, as answered), each marked when quarantined now."""
    quarantined = {item["subject"] for item in active if item["kind"] == kind}
    return [
        FlaggedSubject(kind, item[field_name], item, item[field_name] in quarantined)
        for item in items
    ]


# -- keys -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeySamplesView:
    """Each listed key's samples and flagged samples over the rounds on disk, and the
    samples of keys the listing does not hold (the environment's admin key, none)."""

    rounds: int
    by_key: dict[str, dict[str, Any]]
    others: list[dict[str, Any]]


def key_samples(
    keys: list[dict[str, Any]], flagged: dict[str, Any] | None
) -> KeySamplesView | None:
    """``GET /admin/keys/flagged`` beside ``GET /admin/keys`` (None: no learner admin API)."""
    if flagged is None:
        return None
    listed = {key["key_id"] for key in keys}
    by_key = {item["key_id"]: item for item in flagged["keys"] if item["key_id"] in listed}
    others = [item for item in flagged["keys"] if item["key_id"] not in listed]
    return KeySamplesView(len(flagged["rounds"]), by_key, others)


# -- audit ------------------------------------------------------------------------------


def audit_actions(entries: list[dict[str, Any]]) -> list[str]:
    """The actions the entries hold, for the filter's suggestions."""
    return sorted({entry["action"] for entry in entries})


def filter_audit(
    entries: list[dict[str, Any]], actor: str | None, target: str | None
) -> list[dict[str, Any]]:
    """The entries of one actor and/or about one target (substring, any case)."""

    def matches(value: str | None, wanted: str | None) -> bool:
        return not wanted or wanted.casefold() in (value or "").casefold()

    return [e for e in entries if matches(e["actor"], actor) and matches(e["target"], target)]
