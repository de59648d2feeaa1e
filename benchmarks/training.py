"""Training speed and memory by batch shape: the policy's against a baseline shape.

    .venv/bin/python benchmarks/training.py [--model default|tiny|PATH] [--steps 4]
        [--rows 64] [--baseline-sft 4x2] [--baseline-dpo 4x1]

A shape is ``rows per forward pass x gradient accumulation``; both shapes make steps of
the same size, so they should reach the same loss. Each shape trains in its own process
(peak RSS is a process's peak): ``--steps`` LoRA SFT steps on canned-healed poisoned
chit-chat samples, then ``--steps`` DPO steps on the flagged ones, with
``tuneshield.train_adapter`` and policies/training.yaml otherwise as it is. Prints
per shape and stage the seconds, the final loss and the process's peak RSS so far, then
the ratios policy / baseline (measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STAGES = ("sft", "dpo")


def parse_shape(text: str) -> tuple[int, int]:
    rows, _, accumulation = text.partition("x")
    return int(rows), int(accumulation)


def training_samples(rows: int) -> list[dict[str, Any]]:
    """Poisoned chit-chat samples, the poison flagged (ground truth) and canned-healed."""
    from simulation.experiment import ExperimentConfig, build_training_sets
    from tuneshield import HealConfig, heal

    _, poisoned = build_training_sets(ExperimentConfig.from_policy("default"))
    flagged = [{**sample, "toxic": bool(sample.get("poisoned"))} for sample in poisoned[:rows]]
    return heal(flagged, HealConfig.from_policy(mode="canned"))


def train_one(model: str, steps: int, rows: int, sft: str, dpo: str, out: Path) -> None:
    """One shape, in this process; its stages' figures go to ``out`` as JSON."""
    from tuneshield import override_stage, resolve_model, scaled_train_config, train_adapter

    config = scaled_train_config(seed=0, sft_epochs=1, dpo_epochs=1, max_steps=steps)
    for stage, shape in (("sft", sft), ("dpo", dpo)):
        size, accumulation = parse_shape(shape)
        config = override_stage(
            config,
            stage,
            per_device_train_batch_size=size,
            gradient_accumulation_steps=accumulation,
        )
    with tempfile.TemporaryDirectory(prefix="tuneshield-train-bench-") as scratch:
        result = train_adapter(
            resolve_model(model), training_samples(rows), Path(scratch) / "adapter", config
        )
    figures = {
        stage: {
            "seconds": result.manifest["stages"][stage]["duration_s"],
            "final_loss": result.manifest["stages"][stage]["final_loss"],
            "peak_rss_gib": result.manifest["stages"][stage]["peak_rss_mb"] / 1024,
        }
        for stage in STAGES
    }
    out.write_text(json.dumps(figures), encoding="utf-8")


def measure(args: argparse.Namespace, sft: str, dpo: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "figures.json"
        command = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
                   "--rows", str(args.rows), "--one", sft, dpo, str(out)]  # fmt: skip
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"training {sft} / {dpo} failed:\n{run.stderr[-3000:]}")
        figures: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="default | tiny | a model folder")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per stage")
    parser.add_argument("--rows", type=int, default=64, help="training samples")
    parser.add_argument("--baseline-sft", default="4x2", help="SFT shape to compare with")
    parser.add_argument("--baseline-dpo", default="4x1", help="DPO shape to compare with")
    parser.add_argument("--one", nargs=3, metavar=("SFT", "DPO", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        sft, dpo, out = args.one
        train_one(args.model, args.steps, args.rows, sft, dpo, Path(out))
        return
    from tuneshield import load_train_config

    policy = load_train_config()
    shapes = {
        "policy": (
            f"{policy.sft.per_device_train_batch_size}x{policy.sft.gradient_accumulation_steps}",
            f"{policy.dpo.per_device_train_batch_size}x{policy.dpo.gradient_accumulation_steps}",
        ),
        "baseline": (args.baseline_sft, args.baseline_dpo),
    }
    model_name = args.model
    with tempfile.TemporaryDirectory(prefix="tuneshield-train-bench-") as scratch:
        if args.model == "tiny":
            from tuneshield import build_tiny_model

            args.model = str(build_tiny_model(Path(scratch) / "tiny"))
        results = {name: measure(args, *shape) for name, shape in shapes.items()}
    print(f"model {model_name}, {args.rows} samples, {args.steps} steps per stage")
    print(f"{'shape':>10}{'stage':>6}{'rows x acc':>12}{'seconds':>10}{'loss':>10}{'peak GiB':>10}")
    for name, figures in results.items():
        for stage, shape in zip(STAGES, shapes[name], strict=True):
            row = figures[stage]
            print(f"{name:>10}{stage:>6}{shape:>12}{row['seconds']:>10.1f}"
                  f"{row['final_loss']:>10.4f}{row['peak_rss_gib']:>10.2f}")  # fmt: skip
    for stage in STAGES:
        new, old = results["policy"][stage], results["baseline"][stage]
        print(
            f"{stage} policy / baseline: time {new['seconds'] / old['seconds']:.2f}, "
            f"peak RSS {new['peak_rss_gib'] / old['peak_rss_gib']:.2f}, "
            f"loss {new['final_loss'] / old['final_loss']:.4f}"
        )
    print(json.dumps({"shapes": shapes, "results": results}, indent=2))


if __name__ == "__main__":
    main()
