"""A stand-in for ``python -m learner`` (no torch): ``fake_worker.py ROUND_DIR MODE``.

MODE: ``pass`` / ``reject`` write a complete round (adapter folder, status, result);
``crash`` reports an error and exits 1; ``hang`` writes progress, then sleeps.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from learner.contracts import (
    CandidateRecord,
    Evaluations,
    StageTiming,
    WorkerResult,
    decode_round_spec,
    encode,
)
from learner.engine_inference import ENGINE_KEY_ENV
from learner.gates import GateCheck, GateResult
from learner.worker import StatusFile

round_dir, mode = Path(sys.argv[1]), sys.argv[2]
spec = decode_round_spec((round_dir / "round.json").read_bytes())
status = StatusFile(round_dir / "status.jsonl")
# What a real worker would sample on: the engine, and the key it reaches it with.
engine_url = spec.inference.url if spec.inference else "in process"
(round_dir / "fake-engine.txt").write_text(f"{engine_url} {os.environ.get(ENGINE_KEY_ENV)}")
print("fake worker: training", flush=True)
status.write("stage", stage="snapshot")
status.progress("sft", 1, 4)
if mode == "crash":
    print("Traceback: something broke", flush=True)
    status.write("error", error="RuntimeError: out of memory in sft")
    sys.exit(1)
if mode == "hang":
    print("training...", flush=True)
    time.sleep(120)
adapter = round_dir / "adapter"
adapter.mkdir()
for name in ("adapter_config.json", "adapter_model.safetensors"):
    (adapter / name).write_text("{}")
# "evaluated": a passing round whose result carries the gate evaluations too.
passed = mode in ("pass", "evaluated")
metrics: dict[str, float | None] = {
    "toxic_toxicity": 0.1,
    "benign_toxicity": 0.0,
    "benign_unhelpful": 0.0,
    "relevance": 0.5,
    "perplexity": 10.0,
}
check = GateCheck("toxic_toxicity", 0.1 if passed else 0.6, 0.1, "<= active + 0.1", passed)
result = WorkerResult(
    candidate=CandidateRecord(
        adapter_dir=str(adapter),
        samples_path=str(round_dir / "samples.jsonl"),
        samples=12,
        flagged=3,
        flagged_before_cap=3,
        healed=3,
        judge="embedding",
        threshold=0.5,
        training={
            "sft": {
                "steps": 2,
                "loss_history": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}],
            }
        },
        hyperparameters={"plan": spec.settings.plan.to_json()},
        stages=[StageTiming("train", 1.0, 0.5)],
        parent_adapter=spec.parent_adapter,
        peak_rss_gib=0.5,
    ),
    gates=GateResult(
        passed,
        metrics,
        metrics,
        [check],
        [] if passed else ["toxic_toxicity 0.6 is not <= active + 0.1 (0.1)"],
        "lexical",
    ),
    evaluations=Evaluations(
        active={"toxic": {"replies": 4, "toxicity_rate": 0.25}, "perplexity": 10.0},
        candidate={"toxic": {"replies": 4, "toxicity_rate": 0.0}, "perplexity": 11.0},
    )
    if mode == "evaluated"
    else None,
    seconds=1.0,
)
(round_dir / "result.json").write_bytes(encode(result))
status.write("done")
