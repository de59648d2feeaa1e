"""Training speed, memory and loss: the policy against a baseline that changes some settings.

    .venv/bin/python benchmarks/training.py [--model default|tiny|PATH] [--steps 4]
        [--rows 64] [--samples FILE] [--set KEY=VALUE ...] [--baseline KEY=VALUE ...]
        [--json FILE] [--repeats 1]
    .venv/bin/python benchmarks/training.py --precision-ab [--model default] [--repeats 3]

KEY is a field of policies/training.yaml: ``bf16``, ``group_by_length``, or
``SECTION.FIELD`` (``sft.per_device_train_batch_size``, ``dpo.precompute_ref_log_probs``,
``lora.r``, ...); VALUE is YAML (``true``, ``4``). ``--set`` changes both arms (say, a GPU's
batch shape on a CPU), ``--baseline`` the baseline only (default: the old batch shape, 4 x 2
rows in SFT, 4 x 1 pairs in DPO). For instance::

    --baseline bf16=false                          # bf16 against fp32: speed, loss parity
    --baseline dpo.precompute_ref_log_probs=false  # a reference forward per step instead
    --baseline group_by_length=false               # padding of random batches

Each arm trains in its own process (peak RSS is a process's peak): ``--steps`` LoRA SFT steps
on ``--rows`` samples (canned-healed poisoned chit-chat, or the first rows of ``--samples``,
a round's samples.jsonl), then ``--steps`` DPO steps on the flagged ones, with
``tuneshield.train_adapter``; before training, the arm measures its device's matmul peak in
its training dtype. Prints per arm and stage the seconds, the loss, the peak RSS, tokens/s,
the padding share and the achieved FLOP/s against that peak; then the ratios baseline /
policy and the largest per-step loss difference (measured in the same run). With
``--repeats N`` the arms train N times each, in the order policy, baseline, baseline,
policy, ... so that a change in the machine's load between runs hits both arms alike:
each stage's figures are those of its median run (odd N gives a true median), every
run's seconds kept beside them (``seconds_runs``).

``--precision-ab`` times one forward and backward pass of the model with a fresh LoRA in
fp32 and in bf16 (bf16 weights, autocast), alternated in one process so that a shared
machine's load hits both alike: the bare compute ratio, without the trainer around it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from simulation.sigterm import unwinds_on_sigterm

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STAGES = ("sft", "dpo")
SECTIONS = ("lora", "sft", "dpo", "cuda")
OLD_SHAPE = [
    "sft.per_device_train_batch_size=4", "sft.gradient_accumulation_steps=2",
    "dpo.per_device_train_batch_size=4", "dpo.gradient_accumulation_steps=1",
]  # fmt: skip


def parse_changes(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as {key: YAML value}."""
    changes = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        changes[key] = yaml.safe_load(value)
    return changes


def apply_changes(config: Any, changes: dict[str, Any]) -> Any:
    """``config`` (a ``TrainConfig``) with ``changes`` (``parse_changes``) applied."""
    from tuneshield import override_stage

    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        if not section:
            config = dataclasses.replace(config, **{name: value})
        elif section in SECTIONS and getattr(config, section) is not None:
            config = override_stage(config, section, **{name: value})
        else:
            raise SystemExit(f"unknown setting {key!r}: use a field, or {SECTIONS}.FIELD")
    return config


def training_samples(rows: int, samples: Path | None) -> list[dict[str, Any]]:
    """The first ``rows`` of a round's samples, or poisoned chit-chat samples with the
    poison flagged (ground truth) and canned-healed."""
    from tuneshield import HealConfig, heal, read_samples

    if samples is not None:
        return read_samples(samples)[:rows]
    from simulation.experiment import ExperimentConfig, build_training_sets

    _, poisoned = build_training_sets(ExperimentConfig.from_policy("default"))
    flagged = [{**sample, "toxic": bool(sample.get("poisoned"))} for sample in poisoned[:rows]]
    return heal(flagged, HealConfig.from_policy(mode="canned"))


