"""Stage metering: wall time and peak resident memory of each pipeline stage."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SAMPLE_INTERVAL_S = 0.1
_STATUS = Path("/proc/self/status")


def current_rss_bytes() -> int:
    """This process's resident set size (Linux ``/proc``; 0 where unavailable)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class StageRecord:
    name: str
    seconds: float
    peak_rss_bytes: int


@dataclass
class StageMeter:
    """Records stages; ``with meter.stage("sft"):`` measures one."""

    records: list[StageRecord] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        peak = [current_rss_bytes()]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(SAMPLE_INTERVAL_S):
                peak[0] = max(peak[0], current_rss_bytes())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        try:
            yield
        finally:
            stop.set()
            sampler.join()
            peak[0] = max(peak[0], current_rss_bytes())
            self.records.append(StageRecord(name, time.perf_counter() - started, peak[0]))

    def as_dicts(self) -> list[dict[str, object]]:
        return [
            {
                "stage": r.name,
                "seconds": round(r.seconds, 2),
                "peak_rss_gib": r.peak_rss_bytes / 2**30,
            }
            for r in self.records
        ]
