"""Learning rounds, orchestrated from the gateway process.

A round, step by step (``RoundRunner``):

1. a ``learner_runs`` row (``queued`` → ``running``);
2. snapshot: turns newer than the watermark (the newest ``snapshot_to`` of the alias's
   registered versions) exported to Parquet on the gateway's own DuckDB connection;
3. worker: ``python -m learner ROUND_DIR`` in a subprocess (torch never runs on
   the event loop, and the DuckDB file stays with this process); its status file is
   polled into the run row, its output goes to ``ROUND_DIR/worker.log``;
4. register: the finished adapter folder is renamed to ``adapters/<alias>-vNNNN`` and
   registered ``candidate`` (gates passed) or ``rejected``, with lineage, watermark
   range, counts, judge, hyper-parameters and gate metrics;
5. hot-swap: a passed candidate is activated (load → probe → alias flip);
6. report: ``ROUND_DIR/report.html``.

A worker that crashes, is killed or runs past the timeout ends the run ``failed`` with
the error; nothing is registered and the alias keeps serving the previous version. A
candidate that the engine refuses to load stays registered as ``candidate`` (it can be
promoted later) and the run is ``failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from engine import HotSwap, VLLMError, identity_version
from learner.canary import CanaryConfig
from learner.contracts import (
    RoundSettings,
    RoundSpec,
    WorkerResult,
    decode_round_settings,
    decode_worker_result,
    encode_round_settings,
)
from learner.engine_inference import (
    ENGINE_KEY_ENV,
    EngineInference,
    InferenceConfig,
    choose_engine,
    release_round_adapters,
)
from learner.gate_cache import CACHE_FOLDER, store_registered
from learner.lineage import LINEAGE_KEY, RoundLineage, lineage_json, round_lineage
from learner.privacy import PrivacyConfig, purge_pending
from learner.quarantine import QuarantineConfig, quarantine_after_round
from learner.round_pipeline import ADAPTER_FOLDER, RoundPlan, write_json
from learner.round_samples import SampleCounts, SamplesConfig
from learner.scheduler import ScheduleConfig
from learner.snapshot import Snapshot, export_snapshot
from learner.worker import (
    LOG_FILE,
    RESULT_FILE,
    SPEC_FILE,
    STATUS_FILE,
    overall_progress,
    read_status,
    write_record,
)
from store import (
    AdapterRegistry,
    AuditLog,
    Database,
    DialogStore,
    RegistryError,
    RunRecord,
    RunStore,
)
from tuneshield import PolicyError, build_config, read_policy

if TYPE_CHECKING:
    from learner.metrics import LearnerMetrics

logger = logging.getLogger(__name__)

ROUNDS_FOLDER = "rounds"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
# The audit log's actor for what the learner does on its own (a round's hot-swap).
LEARNER_ACTOR = "learner"
# The run's progress once the worker is done (register and hot-swap take seconds).
STAGE_DONE = 0.99
WorkerCommand = Callable[[Path], list[str]]


class RoundBusy(RegistryError):
    """A round is already running; one at a time."""


class RoundFailed(RuntimeError):
    """A round ended without a served candidate; the message says why."""


@dataclass(frozen=True)
class WorkerConfig:
    """The worker subprocess (policies/learner.yaml, section ``worker``)."""

    poll_s: float = field(default=2.0, metadata={"help": "Status polling period."})
    timeout_s: float = field(default=7200.0, metadata={"help": "A longer round is killed."})
    settle_s: float = field(default=5.0, metadata={"help": "Younger turns wait a round."})
    torch_threads: int = field(default=0, metadata={"help": "Worker torch threads (0: all)."})
    log_tail_lines: int = field(default=40, metadata={"help": "Log lines the API shows."})

    def __post_init__(self) -> None:
        for name in ("poll_s", "timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.settle_s < 0 or self.torch_threads < 0 or self.log_tail_lines < 0:
            raise ValueError("settle_s, torch_threads and log_tail_lines must be >= 0")


@dataclass(frozen=True)
class ControlConfig:
    """The learner process's loop (policies/learner.yaml, section ``control``)."""

    poll_s: float = field(default=1.0, metadata={"help": "How often queued rounds are claimed."})
    leader_poll_s: float = field(
        default=2.0, metadata={"help": "How often a waiting learner tries the leader lock."}
    )
    reconcile_s: float = field(
        default=5.0, metadata={"help": "How often engines are checked for the active versions."}
    )
    metrics_port: int | None = field(
        default=None,
        metadata={"help": "Port of `tuneshield learner`'s own /metrics (null: not served)."},
    )
    metrics_host: str = field(
        default="127.0.0.1", metadata={"help": "Interface of the learner's /metrics port."}
    )

    def __post_init__(self) -> None:
        for name in ("poll_s", "leader_poll_s", "reconcile_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.metrics_port is not None and not 0 < self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in 1..65535 or null, got {self.metrics_port}")


