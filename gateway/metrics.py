"""Prometheus metrics of one gateway app, in a registry of its own.

A per-app ``CollectorRegistry`` (not the process-global one) lets tests and benchmarks
build several apps in one process without duplicate-metric errors.

Besides the request metrics, every gateway replica reports what it serves
(``tuneshield_alias_active_version``, from its alias cache) and whether each of its
engines answers (``tuneshield_engine_up``, from the engine pool's periodic listing). The
learner adds its own metrics to this registry when it runs inside the gateway
(``learner.metrics``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Judge scores lie in [0, 1]: tenths are enough to read a distribution (the mean is exact).
GUARD_SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
ALIAS_VERSION_METRIC = "tuneshield_alias_active_version"
ENGINE_UP_METRIC = "tuneshield_engine_up"
ENGINE_UP_HELP = "Whether the engine answers (1) or not (0), by engine root URL."

ActiveVersions = Callable[[], Iterable[tuple[str, str]]]
"""``(alias, version)`` pairs: what each alias serves now."""


def engine_label(url: str) -> str:
    """An engine's ``engine`` label: its root URL, so that the gateway (which calls
    ``…/v1``) and the learner (which calls the root) name one engine the same way."""
    return url.rstrip("/").removesuffix("/v1")


class AliasVersionCollector(Collector):
    """``tuneshield_alias_active_version{alias, version} 1`` per alias, read from the alias
    cache at every scrape: after a flip the old version's series is gone (not left at 0),
    as with any info metric."""

    def __init__(self) -> None:
        self.source: ActiveVersions = lambda: ()

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            ALIAS_VERSION_METRIC,
            "The adapter version each model alias serves (always 1).",
            labels=["alias", "version"],
        )
        for alias, version in self.source():
            family.add_metric([alias, version], 1.0)
        yield family


class Metrics:
    """The gateway's counters, histograms and gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gateway_requests",
            "HTTP requests answered, by route and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "gateway_request_duration_seconds",
            "Time from request to the last byte of the response, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "Time from request to the first relayed chunk of a stream.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "gateway_tokens",
            "Tokens reported by the engine, by kind (prompt, completion).",
            ["kind"],
            registry=self.registry,
        )
        self.errors = Counter(
            "gateway_errors",
            "Errors answered, by OpenAI error type and status code.",
            ["type", "status"],
            registry=self.registry,
        )
        self.turns = Counter(
            "gateway_dialog_turns",
            "Dialog turns by outcome (logged, lost).",
            ["outcome"],
            registry=self.registry,
        )
        self.guard = Counter(
            "gateway_guard_decisions",
            "Live guard decisions over the threshold, by action.",
            ["action"],
            registry=self.registry,
        )
        self.guard_scores = Histogram(
            "gateway_guard_score",
            "Live guard scores in [0, 1] (toxicity), by what was scored (user turn, reply).",
            ["scored"],
            buckets=GUARD_SCORE_BUCKETS,
            registry=self.registry,
        )
        self.log_queue_depth = Gauge(
            "gateway_dialog_log_queue_depth",
            "Turns waiting to be written to DuckDB.",
            registry=self.registry,
        )
        self.engine_up = Gauge(ENGINE_UP_METRIC, ENGINE_UP_HELP, ["engine"], registry=self.registry)
        self.engine_retries = Counter(
            "gateway_engine_retries",
            "Requests moved on to another engine, by the engine that failed and why.",
            ["engine", "reason"],
            registry=self.registry,
        )
        self.engine_in_flight = Gauge(
            "gateway_engine_requests_in_flight",
            "Requests in flight per engine (what routing balances).",
            ["engine"],
            registry=self.registry,
        )
        self.active_versions = AliasVersionCollector()
        self.registry.register(self.active_versions)

    def report_engine(self, url: str, up: bool, in_flight: int) -> None:
        """One engine's state after a probe (``tuneshield_engine_up`` and its load)."""
        self.engine_up.labels(url).set(1.0 if up else 0.0)
        self.engine_in_flight.labels(url).set(in_flight)

    def watch_queue(self, depth: Callable[[], int]) -> None:
        """Report ``depth()`` as the log queue depth at every scrape."""
        self.log_queue_depth.set_function(lambda: float(depth()))

    def watch_aliases(self, versions: ActiveVersions) -> None:
        """Report ``versions()`` as the active version of each alias at every scrape."""
        self.active_versions.source = versions

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
