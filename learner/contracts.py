"""What crosses the learner's process boundary: typed, versioned, strictly decoded records.

The learner queues a round in the store and, later and maybe in another release, its
worker subprocess (``python -m learner ROUND_DIR``) runs it. Everything that
travels between them is one of these records::

    RoundSettings   learner_runs.settings   the policies, read once when the round is queued
    RoundSpec       ROUND_DIR/round.json    the settings + snapshot, models and adapters
    StatusEvent     ROUND_DIR/status.jsonl  one line per event, appended by the worker
    WorkerResult    ROUND_DIR/result.json   CandidateRecord, GateResult, Evaluations

The worker never reads ``policies/`` while running a round: every config it needs is in
its ``RoundSettings``. Each record carries a ``version``; ``decode`` refuses another
version, a field it does not know (nested configs included), a value of the wrong type
(no coercion) and a value its config's checks reject, with a ``ContractError`` naming
the record and the field (``... at `$.settings.plan.heal_mode```).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgspec
from msgspec import inspect as mi

from learner.engine_inference import EngineInference
from learner.gates import GateResult, GatesConfig, check_probe_supply
from learner.round_pipeline import CandidateResult, RoundPlan
from tuneshield import (
    EvalConfig,
    HealConfig,
    TrainConfig,
    build_config,
    check_independent,
    load_config,
    load_train_config,
    read_policy,
    scaled_train_config,
)

if TYPE_CHECKING:
    from tuneshield import JudgesPolicy

# 2: gates with a fixed probe count, checked against the active version only.
ROUND_SETTINGS_VERSION = 3  # 1: the plan alone (learner_runs.settings before this module)
# 2: no version 0 to gate against.
ROUND_SPEC_VERSION = 3  # 1: round.json with plan and gate overrides, read beside policies/
STATUS_VERSION = 1
RESULT_VERSION = 2  # 1: gate verdicts against the active version only

OTHER_RELEASE = "written by another release of the learner"

RecordT = TypeVar("RecordT")


class ContractError(ValueError):
    """A record does not decode: another version, an unknown field, a wrong type or value."""


def _check_version(what: str, found: int, expected: int) -> None:
    if found != expected:
        raise ValueError(f"{what} version {found!r} is not {expected}: {OTHER_RELEASE}")


class RoundSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Everything a round's worker needs from ``policies/``, as it was when it was queued.

    Built once by ``from_policies`` (the learner, when it queues a round), stored in the
    run's row, handed to the worker in ``round.json``. Cross-field checks run on every
    build and decode, so a misconfigured round fails when queued, not hours later.
    """

    version: int = ROUND_SETTINGS_VERSION
    plan: RoundPlan
    """How the round trains (policies/learner.yaml ``round``, with the caller's changes)."""
    training: TrainConfig
    """policies/training.yaml; the plan's epochs, step cap, rate and seed apply on top."""
    healing: HealConfig
    """policies/healing.yaml; the plan's heal mode, seed and reply cap apply on top."""
    judges: dict[str, Any]
    """policies/judges.yaml as read; checked as a ``JudgesPolicy`` (``judges_policy()``)."""
    evaluation: EvalConfig
    """policies/evaluation.yaml; the gates' probes, seed and judge apply on top."""
    gates: GatesConfig | None
    """policies/gates.yaml with the caller's overrides; None skips the gates (it passes)."""

    def __post_init__(self) -> None:
        _check_version("round settings", self.version, ROUND_SETTINGS_VERSION)
        policy = self.judges_policy()
        if self.plan.defense and self.plan.judge not in policy.judges:
            raise ValueError(
                f"plan.judge {self.plan.judge!r} is not among judges {sorted(policy.judges)}"
            )
        if self.gates is not None:
            judge = self.gate_evaluation().judge
            if judge not in policy.judges:
                raise ValueError(
                    f"the gates' evaluation judge {judge!r} is not among judges "
                    f"{sorted(policy.judges)}"
                )
            check_independent(judge, self.defense_judges())
            check_probe_supply(self.gates)

    @classmethod
    def from_policies(
        cls,
        directory: Path | None = None,
        *,
        plan: RoundPlan | None = None,
        gate_overrides: Mapping[str, Any] | None = None,
        skip_gates: bool = False,
    ) -> RoundSettings:
        """Read the policies a round runs with, once: ``plan`` replaces learner.yaml's
        ``round`` section, ``gate_overrides`` fields of gates.yaml (``None`` keeps one)."""
        return cls(
            plan=plan or RoundPlan.from_policy(directory),
            training=load_train_config(directory),
            healing=load_config(HealConfig, "healing", directory=directory),
            judges=read_policy("judges", directory),
            evaluation=load_config(EvalConfig, "evaluation", directory=directory),
            gates=None
            if skip_gates
            else GatesConfig.from_policy(directory, **dict(gate_overrides or {})),
        )

    def judges_policy(self) -> JudgesPolicy:
        """The recorded judges.yaml, checked (unknown keys and bad values are errors)."""
        from tuneshield import JudgesPolicy

        return build_config(JudgesPolicy, dict(self.judges), "round settings [judges]")

    def defense_judges(self) -> list[str]:
        """The judges the defense uses (the plan's, with a cascade's parts); none if off."""
        from tuneshield import defense_judge_names

        if not self.plan.defense:
            return []
        return defense_judge_names(self.plan.judge, self.judges_policy())

    def train_config(self) -> TrainConfig:
        """training.yaml with the plan's seed, epochs per stage, step cap and rates."""
        plan = self.plan
        return scaled_train_config(
            plan.seed, plan.sft_epochs, plan.dpo_epochs, plan.max_steps,
            sft_learning_rate=plan.sft_learning_rate, dpo_learning_rate=plan.dpo_learning_rate,
            policy=self.training,
        )  # fmt: skip

    def heal_config(self) -> HealConfig:
        """healing.yaml with the plan's heal mode, seed and (if set) reply cap."""
        changes: dict[str, Any] = {"mode": self.plan.heal_mode, "seed": self.plan.seed}
        if self.plan.heal_max_new_tokens:
            changes["max_new_tokens"] = self.plan.heal_max_new_tokens
        return dataclasses.replace(self.healing, **changes)  # re-runs the checks

    def gate_evaluation(self) -> EvalConfig:
        """evaluation.yaml with the gates' probes, replies, seed and (if set) judge."""
        gates = self.gates
        if gates is None:
            raise ValueError("the round skips the gates: there is no gate evaluation")
        changes: dict[str, Any] = {
            "samples_per_probe": gates.samples_per_probe,
            "max_new_tokens": gates.max_new_tokens,
            "max_probes": gates.max_probes,
            "max_perplexity_samples": gates.perplexity_samples,
            "seed": gates.seed,
        }
        if gates.judge is not None:
            changes["judge"] = gates.judge
        return dataclasses.replace(self.evaluation, **changes)


class RoundSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What the learner asks the worker to do (``round.json``)."""

    version: int = ROUND_SPEC_VERSION
    run_id: str
    settings: RoundSettings
    snapshot: str
    """The snapshot's Parquet file."""
    base_model: str
    parent_adapter: str | None
    """The adapter the candidate continues (None: a fresh LoRA)."""
    active_adapter: str | None
    """The adapter the gates compare against (None: the bare base model's outputs)."""
    active_version: str | None = None
    """The version the alias served when the round started (None: none registered)."""
    version0: str | None = None
    """The alias's version 0, which the gates compare against too (None: none known)."""
    version0_adapter: str | None = None
    """Version 0's adapter folder (the registry's)."""
    torch_threads: int = 0
    """Worker torch threads (0: torch's default)."""
    gate_cache: str | None = None
    """The folder of stored gate evaluations (``learner.gate_cache``; None: every
    reference is evaluated)."""
    inference: EngineInference | None = None
    """The engine healing and gate replies are sampled on (None: in the worker)."""

    def __post_init__(self) -> None:
        _check_version("round spec", self.version, ROUND_SPEC_VERSION)


StatusKind = Literal["stage", "progress", "error", "done"]


class StatusEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One line of ``status.jsonl``: a stage starts, progress within it, an error, done."""

    version: int = STATUS_VERSION
    time: str
    """ISO 8601, UTC, milliseconds."""
    event: StatusKind
    stage: str | None = None
    done: int | None = None
    total: int | None = None
    samples: int | None = None
    """With the classify stage's start: how many samples the snapshot held."""
    error: str | None = None
    """With ``error``: the exception's type and message."""

    def __post_init__(self) -> None:
        _check_version("status event", self.version, STATUS_VERSION)


