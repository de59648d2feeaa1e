"""The defense end to end on the real default model (SmolLM2-135M-Instruct, CPU).

    .venv/bin/python benchmarks/pipeline.py [--size full|default|quick] [--model default]
                                            [--out reports/pipeline] [--resume]

Poisoned chitchat set (30% injection; >= 500 samples at --size full) → classify → heal
→ SFT → DPO, for the arms base, control (same dialogs, no poison), undefended,
TuneShield (contextual) and TuneShield (canned). Prints per arm toxicity on toxic and
benign probes (several sampled replies per probe, temperature 1, independent judge),
benign canned/refusal rate, relevance and perplexity, each arm's toxicity as a ratio of
the undefended arm's (the baseline measured in the same run), and the time and peak
memory of every stage. Writes the report folder (report.html with plots).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from simulation.experiment import ExperimentConfig, run_experiment
from simulation.report import write_experiment_report
from simulation.sigterm import unwinds_on_sigterm
from tuneshield import (
    DEFAULT_MODEL_ALIASES,
    arms_table,
    console,
    markdown_table,
    prepare_default_model,
    stage_bars,
)


@unwinds_on_sigterm
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="full")
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", type=Path, default=Path("reports/pipeline"))
    parser.add_argument("--arms", default=None, help="comma-separated arms")
    parser.add_argument(
        "--resume", action="store_true", help="continue a stopped run of the same configuration"
    )
    args = parser.parse_args()
    if args.model.lower() in DEFAULT_MODEL_ALIASES:
        prepare_default_model()
    config = ExperimentConfig.from_policy(
        args.size, base_model=args.model, arms=args.arms.split(",") if args.arms else None
    )
    with stage_bars() as progress:
        results = run_experiment(config, args.out, progress, resume=args.resume)
    report = write_experiment_report(results, args.out)
    print(markdown_table(arms_table(results)))
    baseline = results["arms"].get("undefended", {}).get("eval", {})
    for kind in ("toxic", "benign"):
        reference = baseline.get(kind, {}).get("toxicity_rate")
        for name, arm in results["arms"].items():
            rate = arm["eval"][kind]["toxicity_rate"]
            ratio = f"{rate / reference:.2f}" if reference else "n/a (undefended rate 0)"
            print(f"{kind:6} toxicity {name:18} {rate:6.1%}  ratio to undefended: {ratio}")
    if "judge" in results:
        judge = results["judge"]
        print(
            f"judge {judge['name']}: precision {judge['precision']:.2f} "
            f"recall {judge['recall']:.2f} auc {judge['auc']:.2f}"
        )
    for stage in results["stages"]:
        seconds, peak = stage["seconds"], stage["peak_rss_gib"]
        print(f"stage {stage['stage']:24} {seconds:8.1f} s  peak {peak:.2f} GiB")
    console.print(f"report: {report}")


if __name__ == "__main__":
    main()
