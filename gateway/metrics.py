"""Prometheus metrics of one gateway app, in a registry of its own.

A per-app ``CollectorRegistry`` (not the process-global one) lets tests and benchmarks
build several apps in one process without duplicate-metric errors.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


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
        self.log_queue_depth = Gauge(
            "gateway_dialog_log_queue_depth",
            "Turns waiting to be written to DuckDB.",
            registry=self.registry,
        )

    def watch_queue(self, depth: Callable[[], int]) -> None:
        """Report ``depth()`` as the log queue depth at every scrape."""
        self.log_queue_depth.set_function(lambda: float(depth()))

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
