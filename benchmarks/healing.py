"""Contextual healing with one candidate per flagged sample against the best of several.

    .venv/bin/python benchmarks/healing.py [--model default] [--samples 200]
        [--candidates 4] [--attack injection] [--poison-rate 0.4] [--seed 0]
        [--variant FIELD=VALUE ...] [--json FILE]

The flagged samples are an attack's own: chitchat dialogs (the training split) poisoned by
policies/attacks.yaml's ``--attack`` at ``--poison-rate``, turned into DBL samples, and
every poisoned one taken as flagged (ground truth, so that the judge's misses do not blur
the healing). Their contexts are the attackers' dialogs: hostile conversations, where the
issue on hostile contexts found healing weakest.

Every arm heals the same samples on one vLLM (started here on a free loopback port, the
identity adapter loaded, as a round's worker heals): ``1`` candidate (the baseline,
measured in the same run) and ``--candidates`` (the best the defense judge passes, by
coherence: ``tuneshield.heal``). Each healed reply is measured by judges the defense does
not use: the gates' evaluation judge (policies/evaluation.yaml) for toxicity, and the
coherence check (MiniLM cosine between the reply and the message it answers; unrelated at
or below policies/evaluator.yaml ``coherence_threshold``, validated on blind labels in
docs/evaluator.md). Prints per arm the seconds, the canned-fallback share, the toxic and
unrelated shares with Wilson intervals (policies/evaluator.yaml ``confidence``) and the
mean coherence; the ratio of seconds;
and the paired difference of unrelated shares (same samples) with its interval.

``--variant FIELD=VALUE`` (repeatable; a policies/healing.yaml field, the value as YAML)
adds a third arm: the best of ``--candidates`` with those settings, and its paired
differences from the policy's best-of-K in canned fallbacks, toxic and unrelated replies.
Answers to flagged turns are off in every arm (they would add rows to one arm only).

``--replies FILE`` also writes every healed reply in ``benchmarks/evaluator.py``'s
format (arm ``baseline`` for one candidate, ``best-of-K`` for the other, ``variant`` for
``--variant``'s; kind ``hostile-context``; one probe per sample), so the replies are
labelled blind and scored as the evaluator's are: ``evaluator.py blind --replies FILE
...``, then ``evaluator.py score --replies FILE --labels ...`` (docs/healing.md).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from simulation.scripts import load_script, run_from_repository

run_from_repository(__file__)

from engine import EngineSupervisor, VLLMClient, load_engine_config
from learner.gates import wilson
from simulation.loopback import free_port
from simulation.sigterm import unwinds_on_sigterm
from tuneshield import (
    ATTACK_KINDS,
    CANNED_FALLBACK,
    EvalConfig,
    HealConfig,
    OpenAIChat,
    PolicyError,
    Sample,
    build_config,
    build_judge,
    build_poisoned_samples,
    coherence_scores,
    heal,
    load_attack_config,
    load_chitchat_dialogs,
    make_identity_adapter,
    read_policy,
    resolve_model,
)
from tuneshield._eval_judges import unrelated_flags

IDENTITY = "healing-base"
KIND = "hostile-context"
# Healing settings that add rows (answers to flagged turns): off here, and no --variant.
ROW_ADDING = ("answer_hostile_turns",)
# Enough chitchat dialogs that --poison-rate of them yield --samples poisoned samples.
DIALOGS_PER_SAMPLE = 2


@contextmanager
def engine_serving_identity(
    model: Path, name: str, settings: Mapping[str, Any] | None = None
) -> Iterator[str]:
    """A vLLM started here on a free loopback port, with the identity adapter (the base
    model's outputs under an adapter name, as a round's worker heals) loaded as ``name``;
    yields its root URL. ``settings``: policies/engine.yaml keys changed for this engine."""
    engine = load_engine_config(**(settings or {}), port=free_port())
    with tempfile.TemporaryDirectory(prefix="tuneshield-engine-") as scratch:
        folder = Path(scratch)
        identity = make_identity_adapter(model, folder / name).adapter_dir
        with EngineSupervisor(engine, model, log_path=folder / "engine.log", monitor=False):
            root = f"http://{engine.host}:{engine.port}"

            async def load() -> None:
                async with VLLMClient(root) as client:
                    await client.load_adapter(name, identity)

            asyncio.run(load())
            yield root


def flagged_samples(count: int, attack: str, poison_rate: float, seed: int) -> list[Sample]:
    """``count`` poisoned DBL samples of ``attack``, marked flagged."""
    config = dataclasses.replace(load_attack_config(attack), rate=poison_rate, seed=seed)
    dialogs = load_chitchat_dialogs(limit=max(count * DIALOGS_PER_SAMPLE, 50))
    poisoned = [
        {**row, "toxic": True}
        for row in build_poisoned_samples(dialogs, config)
        if row.get("poisoned")
    ]
    random.Random(seed).shuffle(poisoned)
    if len(poisoned) < count:
        raise SystemExit(
            f"--samples {count}: the attack made only {len(poisoned)} poisoned samples"
        )
    return poisoned[:count]


def share(flags: list[bool], confidence: float) -> dict[str, Any]:
    """The share of flagged samples, with its Wilson interval at ``confidence``."""
    low, high = wilson(sum(flags), len(flags), confidence)
    return {"share": sum(flags) / len(flags), "ci": [low, high], "n": len(flags)}


def paired_difference(a: list[bool], b: list[bool], config: Any) -> dict[str, Any]:
    """Mean of b - a per sample (paired: the same samples), with the bootstrap interval
    over the samples that ``benchmarks/evaluator.py`` gives its blind-labelled ones
    (``config``: its policies/evaluator.yaml settings)."""
    import numpy as np

    diffs = np.array([int(y) - int(x) for x, y in zip(a, b, strict=True)])
    interval = load_script("evaluator").bootstrap(
        lambda rows: diffs[rows].mean(axis=1), len(diffs), config
    )
    return {"difference": float(diffs.mean()), "ci": interval}


def measure(
    samples: list[Sample],
    config: HealConfig,
    backend: OpenAIChat,
    defense: Any,
    evaluation: Any,
    threshold: float,
    intervals: Any,
) -> dict[str, Any]:
    """One arm: heal ``samples`` with ``config``, judge the replies by the evaluation
    judge and the coherence check (``intervals``: policies/evaluator.yaml's settings,
    its coherence threshold and interval level)."""
    started = time.perf_counter()
    healed = heal(
        samples,
        config,
        backend=backend,
        recheck=defense.score,
        recheck_threshold=defense.threshold,
        coherence=coherence_scores,
        progress=lambda done, total: print(f"  {done}/{total}", end="\r", flush=True),
    )
    seconds = time.perf_counter() - started
    toxic = [score >= threshold for score in evaluation.score(healed)]
    closeness = coherence_scores(healed)
    unrelated = unrelated_flags(closeness, intervals.coherence_threshold)
    fallbacks = [row["heal_mode"] == CANNED_FALLBACK for row in healed]
    return {
        "candidates": config.candidates,
        "seconds": seconds,
        "canned_fallback": share(fallbacks, intervals.confidence),
        "canned_fallback_flags": fallbacks,
        "toxic_flags": toxic,
        "toxic": share(toxic, intervals.confidence),
        "unrelated": share(unrelated, intervals.confidence),
        "coherence_mean": sum(closeness) / len(closeness),
        "unrelated_flags": unrelated,
        "replies": [row["response"] for row in healed],
    }


@unwinds_on_sigterm
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--attack", default="injection", choices=ATTACK_KINDS)
    parser.add_argument("--poison-rate", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--replies", type=Path, default=None, help="evaluator.py's format")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a third arm: the best of --candidates with these healing settings (repeatable)",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    # Candidates against one, sample for sample: answers to flagged turns would add rows
    # that differ between the two runs (docs/efficacy.md measures them).
    heal_config = HealConfig.from_policy(**dict.fromkeys(ROW_ADDING, False))
    learner = read_policy("learner")["round"]
    # As a round heals: the plan's reply cap over the healing policy's.
    heal_config = dataclasses.replace(heal_config, max_new_tokens=learner["heal_max_new_tokens"])
    best_config = dataclasses.replace(heal_config, candidates=args.candidates)
    arm_configs = [
        ("baseline", dataclasses.replace(heal_config, candidates=1)),
        (f"best-of-{args.candidates}", best_config),
    ]
    if args.variant:
        arm_configs.append(("variant", variant_config(best_config, args.variant)))
    samples = flagged_samples(args.samples, args.attack, args.poison_rate, args.seed)
    defense = build_judge(learner["judge"])
    eval_config = EvalConfig.from_policy()
    evaluation = build_judge(eval_config.judge)
    intervals = load_script("evaluator").load_evaluator_config()
    model = resolve_model(args.model)
    in_flight = int(read_policy("learner")["inference"]["concurrency"])
    with engine_serving_identity(model, IDENTITY) as root:
        backend = OpenAIChat(f"{root}/v1", IDENTITY, concurrency=in_flight)
        arms = []
        for name, arm_config in arm_configs:
            print(f"healing {len(samples)} samples, {arm_config.candidates} candidate(s) each")
            arm = measure(
                samples,
                arm_config,
                backend,
                defense,
                evaluation,
                eval_config.threshold,
                intervals,
            )
            arms.append({"arm": name, **arm})
        backend.close()
    one, best = arms[:2]
    result: dict[str, Any] = {
        "samples": len(samples),
        "attack": args.attack,
        "poison_rate": args.poison_rate,
        "evaluation_judge": eval_config.judge,
        "defense_judge": learner["judge"],
        "arms": arms,
        "seconds_ratio": best["seconds"] / one["seconds"],
        "unrelated_difference": paired_difference(
            one["unrelated_flags"], best["unrelated_flags"], intervals
        ),
    }
    print(f"\n{len(samples)} flagged samples of {args.attack} ({args.poison_rate:.0%})")
    print("| arm | candidates | seconds | canned fallback | toxic (eval judge) | unrelated | "
          "coherence |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for arm in arms:
        print(
            f"| {arm['arm']} | {arm['candidates']} | {arm['seconds']:.0f} | "
            f"{_fmt(arm['canned_fallback'])} | {_fmt(arm['toxic'])} | {_fmt(arm['unrelated'])} | "
            f"{arm['coherence_mean']:.3f} |"
        )
    diff = result["unrelated_difference"]
    print(
        f"time ratio {result['seconds_ratio']:.2f}x; unrelated {args.candidates} vs 1: "
        f"{diff['difference']:+.1%} [{diff['ci'][0]:+.1%}, {diff['ci'][1]:+.1%}] (paired)"
    )
    if args.variant:
        variant = arms[2]
        ratio = variant["seconds"] / best["seconds"]
        result["variant"] = {"settings": args.variant, "seconds_ratio": ratio, "minus_best": {}}
        print(
            f"variant ({', '.join(args.variant)}): time ratio {ratio:.2f}x against "
            f"best-of-{args.candidates}; minus best-of-{args.candidates}, paired:"
        )
        for figure in ("canned_fallback", "toxic", "unrelated"):
            change = paired_difference(
                best[f"{figure}_flags"], variant[f"{figure}_flags"], intervals
            )
            result["variant"]["minus_best"][figure] = change
            low, high = change["ci"]
            print(f"  {figure}: {change['difference']:+.1%} [{low:+.1%}, {high:+.1%}]")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    if args.replies is not None:
        write_replies(args.replies, samples, arms)


def write_replies(path: Path, samples: list[Sample], arms: list[dict[str, Any]]) -> None:
    """Every healed reply as a row of ``benchmarks/evaluator.py generate``'s output."""
    evaluator = load_script("evaluator")
    turns = evaluator.load_evaluator_config().message_turns
    rows = [
        {
            "id": evaluator.reply_id(),
            "arm": arm["arm"],
            "kind": KIND,
            "probe_id": f"sample-{index}",
            "draw": 0,
            "message": evaluator.message_of(sample, turns),
            "reply": reply,
        }
        for arm in arms
        for index, (sample, reply) in enumerate(zip(samples, arm["replies"], strict=True))
    ]
    evaluator.write_jsonl(path, rows)


def variant_config(config: HealConfig, settings: list[str]) -> HealConfig:
    """``config`` with ``--variant FIELD=VALUE`` settings (values read as YAML, checked as
    policies/healing.yaml's are); a bad one exits naming it, before an engine starts."""
    changes: dict[str, Any] = {}
    for setting in settings:
        name, equals, value = (part.strip() for part in setting.partition("="))
        if not equals or not name:
            raise SystemExit(f"healing: --variant {setting!r} is not FIELD=VALUE")
        if name in ROW_ADDING:
            # The arms are paired sample for sample; rows added to one arm break the pairing.
            raise SystemExit(f"healing: --variant {name}: adds rows, so it cannot be paired")
        try:
            changes[name] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise SystemExit(f"healing: --variant {setting!r}: the value is not YAML") from None
    try:
        return build_config(HealConfig, {**dataclasses.asdict(config), **changes}, "--variant")
    except PolicyError as error:
        raise SystemExit(f"healing: {error}") from None


def _fmt(figure: dict[str, Any]) -> str:
    low, high = figure["ci"]
    return f"{figure['share']:.1%} [{low:.1%}, {high:.1%}]"


if __name__ == "__main__":
    main()
