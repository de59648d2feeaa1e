"""Prometheus metrics of the learner: how rounds end, how long their stages take, what the
gates said, and whether the engines it keeps in line answer.

They live where the learner runs. ``tuneshield serve`` runs it inside the gateway, so
they join the gateway's registry and its ``/metrics``. ``tuneshield learner`` is a process
of its own: they go to a registry of its own, served on ``control.metrics_port``
(policies/learner.yaml) by ``serve_metrics``. Each process reports what it did itself
(the Prometheus way): counters are not repeated by every gateway replica, and a learner
that restarts starts them at 0, which ``rate()`` and ``increase()`` expect.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from gateway.metrics import ENGINE_UP_HELP, ENGINE_UP_METRIC, engine_label
from learner.gates import METRICS as GATE_NAMES
from learner.gates import GateResult

# A run's final status → the outcome label: a run "succeeded" when its candidate was
# promoted (it serves the alias now).
ROUND_OUTCOMES = {"succeeded": "promoted", "rejected": "rejected", "failed": "failed"}
GATE_VERDICTS = ("pass", "fail", "unchecked")
# Stages last from a fraction of a second (register) to hours (a worker on a CPU).
STAGE_BUCKETS = (0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
                 7200.0)  # fmt: skip


class MetricsPortError(OSError):
    """The learner's metrics port cannot be bound (in use, or no such interface)."""


def gate_verdict(candidate: float | None, active: float | None, ok: bool) -> str:
    """``pass``/``fail``, or ``unchecked`` where either side has no number (the gates then
    let the metric through without judging it)."""
    if candidate is None or active is None:
        return "unchecked"
    return "pass" if ok else "fail"


class LearnerMetrics:
    """The learner's counters, histogram and engine gauges, in ``registry``.

    ``report_engines`` False leaves engine health to someone else in the same registry
    (the gateway probes the same engine in ``tuneshield serve``): one writer per series.
    """

    def __init__(self, registry: CollectorRegistry, *, report_engines: bool = True) -> None:
        self.registry = registry
        self.rounds = Counter(
            "tuneshield_learner_rounds",
            "Learning rounds finished, by outcome (promoted, rejected, failed).",
            ["outcome"],
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "tuneshield_learner_round_stage_duration_seconds",
            "Wall time of one stage of a round: the learner's (snapshot, worker, register, "
            "hotswap, report) and, within the worker, its own (classify, heal, train, gates).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.gate_checks = Counter(
            "tuneshield_learner_gate_checks",
            "Gate checks of round candidates, by gate and verdict (pass, fail, unchecked).",
            ["gate", "verdict"],
            registry=registry,
        )
        self.engine_up: Gauge | None = (
            Gauge(ENGINE_UP_METRIC, ENGINE_UP_HELP, ["engine"], registry=registry)
            if report_engines
            else None
        )
        # Every series from the start, at 0: a first increment is then a visible change.
        for outcome in ROUND_OUTCOMES.values():
            self.rounds.labels(outcome)
        for gate in GATE_NAMES:
            for verdict in GATE_VERDICTS:
                self.gate_checks.labels(gate, verdict)

    def round_finished(
        self,
        status: str,
        stages: Iterable[tuple[str, float]],
        gates: GateResult | None,
    ) -> None:
        """Count a round that ended with run status ``status``, its stages' durations and
        its gates' checks (None: the gates did not run or were skipped)."""
        self.rounds.labels(ROUND_OUTCOMES.get(status, "failed")).inc()
        for stage, seconds in stages:
            self.stage_seconds.labels(stage).observe(seconds)
        for check in gates.checks if gates is not None else ():
            verdict = gate_verdict(check.candidate, check.active, check.ok)
            self.gate_checks.labels(check.metric, verdict).inc()

    def engine_answered(self, url: str, answered: bool) -> None:
        """Record whether the engine at ``url`` answered the learner's last call."""
        if self.engine_up is not None:
            self.engine_up.labels(engine_label(url)).set(1.0 if answered else 0.0)

    def unregister(self) -> None:
        """Take these metrics out of the registry (the gateway's outlives the learner)."""
        for collector in (self.rounds, self.stage_seconds, self.gate_checks, self.engine_up):
            if collector is not None:
                self.registry.unregister(collector)


@contextmanager
def serve_metrics(registry: CollectorRegistry, host: str, port: int | None) -> Iterator[None]:
    """Serve ``registry`` on ``http://host:port/metrics`` for the block's duration (nothing
    when ``port`` is None); the server and its thread are closed at the end."""
    if port is None:
        yield
        return
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as error:
        raise MetricsPortError(
            f"cannot serve the learner's metrics on {host}:{port} (policies/learner.yaml "
            f"control.metrics_port): {error.strerror or error}"
        ) from None
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