class StageTiming(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Wall seconds and peak RSS of one pipeline stage."""

    stage: str
    seconds: float
    peak_rss_gib: float


class RoundStage(msgspec.Struct, frozen=True, kw_only=True):
    """One stage of a round as its report and ``GET /admin/learner/runs/{id}`` show it.

    Read back from the round's ``summary.json`` (``learner.round_report.stage_times``):
    the learner's own stages (snapshot, register, hotswap, report) with the worker's
    (classify, heal, train, gates) in place of the worker's total.
    """

    stage: str
    seconds: float
    """Wall seconds."""
    peak_rss_gib: float | None = None
    """Peak resident memory of the worker process by the stage's end; null for the
    learner's own stages (they run in the learner process, beside everything else)."""
    worker: bool = False
    """Whether the stage ran in the round's worker subprocess."""


class CandidateRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``CandidateResult`` on the wire: what a round trained, and what it cost."""

    adapter_dir: str
    samples_path: str
    samples: int
    flagged: int | None
    """Flagged by the defense judge after any recall cap (None: no defense)."""
    flagged_before_cap: int | None
    healed: int
    judge: str | None
    threshold: float | None
    training: dict[str, Any]
    """Per stage (sft, dpo): rows, steps, loss_history, duration_s, ... (the manifest's)."""
    hyperparameters: dict[str, Any]
    stages: list[StageTiming]
    parent_adapter: str | None
    peak_rss_gib: float
    unrelated: int | None = None
    """Left out of SFT as unrelated to their message (None: no screening)."""
    deflections: int | None = None
    """Flagged, healed with a canned fallback and left out of SFT (None: no defense)."""
    canned_fallbacks: int | None = None
    """Flagged and healed with a canned fallback, learned or not (None: no defense)."""
    answers: int | None = None
    """Answers to flagged turns healing added (None: no defense)."""
    flagged_drafts: int | None = None
    """Healed rows whose most flagged candidate DPO also rejects (None: no defense)."""

    @classmethod
    def of(cls, result: CandidateResult) -> CandidateRecord:
        return msgspec.convert(result.to_json(), cls, strict=True)


class Evaluations(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The gate evaluations, as ``tuneshield.evaluate`` returned them (NaN as null)."""

    active: dict[str, Any]
    candidate: dict[str, Any]
    version0: dict[str, Any] | None = None
    """Version 0's, when it is not the active version (None: the active one's, or none)."""
    reused: dict[str, str] = msgspec.field(default_factory=dict)
    """Reference ("active", "version 0") → the run whose stored evaluation was reused."""


class WorkerResult(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``result.json``: the candidate, the gates' verdict and both evaluations."""

    version: int = RESULT_VERSION
    candidate: CandidateRecord
    gates: GateResult | None
    """None: the round skipped the gates (the candidate passes)."""
    evaluations: Evaluations | None
    seconds: float

    def __post_init__(self) -> None:
        _check_version("worker result", self.version, RESULT_VERSION)

    @property
    def passed(self) -> bool:
        return self.gates is None or self.gates.passed


# -- encoding and strict decoding -----------------------------------------------------


def encode(record: msgspec.Struct) -> bytes:
    """A record as JSON (NaN and infinities as null)."""
    return msgspec.json.encode(record)


def decode(data: bytes | str, type_: type[RecordT], what: str, version: int) -> RecordT:
    """``data`` as a ``type_`` record; ``ContractError`` naming the field that does not fit.

    The version is checked first (a record of another release may differ anywhere);
    then unknown fields, nested dataclass configs included (msgspec ignores those only
    there); then types, strictly, and every config's own checks.
    """
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as error:
        raise ContractError(f"{what}: not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise ContractError(f"{what}: expected a JSON object, got {type(raw).__name__}")
    found = raw.get("version")
    if found != version:
        raise ContractError(f"{what}: version {found!r} is not {version}: {OTHER_RELEASE}")
    _reject_unknown_fields(raw, mi.type_info(type_), what, "$")
    try:
        return msgspec.convert(raw, type_, strict=True)
    except msgspec.ValidationError as error:
        raise ContractError(f"{what}: {error}") from None


def _reject_unknown_fields(value: Any, info: mi.Type, what: str, path: str) -> None:
    if isinstance(info, (mi.DataclassType, mi.StructType)) and isinstance(value, dict):
        fields = {field.encode_name: field for field in info.fields}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ContractError(
                f"{what}: unknown field `{unknown[0]}` at `{path}` (known: {sorted(fields)})"
            )
        for key, item in value.items():
            _reject_unknown_fields(item, fields[key].type, what, f"{path}.{key}")
    elif isinstance(info, mi.UnionType):
        for member in info.types:
            _reject_unknown_fields(value, member, what, path)
    elif isinstance(info, (mi.ListType, mi.VarTupleType)) and isinstance(value, list):
        for index, item in enumerate(value):
            _reject_unknown_fields(item, info.item_type, what, f"{path}[{index}]")
    elif isinstance(info, mi.DictType) and isinstance(value, dict):
        for key, item in value.items():
            _reject_unknown_fields(item, info.value_type, what, f"{path}.{key}")


def encode_round_settings(settings: RoundSettings) -> str:
    """The settings a queued round runs with, as stored in its run row."""
    return encode(settings).decode()


def decode_round_settings(text: str | bytes | None) -> RoundSettings:
    """A run row's settings; ``ContractError`` naming what does not fit."""
    if text is None:
        raise ContractError("round settings: the run was queued without them")
    return decode(text, RoundSettings, "round settings", ROUND_SETTINGS_VERSION)


def decode_round_spec(data: str | bytes) -> RoundSpec:
    return decode(data, RoundSpec, "round spec (round.json)", ROUND_SPEC_VERSION)


def decode_status_event(line: str | bytes) -> StatusEvent:
    return decode(line, StatusEvent, "status event", STATUS_VERSION)


def decode_worker_result(data: str | bytes) -> WorkerResult:
    return decode(data, WorkerResult, "worker result (result.json)", RESULT_VERSION)
