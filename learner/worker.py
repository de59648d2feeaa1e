"""The learning round's worker: ``python -m learner ROUND_DIR`` (``learner/__main__.py``).

The gateway process owns the database and serves traffic, so the heavy part of a round
(torch: classify, heal, SFT, DPO, gate evaluations) runs here, in a subprocess that
talks to the gateway only through files in ``ROUND_DIR``:

- ``round.json`` (in, ``RoundSpec``): the round's settings as queued (plan, training,
  healing, judges, evaluation, gates: the worker reads no policy file), the snapshot, the
  base model, the parent and active adapters;
- ``status.jsonl`` (out, appended, ``StatusEvent``): one JSON line per event — ``stage``
  when a stage starts, ``progress`` with done/total, ``error`` with the message, ``done``;
- ``result.json`` (out, written atomically at the end, ``WorkerResult``): the candidate,
  the gate verdict and the evaluations (candidate, active version, version 0);
- ``adapter/`` (out): the candidate, renamed into place only when complete.

Every file is a versioned record of ``learner.contracts``, decoded strictly.

Exit status 0 means ``result.json`` is complete; anything else is a failed round.

On a node with several GPUs the training stage runs in one process per GPU under
``accelerate launch`` (``learner.round_pipeline.train_on_gpus``), each started as
``python -m learner --train SPEC`` (``train_stage``); the worker reads their progress.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from gateway import configure_logging
from learner.contracts import (
    CandidateRecord,
    Evaluations,
    StageTiming,
    StatusEvent,
    StatusKind,
    WorkerResult,
    decode_round_spec,
    decode_status_event,
    encode,
)
from learner.gates import GateResult
from learner.round_pipeline import PROGRESS_MARK, RoundError

SPEC_FILE = "round.json"
STATUS_FILE = "status.jsonl"
RESULT_FILE = "result.json"
LOG_FILE = "worker.log"
# Share of a round's progress per stage (gate evaluations cost about as much as SFT).
STAGE_WEIGHTS = {"snapshot": 0.02, "classify": 0.08, "heal": 0.15, "sft": 0.35, "dpo": 0.15,
                 "gates": 0.25}  # fmt: skip

logger = logging.getLogger("learner.worker")


class StatusFile:
    """Appends status events (``StatusEvent``), one JSON object per line, flushed at once."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, event: StatusKind, **values: Any) -> None:
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        line = encode(StatusEvent(time=now, event=event, **values))
        with self.path.open("ab") as handle:
            handle.write(line + b"\n")

    def progress(self, stage: str, done: int, total: int) -> None:
        self.write("progress", stage=stage, done=done, total=total)


def read_status(path: Path) -> list[StatusEvent]:
    """The events written so far; a half-written last line (no newline yet) is skipped,
    a line of another version or shape raises ``ContractError``."""
    if not path.exists():
        return []
    *complete, _partial = path.read_bytes().split(b"\n")
    return [decode_status_event(line) for line in complete if line.strip()]


def overall_progress(events: list[StatusEvent]) -> tuple[str | None, float]:
    """(current stage, share of the round done) from the status events."""
    stage: str | None = None
    done_share: dict[str, float] = {}
    for event in events:
        if event.event == "done":
            return "done", 1.0
        if event.event in ("stage", "progress") and event.stage is not None:
            stage = event.stage
            total = event.total or 0
            share = min(1.0, (event.done or 0) / total) if total else 0.0
            done_share[stage] = max(done_share.get(stage, 0.0), share)
    order = list(STAGE_WEIGHTS)
    progress = 0.0
    if stage in STAGE_WEIGHTS:
        # Stages before the current one are done (skipped ones included).
        for name in order[: order.index(stage)]:
            progress += STAGE_WEIGHTS[name]
        progress += STAGE_WEIGHTS[stage] * done_share.get(stage, 0.0)
    return stage, min(progress, 0.99)


