"""Judges compared on the shipped labelled set: fit on its train split, measured on test.

    .venv/bin/python benchmarks/classifiers.py [--llm tiny,default] [--llm-train-limit 100]
                                                [--threads 2] [--json OUT]

For each judge: accuracy, precision, recall, F1 and AUC on the test split at the
threshold fitted on the train split (F1-maximising, as `tuneshield classify calibrate`
does; the embedding judge's from its out-of-fold training scores), and samples/s
scoring the test split, with the ratio to the lexical baseline timed in the same run
(this machine is shared, so absolute rates drift; ratios drift less).

Judges: lexical (alt-profanity-check); embedding (MiniLM + logistic regression trained
here on the train split); cascade lexical→embedding (band from policies/judges.yaml);
refusal and direct (prompts from policies/judges.yaml) on a tiny random model (mechanics
only: expect chance) and on the prepared SmolLM2-135M-Instruct (`tuneshield models
prepare`). LLM thresholds are fitted on a stratified subset of the train split
(--llm-train-limit) to bound the run time on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from simulation.sigterm import unwinds_on_sigterm
from tuneshield import (
    LABELLED_FILE,
    CascadeJudge,
    CascadeJudgeSettings,
    DirectJudge,
    EmbeddingJudge,
    Judge,
    LexicalJudge,
    LLMJudgeSettings,
    RefusalJudge,
    Sample,
    best_threshold,
    binary_metrics,
    labels_of,
    load_judges_policy,
    read_samples,
    score_samples,
    train_embedding_judge,
)

MIN_TIMING_S = 1.0  # fast judges are re-run until this long, so their rate is not noise


def stratified_subset(samples: Sequence[Sample], limit: int, seed: int = 0) -> list[Sample]:
    """At most ``limit`` samples, half of each label where possible, order shuffled."""
    if limit <= 0 or limit >= len(samples):
        return list(samples)
    rng = random.Random(seed)
    by_label = {label: [s for s in samples if s["label"] == label] for label in (0, 1)}
    chosen = [
        s for group in by_label.values() for s in rng.sample(group, min(len(group), limit // 2))
    ]
    rng.shuffle(chosen)
    return chosen


def timed_scores(
    judge: Judge, samples: Sequence[Sample], batch_size: int
) -> tuple[list[float], float]:
    """Scores of ``samples`` and samples/s (repeated passes for judges faster than MIN_TIMING_S)."""
    passes, start = 0, time.perf_counter()
    while True:
        scores = score_samples(samples, judge, batch_size=batch_size)
        passes += 1
        elapsed = time.perf_counter() - start
        if elapsed >= MIN_TIMING_S:
            return scores, passes * len(samples) / elapsed


def evaluate(
    name: str,
    judge: Judge,
    threshold: float,
    test: Sequence[Sample],
    batch_size: int,
    note: str = "",
) -> dict[str, Any]:
    scores, rate = timed_scores(judge, test, batch_size)
    figures = binary_metrics(scores, labels_of(test), threshold)
    row = {"judge": name, "threshold": threshold, **figures, "samples_per_s": rate, "note": note}
    # Printed as it goes: LLM judges are slow on CPU and a cut-off run keeps its figures.
    print(
        f"  {name}: thr {threshold:.3f} acc {figures['accuracy']:.3f} "
        f"prec {figures['precision']:.3f} recall {figures['recall']:.3f} "
        f"auc {figures['auc']:.3f} {rate:.2f}/s {note}",
        flush=True,
    )
    return row


def fitted_threshold(judge: Judge, train: Sequence[Sample], batch_size: int, metric: Any) -> float:
    scores = score_samples(train, judge, batch_size=batch_size)
    threshold, _ = best_threshold(scores, labels_of(train), metric)
    return threshold


def llm_rows(
    label: str,
    model: str | Path,
    policy: Any,
    train: Sequence[Sample],
    test: Sequence[Sample],
    batch_size: int,
) -> list[dict[str, Any]]:
    from tuneshield import TransformersChat

    backend = TransformersChat(model, batch_size=8)
    rows = []
    for kind, judge_class in (("refusal", RefusalJudge), ("direct", DirectJudge)):
        settings = policy.judges[kind]
        assert isinstance(settings, LLMJudgeSettings)
        judge = judge_class(backend, settings.prompts, top_k=settings.top_k, system=settings.system)
        threshold = fitted_threshold(judge, train, batch_size, policy.calibration_metric)
        judge.queries = judge.undecided = 0
        row = evaluate(f"{kind} [{label}]", judge, threshold, test, batch_size)
        row["note"] = (
            f"{len(settings.prompts)} prompts; no yes/no in top-{settings.top_k}: "
            f"{judge.undecided}/{judge.queries}"
        )
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    lexical_rate = next(r["samples_per_s"] for r in rows if r["judge"] == "lexical")
    table = Table(title="Judges on tuneshield/data/labelled.jsonl (fit: train, measured: test)")
    for column in ("judge", "thr", "acc", "prec", "recall", "F1", "AUC", "samples/s", "vs lexical"):
        table.add_column(column, justify="left" if column == "judge" else "right")
    for r in rows:
        table.add_row(
            escape(r["judge"]),
            f"{r['threshold']:.3f}",
            f"{r['accuracy']:.3f}",
            f"{r['precision']:.3f}",
            f"{r['recall']:.3f}",
            f"{r['f1']:.3f}",
            f"{r['auc']:.3f}",
            f"{r['samples_per_s']:.1f}",
            f"{r['samples_per_s'] / lexical_rate:.2g}x",
        )
    Console(width=140).print(table)
    for r in rows:
        if r["note"]:
            print(f"  {r['judge']}: {r['note']}")


@unwinds_on_sigterm
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labelled", type=Path, default=LABELLED_FILE)
    parser.add_argument("--llm", default="tiny,default", help="LLM judge models: tiny, default")
    parser.add_argument("--llm-train-limit", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    policy = load_judges_policy()
    samples = read_samples(args.labelled)
    train = [s for s in samples if s["split"] == "train"]
    test = [s for s in samples if s["split"] == "test"]
    print(
        f"{args.labelled}: train {len(train)}, test {len(test)} ({sum(labels_of(test))} toxic)",
        flush=True,
    )
    batch = policy.batch_size
    rows = []

    lexical = LexicalJudge()
    lexical_threshold = fitted_threshold(lexical, train, batch, policy.calibration_metric)
    rows.append(evaluate("lexical", lexical, lexical_threshold, test, batch))

    started = time.perf_counter()
    artefact = train_embedding_judge(train, policy.embedding_training, version="benchmark")
    fit_s = time.perf_counter() - started
    embedding = EmbeddingJudge(artefact)
    embedding.threshold = float(artefact.metadata["cross_validation"]["threshold"])
    embedding.score(test[:2])  # loads the encoder outside the timing
    rows.append(
        evaluate(
            "embedding",
            embedding,
            embedding.threshold,
            test,
            batch,
            note=f"trained in {fit_s:.0f} s on {len(train)} samples",
        )
    )

    cascade_settings = policy.judges["cascade"]
    assert isinstance(cascade_settings, CascadeJudgeSettings)
    cascade = CascadeJudge(lexical, embedding, cascade_settings.low, cascade_settings.high)
    row = evaluate(cascade.name, cascade, cascade.threshold, test, batch)
    row["note"] = (
        f"band [{cascade.low}, {cascade.high}]: {cascade.escalated}/{cascade.scored} escalated"
    )
    rows.append(row)

    llm_subset = stratified_subset(train, args.llm_train_limit)
    wanted = [m.strip() for m in args.llm.split(",") if m.strip()]
    if "tiny" in wanted:
        from tuneshield import build_tiny_model

        with tempfile.TemporaryDirectory() as scratch:
            tiny = build_tiny_model(Path(scratch) / "tiny")
            rows += llm_rows("tiny random", tiny, policy, llm_subset, test, batch)
    if "default" in wanted:
        rows += llm_rows("SmolLM2-135M", "default", policy, llm_subset, test, batch)

    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
