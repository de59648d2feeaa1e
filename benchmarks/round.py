"""One learning round on the real stack, timed per stage.

    .venv/bin/python benchmarks/round.py [--model default|tiny|PATH] [--dialogs 1000]
        [--poison-rate 0.3] [--attack injection] [--user-turns 3] [--sft-epochs N]
        [--dpo-epochs N] [--work-dir DIR] [--json FILE] [--no-baseline]

Starts the stack as ``tuneshield serve`` does (engine through ``EngineSupervisor`` and the
gateway with its learner; loopback ports, a temporary data dir; ``--model tiny`` builds a
tiny random model for a quick run), with the dialog log already holding ``--dialogs``
conversations: chitchat training dialogs replayed by simulated users
(``simulation.users.plan_users``), ``--poison-rate`` of them rewritten by attackers
(``tuneshield.poison_dialogs``). They are logged the way the gateway logs them — one turn row
per request, the request carrying the history, the reply the dialog's next bot turn —
and written before the server starts (the gateway process is the DuckDB file's only
writer while it runs): this benchmark times the round, not chat.

Then one round through the admin API (``POST /admin/learner/run``), followed to its end
(``GET /admin/learner/runs/{id}``). Prints per stage (snapshot, classify, heal, sft, dpo,
gates, register, hot-swap, report, and the worker's own overhead: start-up, imports,
model loads) the seconds, the worker's peak RSS as the worker measures it, and the peak
RSS of the worker, the engine and the gateway sampled from ``/proc`` while the stage ran;
then samples, flagged (with the judge's precision and recall against the attackers'
ground truth), healed, training steps, the gate verdict, load → alias flip and the
total. Sampled RSS sums the processes of a group (shared pages count once per process).

The baseline, measured in the same run: the very same round with the defense off
(``round.defense: false``: no judge, no healing, no DPO), in a fresh data dir holding the
same dialogs. Per stage and in total, the seconds of both rounds side by side and their
ratio (TuneShield round / undefended round): the defense's cost in time and memory;
``--no-baseline`` skips it.

The training stages' work: per stage the tokens, the padding share and the FLOPs the worker
counted (``tuneshield._train.StageWork``: 4N + 6A per training token for a LoRA A on a
frozen base of N matrix weights below the LM head, 2(N + A) per DPO reference token, and
6H or 2H per position the head of H weights projects), the achieved FLOP/s,
and their share of the device's dense matmul peak in the training dtype, measured by a
microbenchmark in this process before the rounds (``measure_matmul_peak``; the worker runs
on the same machine with as many threads).

Round sizes: ``policies/learner.yaml`` ``round``, ``policies/training.yaml`` and
``policies/gates.yaml`` as they are, epochs overridable (a copy of ``policies/`` with the
overrides is passed to the server): the optimizer steps follow from the samples and the
epochs, never from a step cap. ``--model tiny`` also loosens the gates and runs one epoch
per stage (a random model's figures are noise).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml

from simulation.scripts import run_from_repository

run_from_repository(__file__)

from gateway import ADMIN_KEY_ENV, create_key
from learner import ROUNDS_FOLDER, STATUS_FILE, SUMMARY_FILE, read_status
from simulation.scripts import load_script
from simulation.sigterm import unwinds_on_sigterm
from simulation.users import SimUser, label_samples, plan_users
from store import COMPLETE_REPLY, DialogStore, KeyStore, TurnRecord, open_database, utcnow
from tuneshield import BOT_ROLE, USER_ROLE, load_attack_config, load_chitchat_dialogs, policies_dir

# The gate margins a random tiny model needs to pass: its figures are noise, the gates
# must run, not judge them (the same sizes as tests/e2e/test_learning_round_e2e.py).
# An effect this large needs one reply per kind, and no interval over one reply rejects.
TINY_GATES = {
    "samples_per_probe": 1, "max_new_tokens": 8, "perplexity_samples": 2,
    "effect_reference": 0.02, "effect_candidate": 0.98,
    "max_perplexity_ratio": 1e6, "min_relevance_ratio": 0.0,
}  # fmt: skip
TINY_ROUND = {"sft_epochs": 1, "dpo_epochs": 1, "heal_max_new_tokens": 8}
FINISHED = ("succeeded", "failed", "rejected")
POLL_S = 1.0
SAMPLE_S = 0.5
ROUND_TIMEOUT_S = 6 * 3600.0
CONVERSATION_PREFIX = "rb"
WORKER_MARK = "-m learner "  # the worker's command line: python -m learner ROUND_DIR
GIB = 2**30
# What the report keeps of each training stage's manifest entry.
TRAINING_KEYS = ("rows", "steps", "duration_s", "setup_s", "train_s", "tokens",
                 "reference_tokens", "padding_share", "tokens_per_s", "flops", "flops_per_s",
                 "peak_gpu_mb", "peak_rss_mb")  # fmt: skip


# -- the dialog log ----------------------------------------------------------------------


def plan_dialogs(
    count: int, poison_rate: float, attack: str, user_turns: int, seed: int
) -> list[SimUser]:
    """``count`` simulated users, ``round(poison_rate * count)`` of them attackers."""
    config = dataclasses.replace(load_attack_config(attack), rate=poison_rate, seed=seed)
    return plan_users(count, config, max_user_turns=user_turns, prefix=CONVERSATION_PREFIX)


def logged_turns(
    users: Sequence[SimUser], key_id: str, alias: str, adapter: str
) -> list[TurnRecord]:
    """The turn rows the gateway would have logged for ``users``' conversations.

    Request ``k`` carries the conversation so far and the user's ``k``-th message; its
    reply is the replayed dialog's ``k``-th bot turn (the last one again where the dialog
    has no more). Times are a second apart and end a minute ago, older than the
    learner's settle time.
    """
    bot_turns = {
        dialog["conversation_id"]: [t["content"] for t in dialog["turns"] if t["role"] == BOT_ROLE]
        for dialog in load_chitchat_dialogs(split="train")
    }
    total = sum(len(user.messages) for user in users)
    clock = utcnow() - timedelta(seconds=60 + total)
    rows: list[TurnRecord] = []
    for user in users:
        replies = bot_turns.get(user.source) or ["I see."]
        history: list[dict[str, str]] = []
        for index, message in enumerate(user.messages):
            history.append({"role": USER_ROLE, "content": message})
            reply = replies[min(index, len(replies) - 1)]
            clock += timedelta(seconds=1)
            rows.append(
                TurnRecord(
                    turn_id=secrets.token_hex(16),
                    conversation_id=user.conversation_id,
                    key_id=key_id,
                    created_at=clock,
                    alias=alias,
                    adapter=adapter,
                    request_messages=json.dumps(history),
                    reply=reply,
                    finish_reason=COMPLETE_REPLY,
                    prompt_tokens=None,
                    completion_tokens=None,
                    latency_ms=0.0,
                    ttft_ms=None,
                    stream=False,
                    guard_score=None,
                    guard_flag=False,
                    opt_out=False,
                )
            )
            history.append({"role": BOT_ROLE, "content": reply})
    return rows


def fill_dialog_log(db_path: Path, users: Sequence[SimUser], alias: str, adapter: str) -> int:
    """Log ``users``' conversations under a fresh (not opted-out) user key."""
    database = open_database(db_path)
    try:
        key = create_key(KeyStore(database), "round-benchmark")
        return DialogStore(database).insert(logged_turns(users, key.record.key_id, alias, adapter))
    finally:
        database.close()