def run_round(round_dir: Path) -> WorkerResult:
    """Do the round described by ``round_dir/round.json``; return (and write) the result.

    Every config comes from the spec's ``RoundSettings`` (recorded when the round was
    queued): nothing here reads policies/.
    """
    from learner.engine_inference import EngineAdapters
    from learner.gate_cache import GateCache
    from learner.gates import IN_PROCESS, ON_ENGINE, Reference, evaluate_gates
    from learner.round_pipeline import train_candidate
    from learner.snapshot import read_snapshot_samples

    spec = decode_round_spec((round_dir / SPEC_FILE).read_bytes())
    settings, plan = spec.settings, spec.settings.plan
    status = StatusFile(round_dir / STATUS_FILE)
    if spec.torch_threads > 0:
        import torch

        torch.set_num_threads(spec.torch_threads)
    started = time.perf_counter()
    status.write("stage", stage="snapshot")
    samples = read_snapshot_samples(
        Path(spec.snapshot), target=plan.target, context_turns=plan.context_turns
    )
    status.write("stage", stage="classify", samples=len(samples))
    engine = EngineAdapters(spec.inference) if spec.inference is not None else None
    try:
        # Contextual healing writes the base model's replies: the identity adapter's.
        healer = None
        if engine is not None and plan.defense and plan.heal_mode == "contextual":
            healer = engine.chat(engine.load("base", None))
        try:
            candidate = train_candidate(
                samples,
                plan,
                base_model=spec.base_model,
                parent_adapter=Path(spec.parent_adapter) if spec.parent_adapter else None,
                out_dir=round_dir,
                progress=status.progress,
                settings=settings,
                healer=healer,
            )
        finally:
            if engine is not None and healer is not None:
                healer.close()
                engine.unload(healer.model)
        record = CandidateRecord.of(candidate)
        verdict: GateResult | None = None
        evaluations: Evaluations | None = None
        if settings.gates is not None:
            status.write("stage", stage="gates")
            with_meter = time.perf_counter()
            zero = None
            if spec.version0 is not None:
                folder = Path(spec.version0_adapter) if spec.version0_adapter else None
                zero = Reference(spec.version0, folder)
            cache = None
            if spec.gate_cache is not None:
                inference = IN_PROCESS if engine is None else ON_ENGINE
                cache = GateCache(Path(spec.gate_cache), settings, spec.base_model, inference)
            verdict, evaluated = evaluate_gates(
                candidate.adapter_dir,
                Path(spec.active_adapter) if spec.active_adapter else None,
                settings,
                base_model=spec.base_model,
                active_version=spec.active_version,
                version0=zero,
                cache=cache,
                run_id=spec.run_id,
                engine=engine,
                progress=lambda done, total: status.progress("gates", done, total),
            )
            evaluations = msgspec.convert(evaluated, Evaluations)
            seconds = round(time.perf_counter() - with_meter, 2)
            timing = StageTiming("gates", seconds, _peak_rss_gib())
            record = msgspec.structs.replace(record, stages=[*record.stages, timing])
    finally:
        if engine is not None:
            engine.close()
    result = WorkerResult(
        candidate=record,
        gates=verdict,
        evaluations=evaluations,
        seconds=round(time.perf_counter() - started, 1),
    )
    write_record(round_dir / RESULT_FILE, result)
    status.write("done")
    return result


def write_record(path: Path, record: msgspec.Struct) -> None:
    """Write ``record`` to ``path`` atomically (a reader sees all of it or nothing)."""
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_bytes(msgspec.json.format(encode(record), indent=2))
    scratch.replace(path)


def _peak_rss_gib() -> float:
    import resource

    # ru_maxrss is KiB on Linux: the process's peak so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def train_stage(spec_path: Path) -> int:
    """One process of a round's training across GPUs (``train_on_gpus`` wrote the spec):
    every process trains its share; the first reports progress on stdout and writes the
    result."""
    import json

    from tuneshield import TrainConfig, read_samples, train_adapter

    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    config = msgspec.convert(spec["config"], TrainConfig)

    def progress(stage: str, done: int, total: int) -> None:
        print(PROGRESS_MARK + json.dumps([stage, done, total]), flush=True)

    result = train_adapter(
        spec["base_model"],
        read_samples(spec["samples"]),
        Path(spec["out_dir"]),
        config,
        dpo=spec["dpo"],
        init_adapter=spec["init_adapter"],
        progress=progress,
    )
    if result.manifest:  # the first process; the others saved nothing
        content = {"adapter_dir": str(result.adapter_dir), "manifest": result.manifest}
        Path(spec["result"]).write_text(json.dumps(content, default=str), encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "--train":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return train_stage(Path(args[1]))
    if len(args) != 1:
        print("usage: python -m learner ROUND_DIR", file=sys.stderr)
        return 2
    round_dir = Path(args[0])
    # No model hub on these machines: fail fast instead of retrying one.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Before torch and transformers are imported: stderr is the round's log file, read
    # back by the admin API, so no progress bars (status.jsonl carries the progress).
    configure_logging()
    try:
        run_round(round_dir)
    except BaseException as error:  # every failure, Ctrl-C included, reaches the status file
        if isinstance(error, RoundError):
            # The round's data cannot make a candidate (none to train on): the message
            # says it all, and the operator reads it without a traceback.
            logger.error("%s", error)
            message = str(error)
        else:
            traceback.print_exc()
            message = f"{type(error).__name__}: {error}"
        StatusFile(round_dir / STATUS_FILE).write("error", error=message)
        return 130 if isinstance(error, KeyboardInterrupt) else 1
    return 0
