"""Hot-swap and rollback under steady load through ``tuneshield serve`` (tiny model).

A bounded run of ``benchmarks/hotswap.py`` (its code, imported from the file): three
clients for 16 s while the admin API promotes v1, promotes v2 and rolls back to v1; and
a fast check that the benchmark's verdict can fail.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from simulation.scripts import load_script

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="no vLLM")


@pytest.mark.slow
@needs_vllm
def test_swap_and_rollback_under_load_fail_no_request(tiny_model_dir: Path, tmp_path: Path) -> None:
    """No request fails across promote v1, promote v2 and rollback; after each flip every
    new request is served by the new version, after the rollback by the previous one."""
    hotswap = load_script("hotswap")
    config = hotswap.BenchConfig(
        model=str(tiny_model_dir),
        clients=3,
        duration_s=16.0,
        max_tokens=8,
        baseline=False,
        work_dir=tmp_path,
        engine_env=hotswap.TINY_ENGINE_ENV,
        ready_timeout_s=400.0,
    )
    report = hotswap.run_benchmark(config)
    (phase,) = report.phases
    v0, v1, v2 = report.versions
    assert phase.sent > 0
    assert phase.failed == 0, phase.failures
    assert phase.unlogged == 0, "every answered request is in the dialog log"
    assert [(swap.action, swap.target) for swap in phase.swaps] == [
        ("promote", v1),
        ("promote", v2),
        ("rollback", v1),
    ]
    for swap in phase.swaps:
        assert swap.error is None, swap
        assert swap.load_to_flip_s is not None and swap.load_to_flip_s > 0
        assert swap.served_after > 0, f"no request was sent after the flip to {swap.target}"
        assert swap.misrouted == 0, swap
    assert phase.misrouted_before_swaps == 0
    assert phase.per_version[v0] > 0 and phase.per_version[v2] > 0
    # The adapters answer differently, so the log's attribution matches what users saw.
    assert len(phase.replies) >= 2
    assert len(set(phase.replies.values())) == len(phase.replies), phase.replies
    assert report.passed


def test_summary_counts_failed_and_misrouted_requests() -> None:
    """The benchmark's verdict fails on a failed request and on a request sent after the
    flip that the old version served; requests in flight during the swap are not misrouted."""
    hotswap = load_script("hotswap")
    step = hotswap.Step(1.0, "promote", "chat-v0001")

    def request(name: str, started: float, finished: float, error: str | None = None) -> Any:
        return hotswap.RequestRecord(name, 0, 0, False, started, finished, 200, error)

    phase = hotswap.Phase(
        "swap",
        3.0,
        [
            request("before", 0.1, 0.5),
            request("during", 1.2, 1.4),
            request("after-new", 1.6, 2.0),
            request("after-old", 1.7, 2.1),
            request("broken", 1.8, 1.9, error="stream ended without [DONE]"),
        ],
        [hotswap.SwapCall(step, 1.0, 1.5, 200, "chat-v0001", 0.2, None)],
    )
    served = {
        "before": hotswap.Served("chat-v0000", "a", "http://e1"),
        "during": hotswap.Served("chat-v0000", "a", "http://e2"),
        "after-new": hotswap.Served("chat-v0001", "b", "http://e1"),
        "after-old": hotswap.Served("chat-v0000", "a", "http://e1"),
    }
    figures = hotswap.summarize(phase, served, "chat-v0000")
    assert (figures.sent, figures.failed, figures.unlogged) == (5, 1, 0)
    assert figures.per_version == {"chat-v0000": 3, "chat-v0001": 1}
    assert figures.per_engine == {"http://e1": 3, "http://e2": 1}
    assert figures.engines_per_version == {"chat-v0000": 2, "chat-v0001": 1}
    (swap,) = figures.swaps
    assert (swap.served_after, swap.misrouted) == (1, 1)
    assert swap.to_first_reply_s == pytest.approx(1.0)
    report = hotswap.Report("tiny", 2, 1, 3.0, 8, ["chat-v0000", "chat-v0001"], 1.0, [figures])
    assert not report.passed
