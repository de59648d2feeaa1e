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

from tuneshield._policies import build_config, read_policy
from tuneshield._samples import Sample
from tuneshield._stages import StageMeter

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
    from tuneshield._attacks import dialogs_to_samples, load_attack_config, poison_dialogs
    from tuneshield._sources import load_chitchat_dialogs

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
    from tuneshield._metrics import binary_metrics

    scores = [float(row["toxic_score"]) for row in classified]
    labels = [int(bool(row.get("poisoned"))) for row in classified]
    return binary_metrics(scores, labels, threshold)


def _stage_progress(stage: str, progress: ProgressFn | None) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    report = progress
    return lambda done, total: report(stage, done, total)


def _defense_judge_names(name: str) -> list[str]:
    from tuneshield._classify import CascadeJudgeSettings, load_judges_policy

    settings = load_judges_policy().judges.get(name)
    if isinstance(settings, CascadeJudgeSettings):
        return [name, settings.cheap, settings.strong]
    return [name]


def run_experiment(
    config: ExperimentConfig, out_dir: Path, progress: ProgressFn | None = None
) -> dict[str, Any]:
    """Run every arm of ``config``; adapters and results go under ``out_dir``.

    ``out_dir/results.partial.json`` is rewritten after every arm, so a long run that is
    stopped still leaves the arms it finished.
    """
    from tuneshield._attacks import dialogs_to_samples
    from tuneshield._backends import TransformersChat
    from tuneshield._classify import build_judge, classify
    from tuneshield._evaluate import EvalConfig, check_independent, evaluate
    from tuneshield._heal import HealConfig, heal
    from tuneshield._probes import load_probes
    from tuneshield._sources import load_chitchat_dialogs
    from tuneshield._train import load_train_config, override_stage, train_adapter

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
    check_independent(eval_config.judge, _defense_judge_names(config.judge))
    heal_policy = HealConfig.from_policy(seed=config.seed)
    if size.heal_max_new_tokens is not None:
        heal_policy = dataclasses.replace(heal_policy, max_new_tokens=size.heal_max_new_tokens)
    train_config = dataclasses.replace(load_train_config(), seed=config.seed)
    for stage, epochs in (("sft", size.sft_epochs), ("dpo", size.dpo_epochs)):
        train_config = override_stage(
            train_config, stage, num_train_epochs=epochs, max_steps=size.max_steps
        )

    with meter.stage("poison"):
        clean, poisoned = build_training_sets(config)
    needs_judge = any(_ARM_PLANS.get(arm, ("", None, False))[0] == "healed" for arm in config.arms)
    healed_sets: dict[str, list[Sample]] = {}
    results: dict[str, Any] = {
        "config": {**dataclasses.asdict(config), "eval": dict(eval_config.__dict__)},
        "seeds": {"experiment": config.seed, "training": train_config.seed},
        "data": {
            "samples": len(poisoned),
            "poisoned_samples": sum(bool(row.get("poisoned")) for row in poisoned),
        },
        "arms": {},
    }
    base_chat = None
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
        modes = {_ARM_PLANS[a][1] for a in config.arms if a in _ARM_PLANS}
        for mode in sorted(m for m in modes if m is not None):
            with meter.stage(f"heal_{mode}"):
                healed_sets[mode] = heal(
                    classified,
                    dataclasses.replace(heal_policy, mode=mode),
                    backend=base_chat,
                    recheck=judge.score,
                    recheck_threshold=judge.threshold,
                    progress=_stage_progress(f"heal_{mode}", progress),
                )
    eval_judge = build_judge(eval_config.judge)
    probes = {kind: load_probes(kind) for kind in ("toxic", "benign", "backdoor")}
    held_out = dialogs_to_samples(
        load_chitchat_dialogs(limit=size.perplexity_samples, seed=config.seed, split="probe")
    )[: size.perplexity_samples]

    for index, arm in enumerate(config.arms):
        if progress:
            progress("arms", index, len(config.arms))
        arm_result: dict[str, Any] = {}
        adapter: Path | None = None
        if arm != "base":
            data_kind, arm_heal_mode, use_dpo = _ARM_PLANS[arm]
            data = {"clean": clean, "poisoned": poisoned}.get(data_kind) or healed_sets[
                str(arm_heal_mode)
            ]
            adapter = out_dir / "adapters" / arm
            with meter.stage(f"train_{arm}"):
                trained = train_adapter(
                    config.base_model, data, adapter, train_config, dpo=use_dpo, progress=progress
                )
            arm_result["train"] = {
                "data": trained.manifest["data"],
                "stages": trained.manifest["stages"],
            }
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
        results["stages"] = meter.as_dicts()
        partial = out_dir / "results.partial.json"
        partial.write_text(json.dumps(results, indent=2, default=str))
    if progress:
        progress("arms", len(config.arms), len(config.arms))
    results["stages"] = meter.as_dicts()
    results["seconds"] = round(time.time() - started, 1)
    return results
