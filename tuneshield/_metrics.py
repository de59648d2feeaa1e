"""Binary classification figures for judges, and the threshold search calibration uses.

Toxic (label 1) is the positive class throughout; a sample is flagged when its score is
at or above the threshold.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

Metric = Literal["f1", "balanced_accuracy"]
METRICS: tuple[Metric, ...] = ("f1", "balanced_accuracy")


def binary_metrics(
    scores: Sequence[float], labels: Sequence[int], threshold: float
) -> dict[str, float]:
    """Accuracy, precision, recall, F1, balanced accuracy and AUC of ``scores`` at ``threshold``."""
    return {**_rates(scores, labels, threshold), "auc": auc(scores, labels)}


def _rates(scores: Sequence[float], labels: Sequence[int], threshold: float) -> dict[str, float]:
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    tp = fp = tn = fn = 0
    for score, label in zip(scores, labels, strict=True):
        flagged = score >= threshold
        if label:
            tp, fn = (tp + 1, fn) if flagged else (tp, fn + 1)
        else:
            fp, tn = (fp + 1, tn) if flagged else (fp, tn + 1)
    total = max(tp + fp + tn + fn, 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    specificity = tn / (tn + fp) if tn + fp else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / total,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "balanced_accuracy": (recall + specificity) / 2,
    }


def auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (ties count half); NaN when one class is absent."""
    positives = [s for s, y in zip(scores, labels, strict=True) if y]
    negatives = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not positives or not negatives:
        return float("nan")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([1 if y else 0 for y in labels], list(scores)))


def best_threshold(
    scores: Sequence[float], labels: Sequence[int], metric: Metric = "f1"
) -> tuple[float, float]:
    """The threshold that maximises ``metric`` on a labelled set, and the value reached.

    Candidates are the midpoints between consecutive distinct scores (plus one below
    and one above all of them), so the chosen threshold sits in the middle of a gap
    rather than on a training score. Ties go to the candidate nearest 0.5, the
    uncalibrated default, so a flat stretch does not drag the threshold to an extreme.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not scores:
        raise ValueError("calibration needs at least one labelled sample")
    distinct = sorted(set(scores))
    candidates = [max(distinct[0] - 1e-6, 0.0)]
    candidates += [(a + b) / 2 for a, b in itertools.pairwise(distinct)]
    candidates.append(min(distinct[-1] + 1e-6, 1.0))
    best = max(
        candidates,
        key=lambda t: (_rates(scores, labels, t)[metric], -abs(t - 0.5)),
    )
    return best, _rates(scores, labels, best)[metric]