def write_policies(folder: Path, round_overrides: dict[str, Any], gates: dict[str, Any]) -> Path:
    """A copy of the policies with the round's size and the gates overridden; the schedule
    off (this round is started by hand)."""
    shutil.copytree(policies_dir(), folder)
    learner = yaml.safe_load((folder / "learner.yaml").read_text(encoding="utf-8"))
    learner["round"].update(round_overrides)
    learner["schedule"]["enabled"] = False
    (folder / "learner.yaml").write_text(yaml.safe_dump(learner), encoding="utf-8")
    policy = yaml.safe_load((folder / "gates.yaml").read_text(encoding="utf-8"))
    policy.update(gates)
    (folder / "gates.yaml").write_text(yaml.safe_dump(policy), encoding="utf-8")
    return folder


# -- memory of the process tree ----------------------------------------------------------


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command may hold spaces and parentheses: ppid follows the last ')'.
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def tree_rss(root: int) -> dict[str, int]:
    """RSS of ``root`` (the gateway), the worker's process tree and the rest (the engine)."""
    children = _proc_children()
    usage = {"gateway": _rss(root), "worker": 0, "engine": 0}
    stack = [(pid, False) for pid in children.get(root, [])]
    while stack:
        pid, in_worker = stack.pop()
        in_worker = in_worker or WORKER_MARK in _cmdline(pid)
        usage["worker" if in_worker else "engine"] += _rss(pid)
        stack.extend((child, in_worker) for child in children.get(pid, []))
    return usage


