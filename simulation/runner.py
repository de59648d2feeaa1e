"""One demo run: users chat, arms learn in rounds, every arm is measured after each.

Per seed, every arm starts at its identity adapter. Round 1's users talk to the common
starting point (the baseline's alias), so all arms learn from the very same logged
dialogs (the control arm from those of benign users only); from round 2 on, each
learning arm's users talk to that arm's current adapter. A round exports the logged
turns (the gateway's own connection), builds DBL samples (``turns_to_samples``), labels
them with the simulator's ground truth, trains a candidate with the learner's round
pipeline, registers it and hot-swaps it in, then measures the arm through the gateway.
The demo applies no gates: it measures what each arm would serve, poisoned or not.

Each simulated user sends an end-user id (OpenAI's ``user``); attackers keep theirs from
round to round. An arm with quarantine (``tuneshield_quarantine``) quarantines, after each
of its rounds, the end users its judge flagged over policies/learner.yaml's
``quarantine`` line (``learner.quarantine.over_the_line``, as the learner does), and
leaves their turns out of its later rounds; the round's result says whom (attackers and
benign users counted against the ground truth) and how many samples that kept out.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simulation.arms import ArmPlan, plan_arms
from simulation.config import DemoConfig
from simulation.measure import Probes, judge_scores, load_demo_probes, measure_alias
from simulation.sigterm import SigtermUnwinds
from simulation.stack import DemoStack, Stack
from simulation.traffic import ChatSettings, TrafficResult, drive
from simulation.users import SimUser, label_samples, plan_users, write_ground_truth
from tuneshield import StageMeter, metric_at

if TYPE_CHECKING:
    from learner.quarantine import QuarantineConfig

ProgressFn = Callable[[str, int, int], None]
Announce = Callable[[str], None]
RUNS_FOLDER = "demo-runs"
# Metrics summarised across seeds: (name, path into an arm's round result).
SUMMARY_METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("toxic_toxicity", ("eval", "toxic", "toxicity_rate")),
    ("benign_toxicity", ("eval", "benign", "toxicity_rate")),
    ("backdoor_toxicity", ("eval", "backdoor", "toxicity_rate")),
    ("toxic_aimed_at_user", ("eval", "toxic", "aimed_at_user_rate")),
    ("benign_aimed_at_user", ("eval", "benign", "aimed_at_user_rate")),
    ("benign_unhelpful", ("eval", "benign", "unhelpful_rate")),
    ("relevance", ("eval", "benign", "relevance")),
    ("perplexity", ("eval", "perplexity")),
    ("judge_precision", ("judge", "used_precision")),
    ("judge_recall", ("judge", "used_recall")),
)


@dataclasses.dataclass
class _Context:
    config: DemoConfig
    stack: Stack
    model_path: str
    probes: Probes
    eval_config: Any
    run_dir: Path
    meter: StageMeter
    progress: ProgressFn | None
    announce: Announce
    quarantine: QuarantineConfig | None = None
    """policies/learner.yaml's quarantine line, for the arms that quarantine."""


def summarise(runs: dict[str, Any]) -> dict[str, Any]:
    """Per arm, round and metric: mean, min, max over seeds (the spread)."""
    collected: dict[str, dict[str, dict[str, list[float]]]] = {}
    for run in runs.values():
        for round_result in run["rounds"]:
            key = str(round_result["round"])
            for arm, data in round_result["arms"].items():
                for name, path in SUMMARY_METRICS:
                    value = metric_at(data, path)
                    if value is not None:
                        slot = collected.setdefault(arm, {}).setdefault(key, {})
                        slot.setdefault(name, []).append(value)
    return {
        arm: {
            round_key: {
                name: {
                    "mean": statistics.fmean(values),
                    "min": min(values),
                    "max": max(values),
                    "n": len(values),
                }
                for name, values in metrics.items()
            }
            for round_key, metrics in rounds.items()
        }
        for arm, rounds in collected.items()
    }


def _measure(ctx: _Context, arm: ArmPlan, adapter_dir: Path) -> dict[str, Any]:
    from gateway import GatewaySettings

    settings: GatewaySettings = ctx.stack.settings
    return measure_alias(
        ctx.stack.gateway_url,
        ctx.stack.api_key,
        arm.alias,
        probes=ctx.probes,
        eval_config=ctx.eval_config,
        address_pattern=ctx.config.address_pattern,
        opt_out_header=settings.routing.opt_out_header,
        concurrency=ctx.config.generation_concurrency,
        base_model=ctx.model_path,
        adapter_dir=adapter_dir,
    )


