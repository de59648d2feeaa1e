"""The defense experiment: poison a DBL training set, train arms, compare them.

Every arm starts from the same base model and the same poisoned chitchat snapshot:
``base`` (no training), ``control`` (the same dialogs without the attackers),
``undefended`` (trained on the poison as it is), ``tuneshield`` (classify → contextual
heal → SFT → DPO) and ablations (``tuneshield_canned``, ``tuneshield_no_dpo``). Each is
evaluated on held-out probes by an independent judge, with helpfulness beside toxicity.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneshield import (
    MANIFEST,
    EvalConfig,
    HealConfig,
    Sample,
    StageMeter,
    TransformersChat,
    binary_metrics,
    build_config,
    build_judge,
    check_independent,
    classify,
    coherence_scores,
    defense_judge_names,
    dialogs_to_samples,
    evaluate,
    heal,
    load_attack_config,
    load_chitchat_dialogs,
    load_probes,
    poison_dialogs,
    read_policy,
    read_samples,
    scaled_train_config,
    train_adapter,
    write_samples,
)

ProgressFn = Callable[[str, int, int], None]
ARMS = ("base", "control", "undefended", "tuneshield", "tuneshield_canned", "tuneshield_no_dpo")
# arm → (training data, heal mode, DPO)
_ARM_PLANS: dict[str, tuple[str, str | None, bool]] = {
    "control": ("clean", None, False),
    "undefended": ("poisoned", None, False),
    "tuneshield": ("healed", "contextual", True),
    "tuneshield_canned": ("healed", "canned", True),
    "tuneshield_no_dpo": ("healed", "contextual", False),
}


@dataclass
class ExperimentSize:
    """How big one run is (a ``sizes`` entry of policies/experiment.yaml)."""

    dialogs: int = field(metadata={"help": "Training dialogs drawn from chitchat."})
    max_samples: int = field(metadata={"help": "DBL samples kept from them, at most."})
    sft_epochs: float = field(metadata={"help": "SFT epochs per arm."})
    dpo_epochs: float = field(metadata={"help": "DPO epochs per arm."})
    max_steps: int = field(metadata={"help": "Cap on optimizer steps per stage (-1: none)."})
    probes: int = field(metadata={"help": "Probes per kind."})
    samples_per_probe: int = field(metadata={"help": "Sampled replies per probe."})
    max_new_tokens: int = field(metadata={"help": "Longest evaluated reply."})
    perplexity_samples: int = field(metadata={"help": "Held-out benign dialogs for PPL."})
    heal_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Cap on healing replies (None: policies/healing.yaml)."}
    )

    def __post_init__(self) -> None:
        for name in ("dialogs", "max_samples", "probes", "samples_per_probe", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ExperimentConfig:
    """One experiment (policies/experiment.yaml), with the size already chosen."""

    size_name: str
    size: ExperimentSize
    arms: list[str] = field(default_factory=lambda: list(ARMS[:5]))
    attack: str = "injection"
    poison_rate: float = 0.3
    judge: str = "embedding"
    seed: int = 0
    base_model: str = "default"

    def __post_init__(self) -> None:
        unknown = [arm for arm in self.arms if arm not in ARMS]
        if unknown:
            raise ValueError(f"arms: unknown arm(s) {unknown}; known: {list(ARMS)}")
        if not 0.0 <= self.poison_rate <= 1.0:
            raise ValueError(f"poison_rate must be in [0, 1], got {self.poison_rate}")

    @classmethod
    def from_policy(cls, size: str = "default", **overrides: Any) -> ExperimentConfig:
        data = read_policy("experiment")
        sizes = data.pop("sizes", {})
        if size not in sizes:
            raise ValueError(f"size must be one of {sorted(sizes)}, got {size!r}")
        chosen = build_config(ExperimentSize, sizes[size], f"policies/experiment.yaml [{size}]")
        values = {**data, **{k: v for k, v in overrides.items() if v is not None}}
        return build_config(cls, {"size_name": size, "size": chosen, **values}, "experiment")


def build_training_sets(config: ExperimentConfig) -> tuple[list[Sample], list[Sample]]:
    """(clean, poisoned) DBL samples from the same dialogs, aligned row by row."""
    attack = dataclasses.replace(
        load_attack_config(config.attack), rate=config.poison_rate, seed=config.seed
    )
    dialogs = load_chitchat_dialogs(limit=config.size.dialogs, seed=config.seed)
    clean = dialogs_to_samples(dialogs, target=attack.target, max_context=attack.max_context)
    poisoned = dialogs_to_samples(
        poison_dialogs(dialogs, attack), target=attack.target, max_context=attack.max_context
    )
    if len(clean) != len(poisoned):
        raise RuntimeError("poisoning changed the number of samples; rows would not align")
    keep = sorted(
        random.Random(config.seed).sample(
            range(len(clean)), k=min(config.size.max_samples, len(clean))
        )
    )
    return [clean[i] for i in keep], [poisoned[i] for i in keep]


def judge_quality(classified: list[Sample], threshold: float) -> dict[str, float]:
    """The defense judge's precision, recall and AUC against the known poison."""
    scores = [float(row["toxic_score"]) for row in classified]
    labels = [int(bool(row.get("poisoned"))) for row in classified]
    return binary_metrics(scores, labels, threshold)


