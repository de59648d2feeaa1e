"""``tuneshield classify``: run a judge over samples, calibrate it, train the embedding judge."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tuneshield._console import console, user_errors
from tuneshield._judges import Judge
from tuneshield._samples import Sample

classify_app = typer.Typer(
    help="Stage 1: score samples for toxicity with the judges in policies/judges.yaml.",
    no_args_is_help=True,
)
ALL_SPLITS = "all"


@contextmanager
def _progress_bar(description: str) -> Iterator[Progress]:
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        yield bar


def _select_split(samples: Sequence[Sample], split: str) -> list[Sample]:
    if split == ALL_SPLITS or not any("split" in s for s in samples):
        return list(samples)
    chosen = [s for s in samples if s.get("split") == split]
    if not chosen:
        raise ValueError(f"no samples with split == {split!r} (use --split all for every row)")
    return chosen


def _scores_with_progress(samples: Sequence[Sample], judge: Judge, batch_size: int) -> list[float]:
    from tuneshield._classify import score_samples

    with _progress_bar(f"scoring with {judge.name}") as bar:
        task = bar.add_task("", total=len(samples))
        return score_samples(
            samples,
            judge,
            batch_size=batch_size,
            progress=lambda done, _total: bar.update(task, completed=done),
        )


@classify_app.command("run")
def run(
    source: Path = typer.Argument(..., help="Samples to judge (.jsonl or .parquet)."),
    target: Path = typer.Argument(..., help="Where to write them with toxic_score/toxic/judge."),
    judge_name: str | None = typer.Option(
        None, "--judge", help="Judge name in policies/judges.yaml (default: its `default`)."
    ),
    threshold: float | None = typer.Option(None, help="Override the judge's threshold."),
) -> None:
    """Add toxic_score, toxic and judge columns to every sample."""
    from tuneshield._classify import build_judge, classify, load_judges_policy
    from tuneshield._samples import read_samples, write_samples

    with user_errors():
        samples = read_samples(source)
        policy = load_judges_policy()
        judge = build_judge(judge_name, policy)
        with _progress_bar(f"classifying with {judge.name}") as bar:
            task = bar.add_task("", total=len(samples))
            judged = classify(
                samples,
                judge,
                threshold,
                batch_size=policy.batch_size,
                progress=lambda done, _total: bar.update(task, completed=done),
            )
        write_samples(judged, target)
    flagged = sum(1 for s in judged if s["toxic"])
    notes = [
        f"{name} {getattr(judge, name)}"
        for name in ("undecided", "escalated")
        if hasattr(judge, name)
    ]
    extra = f" ({', '.join(notes)})" if notes else ""
    console.print(f"{judge.name}: {flagged}/{len(judged)} flagged toxic{extra} → {target}")


@classify_app.command("calibrate")
def calibrate_command(
    labelled: Path = typer.Argument(..., help="Labelled samples (label 0/1, optional split)."),
    judge_name: str | None = typer.Option(None, "--judge", help="Judge to calibrate."),
    split: str = typer.Option("train", help=f"Rows whose split column matches; '{ALL_SPLITS}'."),
    write: bool = typer.Option(True, help="Write the threshold into policies/judges.yaml."),
) -> None:
    """Fit the judge's threshold on a labelled split; write it to policies/judges.yaml."""
    from tuneshield._classify import build_judge, load_judges_policy, set_judge_setting
    from tuneshield._embedding_judge import labels_of
    from tuneshield._metrics import best_threshold, binary_metrics
    from tuneshield._samples import read_samples

    with user_errors():
        samples = _select_split(read_samples(labelled), split)
        labels = labels_of(samples)
        policy = load_judges_policy()
        name = judge_name or policy.default
        judge = build_judge(name, policy)
        scores = _scores_with_progress(samples, judge, policy.batch_size)
        threshold, _ = best_threshold(scores, labels, policy.calibration_metric)
        figures = binary_metrics(scores, labels, threshold)
        if write:
            set_judge_setting(name, "threshold", threshold)
    summary = ", ".join(f"{key} {value:.3f}" for key, value in figures.items())
    console.print(
        f"{name}: threshold {threshold:.4f} (maximises {policy.calibration_metric} on "
        f"{len(samples)} samples, split {split}): {summary}"
        + ("; written to policies/judges.yaml" if write else "")
    )


@classify_app.command("train-judge")
def train_judge(
    labelled: Path = typer.Argument(..., help="Labelled samples (label 0/1, optional split)."),
    split: str = typer.Option("train", help=f"Rows whose split column matches; '{ALL_SPLITS}'."),
    out: Path | None = typer.Option(
        None, help="Artefact folder (default: the next embedding-vN under tuneshield/data/judges)."
    ),
    activate: bool = typer.Option(
        True, help="Point judges.embedding at the new artefact and its calibrated threshold."
    ),
    judge_name: str = typer.Option("embedding", "--judge", help="Embedding judge to update."),
) -> None:
    """Train the embedding judge's classifier; save a versioned artefact."""
    from tuneshield._classify import load_judges_policy, set_judge_setting
    from tuneshield._embedding_judge import JUDGES_DATA_DIR, next_version, train_embedding_judge
    from tuneshield._samples import read_samples

    with user_errors():
        samples = _select_split(read_samples(labelled), split)
        policy = load_judges_policy()
        version = out.name if out is not None else next_version()
        folder = out if out is not None else JUDGES_DATA_DIR / version
        if folder.exists():
            raise ValueError(f"{folder} exists; artefacts are immutable, pick a new --out")
        with console.status(f"embedding {len(samples)} samples and fitting"):
            artefact = train_embedding_judge(
                samples,
                policy.embedding_training,
                version=version,
                source=f"{labelled.name} (split: {split})",
            )
        artefact.save(folder)
        figures = artefact.metadata["cross_validation"]
        if activate:
            shipped = folder.resolve().parent == JUDGES_DATA_DIR
            set_judge_setting(judge_name, "artefact", version if shipped else str(folder.resolve()))
            set_judge_setting(judge_name, "threshold", float(figures["threshold"]))
    console.print(
        f"{folder}: {len(samples)} samples; out-of-fold AUC {figures['auc']:.3f}, "
        f"F1 {figures['f1']:.3f} at threshold {figures['threshold']:.4f}"
        + (f"; judges.{judge_name} now uses it" if activate else "")
    )