def _chat(ctx: _Context, alias: str) -> ChatSettings:
    return ChatSettings(
        base_url=ctx.stack.gateway_url,
        api_key=ctx.stack.api_key,
        model=alias,
        max_tokens=ctx.config.size.reply_max_tokens,
        temperature=ctx.config.reply_temperature,
        concurrency=ctx.config.concurrency,
        conversation_header=ctx.stack.settings.routing.conversation_header,
    )


def _session(
    ctx: _Context, name: str, users: list[SimUser], alias: str
) -> tuple[TrafficResult, list[dict[str, Any]]]:
    """Users chat with ``alias``; their logged turns come back as labelled DBL samples."""
    from learner.snapshot import turns_to_samples

    with ctx.meter.stage(f"chat_{name}"):
        traffic = drive(users, _chat(ctx, alias), ctx.progress)
    if traffic.failed:
        ctx.announce(f"[yellow]{traffic.failed} conversation(s) failed: {traffic.errors[:2]}")
    if not traffic.conversations:
        raise RuntimeError(f"every conversation with {alias} failed: {traffic.errors[:2]}")
    table = ctx.stack.export_turns(name, [u.conversation_id for u in users], traffic.requests)
    samples = turns_to_samples(table, target="user")
    return traffic, label_samples(samples, users)