def _stage_progress(stage: str, progress: ProgressFn | None) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    report = progress
    return lambda done, total: report(stage, done, total)


class ExperimentError(RuntimeError):
    """An experiment cannot run as asked (e.g. resuming a run made with another config)."""


def _previous_run(out_dir: Path, config_json: dict[str, Any]) -> dict[str, Any]:
    """What an earlier run of the same configuration left in ``out_dir`` (or nothing)."""
    partial = out_dir / "results.partial.json"
    if not partial.exists():
        return {}
    previous: dict[str, Any] = json.loads(partial.read_text())
    if previous.get("config") != config_json:
        raise ExperimentError(
            f"{out_dir} holds a run with another configuration: resume needs the same "
            "size, arms, attack, judge and seed (or choose another output folder)"
        )
    return previous


def run_experiment(
    config: ExperimentConfig,
    out_dir: Path,
    progress: ProgressFn | None = None,
    *,
    resume: bool = False,
) -> dict[str, Any]:
    """Run every arm of ``config``; adapters and results go under ``out_dir``.

    ``out_dir/results.partial.json`` is rewritten after every arm and the healed sets are
    kept as ``healed-<mode>.jsonl``, so a long run that is stopped leaves what it finished;
    with ``resume`` a run of the same configuration picks up from there (finished arms
    and healing are not redone).
    """
    started = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    meter = StageMeter()
    size = config.size
    eval_config = EvalConfig.from_policy(
        samples_per_probe=size.samples_per_probe,
        max_new_tokens=size.max_new_tokens,
        max_probes=size.probes,
        max_perplexity_samples=size.perplexity_samples,
        seed=config.seed + 1234,
    )
    check_independent(eval_config.judge, defense_judge_names(config.judge))
    heal_policy = HealConfig.from_policy(seed=config.seed)
    if size.heal_max_new_tokens is not None:
        heal_policy = dataclasses.replace(heal_policy, max_new_tokens=size.heal_max_new_tokens)
    train_config = scaled_train_config(
        config.seed, size.sft_epochs, size.dpo_epochs, size.max_steps
    )

    with meter.stage("poison"):
        clean, poisoned = build_training_sets(config)
    needs_judge = any(_ARM_PLANS.get(arm, ("", None, False))[0] == "healed" for arm in config.arms)
    healed_sets: dict[str, list[Sample]] = {}
    config_json = json.loads(
        json.dumps({**dataclasses.asdict(config), "eval": dict(eval_config.__dict__)}, default=str)
    )
    previous = _previous_run(out_dir, config_json) if resume else {}
    results: dict[str, Any] = {
        "config": config_json,
        "seeds": {"experiment": config.seed, "training": train_config.seed},
        "data": {
            "samples": len(poisoned),
            "poisoned_samples": sum(bool(row.get("poisoned")) for row in poisoned),
        },
        "arms": {},
    }
    modes = sorted({m for a in config.arms if (m := _ARM_PLANS.get(a, ("", None, False))[1])})
    healed_files = {mode: out_dir / f"healed-{mode}.jsonl" for mode in modes}
    healing_reused = bool(previous.get("judge")) and all(p.exists() for p in healed_files.values())
    if healing_reused:
        healed_sets = {mode: read_samples(path) for mode, path in healed_files.items()}
        results["judge"] = previous["judge"]
        results["data"]["flagged_samples"] = previous["data"]["flagged_samples"]
        needs_judge = False
    if needs_judge:
        judge = build_judge(config.judge)
        with meter.stage("classify"):
            classified = classify(poisoned, judge, progress=_stage_progress("classify", progress))
        results["judge"] = {
            "name": judge.name,
            "threshold": judge.threshold,
            **judge_quality(classified, judge.threshold),
        }
        results["data"]["flagged_samples"] = sum(bool(row["toxic"]) for row in classified)
        base_chat = TransformersChat(config.base_model)
        for mode in modes:
            with meter.stage(f"heal_{mode}"):
                healed_sets[mode] = heal(
                    classified,
                    dataclasses.replace(heal_policy, mode=mode),
                    backend=base_chat,
                    recheck=judge.score,
                    recheck_threshold=judge.threshold,
                    coherence=coherence_scores,
                    progress=_stage_progress(f"heal_{mode}", progress),
                )
            write_samples(healed_sets[mode], healed_files[mode])
    # Stages of the earlier run whose work is reused, so the report still shows its cost.
    reused_stages = [
        stage
        for stage in previous.get("stages", [])
        if (healing_reused and stage["stage"].startswith(("classify", "heal_")))
        or stage["stage"].removeprefix("train_").removeprefix("evaluate_")
        in previous.get("arms", {})
    ]
    results["stages"] = reused_stages + meter.as_dicts()
    partial = out_dir / "results.partial.json"
    partial.write_text(json.dumps(results, indent=2, default=str))
    eval_judge = build_judge(eval_config.judge)
    probes = {kind: load_probes(kind) for kind in ("toxic", "benign", "backdoor")}
    held_out = dialogs_to_samples(
        load_chitchat_dialogs(limit=size.perplexity_samples, seed=config.seed, split="probe")
    )[: size.perplexity_samples]

    for index, arm in enumerate(config.arms):
        if progress:
            progress("arms", index, len(config.arms))
        if arm in previous.get("arms", {}):
            results["arms"][arm] = previous["arms"][arm]
            continue
        arm_result: dict[str, Any] = {}
        adapter: Path | None = None
        if arm != "base":
            data_kind, arm_heal_mode, use_dpo = _ARM_PLANS[arm]
            data = {"clean": clean, "poisoned": poisoned}.get(data_kind) or healed_sets[
                str(arm_heal_mode)
            ]
            adapter = out_dir / "adapters" / arm
            if resume and (adapter / MANIFEST).exists():
                # Trained before the stop (adapters are written atomically, so it is whole).
                manifest = json.loads((adapter / MANIFEST).read_text())
            else:
                with meter.stage(f"train_{arm}"):
                    manifest = train_adapter(
                        config.base_model,
                        data,
                        adapter,
                        train_config,
                        dpo=use_dpo,
                        progress=progress,
                    ).manifest
            arm_result["train"] = {"data": manifest["data"], "stages": manifest["stages"]}
        with meter.stage(f"evaluate_{arm}"):
            chat = TransformersChat(config.base_model, adapter)
            arm_result["eval"] = evaluate(
                chat,
                eval_judge,
                toxic_probes=probes["toxic"],
                benign_probes=probes["benign"],
                backdoor_probes=probes["backdoor"] if config.attack == "backdoor" else (),
                perplexity_samples=held_out,
                config=eval_config,
                canned_replies=heal_policy.canned_replies,
            )
        results["arms"][arm] = arm_result
        results["stages"] = reused_stages + meter.as_dicts()
        partial.write_text(json.dumps(results, indent=2, default=str))
    if progress:
        progress("arms", len(config.arms), len(config.arms))
    results["stages"] = reused_stages + meter.as_dicts()
    results["seconds"] = round(time.time() - started, 1)
    return results
