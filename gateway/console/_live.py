"""Live traffic figures for the overview, read from this process's Prometheus metrics.

A background task reads the gateway's counters and histograms every ``sample_period_s``
(off the request path: the chat routes do exactly what they did before), and keeps the
last ``history_points`` readings. What the charts show comes from the differences
between consecutive readings: requests per second on ``/v1``, the share answered with a
server error, the chat route's p50 and p99 latency (interpolated within the histogram's
buckets, as Prometheus' ``histogram_quantile`` does), and the guard's mean toxicity score
of the replies it scored. The figures are this gateway process's; each replica has its
own (Prometheus adds them up).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise

from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.samples import Sample

from gateway.metrics import Metrics
from gateway.routes import chat_completions

logger = logging.getLogger(__name__)

USER_ROUTES = "/v1/"
CHAT_ROUTE = next(iter(chat_completions.paths))
SERVER_ERROR = 500
REPLY = "reply"
"""What the guard calls a scored reply (``Guard.check_reply``)."""
P50, P99 = 0.5, 0.99


@dataclass(frozen=True)
class Reading:
    """The cumulative counters at one moment."""

    at: float
    """Wall-clock seconds (``time.time``)."""
    requests: float
    """``/v1`` requests answered."""
    server_errors: float
    """Of those, answered with a 5xx status."""
    latency: tuple[tuple[float, float], ...]
    """The chat route's latency histogram: (upper bound in seconds, cumulative count)."""
    toxicity_sum: float
    toxicity_count: float
    """Sum and count of the guard's reply scores."""
    guard_actions: float
    """Guard decisions over the threshold (any action, user turns and replies)."""


@dataclass(frozen=True)
class Window:
    """What happened between two readings."""

    end: float
    seconds: float
    requests_per_s: float
    error_rate: float | None
    """Share of ``/v1`` requests answered with a server error (None: no requests)."""
    p50_s: float | None
    p99_s: float | None
    toxicity: float | None
    """Mean guard score of the replies scored (None: none scored)."""
    guard_actions: float


def _samples(metric: MetricWrapperBase, suffix: str) -> Iterator[Sample]:
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith(suffix):
                yield sample


def read(metrics: Metrics, now: float | None = None) -> Reading:
    """The gateway's counters as they stand."""
    requests = server_errors = 0.0
    for sample in _samples(metrics.requests, "_total"):
        if sample.labels["route"].startswith(USER_ROUTES):
            requests += sample.value
            if int(sample.labels["status"]) >= SERVER_ERROR:
                server_errors += sample.value
    latency = tuple(
        (float(sample.labels["le"]), sample.value)
        for sample in _samples(metrics.latency, "_bucket")
        if sample.labels["route"] == CHAT_ROUTE
    )
    toxicity_sum = sum(
        s.value for s in _samples(metrics.guard_scores, "_sum") if s.labels["scored"] == REPLY
    )
    toxicity_count = sum(
        s.value for s in _samples(metrics.guard_scores, "_count") if s.labels["scored"] == REPLY
    )
    return Reading(
        at=time.time() if now is None else now,
        requests=requests,
        server_errors=server_errors,
        latency=latency,
        toxicity_sum=toxicity_sum,
        toxicity_count=toxicity_count,
        guard_actions=sum(sample.value for sample in _samples(metrics.guard, "_total")),
    )


def engines(metrics: Metrics) -> list[tuple[str, bool]]:
    """Each engine of the pool and whether it answered its last probe."""
    return [
        (sample.labels["engine"], sample.value > 0) for sample in _samples(metrics.engine_up, "")
    ]


def bucket_quantile(quantile: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The ``quantile`` of a histogram's cumulative ``(upper bound, count)`` buckets, by
    linear interpolation within its bucket (None: no observations). Past the last finite
    bound it is that bound, as in Prometheus."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = quantile * ordered[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def window(before: Reading, after: Reading) -> Window:
    """The figures of the time between two readings."""
    seconds = max(after.at - before.at, 0.0)
    requests = after.requests - before.requests
    earlier = dict(before.latency)
    latency = [(bound, count - earlier.get(bound, 0.0)) for bound, count in after.latency]
    scored = after.toxicity_count - before.toxicity_count
    return Window(
        end=after.at,
        seconds=seconds,
        requests_per_s=requests / seconds if seconds else 0.0,
        error_rate=(after.server_errors - before.server_errors) / requests if requests else None,
        p50_s=bucket_quantile(P50, latency),
        p99_s=bucket_quantile(P99, latency),
        toxicity=(after.toxicity_sum - before.toxicity_sum) / scored if scored else None,
        guard_actions=after.guard_actions - before.guard_actions,
    )


class LiveMetrics:
    """The last ``keep`` readings of one gateway's metrics."""

    def __init__(self, metrics: Metrics, keep: int) -> None:
        self._metrics = metrics
        self._readings: deque[Reading] = deque(maxlen=keep + 1)

    def sample(self) -> None:
        """Take one reading now."""
        self._readings.append(read(self._metrics))

    def windows(self) -> list[Window]:
        """The figures between consecutive readings, oldest first."""
        return [window(a, b) for a, b in pairwise(self._readings)]

    def engines(self) -> list[tuple[str, bool]]:
        """Each engine and whether it answered its last probe, as of now."""
        return engines(self._metrics)

    async def run(self, period_s: float) -> None:
        """Sample every ``period_s`` until cancelled (the console's lifespan ends it)."""
        while True:
            try:
                self.sample()
            except Exception as error:  # a metric that fails to read must not end the task
                logger.warning("console: reading the metrics failed: %s", error)
            await asyncio.sleep(period_s)