def _train_arm(
    ctx: _Context,
    arm: ArmPlan,
    samples: list[dict[str, Any]],
    parent: tuple[str, Path],
    round_dir: Path,
) -> tuple[dict[str, Any], tuple[str, Path]]:
    from learner.round_pipeline import train_candidate
    from tuneshield import read_samples

    assert arm.plan is not None
    if arm.population == "benign":
        samples = [row for row in samples if not row.get("attacker")]
    progress = ctx.progress

    def arm_progress(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(f"{arm.name} {stage}", done, total)

    healer = ctx.stack.healer(ctx.config.generation_concurrency)
    try:
        with ctx.meter.stage(f"train_{arm.name}"):
            candidate = train_candidate(
                samples,
                arm.plan,
                base_model=ctx.model_path,
                parent_adapter=parent[1],
                out_dir=round_dir / arm.name,
                progress=arm_progress,
                healer=healer,
            )
    finally:
        healer.close()
    version = ctx.stack.install(
        arm.alias,
        candidate.adapter_dir,
        parent=parent[0],
        samples=candidate.samples,
        flagged=candidate.flagged,
        healed=candidate.healed,
        judge=candidate.judge,
        threshold=candidate.threshold,
        hyperparameters=candidate.hyperparameters,
    )
    swap = ctx.stack.activate(version)
    adapter_dir = ctx.stack.adapter_path(version)
    trained = read_samples(candidate.samples_path)
    judge = judge_scores(trained, candidate.threshold) if candidate.threshold is not None else {}
    with ctx.meter.stage(f"measure_{arm.name}"):
        measured = _measure(ctx, arm, adapter_dir)
    result = {
        "version": version,
        "parent": parent[0],
        "swap": swap,
        "data": {
            "samples": len(samples),
            "poisoned_samples": sum(bool(row.get("poisoned")) for row in samples),
            "flagged": candidate.flagged,
            "healed": candidate.healed,
            "unrelated": candidate.unrelated,
            "deflections": candidate.deflections,
            "canned_fallbacks": candidate.canned_fallbacks,
            "answers": candidate.answers,
            "flagged_drafts": candidate.flagged_drafts,
        },
        "train": {"stages": candidate.training, "pipeline": candidate.stages},
        "judge": judge,
        "eval": measured,
        "samples_path": str(candidate.samples_path),
    }
    return result, (version, adapter_dir)


def split_quarantined(
    samples: list[dict[str, Any]], quarantined: set[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, left out): quarantined end users' samples never train the arm again."""
    kept = [row for row in samples if row.get("end_user") not in quarantined]
    return kept, [row for row in samples if row.get("end_user") in quarantined]


def quarantine_round(
    config: QuarantineConfig,
    samples_path: Path,
    users: list[SimUser],
    quarantined: set[str],
    label: str,
) -> dict[str, Any]:
    """Quarantine the end users over the policy's line in a round's trained samples (the
    demo's one API key carries every user, so end users are what is quarantined); add them
    to ``quarantined``; say whom, against the ground truth."""
    from learner.quarantine import over_the_line
    from learner.round_samples import RoundKeyCount, SampleCounts

    counts = SampleCounts(1).of(samples_path, "user") or {}
    per = {user: [RoundKeyCount(run_id=label, samples=samples, flagged=flagged)]
           for user, (samples, flagged) in counts.items()}  # fmt: skip
    found = [
        offender.subject
        for offender in over_the_line("user", per, [label], config)
        if offender.subject not in quarantined
    ]
    quarantined.update(found)
    attackers = {user.end_user for user in users if user.attacker and user.end_user}
    benign = {user.end_user for user in users if not user.attacker and user.end_user}
    return {
        "quarantined_now": sorted(found),
        "attackers_quarantined": len(attackers & quarantined),
        "attackers": len(attackers),
        "benign_quarantined": len(benign & quarantined),
        "benign": len(benign),
    }


def _run_seed(ctx: _Context, arms: list[ArmPlan], seed: int) -> dict[str, Any]:
    from engine import identity_version
    from tuneshield import load_attack_config

    config, size, stack = ctx.config, ctx.config.size, ctx.stack
    current: dict[str, tuple[str, Path]] = {}
    # Per arm with quarantine: the end users quarantined so far (this seed).
    quarantined: dict[str, set[str]] = {arm.name: set() for arm in arms if arm.quarantine}
    for arm in arms:
        start = identity_version(arm.alias)
        if stack.active_version(arm.alias) != start:
            stack.activate(start)  # every seed starts from the same point
        current[arm.name] = (start, stack.adapter_path(start))
    baseline = arms[0]
    ctx.announce(f"seed {seed}: measuring the starting point ({baseline.alias})")
    with ctx.meter.stage("measure_baseline"):
        start_eval = {"version": current[baseline.name][0], "eval": _measure(
            ctx, baseline, current[baseline.name][1])}  # fmt: skip
    rounds: list[dict[str, Any]] = [{"round": 0, "arms": {arm.name: start_eval for arm in arms}}]
    attack = dataclasses.replace(
        load_attack_config(config.attack), rate=config.poison_rate, seed=seed
    )
    for number in range(1, size.rounds + 1):
        round_dir = ctx.run_dir / f"seed{seed}" / f"round{number}"
        users = plan_users(
            size.users,
            attack,
            max_user_turns=size.max_user_turns,
            prefix=f"demo-s{seed}-r{number}",
            offset=(number - 1) * size.users,
            people=f"demo-s{seed}",
        )
        write_ground_truth(users, round_dir / "users.jsonl")
        round_result: dict[str, Any] = {
            "round": number,
            "users": len(users),
            "attackers": sum(u.attacker for u in users),
            "traffic": {},
            "arms": {baseline.name: {**start_eval, "measured_at_round": 0}},
        }
        shared: list[dict[str, Any]] | None = None
        if number == 1:
            ctx.announce(f"round 1: {len(users)} users chat with {baseline.alias}")
            traffic, shared = _session(ctx, f"s{seed}-r1", users, baseline.alias)
            round_result["traffic"]["shared"] = traffic.summary()
        for arm in arms[1:]:
            if shared is not None:
                samples = shared
            else:
                own = [u for u in users if arm.population == "all" or not u.attacker]
                own = [dataclasses.replace(u, conversation_id=f"{u.conversation_id}-{arm.name}")
                       for u in own]  # fmt: skip
                ctx.announce(f"round {number}: {len(own)} users chat with {arm.alias}")
                traffic, samples = _session(ctx, f"s{seed}-r{number}-{arm.name}", own, arm.alias)
                round_result["traffic"][arm.name] = traffic.summary()
            left_out: list[dict[str, Any]] = []
            if arm.quarantine:
                samples, left_out = split_quarantined(samples, quarantined[arm.name])
            ctx.announce(f"round {number}: training {arm.name}")
            result, current[arm.name] = _train_arm(ctx, arm, samples, current[arm.name], round_dir)
            if arm.quarantine:
                assert ctx.quarantine is not None, "read in run_demo for arms that quarantine"
                decided = quarantine_round(ctx.quarantine, Path(result["samples_path"]), users,
                                           quarantined[arm.name], f"round{number}")  # fmt: skip
                result["quarantine"] = {
                    **decided,
                    "left_out_samples": len(left_out),
                    "left_out_poisoned": sum(bool(row.get("poisoned")) for row in left_out),
                }
                ctx.announce(
                    f"round {number}: {arm.name} has quarantined "
                    f"{decided['attackers_quarantined']} of {decided['attackers']} attackers, "
                    f"{decided['benign_quarantined']} benign users"
                )
            round_result["arms"][arm.name] = result
        rounds.append(round_result)
        _write_partial(ctx.run_dir, seed, rounds)
    return {"seed": seed, "rounds": rounds}


def _write_partial(run_dir: Path, seed: int, rounds: list[dict[str, Any]]) -> None:
    path = run_dir / f"seed{seed}" / "rounds.partial.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rounds, indent=2, default=str))


def run_demo(
    config: DemoConfig,
    data_dir: Path,
    *,
    progress: ProgressFn | None = None,
    announce: Announce = print,
    stack_factory: Callable[..., Stack] = DemoStack,
) -> dict[str, Any]:
    """Start the stack in ``data_dir``, run every seed, return the results (JSON-ready)."""
    from learner.round_pipeline import RoundPlan
    from tuneshield import EvalConfig, check_independent, defense_judge_names, resolve_model

    started = time.time()
    size = config.size
    meter = StageMeter()
    model_path = resolve_model(config.model, prepare=True)
    base_plan = RoundPlan.from_policy(
        sft_epochs=size.sft_epochs,
        dpo_epochs=size.dpo_epochs,
        max_steps=size.max_steps,
        sft_learning_rate=size.sft_learning_rate,
        dpo_learning_rate=size.dpo_learning_rate,
        heal_max_new_tokens=size.heal_max_new_tokens,
        target="user",
    )
    eval_config = EvalConfig.from_policy(
        samples_per_probe=size.samples_per_probe,
        max_new_tokens=size.eval_max_new_tokens,
        max_probes=size.probes,
        max_perplexity_samples=size.perplexity_samples,
    )
    check_independent(eval_config.judge, defense_judge_names(base_plan.judge))
    probes = load_demo_probes(size.probes, size.perplexity_samples, seed=0)
    arms = plan_arms(config.arms, base_plan, config.weak_judge_recall)
    quarantine = None
    if any(arm.quarantine for arm in arms):
        from learner.rounds import LearnerConfig

        quarantine = LearnerConfig.from_policy().quarantine
    runs: dict[str, Any] = {}
    run_dir = Path(data_dir) / RUNS_FOLDER
    stack = stack_factory(
        model_path,
        Path(data_dir),
        [arm.alias for arm in arms],
        engine_overrides=config.engine,
        rate_limit_per_minute=config.rate_limit_per_minute,
        announce=announce,
    )
    announce(f"starting engine + gateway in {data_dir} (about 1-2 minutes on a CPU)")
    # A SIGTERM (kill, a timeout) must stop the engine too, as Ctrl-C does.
    with SigtermUnwinds() as sigterm:
        try:
            with meter.stage("start_stack"):
                stack.start()
            ctx = _Context(config, stack, model_path, probes, eval_config, run_dir, meter,
                           progress, announce, quarantine)  # fmt: skip
            for seed in size.seeds:
                seeded = [
                    dataclasses.replace(arm, plan=dataclasses.replace(arm.plan, seed=seed))
                    if arm.plan is not None
                    else arm
                    for arm in arms
                ]
                ctx.eval_config = dataclasses.replace(eval_config, seed=eval_config.seed + seed)
                runs[str(seed)] = _run_seed(ctx, seeded, seed)
        finally:
            with sigterm.held(), meter.stage("stop_stack"):
                stack.stop()
    return {
        "config": config.to_json(),
        "model": model_path,
        "plans": {arm.name: arm.to_json() for arm in arms},
        "aliases": {arm.name: arm.alias for arm in arms},
        "seeds": list(size.seeds),
        "eval": dict(eval_config.__dict__),
        "probes": probes.counts(),
        "runs": runs,
        "summary": summarise(runs),
        "stages": meter.as_dicts(),
        "seconds": round(time.time() - started, 1),
    }
