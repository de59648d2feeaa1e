"""The learning round's worker: ``python -m learner.worker ROUND_DIR``.

The gateway process owns the database and serves traffic, so the heavy part of a round
(torch: classify, heal, SFT, DPO, gate evaluations) runs here, in a subprocess that
talks to the gateway only through files in ``ROUND_DIR``:

- ``round.json`` (in): the plan, the snapshot, the base model, the parent and active
  adapters, the gates' settings (``RoundSpec``);
- ``status.jsonl`` (out, appended): one JSON line per event — ``stage`` when a stage
  starts, ``progress`` with done/total, ``error`` with the message, ``done``;
- ``result.json`` (out, written atomically at the end): the candidate, the gate verdict
  and both evaluations;
- ``adapter/`` (out): the candidate, renamed into place only when complete.

Exit status 0 means ``result.json`` is complete; anything else is a failed round.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from learner.round_pipeline import RoundPlan, write_json

SPEC_FILE = "round.json"
STATUS_FILE = "status.jsonl"
RESULT_FILE = "result.json"
LOG_FILE = "worker.log"
# Share of a round's progress per stage (gate evaluations cost about as much as SFT).
STAGE_WEIGHTS = {"snapshot": 0.02, "classify": 0.08, "heal": 0.15, "sft": 0.35, "dpo": 0.15,
                 "gates": 0.25}  # fmt: skip

logger = logging.getLogger("learner.worker")


@dataclass
class RoundSpec:
    """What the gateway asks the worker to do (``round.json``)."""

    run_id: str
    plan: RoundPlan
    snapshot: str
    base_model: str
    parent_adapter: str | None
    active_adapter: str | None
    gates: dict[str, Any] | None = field(default_factory=dict)
    """Overrides of policies/gates.yaml; None skips the gates (the candidate passes)."""
    defense_judges: list[str] = field(default_factory=list)
    torch_threads: int = 0

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["plan"] = self.plan.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundSpec:
        return cls(**{**data, "plan": RoundPlan.from_json(data["plan"])})


class StatusFile:
    """Appends status events, one JSON object per line, flushed at once."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, event: str, **values: Any) -> None:
        line = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({**line, **values}, default=str) + "\n")

    def progress(self, stage: str, done: int, total: int) -> None:
        self.write("progress", stage=stage, done=done, total=total)


def read_status(path: Path) -> list[dict[str, Any]]:
    """The events written so far (a half-written last line is skipped)."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def overall_progress(events: list[dict[str, Any]]) -> tuple[str | None, float]:
    """(current stage, share of the round done) from the status events."""
    stage: str | None = None
    done_share: dict[str, float] = {}
    for event in events:
        name = event.get("stage")
        if event["event"] == "done":
            return "done", 1.0
        if event["event"] in ("stage", "progress") and isinstance(name, str):
            stage = name
            total = event.get("total") or 0
            share = min(1.0, event.get("done", 0) / total) if total else 0.0
            done_share[name] = max(done_share.get(name, 0.0), share)
    order = list(STAGE_WEIGHTS)
    progress = 0.0
    if stage in STAGE_WEIGHTS:
        # Stages before the current one are done (skipped ones included).
        for name in order[: order.index(stage)]:
            progress += STAGE_WEIGHTS[name]
        progress += STAGE_WEIGHTS[stage] * done_share.get(stage, 0.0)
    return stage, min(progress, 0.99)


def run_round(round_dir: Path) -> dict[str, Any]:
    """Do the round described by ``round_dir/round.json``; return (and write) the result."""
    from learner.gates import GatesConfig, evaluate_gates
    from learner.round_pipeline import train_candidate
    from learner.snapshot import read_snapshot_samples

    spec = RoundSpec.from_json(json.loads((round_dir / SPEC_FILE).read_text(encoding="utf-8")))
    status = StatusFile(round_dir / STATUS_FILE)
    if spec.torch_threads > 0:
        import torch

        torch.set_num_threads(spec.torch_threads)
    started = time.perf_counter()
    status.write("stage", stage="snapshot")
    samples = read_snapshot_samples(
        Path(spec.snapshot), target=spec.plan.target, context_turns=spec.plan.context_turns
    )
    status.write("stage", stage="classify", samples=len(samples))
    candidate = train_candidate(
        samples,
        spec.plan,
        base_model=spec.base_model,
        parent_adapter=Path(spec.parent_adapter) if spec.parent_adapter else None,
        out_dir=round_dir,
        progress=status.progress,
    )
    result: dict[str, Any] = {"candidate": candidate.to_json(), "gates": None, "evaluations": {}}
    if spec.gates is not None:
        status.write("stage", stage="gates")
        config = GatesConfig.from_policy(**spec.gates)
        with_meter = time.perf_counter()
        verdict, evaluations = evaluate_gates(
            candidate.adapter_dir,
            Path(spec.active_adapter) if spec.active_adapter else None,
            config,
            base_model=spec.base_model,
            defense_judges=spec.defense_judges,
        )
        result["gates"] = verdict.to_json()
        result["evaluations"] = evaluations
        result["candidate"]["stages"].append(
            {
                "stage": "gates",
                "seconds": round(time.perf_counter() - with_meter, 2),
                "peak_rss_gib": _peak_rss_gib(),
            }
        )
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_json(round_dir / RESULT_FILE, result)
    status.write("done")
    return result


def _peak_rss_gib() -> float:
    import resource

    # ru_maxrss is KiB on Linux: the process's peak so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m learner.worker ROUND_DIR", file=sys.stderr)
        return 2
    round_dir = Path(args[0])
    # No model hub on these machines: fail fast instead of retrying one.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        run_round(round_dir)
    except BaseException as error:  # every failure, Ctrl-C included, reaches the status file
        traceback.print_exc()
        message = f"{type(error).__name__}: {error}"
        StatusFile(round_dir / STATUS_FILE).write("error", error=message)
        return 130 if isinstance(error, KeyboardInterrupt) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