@dataclass
class MemorySampler:
    """Samples ``tree_rss`` in a thread; peaks per stage (the run row's stage)."""

    root: int
    stage: str = "queued"
    peaks: dict[str, dict[str, int]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            usage = tree_rss(self.root)
            peak = self.peaks.setdefault(self.stage, dict.fromkeys(usage, 0))
            for group, value in usage.items():
                peak[group] = max(peak[group], value)

    def peak(self, stage: str | None = None) -> dict[str, float | None]:
        """Peak GiB per group for one stage (None: no sample), or over the whole run."""
        if stage is None:
            chosen = list(self.peaks.values())
        else:
            chosen = [self.peaks[stage]] if stage in self.peaks else []
        groups = ("gateway", "worker", "engine")
        return {g: max(p[g] for p in chosen) / GIB if chosen else None for g in groups}


# -- the round ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    model: str = "default"
    dialogs: int = 1000
    poison_rate: float = 0.3
    attack: str = "injection"
    user_turns: int = 3
    seed: int = 0
    round_overrides: dict[str, Any] = field(default_factory=dict)
    gates: dict[str, Any] = field(default_factory=dict)
    work_dir: Path | None = None
    baseline: bool = True
    """Also run the same round with the defense off (``round.defense: false``)."""


def follow_round(url: str, admin_key: str, sampler: MemorySampler) -> dict[str, Any]:
    """Start a round through the admin API and poll it to its end; the final run row."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    started = httpx.post(f"{url}/admin/learner/run", headers=headers, timeout=60)
    if started.status_code != 202:
        raise RuntimeError(f"POST /admin/learner/run: {started.status_code} {started.text}")
    run_id = started.json()["run_id"]
    origin = time.monotonic()
    shown = None
    while True:
        run: dict[str, Any] = httpx.get(
            f"{url}/admin/learner/runs/{run_id}", headers=headers, timeout=60
        ).json()
        sampler.stage = str(run.get("stage") or run["status"])
        if (run["status"], run["stage"]) != shown:
            shown = (run["status"], run["stage"])
            print(
                f"  {time.monotonic() - origin:7.1f} s  {run['status']:<9} {run['stage']}",
                file=sys.stderr,
                flush=True,
            )
        if run["status"] in FINISHED:
            run["wall_s"] = round(time.monotonic() - origin, 1)
            return run
        if time.monotonic() - origin > ROUND_TIMEOUT_S:
            raise RuntimeError(f"round {run_id} still running after {ROUND_TIMEOUT_S:.0f} s")
        time.sleep(POLL_S)


def status_stages(round_dir: Path, worker_s: float | None) -> dict[str, float]:
    """Seconds per worker stage from its status file, for a worker that did not finish:
    a stage runs from the previous stage's last event (its end) to its own last event;
    the last stage until the worker ended."""
    first: dict[str, datetime] = {}
    last: dict[str, datetime] = {}
    for event in read_status(round_dir / STATUS_FILE):
        if event.stage is not None and event.event in ("stage", "progress"):
            first.setdefault(event.stage, datetime.fromisoformat(event.time))
            last[event.stage] = datetime.fromisoformat(event.time)
    if not first or worker_s is None:
        return {}
    names = list(first)
    starts = [first[names[0]], *(last[name] for name in names[:-1])]
    ends = [*starts[1:], first[names[0]] + timedelta(seconds=worker_s)]
    pairs = zip(names, starts, ends, strict=True)
    return {name: (end - start).total_seconds() for name, start, end in pairs}


def stage_table(
    summary: dict[str, Any], sampler: MemorySampler, round_dir: Path
) -> list[dict[str, Any]]:
    """Rows: stage, seconds, the worker's own peak RSS, sampled peaks per group."""
    outer = {s["stage"]: s["seconds"] for s in summary.get("stages", [])}
    result = summary.get("result") or {}
    candidate = result.get("candidate") or {}
    inner = {s["stage"]: s for s in candidate.get("stages", [])}
    training = candidate.get("training") or {}
    rows: list[dict[str, Any]] = []

    def add(stage: str, seconds: float | None, worker_gib: float | None, sampled: str) -> None:
        # ``sampled``: the run row's stage whose samples count ("": none, too short).
        if seconds is None:
            return
        peaks = sampler.peak(sampled)
        rows.append({"stage": stage, "seconds": round(seconds, 2), "worker_peak_gib": worker_gib,
                     **{f"{g}_rss_gib": v for g, v in peaks.items()}})  # fmt: skip

    add("snapshot", outer.get("snapshot"), None, "snapshot")
    if not inner:
        # No result.json: the worker failed; its status file still dates its stages.
        for name, seconds in status_stages(round_dir, outer.get("worker")).items():
            if name != "snapshot":
                add(f"{name} (status)", seconds, None, name)
    for name in ("classify", "heal"):
        if name in inner:
            add(name, inner[name]["seconds"], inner[name]["peak_rss_gib"], name)
    # A stage that did not run (DPO in an undefended round) has no duration.
    trained = {name: stage for name, stage in training.items() if "duration_s" in stage}
    for name in ("sft", "dpo"):
        if name in trained:
            stage = trained[name]
            add(name, stage["duration_s"], stage["peak_rss_mb"] / 1024, name)
    if "gates" in inner:
        add("gates", inner["gates"]["seconds"], inner["gates"]["peak_rss_gib"], "gates")
    if "worker" in outer and inner:
        # Start-up, imports, snapshot read, model loads, adapter save: the worker's wall
        # time that no stage above accounts for.
        measured = sum(inner[s]["seconds"] for s in inner) - inner.get("train", {}).get(
            "seconds", 0.0
        )
        measured += sum(trained[s]["duration_s"] for s in ("sft", "dpo") if s in trained)
        add("worker overhead", outer["worker"] - measured, None, "")
    add("register", outer.get("register"), None, "register")
    add("hot-swap", outer.get("hotswap"), None, "hotswap")
    add("report", outer.get("report"), None, "")
    return rows


def judge_figures(round_dir: Path, users: Sequence[SimUser]) -> dict[str, Any] | None:
    """The defense judge's precision and recall on the round's samples (ground truth)."""
    from simulation.experiment import judge_quality
    from tuneshield import read_samples

    path = round_dir / "samples.jsonl"
    if not path.is_file():
        return None
    # Healing replaced the flagged targets: the ground truth knows the originals.
    trained = [
        {**s, "response": s.get("original_response") or s["response"]} for s in read_samples(path)
    ]
    samples = [s for s in label_samples(trained, users) if "toxic_score" in s]
    result = json.loads((round_dir / "result.json").read_text(encoding="utf-8"))
    threshold = result["candidate"]["threshold"]
    if not samples or threshold is None:
        return None
    poisoned = sum(bool(s["poisoned"]) for s in samples)
    return {"poisoned_samples": poisoned, **judge_quality(samples, float(threshold))}


def run_benchmark(config: BenchConfig) -> dict[str, Any]:
    """The round with TuneShield, then (``config.baseline``) the same round undefended: same
    dialogs, same model, a fresh data dir; the ratios say what the defense costs."""
    scratch = None
    if config.work_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="tuneshield-round-")
        work_dir = Path(scratch.name)
    else:
        work_dir = config.work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
    try:
        model = load_script("hotswap").resolve_bench_model(config.model, work_dir)
        users = plan_dialogs(
            config.dialogs, config.poison_rate, config.attack, config.user_turns, config.seed
        )
        # Before any stack starts: the machine is otherwise idle, as the worker's stages
        # mostly find it (the engine waits while the worker trains).
        peak = matmul_peak()
        report = run_round(config, model, users, work_dir / "defended", defense=True)
        report["matmul_peak"] = peak
        if config.baseline:
            baseline = run_round(config, model, users, work_dir / "undefended", defense=False)
            report["baseline"] = baseline
            report["ratio_to_undefended"] = {
                "round_s": _ratio(report["round_s"], baseline["round_s"]),
                **{
                    f"peak_{group}_rss": _ratio(value, baseline["peak_rss_gib"].get(group))
                    for group, value in report["peak_rss_gib"].items()
                },
            }
        return report
    finally:
        if scratch is not None:
            scratch.cleanup()


