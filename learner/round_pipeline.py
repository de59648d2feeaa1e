"""One round's training, with no server around it: samples in, candidate adapter out.

``train_candidate`` runs TuneShield on a snapshot's DBL samples: classify with the
defense judge → (ablation: cap the judge's recall) → heal the flagged samples → screen
the others (healing.yaml's ``learn_min_coherence``: replies that ignore their message
are not learned) → LoRA SFT → DPO on the flagged ones, continuing from the active
adapter when the plan says so. With ``defense: false`` it fine-tunes on the samples as
they are (the undefended arm). Every step is a ``tuneshield`` library function; this
module only strings them together and keeps the counts, losses, timings and memory a
round reports.

It is what the learner's worker subprocess runs, and what ``tuneshield demo`` calls for
its arms. Nothing here imports the gateway or touches the database.
"""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneshield import PolicyError, Sample, StageMeter, load_config, write_samples

if TYPE_CHECKING:
    from learner.contracts import RoundSettings
    from tuneshield import ChatBackend, TrainConfig, TrainResult

ProgressFn = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: stage is classify, heal, sft or dpo."""

POLICY = "learner"
ADAPTER_FOLDER = "adapter"
SAMPLES_FILE = "samples.jsonl"
# Several GPUs: the training stage's files for its ``accelerate launch`` processes.
TRAIN_FOLDER = "train-launch"
TRAIN_SPEC = "spec.json"
TRAIN_RESULT = "result.json"
PROGRESS_MARK = "tuneshield-progress "
# How long a stopped training launch may take to end: torch's elastic agent gives its
# processes 30 s after SIGTERM before it kills them.
LAUNCH_STOP_TIMEOUT_S = 60
HEAL_MODES = ("contextual", "canned")
TARGETS = ("user", "assistant")


class RoundError(RuntimeError):
    """A round cannot train a candidate; the message says why."""


@dataclass(frozen=True)
class RoundPlan:
    """How a round trains (policies/learner.yaml, section ``round``)."""

    defense: bool = field(
        default=True, metadata={"help": "Run TuneShield; false fine-tunes undefended."}
    )
    judge: str = field(default="embedding", metadata={"help": "Defense judge (judges.yaml)."})
    heal_mode: str = field(default="contextual", metadata={"help": "contextual or canned."})
    dpo: bool = field(default=True, metadata={"help": "Align with DPO after SFT."})
    judge_recall_cap: float | None = field(
        default=None,
        metadata={"help": "Ablation: keep only this share of flagged samples flagged."},
    )
    continue_from_active: bool = field(
        default=True, metadata={"help": "Train on top of the active adapter (else fresh LoRA)."}
    )
    target: str = field(default="user", metadata={"help": "Whose turns are targets."})
    context_turns: int = field(default=3, metadata={"help": "Earlier utterances per sample."})
    sft_epochs: float = field(default=2.0, metadata={"help": "SFT epochs."})
    dpo_epochs: float = field(default=2.0, metadata={"help": "DPO epochs."})
    max_steps: int = field(default=-1, metadata={"help": "Step cap per stage (-1: none)."})
    sft_learning_rate: float | None = field(
        default=None, metadata={"help": "SFT peak learning rate (None: training.yaml)."}
    )
    dpo_learning_rate: float | None = field(
        default=None, metadata={"help": "DPO peak learning rate (None: training.yaml)."}
    )
    heal_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Cap on healing replies (None: healing.yaml)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for cap, healing and training."})

    def __post_init__(self) -> None:
        if self.heal_mode not in HEAL_MODES:
            raise ValueError(f"heal_mode must be one of {HEAL_MODES}, got {self.heal_mode!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.judge_recall_cap is not None and not 0.0 <= self.judge_recall_cap <= 1.0:
            raise ValueError(f"judge_recall_cap must be in [0, 1], got {self.judge_recall_cap}")
        if self.context_turns < 1:
            raise ValueError(f"context_turns must be >= 1, got {self.context_turns}")
        for name in ("sft_epochs", "dpo_epochs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("sft_learning_rate", "dpo_learning_rate"):
            rate = getattr(self, name)
            if rate is not None and rate <= 0:
                raise ValueError(f"{name} must be > 0, got {rate}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be -1 or > 0, got {self.max_steps}")
        if self.heal_max_new_tokens is not None and self.heal_max_new_tokens < 1:
            raise ValueError(f"heal_max_new_tokens must be >= 1, got {self.heal_max_new_tokens}")
        if not self.defense and self.judge_recall_cap is not None:
            raise ValueError(
                f"judge_recall_cap={self.judge_recall_cap} needs defense=true (got defense=false)"
            )

    @classmethod
    def from_policy(cls, directory: Path | None = None, **overrides: Any) -> RoundPlan:
        """The ``round`` section of policies/learner.yaml; ``None`` overrides keep it."""
        plan = load_config(cls, POLICY, "round", directory)
        changes = {name: value for name, value in overrides.items() if value is not None}
        try:
            return dataclasses.replace(plan, **changes)
        except (TypeError, ValueError) as error:
            raise PolicyError(f"round plan: {error}") from None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundPlan:
        return cls(**data)


@dataclass
class CandidateResult:
    """What a round trained, and what it cost."""

    adapter_dir: Path
    samples_path: Path
    """Every sample as trained (classified, healed), JSONL, for audits and the report."""
    samples: int
    """The snapshot's samples (healing's answers to flagged turns are trained too)."""
    flagged: int | None
    """Flagged by the defense judge after any recall cap (None: no defense)."""
    flagged_before_cap: int | None
    healed: int
    judge: str | None
    threshold: float | None
    training: dict[str, Any]
    """Per stage (sft, dpo): rows, steps, loss_history, duration_s, ... (the manifest's)."""
    hyperparameters: dict[str, Any]
    stages: list[dict[str, Any]]
    """Wall seconds and peak RSS (GiB) per pipeline stage."""
    parent_adapter: str | None
    unrelated: int | None = None
    """Samples left out of SFT as unrelated to their message (None: no screening)."""
    deflections: int | None = None
    """Flagged samples whose healing fell back to a canned reply, left out of SFT
    (``learn_canned_fallbacks`` off; None: no defense)."""
    canned_fallbacks: int | None = None
    """Flagged samples none of whose contextual candidates the judge passed (or whose
    candidates were all empty), healed with a canned reply, learned or not (None: no
    defense; 0 in canned mode, where every reply is canned by design). Learned, they teach
    deflecting (``learn_canned_fallbacks``)."""
    answers: int | None = None
    """Answers to flagged turns healing added (``answer_hostile_turns``; None: no defense)."""
    flagged_drafts: int | None = None
    """Healed samples and answers whose most flagged candidate DPO also rejects
    (``pair_flagged_drafts``; None: no defense or no DPO)."""

    @property
    def peak_rss_gib(self) -> float:
        return max((float(s["peak_rss_gib"]) for s in self.stages), default=0.0)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["adapter_dir"] = str(self.adapter_dir)
        data["samples_path"] = str(self.samples_path)
        data["peak_rss_gib"] = self.peak_rss_gib
        return data


def cap_recall(samples: Sequence[Sample], cap: float, seed: int) -> list[Sample]:
    """Copies of ``samples`` where only ``round(cap * flagged)`` flagged samples stay
    flagged, chosen by ``seed``: a weaker judge, as in the paper's biased-classifier study.
    Un-flagged ones are marked ``recall_capped``."""
    flagged = [index for index, sample in enumerate(samples) if sample.get("toxic")]
    kept = set(random.Random(seed).sample(flagged, round(cap * len(flagged))))
    out = []
    for index, sample in enumerate(samples):
        dropped = bool(sample.get("toxic")) and index not in kept
        out.append({**sample, "toxic": bool(sample.get("toxic")) and not dropped,
                    "recall_capped": dropped})  # fmt: skip
    return out


def _stage_progress(stage: str, progress: ProgressFn | None) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    report = progress
    return lambda done, total: report(stage, done, total)


def train_candidate(
    samples: Sequence[Sample],
    plan: RoundPlan,
    *,
    base_model: str | Path,
    parent_adapter: Path | None,
    out_dir: Path,
    progress: ProgressFn | None = None,
    healer: ChatBackend | None = None,
    settings: RoundSettings | None = None,
) -> CandidateResult:
    """Train one candidate adapter into ``out_dir/adapter`` (written atomically).

    ``settings`` are the judges, healing and training configs the round was queued with
    (the worker always passes them, and its plan is ``plan``); ``None`` reads policies/
    now, for the demo and scripts. ``parent_adapter`` (the active version's folder) is
    continued when ``plan.continue_from_active``. ``healer`` writes contextual healing replies; by
    default the base model in this process (pass an ``OpenAIChat`` on an engine's
    identity adapter to heal through vLLM). ``out_dir/adapter`` must not exist.
    """
    from learner.contracts import RoundSettings
    from tuneshield import (
        CANNED_FALLBACK,
        build_judge,
        classify,
        coherence_scores,
        flagged_draft,
        heal,
        is_answer,
        screen_unrelated,
    )

    samples = list(samples)
    if not samples:
        raise RoundError("no samples to train on: the snapshot holds no new target turns")
    out_dir.mkdir(parents=True, exist_ok=True)
    if settings is None:
        settings = RoundSettings.from_policies(plan=plan, skip_gates=True)
    elif settings.plan != plan:
        raise RoundError(f"plan {plan} is not the settings' plan {settings.plan}")
    meter = StageMeter()
    judge_name: str | None = None
    threshold: float | None = None
    flagged_before_cap: int | None = None
    unrelated: int | None = None
    deflections: int | None = None
    canned_fallbacks: int | None = None
    answers: int | None = None
    flagged_drafts: int | None = None
    data = samples
    if plan.defense:
        judge = build_judge(plan.judge, settings.judges_policy())
        judge_name, threshold = judge.name, judge.threshold
        with meter.stage("classify"):
            data = classify(samples, judge, progress=_stage_progress("classify", progress))
        flagged_before_cap = sum(bool(row["toxic"]) for row in data)
        if plan.judge_recall_cap is not None:
            data = cap_recall(data, plan.judge_recall_cap, plan.seed)
        heal_config = settings.heal_config()
        with meter.stage("heal"):
            if healer is None and plan.heal_mode == "contextual" and any(r["toxic"] for r in data):
                from tuneshield import TransformersChat

                healer = TransformersChat(base_model, batch_size=heal_config.batch_size)
            data = heal(
                data,
                heal_config,
                backend=healer,
                recheck=judge.score,
                recheck_threshold=judge.threshold,
                coherence=coherence_scores,
                progress=_stage_progress("heal", progress),
            )
        deflections = sum(bool(row.get("deflects")) for row in data)
        canned_fallbacks = sum(row.get("heal_mode") == CANNED_FALLBACK for row in data)
        answers = sum(is_answer(row) for row in data)
        # Paired only where DPO runs.
        if plan.dpo:
            flagged_drafts = sum(flagged_draft(row) is not None for row in data)
        if heal_config.learn_min_coherence is not None:
            with meter.stage("screen"):
                data = screen_unrelated(data, heal_config, coherence_scores)
            unrelated = sum(bool(row.get("unrelated")) for row in data)
    init = parent_adapter if plan.continue_from_active else None
    with meter.stage("train"):
        trained = train_on_gpus(
            base_model,
            data,
            out_dir / ADAPTER_FOLDER,
            settings.train_config(),
            dpo=plan.defense and plan.dpo,
            init_adapter=init,
            progress=progress,
        )
    samples_path = write_samples(data, out_dir / SAMPLES_FILE)
    manifest = trained.manifest
    return CandidateResult(
        adapter_dir=trained.adapter_dir,
        samples_path=samples_path,
        samples=len(samples),  # the snapshot's; answers to flagged turns are extra rows
        flagged=sum(bool(row.get("toxic")) for row in data) if plan.defense else None,
        flagged_before_cap=flagged_before_cap,
        healed=sum(row.get("heal_mode") is not None and not is_answer(row) for row in data),
        judge=judge_name,
        threshold=threshold,
        training=manifest["stages"],
        # The training config as it ran (bf16 resolved, the device's batch shape) and where.
        hyperparameters={
            "plan": plan.to_json(),
            "training": manifest["config"],
            "device": manifest["device"],
        },
        stages=meter.as_dicts(),
        parent_adapter=str(init) if init is not None else None,
        unrelated=unrelated,
        deflections=deflections,
        canned_fallbacks=canned_fallbacks,
        answers=answers,
        flagged_drafts=flagged_drafts,
    )


def visible_gpus() -> int:
    """The CUDA GPUs this process may use (``CUDA_VISIBLE_DEVICES`` applies)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def train_on_gpus(
    base_model: str | Path,
    samples: Sequence[Sample],
    out_dir: Path,
    config: TrainConfig,
    *,
    dpo: bool,
    init_adapter: Path | None,
    progress: ProgressFn | None,
    processes: int | None = None,
) -> TrainResult:
    """``train_adapter`` here on one device (a GPU or the CPU); across the GPUs of this
    node when there are several: one process per GPU under ``accelerate launch`` (DDP),
    each running ``python -m learner --train SPEC`` (``learner.worker.train_stage``) on its
    share of every step's rows; the first one saves the adapter and writes the result.

    ``processes`` (default: the visible GPUs) is there for tests: without GPUs the same
    launch starts CPU processes (gloo instead of NCCL).
    """
    from tuneshield import TrainResult, train_adapter
    from tuneshield._train import detect_device

    count = visible_gpus() if processes is None else processes
    if count <= 1:
        return train_adapter(base_model, samples, out_dir, config, dpo=dpo,
                             init_adapter=init_adapter, progress=progress)  # fmt: skip
    folder = out_dir.parent / TRAIN_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "base_model": str(base_model),
        "samples": str(write_samples(samples, folder / SAMPLES_FILE)),
        "out_dir": str(out_dir),
        "config": dataclasses.asdict(config),
        "dpo": dpo,
        "init_adapter": str(init_adapter) if init_adapter is not None else None,
        "result": str(folder / TRAIN_RESULT),
    }
    write_json(folder / TRAIN_SPEC, spec)
    precision = "bf16" if detect_device(config.bf16).bf16 else "no"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
               "--num_processes", str(count), "--mixed_precision", precision,
               "--multi_gpu", "-m", "learner", "--train", str(folder / TRAIN_SPEC)]  # fmt: skip
    # The processes' output is the round's log; progress lines are turned into events.
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1) as launch:
        assert launch.stdout is not None
        try:
            for line in launch.stdout:
                if line.startswith(PROGRESS_MARK) and progress is not None:
                    stage, done, total = json.loads(line[len(PROGRESS_MARK) :])
                    progress(stage, done, total)
                elif not line.startswith(PROGRESS_MARK):
                    sys.stderr.write(line)
        except BaseException:
            # Left as it is, the block would close the pipe and wait for the launch, whose
            # first process goes on until its next progress line meets the closed pipe (a
            # GPU step can take minutes). SIGTERM makes accelerate stop them all now.
            launch.terminate()
            try:
                launch.wait(timeout=LAUNCH_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                launch.kill()
            raise
    if launch.returncode != 0:
        raise RuntimeError(
            f"training across {count} processes failed (exit status {launch.returncode}); "
            "the round's log holds their output"
        )
    result = json.loads((folder / TRAIN_RESULT).read_text(encoding="utf-8"))
    return TrainResult(adapter_dir=Path(result["adapter_dir"]), manifest=result["manifest"])


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (a reader sees all of it or nothing)."""
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    scratch.replace(path)