def train_one(args: argparse.Namespace, changes: dict[str, Any], out: Path) -> None:
    """One arm, in this process; its stages' figures go to ``out`` as JSON."""
    from tuneshield import resolve_model, scaled_train_config, train_adapter
    from tuneshield._train import detect_device, measure_matmul_peak

    config = scaled_train_config(seed=0, sft_epochs=1, dpo_epochs=1, max_steps=args.steps)
    config = apply_changes(config, changes)
    peak = measure_matmul_peak(detect_device(config.bf16))
    data = training_samples(args.rows, args.samples)
    with tempfile.TemporaryDirectory(prefix="tuneshield-train-bench-") as scratch:
        result = train_adapter(resolve_model(args.model), data, Path(scratch) / "adapter", config)
    manifest = result.manifest
    figures: dict[str, Any] = {"device": manifest["device"], "peak": peak}
    for stage in STAGES:
        metrics = manifest["stages"][stage]
        figures[stage] = {
            "seconds": metrics["duration_s"],
            "setup_s": metrics["setup_s"],
            "final_loss": metrics["final_loss"],
            "losses": [entry["loss"] for entry in metrics["loss_history"]],
            "peak_rss_gib": metrics["peak_rss_mb"] / 1024,
            "tokens": metrics["tokens"],
            "reference_tokens": metrics["reference_tokens"],
            "tokens_per_s": metrics["tokens_per_s"],
            "padding_share": metrics["padding_share"],
            "shared_prefix": metrics.get("shared_prefix"),
            "flops_per_s": metrics["flops_per_s"],
            "share_of_peak": metrics["flops_per_s"] / peak["flops_per_s"],
            "reference": metrics.get("reference"),
        }
    out.write_text(json.dumps(figures), encoding="utf-8")