@dataclass(frozen=True)
class LearnerConfig:
    """policies/learner.yaml."""

    alias: str
    round: RoundPlan
    schedule: ScheduleConfig
    worker: WorkerConfig
    control: ControlConfig = field(default_factory=ControlConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    quarantine: QuarantineConfig = field(default_factory=QuarantineConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    canary: CanaryConfig = field(default_factory=CanaryConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    import_root: Path = field(
        default=Path("imports"),
        metadata={"help": "The folder POST /admin/adapters copies from (relative: data dir)."},
    )

    def __post_init__(self) -> None:
        # The policy gives a string; an empty one would make the whole data dir importable.
        if not str(self.import_root).strip():
            raise ValueError("import_root must name a folder")
        object.__setattr__(self, "import_root", Path(self.import_root))

    def import_root_in(self, data_dir: Path) -> Path:
        """The import root as an absolute path (a relative one lies in ``data_dir``)."""
        return (Path(data_dir) / self.import_root).absolute()

    @classmethod
    def from_policy(cls, directory: Path | None = None) -> LearnerConfig:
        data = read_policy("learner", directory)
        where = "policies/learner.yaml"
        sections = {
            "round": RoundPlan,
            "schedule": ScheduleConfig,
            "worker": WorkerConfig,
            "control": ControlConfig,
            "samples": SamplesConfig,
            "quarantine": QuarantineConfig,
            "privacy": PrivacyConfig,
            "canary": CanaryConfig,
            "inference": InferenceConfig,
        }
        values: dict[str, Any] = dict(data)
        for name, cls_ in sections.items():
            section = values.get(name)
            if not isinstance(section, dict):
                raise PolicyError(f"{where}: missing section '{name}'")
            values[name] = build_config(cls_, section, f"{where} [{name}]")
        return build_config(cls, values, where)


def default_worker_command(round_dir: Path) -> list[str]:
    return [sys.executable, "-m", "learner", str(round_dir)]


@dataclass(frozen=True)
class LearnerOptions:
    """What the gateway needs to run rounds (``AdapterAdmin(learner=...)``)."""

    base_model: str | Path
    adapters_dir: Path
    config: LearnerConfig
    gates: dict[str, Any] | None = None
    """Overrides of policies/gates.yaml; None: the policy as it is."""
    worker_command: WorkerCommand = default_worker_command


def watermark(registry: AdapterRegistry, alias: str) -> datetime | None:
    """Where ``alias``'s next snapshot starts: the newest dialog an earlier round consumed."""
    ends = [
        record.snapshot_to
        for record in registry.list(alias)
        if record.snapshot_to is not None and record.status != "failed"
    ]
    return max(ends, default=None)


def queue_round(runs: RunStore, alias: str, settings: RoundSettings) -> RunRecord:
    """Queue a round of ``alias`` with ``settings`` (recorded in its run row, they are what
    its worker runs with); ``RoundBusy`` while one is queued or running.

    Gateways (``POST /admin/learner/run``) and the learner's schedule queue rounds; the
    active learner claims and runs them one at a time.
    """
    queued = runs.queue(alias, encode_round_settings(settings))
    if queued is None:
        waiting = runs.unfinished()
        which = f"{waiting[0].status} ({waiting[0].run_id})" if waiting else "queued"
        raise RoundBusy(f"a learning round is already {which}")
    return queued


def log_tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of a log file (empty when it does not exist)."""
    if lines <= 0 or not path.is_file():
        return []
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - 200 * lines))
        text = handle.read().decode("utf-8", errors="replace")
    return text.splitlines()[-lines:]


class RoundRunner:
    """Runs learning rounds for one alias, one at a time, on the gateway's event loop."""

    def __init__(
        self,
        database: Database,
        registry: AdapterRegistry,
        runs: RunStore,
        hotswap: HotSwap,
        *,
        base_model: str | Path,
        data_dir: Path,
        adapters_dir: Path,
        config: LearnerConfig,
        gates: dict[str, Any] | None = None,
        worker_command: WorkerCommand = default_worker_command,
        metrics: LearnerMetrics | None = None,
    ) -> None:
        self.database = database
        self.registry = registry
        self.runs = runs
        self.hotswap = hotswap
        self.base_model = str(base_model)
        self.data_dir = Path(data_dir)
        self.adapters_dir = Path(adapters_dir)
        self.config = config
        self.gates: dict[str, Any] | None = {} if gates is None else gates
        self.worker_command = worker_command
        self.metrics = metrics
        # Read once, here (the learner's start): every round this runner queues records
        # these settings, whatever the policy files say by the time it runs.
        self.settings = RoundSettings.from_policies(
            plan=config.round, gate_overrides=self.gates, skip_gates=self.gates is None
        )
        self._task: asyncio.Task[RunRecord] | None = None
        self._claimed = False

    @property
    def alias(self) -> str:
        return self.config.alias

    @property
    def busy(self) -> bool:
        return self._claimed or (self._task is not None and not self._task.done())

    @property
    def current_run(self) -> str | None:
        task = self._task
        return task.get_name() if task is not None and not task.done() else None

    def round_dir(self, run_id: str) -> Path:
        return self.data_dir / ROUNDS_FOLDER / run_id

    @property
    def gate_cache_dir(self) -> Path:
        """Stored gate evaluations (``learner.gate_cache``), shared by the alias's rounds."""
        return self.data_dir / CACHE_FOLDER

    def watermark(self) -> datetime | None:
        """Where the next snapshot starts: the newest dialog an earlier round consumed."""
        return watermark(self.registry, self.alias)

    def new_conversations(self) -> int:
        """Conversations with turns after the watermark (not opted out)."""
        return DialogStore(self.database).count_new_conversations(self.watermark())

    def round_settings(self, plan: RoundPlan | None = None) -> RoundSettings:
        """What a round queued now runs with: the policies as read when this runner was
        built, with ``plan`` (default: learner.yaml's) and this runner's gate overrides."""
        if plan is None or plan == self.settings.plan:
            return self.settings
        return msgspec.structs.replace(self.settings, plan=plan)

    def queue(self, plan: RoundPlan | None = None) -> RunRecord:
        """Record a round for the active learner, with the settings it will run with."""
        return queue_round(self.runs, self.alias, self.round_settings(plan))

    async def execute(self, run: RunRecord) -> RunRecord:
        """Run a claimed round (status ``running``) to its end with its recorded settings."""
        if self.busy:
            raise RoundBusy(f"a learning round is already running ({self.current_run})")
        text = await asyncio.to_thread(self.runs.settings, run.run_id)
        try:
            settings = decode_round_settings(text)
        except ValueError as error:
            record = await self._update(run.run_id, status="failed", error=str(error))
            self._count(record, [], None)
            return record
        self._task = asyncio.create_task(self._run(run.run_id, settings), name=run.run_id)
        return await asyncio.shield(self._task)

    async def start(self, plan: RoundPlan | None = None) -> RunRecord:
        """Queue a round and run it here at once (no control loop); return its run row.

        ``RoundBusy`` if a round is queued or running.
        """
        if self.busy:
            raise RoundBusy(f"a learning round is already running ({self.current_run})")
        self._claimed = True
        try:
            settings = await asyncio.to_thread(self.round_settings, plan)
            queued = await asyncio.to_thread(queue_round, self.runs, self.alias, settings)
            record = await asyncio.to_thread(self.runs.claim_next, "in-process", queued.run_id)
            assert record is not None, "a run queued now is claimable"
            self._task = asyncio.create_task(self._run(record.run_id, settings), name=record.run_id)
        finally:
            self._claimed = False
        return record

    async def run(self, plan: RoundPlan | None = None) -> RunRecord:
        """Run a round to its end; return the final run row."""
        await self.start(plan)
        assert self._task is not None
        return await asyncio.shield(self._task)

    def queue_if_due(self) -> RunRecord | None:
        """The scheduled job: queue a round if none is waiting or running and enough new
        conversations arrived."""
        if self.runs.unfinished():
            # Every tick that finds nothing to do is routine: debug, not info.
            logger.debug("scheduled round skipped: a round is queued or running")
            return None
        new = self.new_conversations()
        needed = self.config.schedule.min_new_dialogs
        if new < needed:
            logger.debug("scheduled round skipped: %d new conversations, %d needed", new, needed)
            return None
        try:
            return self.queue()
        except RoundBusy:
            return None

    async def close(self) -> None:
        """Stop a running round (its worker is killed; the run ends failed)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- one round ------------------------------------------------------------------

    async def _run(self, run_id: str, settings: RoundSettings) -> RunRecord:
        plan = settings.plan
        round_dir = self.round_dir(run_id)
        round_dir.mkdir(parents=True, exist_ok=True)
        log_path = round_dir / LOG_FILE
        # Wall time of the gateway-side stages; the worker's own (classify, heal, train,
        # gates, with peak RSS) are in result.json.
        stages: list[dict[str, Any]] = []
        summary: dict[str, Any] = {
            "run_id": run_id, "alias": self.alias, "plan": plan.to_json(), "stages": stages,
        }  # fmt: skip
        final: dict[str, Any] = {}
        result: WorkerResult | None = None
        try:
            await self._update(
                run_id, status="running", stage="snapshot", progress=0.0, log_path=str(log_path)
            )
            with _timed(stages, "snapshot"):
                snapshot = await asyncio.to_thread(self._snapshot, run_id)
            summary["snapshot"] = _snapshot_json(snapshot)
            if snapshot.rows == 0:
                raise RoundFailed(f"no new dialogs since {snapshot.watermark_from or 'the start'}")
            # What the round trains from, by content, before its worker reads any of it.
            lineage = await asyncio.to_thread(round_lineage, run_id, snapshot, settings)
            summary["lineage"] = lineage_json(lineage)
            active = await asyncio.to_thread(self.registry.active, self.alias)
            # The gates check against version 0 too, so drift cannot compound.
            zero = await asyncio.to_thread(self.registry.version_zero, self.alias)
            inference = await self._inference(run_id)
            summary["inference"] = inference.url if inference else "in_process"
            spec = RoundSpec(
                run_id=run_id,
                settings=settings,
                snapshot=str(snapshot.path),
                base_model=self.base_model,
                parent_adapter=active.path if active and plan.continue_from_active else None,
                active_adapter=active.path if active else None,
                active_version=active.version if active else None,
                version0=zero.version if zero else None,
                version0_adapter=zero.path if zero else None,
                torch_threads=self.config.worker.torch_threads,
                gate_cache=str(self.gate_cache_dir) if _caches(settings) else None,
                inference=inference,
            )
            summary["active_version"] = active.version if active else None
            summary["version0"] = zero.version if zero else None
            write_record(round_dir / SPEC_FILE, spec)
            with _timed(stages, "worker"):
                try:
                    await self._work(run_id, round_dir, log_path, inference)
                finally:
                    if inference is not None:
                        # A worker killed mid-round leaves its private adapters loaded.
                        await release_round_adapters(self.hotswap.clients, inference.prefix)
            result = decode_worker_result((round_dir / RESULT_FILE).read_bytes())
            summary["result"] = msgspec.to_builtins(result)
            final = await self._register(
                run_id, round_dir, snapshot, result, active, stages, lineage, settings
            )
        except asyncio.CancelledError:
            final = {"status": "failed", "error": "the learner stopped during the round"}
            raise
        except Exception as error:  # every failure ends the run, never the gateway
            logger.warning("learning round %s failed: %s", run_id, error)
            final = {"status": "failed", "error": _message(error)}
        finally:
            summary.update(final)
            record = await asyncio.shield(self._finish(run_id, round_dir, summary, final))
            self._count(record, stages, result)
        return record

    def _count(
        self, record: RunRecord, stages: list[dict[str, Any]], result: WorkerResult | None
    ) -> None:
        """Report a finished round to the metrics: its outcome, the learner's stages and
        the worker's own, and its gates' checks."""
        if self.metrics is None:
            return
        timings = [(stage["stage"], stage["seconds"]) for stage in stages]
        if result is not None:
            timings += [(timing.stage, timing.seconds) for timing in result.candidate.stages]
        self.metrics.round_finished(
            record.status, timings, result.gates if result is not None else None
        )

    def _snapshot(self, run_id: str) -> Snapshot:
        privacy = self.config.privacy
        # Deleted dialogs' copies go before a round reads the files (learner/privacy.py);
        # the snapshot's texts are scrubbed of PII before it is written.
        purge_pending(self.database, self.data_dir, compact=privacy.compact_store)
        return export_snapshot(
            DialogStore(self.database),
            self.data_dir,
            self.watermark(),
            name=run_id,
            settle_s=self.config.worker.settle_s,
            scrubber=privacy.scrubber,
        )

    async def _inference(self, run_id: str) -> EngineInference | None:
        """The engine the round's worker samples replies on (None: in the worker)."""
        try:
            identity = await asyncio.to_thread(self.registry.get, identity_version(self.alias))
        except RegistryError:
            identity = None
        try:
            return await choose_engine(
                self.hotswap.clients,
                self.config.inference,
                run_id=run_id,
                base_adapter=Path(identity.path) if identity else None,
            )
        except VLLMError as error:
            raise RoundFailed(str(error)) from None

    async def _work(
        self, run_id: str, round_dir: Path, log_path: Path, inference: EngineInference | None
    ) -> None:
        """Run the worker to its end, mirroring its progress into the run row."""
        status_path = round_dir / STATUS_FILE
        worker = self.config.worker
        env = dict(os.environ)
        # The key of the engine the worker samples on (never written to round.json).
        key = next(
            (c.api_key for c in self.hotswap.clients if inference and c.base_url == inference.url),
            None,
        )
        if key:
            env[ENGINE_KEY_ENV] = key
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *self.worker_command(round_dir),
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + worker.timeout_s
        shown: tuple[str | None, float] = (None, -1.0)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), timeout=worker.poll_s)
                stage, progress = overall_progress(read_status(status_path))
                # The worker's "done" is not the round's: register and hot-swap follow.
                if stage == "done":
                    stage, progress = "register", STAGE_DONE
                if (stage, round(progress, 3)) != shown and stage is not None:
                    shown = (stage, round(progress, 3))
                    await self._update(run_id, stage=stage, progress=progress)
                if process.returncode is not None:
                    break
                if loop.time() > deadline:
                    raise RoundFailed(f"the worker ran past {worker.timeout_s:g} s and was killed")
        finally:
            if process.returncode is None:
                _kill_group(process.pid)
                await process.wait()
        if process.returncode != 0:
            errors = [e.error for e in read_status(status_path) if e.event == "error"]
            how = (
                f"was killed by signal {-process.returncode}"
                if process.returncode < 0
                else f"exited with status {process.returncode}"
            )
            detail = f": {errors[-1]}" if errors else f" (log: {log_path})"
            raise RoundFailed(f"the worker {how}{detail}")
        if not (round_dir / RESULT_FILE).is_file():
            raise RoundFailed(f"the worker exited without {RESULT_FILE}")

    async def _register(
        self,
        run_id: str,
        round_dir: Path,
        snapshot: Snapshot,
        result: WorkerResult,
        active: Any,
        stages: list[dict[str, Any]],
        lineage: RoundLineage,
        settings: RoundSettings,
    ) -> dict[str, Any]:
        candidate, gates, passed = result.candidate, result.gates, result.passed
        await self._update(run_id, stage="register", progress=STAGE_DONE)
        with _timed(stages, "register"):
            version = await asyncio.to_thread(self.registry.next_version, self.alias)
            record = await asyncio.to_thread(
                lambda: self.registry.install(
                    round_dir / ADAPTER_FOLDER,
                    self.adapters_dir,
                    version,
                    status="candidate" if passed else "rejected",
                    parent=active.version if active is not None else None,
                    snapshot_from=snapshot.watermark_from,
                    snapshot_to=snapshot.watermark_to,
                    samples=candidate.samples,
                    flagged=candidate.flagged,
                    healed=candidate.healed,
                    judge=candidate.judge,
                    threshold=candidate.threshold,
                    hyperparameters={
                        **candidate.hyperparameters,
                        "continued_from": candidate.parent_adapter,
                        "run_id": run_id,
                        LINEAGE_KEY: lineage_json(lineage),
                    },
                    gate_metrics=gates.to_json() if gates else {"skipped": True},
                )
            )
        if result.evaluations is not None and _caches(settings):
            # Next round this version may be the active one: its evaluation is reused.
            await asyncio.to_thread(
                store_registered,
                self.gate_cache_dir,
                settings,
                self.base_model,
                version=record.version,
                adapter=Path(record.path),
                run_id=run_id,
                evaluation=result.evaluations.candidate,
            )
        if not passed:
            reasons = "; ".join(gates.reasons) if gates else ""
            return {"status": "rejected", "version": version, "error": f"gates: {reasons}"}
        await self._update(run_id, stage="hotswap", version=version)
        try:
            with _timed(stages, "hotswap"):
                swap = await self.hotswap.activate(record.version, actor=LEARNER_ACTOR)
        except (VLLMError, RegistryError) as error:
            served = active.version if active is not None else "the previous version"
            return {
                "status": "failed",
                "version": version,
                "error": f"{version} is registered as candidate but could not be served "
                f"({_message(error)}); {served} stays live",
            }
        await asyncio.to_thread(
            AuditLog(self.database).record,
            LEARNER_ACTOR,
            "activate",
            version,
            alias=swap.alias,
            previous=swap.previous,
            run_id=run_id,
        )
        return {"status": "succeeded", "version": version, "load_s": swap.load_s}

    async def _finish(
        self, run_id: str, round_dir: Path, summary: dict[str, Any], final: dict[str, Any]
    ) -> RunRecord:
        if "snapshot" in summary:
            summary["quarantined"] = await asyncio.to_thread(self._quarantine, run_id, summary)
        write_json(round_dir / SUMMARY_FILE, summary)
        try:
            from learner.round_report import write_round_report

            with _timed(summary.setdefault("stages", []), "report"):
                await asyncio.to_thread(write_round_report, round_dir)
            write_json(round_dir / SUMMARY_FILE, summary)
        except Exception as error:  # a missing report must not hide the round's outcome
            logger.warning("round %s: report not written: %s", run_id, error)
        changes: dict[str, Any] = {
            "status": final.get("status", "failed"),
            "version": final.get("version"),
            "error": final.get("error"),
        }
        if changes["status"] != "failed":
            # A failed run keeps the stage and progress it reached.
            changes.update(stage="done", progress=1.0)
        return await self._update(run_id, **changes)

    def _quarantine(self, run_id: str, summary: dict[str, Any]) -> list[dict[str, Any]]:
        """Quarantine the keys and end users the round's judge flagged over the policy's
        line (learner/quarantine.py); a failure is logged, never the round's outcome."""
        try:
            quarantined = quarantine_after_round(
                self.database,
                SampleCounts(self.config.samples.key_rounds),
                run_id,
                self.config.quarantine,
                excluded_from=summary["snapshot"]["watermark_from"],
                scan=self.config.samples.key_rounds,
            )
        except Exception as error:
            logger.warning("round %s: quarantine not decided: %s", run_id, error)
            return []
        return [msgspec.to_builtins(offender) for offender in quarantined]

    async def _update(self, run_id: str, **changes: Any) -> RunRecord:
        return await asyncio.to_thread(lambda: self.runs.update(run_id, **changes))


@contextlib.contextmanager
def _timed(stages: list[dict[str, Any]], name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        stages.append({"stage": name, "seconds": round(time.perf_counter() - started, 2)})


def _kill_group(pid: int) -> None:
    # The worker leads its own session: kill what it started too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _caches(settings: RoundSettings) -> bool:
    """Whether the round's gates keep and reuse evaluations (policies/gates.yaml cache)."""
    return settings.gates is not None and settings.gates.cache


def _message(error: BaseException) -> str:
    if isinstance(error, (RoundFailed, RegistryError)):
        return str(error)
    text = getattr(error, "message", None) or str(error)
    return f"{type(error).__name__}: {text}"


def _snapshot_json(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "path": str(snapshot.path),
        "rows": snapshot.rows,
        "conversations": snapshot.conversations,
        "watermark_from": snapshot.watermark_from,
        "watermark_to": snapshot.watermark_to,
        "pii_found": snapshot.pii_found,
    }