def _ratio(value: float | None, baseline: float | None) -> float | None:
    return None if value is None or not baseline else round(value / baseline, 2)


def matmul_peak() -> dict[str, Any]:
    """The dense matmul FLOP/s of the device the worker trains on, in its training dtype
    (policies/training.yaml ``bf16`` resolved here as the worker resolves it)."""
    from tuneshield import load_train_config
    from tuneshield._train import detect_device, measure_matmul_peak

    return measure_matmul_peak(detect_device(load_train_config().bf16))


def run_round(
    config: BenchConfig, model: str, users: Sequence[SimUser], work_dir: Path, *, defense: bool
) -> dict[str, Any]:
    """One round in ``work_dir`` (data dir, policies) on a log holding ``users``' dialogs."""
    hotswap = load_script("hotswap")
    tiny = config.model == "tiny"
    admin_key = os.environ.get(ADMIN_KEY_ENV) or "rb-admin-" + secrets.token_hex(16)
    data_dir = work_dir / "data"
    prepared = hotswap.prepare_data_dir(data_dir, model, [], admin_key)
    turns = fill_dialog_log(prepared.db_path, users, prepared.alias, prepared.initial)
    round_overrides = {
        **(TINY_ROUND if tiny else {}),
        **config.round_overrides,
        "defense": defense,
    }
    gates = {**(TINY_GATES if tiny else {}), **config.gates}
    policies = write_policies(work_dir / "policies", round_overrides, gates)
    env = {
        **(hotswap.TINY_ENGINE_ENV if tiny else {}),
        "TUNESHIELD_POLICIES_DIR": str(policies),
    }
    started = time.monotonic()
    with hotswap.ServeProcess(model, data_dir, admin_key, engine_env=env) as stack:
        startup_s = time.monotonic() - started
        assert stack.process is not None
        with MemorySampler(stack.process.pid) as sampler:
            idle = tree_rss(stack.process.pid)
            run = follow_round(stack.url, admin_key, sampler)
    round_dir = data_dir / ROUNDS_FOLDER / run["run_id"]
    summary = json.loads((round_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    result = summary.get("result") or {}
    candidate = result.get("candidate") or {}
    gates_result = result.get("gates")
    training = candidate.get("training") or {}
    return {
        "model": config.model,
        "defense": defense,
        "dialogs": config.dialogs,
        "poisoned_dialogs": sum(user.attacker for user in users),
        "logged_turns": turns,
        "stack_ready_s": round(startup_s, 1),
        "threads": os.environ.get("OMP_NUM_THREADS", "all"),
        "load_average": os.getloadavg(),
        "status": run["status"],
        "error": run.get("error"),
        "version": run.get("version"),
        "round_s": run["wall_s"],
        "stages": stage_table(summary, sampler, round_dir),
        "peak_rss_gib": sampler.peak(),
        "idle_rss_gib": {group: value / GIB for group, value in idle.items()},
        "snapshot": summary.get("snapshot"),
        "samples": candidate.get("samples"),
        "flagged": candidate.get("flagged"),
        "healed": candidate.get("healed"),
        "judge": candidate.get("judge"),
        "judge_quality": judge_figures(round_dir, users) if defense else None,
        "steps": {name: stage.get("steps", 0) for name, stage in training.items()},
        "training": {
            name: {key: stage.get(key) for key in TRAINING_KEYS}
            for name, stage in training.items()
            if "duration_s" in stage
        },
        "device": (candidate.get("hyperparameters") or {}).get("device"),
        "plan": summary.get("plan"),
        "gates": gates_result,
        "load_to_flip_s": summary.get("load_s"),
    }


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_report(report: dict[str, Any]) -> None:
    _print_round(report)
    baseline = report.get("baseline")
    if baseline is not None:
        print()
        print("baseline: the same round with the defense off (round.defense: false)")
        _print_round(baseline)
        print()
        _print_comparison(report, baseline)
    print()
    _print_training(report, baseline)


def stage_comparison(report: dict[str, Any], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """Per stage (both rounds' stages, in round order) and in total: seconds of the
    TuneShield round, of the undefended round, and their ratio."""
    ours = {row["stage"]: row["seconds"] for row in report["stages"]}
    theirs = {row["stage"]: row["seconds"] for row in baseline["stages"]}
    names = list(ours) + [name for name in theirs if name not in ours]
    rows = [{"stage": name, "tuneshield_s": ours.get(name), "undefended_s": theirs.get(name),
             "ratio": _ratio(ours.get(name), theirs.get(name))} for name in names]  # fmt: skip
    rows.append({"stage": "total", "tuneshield_s": report["round_s"],
                 "undefended_s": baseline["round_s"],
                 "ratio": _ratio(report["round_s"], baseline["round_s"])})  # fmt: skip
    return rows


def _print_comparison(report: dict[str, Any], baseline: dict[str, Any]) -> None:
    print("TuneShield round against the undefended round, same dialogs, same run")
    print(f"{'stage':>16}{'TuneShield s':>16}{'undefended s':>16}{'ratio':>10}")
    for row in stage_comparison(report, baseline):
        cells = ["-" if row[key] is None else f"{row[key]:.1f}"
                 for key in ("tuneshield_s", "undefended_s")]  # fmt: skip
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        print(f"{row['stage']:>16}{cells[0]:>16}{cells[1]:>16}{ratio:>10}")
    ratio = report["ratio_to_undefended"]
    print(
        "peak memory, TuneShield / undefended: "
        + ", ".join(
            f"{name} {value}"
            for name, value in ratio.items()
            if value is not None and name != "round_s"
        )
    )


def training_rows(report: dict[str, Any], peak: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per training stage: work, achieved FLOP/s and its share of the matmul peak."""
    rows = []
    for stage, figures in report.get("training", {}).items():
        achieved = figures.get("flops_per_s")
        share = achieved / peak["flops_per_s"] if peak and achieved is not None else None
        rows.append({"round": "TuneShield" if report["defense"] else "undefended",
                     "stage": stage, **figures, "share_of_peak": share})  # fmt: skip
    return rows


def _print_training(report: dict[str, Any], baseline: dict[str, Any] | None) -> None:
    peak = report.get("matmul_peak")
    device = report.get("device") or {}
    if peak:
        print(
            f"matmul peak (same run): {peak['flops_per_s']:.3g} FLOP/s, {peak['dtype']} "
            f"{peak['size']}x{peak['size']} products on {peak['device']}"
            + (f", {peak['threads']} threads" if peak.get("threads") else "")
            + (
                f"; the worker trained on {device.get('name')} in "
                f"{'bf16' if device.get('bf16') else 'fp32'} ({device.get('reason')})"
                if device
                else ""
            )
        )
    header = ("round", "stage", "rows", "steps", "tokens", "padding", "TFLOP", "seconds",
              "FLOP/s", "of peak")  # fmt: skip
    print("".join(f"{h:>12}" for h in header))
    rows = training_rows(report, peak) + (training_rows(baseline, peak) if baseline else [])
    for row in rows:
        flops, achieved, share = row.get("flops"), row.get("flops_per_s"), row["share_of_peak"]
        padding = row.get("padding_share")
        cells = [row["round"], row["stage"], str(row.get("rows")), str(row.get("steps")),
                 str(row.get("tokens")), "-" if padding is None else f"{padding:.1%}",
                 "-" if flops is None else f"{flops / 1e12:.1f}", f"{row['duration_s']:.1f}",
                 "-" if achieved is None else f"{achieved:.3g}",
                 "-" if share is None else f"{share:.1%}"]  # fmt: skip
        print("".join(f"{cell:>12}" for cell in cells))


def _print_round(report: dict[str, Any]) -> None:
    plan = report["plan"] or {}
    print(
        f"round ({'TuneShield' if report['defense'] else 'undefended'}): "
        f"model {report['model']}, {report['dialogs']} dialogs "
        f"({report['poisoned_dialogs']} attackers, {report['logged_turns']} logged turns), "
        f"sft_epochs {plan.get('sft_epochs')}, dpo_epochs {plan.get('dpo_epochs')}, "
        f"stack ready in {report['stack_ready_s']:.0f} s; "
        f"OMP_NUM_THREADS {report['threads']}, load average at the end "
        f"{report['load_average'][0]:.1f}"
    )
    header = ("stage", "seconds", "worker peak", "worker RSS", "engine RSS", "gateway RSS")
    print("".join(f"{h:>16}" for h in header) + "   (GiB)")
    for row in report["stages"]:
        cells = [row["stage"], f"{row['seconds']:.1f}", _gib(row["worker_peak_gib"]),
                 _gib(row["worker_rss_gib"]), _gib(row["engine_rss_gib"]),
                 _gib(row["gateway_rss_gib"])]  # fmt: skip
        print("".join(f"{cell:>16}" for cell in cells))
    peak = report["peak_rss_gib"]
    print(
        f"{'total':>16}{report['round_s']:>16.1f}{'':>16}{_gib(peak['worker']):>16}"
        f"{_gib(peak['engine']):>16}{_gib(peak['gateway']):>16}"
    )
    snapshot = report["snapshot"] or {}
    quality = report["judge_quality"] or {}
    print(
        f"snapshot {snapshot.get('rows')} turns / {snapshot.get('conversations')} conversations; "
        f"samples {report['samples']}, "
        + (
            f"flagged {report['flagged']} by {report['judge']}"
            if report["defense"]
            else "no judge (defense off)"
        )
        + (
            f" (precision {quality['precision']:.2f}, recall {quality['recall']:.2f} against "
            f"{quality['poisoned_samples']} poisoned samples)"
            if quality
            else ""
        )
        + f", healed {report['healed']}; training steps {report['steps']}"
    )
    gates = report["gates"]
    if gates is None:
        print("gates: skipped")
    else:
        verdict = "passed" if gates["passed"] else "REJECTED: " + "; ".join(gates["reasons"])
        print(f"gates: {verdict}; candidate {gates['candidate']} vs active {gates['active']}")
    print(
        f"round {report['status']}"
        + (f" -> {report['version']}" if report["version"] else "")
        + (
            f", load -> alias flip {report['load_to_flip_s']:.2f} s"
            if report["load_to_flip_s"]
            else ""
        )
        + (f": {report['error']}" if report["error"] else "")
    )


@unwinds_on_sigterm
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="default | tiny | a model folder")
    parser.add_argument("--dialogs", type=int, default=1000)
    parser.add_argument("--poison-rate", type=float, default=0.3)
    parser.add_argument("--attack", default="injection", help="policies/attacks.yaml kind")
    parser.add_argument("--user-turns", type=int, default=3, help="user turns per dialog")
    parser.add_argument("--seed", type=int, default=0, help="which dialogs, which attack")
    parser.add_argument("--sft-epochs", type=float, help="default: policies/learner.yaml")
    parser.add_argument("--dpo-epochs", type=float, help="default: policies/learner.yaml")
    parser.add_argument("--work-dir", type=Path, help="keep data dir, round and logs here")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the undefended round (the baseline)"
    )
    args = parser.parse_args()
    if args.dialogs < 1 or not 0.0 <= args.poison_rate <= 1.0 or args.user_turns < 2:
        parser.error("--dialogs >= 1, --poison-rate in [0, 1] and --user-turns >= 2")
    overrides = {"sft_epochs": args.sft_epochs, "dpo_epochs": args.dpo_epochs}
    config = BenchConfig(
        model=args.model,
        dialogs=args.dialogs,
        poison_rate=args.poison_rate,
        attack=args.attack,
        user_turns=args.user_turns,
        seed=args.seed,
        round_overrides={k: v for k, v in overrides.items() if v is not None},
        work_dir=args.work_dir,
        baseline=not args.no_baseline,
    )
    try:
        report = run_benchmark(config)
    except (RuntimeError, ValueError, httpx.HTTPError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print_report(report)
    print(json.dumps(report, indent=2, default=str))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    failed = "failed" in (report["status"], (report.get("baseline") or {}).get("status"))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