def measure(args: argparse.Namespace, changes: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "figures.json"
        command = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
                   "--rows", str(args.rows), "--one", json.dumps(changes), str(out)]  # fmt: skip
        if args.samples is not None:
            command += ["--samples", str(args.samples)]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"training with {changes} failed:\n{run.stderr[-3000:]}")
        figures: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
        return figures


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage, the figures of its median run by seconds (of an even number, the
    faster of the two middle ones), so that rates, memory and losses are one run's;
    every run's seconds beside them."""
    figures = dict(runs[0])
    for stage in STAGES:
        ordered = sorted(runs, key=lambda run: run[stage]["seconds"])
        middle = ordered[(len(ordered) - 1) // 2][stage]
        figures[stage] = {**middle, "seconds_runs": [run[stage]["seconds"] for run in runs]}
    return figures


def loss_gap(policy: list[float], baseline: list[float]) -> float | None:
    """The largest per-step loss difference, relative to the policy's loss at that step."""
    pairs = list(zip(policy, baseline, strict=False))
    return max((abs(a - b) / abs(a) for a, b in pairs if a), default=None)


def print_report(results: dict[str, Any], arms: dict[str, dict[str, Any]]) -> None:
    header = ("arm", "stage", "seconds", "loss", "peak GiB", "tokens/s", "padding",
              "FLOP/s", "of peak")  # fmt: skip
    print("".join(f"{h:>11}" for h in header))
    for name, figures in results.items():
        for stage in STAGES:
            row = figures[stage]
            cells = [name, stage, f"{row['seconds']:.1f}", f"{row['final_loss']:.4f}",
                     f"{row['peak_rss_gib']:.2f}", f"{row['tokens_per_s']:.0f}",
                     f"{row['padding_share']:.1%}", f"{row['flops_per_s']:.3g}",
                     f"{row['share_of_peak']:.1%}"]  # fmt: skip
            print("".join(f"{cell:>11}" for cell in cells))
    for name, figures in results.items():
        peak = figures["peak"]
        print(f"{name}: {figures['device']['name']} ({figures['device']['reason']}), matmul "
              f"peak {peak['flops_per_s']:.3g} FLOP/s in {peak['dtype']}; changes "
              f"{arms[name] or 'none'}")  # fmt: skip
    policy, baseline = results["policy"], results["baseline"]
    for stage in STAGES:
        new, old = policy[stage], baseline[stage]
        gap = loss_gap(new["losses"], old["losses"])
        print(
            f"{stage} baseline / policy: time {old['seconds'] / new['seconds']:.2f}, peak RSS "
            f"{old['peak_rss_gib'] / new['peak_rss_gib']:.2f}, final loss "
            f"{old['final_loss'] / new['final_loss']:.4f}; largest per-step loss difference "
            + ("-" if gap is None else f"{gap:.2%}")
        )


PRECISION_AB_REPEATS = 3
# --precision-ab: the CPU shape (one row) and a GPU's (8 rows), of a typical row's length.
AB_SHAPES = ((1, 100), (8, 100))


def precision_ab(model: str, repeats: int) -> None:
    """Median seconds of a forward + backward in fp32 and bf16, alternated per repeat."""
    import statistics
    import time

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneshield import load_train_config, resolve_model

    lora = load_train_config().lora_config()
    models = {
        name: get_peft_model(AutoModelForCausalLM.from_pretrained(resolve_model(model),
                                                                  dtype=dtype), lora)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    for rows, length in AB_SHAPES:
        ids = torch.randint(0, models["fp32"].config.vocab_size, (rows, length),
                            generator=generator)  # fmt: skip
        seconds: dict[str, list[float]] = {name: [] for name in models}
        for repeat in range(repeats + 1):  # the first round warms up
            for name, peft_model in models.items():
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                    loss = peft_model(input_ids=ids, labels=ids).loss
                loss.backward()
                peft_model.zero_grad()
                if repeat:
                    seconds[name].append(time.perf_counter() - start)
        fp32, bf16 = (statistics.median(seconds[name]) for name in ("fp32", "bf16"))
        print(f"{rows} x {length} tokens: fp32 {fp32:.3f} s, bf16 {bf16:.3f} s, "
              f"fp32 / bf16 {fp32 / bf16:.2f}")  # fmt: skip


@unwinds_on_sigterm
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="default | tiny | a model folder")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per stage")
    parser.add_argument("--rows", type=int, default=64, help="training samples")
    parser.add_argument("--samples", type=Path, help="a round's samples.jsonl")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="both arms")
    parser.add_argument("--baseline", nargs="*", default=OLD_SHAPE, metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--precision-ab", action="store_true", help="fp32 vs bf16 step time")
    parser.add_argument(
        "--repeats", type=int, help="runs per arm, alternated (default 1; --precision-ab 3)"
    )
    parser.add_argument("--one", nargs=2, metavar=("CHANGES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats: {args.repeats} is not a positive number of runs")
    if args.one:
        changes, out = args.one
        train_one(args, json.loads(changes), Path(out))
        return
    if args.precision_ab:
        precision_ab(args.model, args.repeats or PRECISION_AB_REPEATS)
        return
    common = parse_changes(args.set)
    arms = {"policy": common, "baseline": {**common, **parse_changes(args.baseline)}}
    model_name = args.model
    with tempfile.TemporaryDirectory(prefix="tuneshield-train-bench-") as scratch:
        if args.model == "tiny":
            from tuneshield import build_tiny_model

            args.model = str(build_tiny_model(Path(scratch) / "tiny"))
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
        order = list(arms)
        for _ in range(args.repeats or 1):
            for name in order:
                runs[name].append(measure(args, arms[name]))
            # ABBA: neither arm always runs first after the other.
            order.reverse()
    results = {name: median_run(figures) for name, figures in runs.items()}
    print(
        f"model {model_name}, {args.rows} samples, {args.steps} steps per stage, "
        f"{args.repeats or 1} run(s) per arm"
    )
    print_report(results, arms)
    figures = json.dumps({"arms": arms, "results": results}, indent=2)
    print(figures)
    if args.json is not None:
        args.json.write_text(figures + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
