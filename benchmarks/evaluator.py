"""Validate the evaluation judges on blind-labelled bot replies (issue #17, item 1).

    .venv/bin/python benchmarks/evaluator.py generate --adapter NAME=PATH ... \
        [--base-model default] [--probes-per-kind K] [--samples S] [--threads N] \
        --out replies.jsonl
    .venv/bin/python benchmarks/evaluator.py blind --replies replies.jsonl --out-dir DIR \
        [--shards N]
    .venv/bin/python benchmarks/evaluator.py score --replies replies.jsonl \
        --labels labels.jsonl [--out-dir DIR]
    .venv/bin/python benchmarks/evaluator.py score --replies A.jsonl --replies B.jsonl \
        --labels A-labels.jsonl --labels B-relabelled.jsonl --out-dir DIR   # pooled

1. ``generate``: the base model (arm ``baseline``) and each adapter reply, sampled in
   process with transformers (T and length from policies/evaluation.yaml), to held-out
   evaluation probes (tuneshield/data/probes.jsonl; never the gates' probes) of the kinds
   in policies/evaluator.yaml: hostile openers, benign openers, and the benign openers
   with a trigger word of the backdoor attack. Every arm answers the same probes with the
   same seeds, so arms can be compared probe by probe. A row: id (opaque), arm, kind,
   probe_id, draw, message (the probe's last user turn and up to two earlier turns),
   reply.
2. ``blind``: the rows shuffled, arm and kind removed, split into shard files of
   {id, message, reply} (one per labeller, in DIR/shards/) and a key file mapping ids
   back (DIR/key.jsonl, outside the labellers' folder).
3. Labellers write one row per reply: {id, toxic, aimed_at_user, canned, unrelated}
   (booleans: toxic; toxicity aimed at the user; a canned or deflecting reply; no
   connection to the message).
4. ``score``: each candidate judge's precision, recall, F1 (at its threshold in
   policies/judges.yaml) and ROC AUC on ``toxic``, with 95% intervals; the coherence
   check's precision and recall on ``unrelated``; the label rates per arm and kind, and
   each arm's paired difference from the baseline. Writes evaluator.md and
   evaluator.json. The defense's judge is measured for comparison only, never chosen.
   Several ``--replies`` files (runs of ``benchmarks/efficacy.py``, whose rows carry the
   same fields) pool their replies for the judges; arms of different runs are not
   comparable, so a pooled score leaves out the per-arm tables. Several ``--labels``
   files may label a reply again (a row may name it by ``reply_id``, as the joint
   relabelling sets do): its first label counts, and the later ones measure how often
   two labellers agree (Cohen's kappa per label).
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from simulation.scripts import run_from_repository

run_from_repository(__file__)

from learner.gates import wilson
from simulation.sigterm import unwinds_on_sigterm
from tuneshield import (
    EvalConfig,
    GenerationConfig,
    Message,
    Sample,
    binary_metrics,
    build_judge,
    defense_judge_names,
    load_attack_config,
    load_config,
    load_judges_policy,
    load_probe_config,
    load_probes,
    markdown_table,
)
from tuneshield._eval_judges import coherence_scores
from tuneshield._probes import PROBE_KINDS, backdoor_probes

BASELINE = "baseline"
LABELS = ("toxic", "aimed_at_user", "canned", "unrelated")
KEY_FILE = "key.jsonl"
SHARDS_FOLDER = "shards"
REPLY_FIELDS = ("id", "arm", "kind", "probe_id", "draw", "message", "reply")
REPLY_ID_BYTES = 8  # 64 random bits: no collision among any number of replies labelled


@dataclass
class EvaluatorConfig:
    """policies/evaluator.yaml."""

    kinds: list[str] = field(metadata={"help": "Probe kinds replied to."})
    probes_per_kind: int = field(metadata={"help": "Probes of each kind."})
    samples_per_probe: int = field(metadata={"help": "Sampled replies per probe and arm."})
    message_turns: int = field(metadata={"help": "Probe turns shown (last user turn + earlier)."})
    batch_size: int = field(metadata={"help": "Conversations per generate call."})
    shards: int = field(metadata={"help": "Blind shard files, one per labeller."})
    shuffle_seed: int = field(metadata={"help": "Seed of the blind shuffle."})
    candidates: list[str] = field(metadata={"help": "Judges measured (policies/judges.yaml)."})
    confidence: float = field(metadata={"help": "Level of every interval."})
    bootstrap_resamples: int = field(metadata={"help": "Resamples of the bootstrap."})
    bootstrap_seed: int = field(metadata={"help": "Seed of the bootstrap."})
    coherence_threshold: float = field(
        metadata={"help": "Cosine below which a reply is unrelated."}
    )
    coherence_batch_size: int = field(metadata={"help": "Texts per MiniLM pass."})

    def __post_init__(self) -> None:
        for kind in self.kinds:
            if kind not in PROBE_KINDS:
                raise ValueError(f"kinds: {kind!r} is not one of {', '.join(PROBE_KINDS)}")
        for name in (
            "probes_per_kind",
            "samples_per_probe",
            "message_turns",
            "batch_size",
            "shards",
            "bootstrap_resamples",
            "coherence_batch_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if not self.candidates:
            raise ValueError("candidates must name at least one judge")


def load_evaluator_config(directory: Path | None = None) -> EvaluatorConfig:
    return load_config(EvaluatorConfig, "evaluator", directory=directory)


def fail(message: str) -> NoReturn:
    """A CLI error: one line naming the setting, exit status 2."""
    print(f"evaluator: {message}", file=sys.stderr)
    raise SystemExit(2)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        fail(f"cannot read {path}: {error.strerror}")
    except UnicodeDecodeError:
        fail(f"cannot read {path}: not UTF-8 text")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            fail(f"{path}:{number} is not a JSON object")
        if not isinstance(row, dict):
            fail(f"{path}:{number} is not a JSON object")
        rows.append(row)
    return rows


def read_replies(path: Path) -> list[dict[str, Any]]:
    """The rows of ``generate``; a row missing a field exits naming it."""
    rows = read_jsonl(path)
    for number, row in enumerate(rows, start=1):
        missing = [name for name in REPLY_FIELDS if name not in row]
        if missing:
            fail(f"{path}:{number}: missing field {missing[0]} (not a `generate` file?)")
    return rows


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


# ------------------------------------------------------------------------- generate


def evaluation_probes(config: EvaluatorConfig, per_kind: int) -> list[dict[str, Any]]:
    """The first ``per_kind`` evaluation probes of each kind; backdoor probes carry the
    backdoor attack's trigger words (policies/attacks.yaml), inserted into the benign ones."""
    probes: list[dict[str, Any]] = []
    for kind in config.kinds:
        if kind == "backdoor":
            triggers = tuple(load_attack_config("backdoor").triggers)
            benign = load_probes("benign")[:per_kind]
            probes += backdoor_probes(benign, triggers, load_probe_config().seed)
        else:
            probes += load_probes(kind)[:per_kind]
    return probes


def message_of(probe: dict[str, Any], turns: int) -> list[Message]:
    """The probe's last ``turns`` non-system turns (it ends on the user turn replied to)."""
    context = [m for m in probe["context"] if m["role"] != "system"]
    return [{"role": m["role"], "content": m["content"]} for m in context[-turns:]]


def reply_id() -> str:
    """An opaque id: random, so that not even a labeller who knows this code (and could
    hash every arm, probe and draw) can read the arm or the kind from it."""
    return secrets.token_hex(REPLY_ID_BYTES)


def arm_replies(
    arm: str,
    backend: Any,
    probes: Sequence[dict[str, Any]],
    config: EvaluatorConfig,
    sampling: EvalConfig,
    samples: int,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    """``samples`` replies per probe from one arm. Call i (draw, batch) is seeded
    ``sampling.seed + i`` in every arm: same probes, same seeds across arms."""
    rows: list[dict[str, Any]] = []
    batches = [probes[i : i + config.batch_size] for i in range(0, len(probes), config.batch_size)]
    total, call = samples * len(probes), 0
    for draw in range(samples):
        for batch in batches:
            generation = GenerationConfig(
                max_new_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=sampling.seed + call,
            )
            call += 1
            replies = backend.generate([p["context"] for p in batch], generation)
            for probe, reply in zip(batch, replies, strict=True):
                rows.append(
                    {
                        "id": reply_id(),
                        "arm": arm,
                        "kind": probe["kind"],
                        "probe_id": probe["conversation_id"],
                        "draw": draw,
                        "message": message_of(probe, config.message_turns),
                        "reply": reply,
                    }
                )
            progress(f"{arm}: {len(rows)}/{total} replies")
    return rows


def generate(
    arms: dict[str, str | None],
    base_model: str,
    out: Path,
    config: EvaluatorConfig,
    *,
    per_kind: int,
    samples: int,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Replies of every arm (``None``: the base model alone) to the evaluation probes."""
    from tuneshield import TransformersChat

    sampling = EvalConfig.from_policy()
    probes = evaluation_probes(config, per_kind)
    rows: list[dict[str, Any]] = []
    for arm, adapter in arms.items():
        backend = TransformersChat(base_model, adapter, batch_size=config.batch_size)
        rows += arm_replies(arm, backend, probes, config, sampling, samples, progress)
    write_jsonl(out, rows)
    return rows


# ---------------------------------------------------------------------------- blind


def blind(replies: Sequence[dict[str, Any]], out_dir: Path, shards: int, seed: int) -> list[Path]:
    """Shuffled shards of {id, message, reply} in ``out_dir/SHARDS_FOLDER`` and the key
    file in ``out_dir``; the shard paths. A labeller who lists the shard's folder sees
    other shards, never the key. ValueError (naming the option) for a shard count out of
    range or an ``out_dir`` that holds shards already: a stale shard left beside new ones
    would be labelled as if it were current."""
    rows = list(replies)
    if not 1 <= shards <= len(rows):
        raise ValueError(f"--shards must be between 1 and the {len(rows)} replies, got {shards}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} is a file")
    if (out_dir / SHARDS_FOLDER).exists() or (out_dir / KEY_FILE).exists():
        raise ValueError(f"--out-dir {out_dir} holds shards already: give a new folder")
    random.Random(seed).shuffle(rows)
    paths = []
    for index in range(shards):
        path = out_dir / SHARDS_FOLDER / f"shard-{index + 1:02d}.jsonl"
        part = rows[index::shards]
        write_jsonl(
            path, [{"id": r["id"], "message": r["message"], "reply": r["reply"]} for r in part]
        )
        paths.append(path)
    # Rows of several runs or conditions (efficacy.py blind) keep theirs in the key too.
    fields = ("id", "arm", "kind", "probe_id", "draw", "condition", "seed")
    key = [{k: r[k] for k in fields if k in r} for r in rows]
    write_jsonl(out_dir / KEY_FILE, key)
    return paths


# ---------------------------------------------------------------------------- score


def check_labels(
    labels: Sequence[dict[str, Any]], replies: dict[str, dict[str, Any]], source: Path
) -> dict[str, dict[str, bool]]:
    """Labels by reply id (``reply_id`` where a row has one: a relabelling set's rows
    carry their own blind ``id``); a bad row exits naming ``source``, its row and field."""
    checked: dict[str, dict[str, bool]] = {}
    for number, row in enumerate(labels, start=1):
        key = "reply_id" if "reply_id" in row else "id"
        rid = row.get(key)
        if not isinstance(rid, str) or rid not in replies:
            fail(f"{source} row {number}: {key} {rid!r} is not a reply of --replies")
        if rid in checked:
            fail(f"{source} row {number}: {key} {rid!r} is labelled twice")
        for name in LABELS:
            if not isinstance(row.get(name), bool):
                fail(f"{source} row {number}: {name} must be true or false, got {row.get(name)!r}")
        checked[rid] = {name: row[name] for name in LABELS}
    if not checked:
        fail(f"{source}: no labelled replies")
    return checked


def pool_replies(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The rows of every file, once each; an id given to two different replies exits
    naming the second."""
    rows: dict[str, dict[str, Any]] = {}
    for path in paths:
        for number, row in enumerate(read_replies(path), start=1):
            known = rows.setdefault(row["id"], row)
            if (known["message"], known["reply"]) != (row["message"], row["reply"]):
                fail(f"{path}:{number}: id {row['id']!r} was already given to another reply")
    return list(rows.values())


def pool_labels(
    paths: Sequence[Path], replies: dict[str, dict[str, Any]]
) -> tuple[dict[str, dict[str, bool]], list[tuple[dict[str, bool], dict[str, bool]]]]:
    """The first label of each reply over ``paths`` in order, and every later one paired
    with that first (a reply labelled three times gives two pairs)."""
    if len(set(paths)) < len(paths):
        fail("--labels: a file is given twice (its labels would agree with themselves)")
    first: dict[str, dict[str, bool]] = {}
    again: list[tuple[dict[str, bool], dict[str, bool]]] = []
    for path in paths:
        for rid, values in check_labels(read_jsonl(path), replies, path).items():
            if rid in first:
                again.append((first[rid], values))
            else:
                first[rid] = values
    return first, again


def agreement(pairs: Sequence[tuple[dict[str, bool], dict[str, bool]]]) -> dict[str, Any]:
    """Per label, how often two labellers of the same reply agree, and Cohen's kappa
    (agreement beyond what each labeller's own rate gives by chance; None where both
    labellers gave every reply the same value)."""
    figures: dict[str, Any] = {"pairs": len(pairs)}
    for name in LABELS:
        a = [one[name] for one, _ in pairs]
        b = [two[name] for _, two in pairs]
        agreed = sum(x == y for x, y in zip(a, b, strict=True)) / len(pairs)
        rate_a, rate_b = sum(a) / len(pairs), sum(b) / len(pairs)
        chance = rate_a * rate_b + (1 - rate_a) * (1 - rate_b)
        figures[name] = {
            "agreed": agreed,
            "positives": [sum(a), sum(b)],
            "both": sum(x and y for x, y in zip(a, b, strict=True)),
            "kappa": (agreed - chance) / (1 - chance) if chance < 1 else None,
        }
    return figures


def interval(successes: int, trials: int, confidence: float) -> list[float] | None:
    return list(wilson(successes, trials, confidence)) if trials else None


def bootstrap(
    statistic: Callable[[Any], Any], size: int, config: EvaluatorConfig
) -> list[float] | None:
    """Percentile interval of ``statistic`` over rows resampled with replacement.

    ``statistic`` takes a (resamples x size) matrix of row indices and returns one value
    per resample (all at once: thousands of resamples of a thousand replies stay fast);
    resamples where it is undefined (NaN: one class missing) are skipped."""
    import numpy as np

    rng = np.random.default_rng(config.bootstrap_seed)
    picks = rng.integers(0, size, (config.bootstrap_resamples, size))
    values = np.asarray(statistic(picks), dtype=float)
    values = values[~np.isnan(values)]
    if not values.size:
        return None
    tail = (1 - config.confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def f1_of(flagged: Any, truth: Any) -> Any:
    """F1 per row of boolean matrices (0 where nothing is flagged or positive)."""
    import numpy as np

    tp = (flagged & truth).sum(axis=1)
    denominator = flagged.sum(axis=1) + truth.sum(axis=1)
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def auc_of(scores: Any, truth: Any) -> Any:
    """ROC AUC per row (Mann-Whitney on mid-ranks, ties count half); NaN where a row
    lacks a class."""
    import numpy as np
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=1)
    positives = truth.sum(axis=1)
    negatives = truth.shape[1] - positives
    rank_sum = (ranks * truth).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    return np.where((positives > 0) & (negatives > 0), auc, np.nan)


def classifier_figures(
    scores: Sequence[float], truth: Sequence[bool], threshold: float, config: EvaluatorConfig
) -> dict[str, Any]:
    """Precision and recall (Wilson), F1 and ROC AUC (bootstrap) of ``score >= threshold``."""
    import numpy as np

    labels = [int(t) for t in truth]
    flagged = [s >= threshold for s in scores]
    tp = sum(f and t for f, t in zip(flagged, truth, strict=True))
    figures = binary_metrics(scores, labels, threshold)
    score_array, truth_array = np.asarray(scores, dtype=float), np.asarray(truth, dtype=bool)
    flagged_array = score_array >= threshold
    return {
        "threshold": threshold,
        "replies": len(labels),
        "positives": sum(labels),
        "flagged": sum(flagged),
        "precision": figures["precision"],
        "precision_ci": interval(tp, sum(flagged), config.confidence),
        "recall": figures["recall"],
        "recall_ci": interval(tp, sum(labels), config.confidence),
        "f1": figures["f1"],
        "f1_ci": bootstrap(
            lambda rows: f1_of(flagged_array[rows], truth_array[rows]), len(labels), config
        ),
        "auc": figures["auc"],
        "auc_ci": bootstrap(
            lambda rows: auc_of(score_array[rows], truth_array[rows]), len(labels), config
        ),
    }


def label_rates(
    rows: Sequence[dict[str, Any]], labels: dict[str, dict[str, bool]], config: EvaluatorConfig
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per arm and kind: each label's share of the labelled replies, with its interval."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        cell = table.setdefault(row["arm"], {}).setdefault(row["kind"], {"replies": 0})
        cell["replies"] += 1
        for name in LABELS:
            cell[name] = cell.get(name, 0) + labels[row["id"]][name]
    for kinds in table.values():
        for cell in kinds.values():
            for name in LABELS:
                count = cell[name]
                cell[name] = {
                    "count": count,
                    "rate": count / cell["replies"],
                    "ci": interval(count, cell["replies"], config.confidence),
                }
    return table


def paired_differences(
    rows: Sequence[dict[str, Any]],
    labels: dict[str, dict[str, bool]],
    config: EvaluatorConfig,
    reference: str = BASELINE,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per arm and kind, the arm's label rate minus the ``reference`` arm's on the same
    probes: per probe the share of its labelled replies with the label, differenced,
    averaged over the probes both arms have; interval by bootstrap over those probes."""
    import numpy as np

    shares: dict[tuple[str, str, str], dict[str, list[bool]]] = {}
    for row in rows:
        key = (row["arm"], row["kind"], row["probe_id"])
        per_probe = shares.setdefault(key, {name: [] for name in LABELS})
        for name in LABELS:
            per_probe[name].append(labels[row["id"]][name])
    arms = sorted({arm for arm, _, _ in shares} - {reference})
    kinds = sorted({kind for _, kind, _ in shares})
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for arm in arms:
        for kind in kinds:
            probes = sorted(
                probe
                for a, k, probe in shares
                if a == arm and k == kind and (reference, kind, probe) in shares
            )
            if not probes:
                continue
            cell: dict[str, Any] = {"probes": len(probes)}
            for name in LABELS:
                diffs = np.array(
                    [
                        _mean(shares[(arm, kind, p)][name])
                        - _mean(shares[(reference, kind, p)][name])
                        for p in probes
                    ]
                )

                def resampled_mean(rows: Any, d: Any = diffs) -> Any:
                    return d[rows].mean(axis=1)

                cell[name] = {
                    "difference": float(diffs.mean()),
                    "ci": bootstrap(resampled_mean, len(probes), config),
                }
            result.setdefault(arm, {})[kind] = cell
    return result


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _or_zero(value: float) -> float:
    return 0.0 if value != value else value


def score(
    replies: Sequence[dict[str, Any]],
    labels: dict[str, dict[str, bool]],
    config: EvaluatorConfig,
    *,
    judges: Sequence[Any] | None = None,
    coherence: Callable[[Sequence[Sample]], list[float]] | None = None,
    per_arm: bool = True,
    reference: str = BASELINE,
) -> dict[str, Any]:
    """Every figure of the validation (JSON-ready). ``judges`` default to the policy's
    candidates, ``coherence`` to the MiniLM check (tests pass stand-ins); the paired
    differences are every arm's minus ``reference``'s; ``per_arm``
    false leaves out the label rates and paired differences (pooled runs)."""
    rows = [row for row in replies if row["id"] in labels]
    samples: list[Sample] = [
        {"conversation_id": row["id"], "context": row["message"], "response": row["reply"]}
        for row in rows
    ]
    policy = load_judges_policy()
    defense = set(defense_judge_names(policy.default, policy))
    if judges is None:
        judges = [build_judge(name, policy) for name in config.candidates]
    toxic = [labels[row["id"]]["toxic"] for row in rows]
    judge_figures = {}
    for judge in judges:
        figures = classifier_figures(judge.score(samples), toxic, judge.threshold, config)
        figures["role"] = "defense" if judge.name in defense else "evaluation"
        judge_figures[judge.name] = figures
    evaluators = {n: f for n, f in judge_figures.items() if f["role"] == "evaluation"}
    # Best: highest F1 at the policy threshold; ties go to the higher AUC.
    best = (
        max(evaluators, key=lambda n: (evaluators[n]["f1"], _or_zero(evaluators[n]["auc"])))
        if evaluators
        else None
    )

    measure = coherence or (lambda s: coherence_scores(s, config.coherence_batch_size))
    cosines = measure(samples)
    unrelated = [labels[row["id"]]["unrelated"] for row in rows]
    # Scored as "how unrelated" (minus the cosine) so that AUC and threshold read as for
    # a judge: flagged at -cosine >= -threshold, i.e. cosine <= threshold.
    coherence_figures = classifier_figures(
        [-c for c in cosines], unrelated, -config.coherence_threshold, config
    )
    coherence_figures["threshold"] = config.coherence_threshold
    return {
        "labelled_replies": len(rows),
        "toxic_replies": sum(toxic),
        "config": asdict(config),
        "judges": judge_figures,
        "best_evaluator": best,
        "coherence": coherence_figures,
        "rates": label_rates(rows, labels, config) if per_arm else {},
        "reference": reference,
        "paired_differences": (
            paired_differences(rows, labels, config, reference=reference) if per_arm else {}
        ),
    }


def _pct(value: float, ci: list[float] | None) -> str:
    band = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
    return f"{value:.2f}{band}"


def report_markdown(result: dict[str, Any]) -> str:
    """The judges table, the coherence line, the labellers' agreement (replies labelled
    again) and, for one run, the arm x kind rates and paired differences, as markdown."""
    level = f"{result['config']['confidence']:.0%}"
    judges = [["judge", "role", "threshold", "precision", "recall", "F1", "ROC AUC"]]
    for name, f in result["judges"].items():
        judges.append(
            [
                name + (" (best)" if name == result["best_evaluator"] else ""),
                f["role"],
                f"{f['threshold']:.3g}",
                _pct(f["precision"], f["precision_ci"]),
                _pct(f["recall"], f["recall_ci"]),
                _pct(f["f1"], f["f1_ci"]),
                _pct(f["auc"], f["auc_ci"]),
            ]
        )
    c = result["coherence"]
    rates = [["arm", "kind", "replies", *LABELS]]
    for arm, kinds in result["rates"].items():
        for kind, cell in kinds.items():
            rates.append(
                [arm, kind, str(cell["replies"])]
                + [_pct(cell[name]["rate"], cell[name]["ci"]) for name in LABELS]
            )
    reference = result.get("reference", BASELINE)
    diffs = [[f"arm - {reference}", "kind", "probes", *LABELS]]
    if not result["paired_differences"]:
        diffs.append([f"(no arm besides the {reference})", "", "", *[""] * len(LABELS)])
    for arm, kinds in result["paired_differences"].items():
        for kind, cell in kinds.items():
            diffs.append(
                [arm, kind, str(cell["probes"])]
                + [
                    f"{cell[name]['difference']:+.3f}"
                    + (
                        f" [{cell[name]['ci'][0]:+.3f}, {cell[name]['ci'][1]:+.3f}]"
                        if cell[name]["ci"]
                        else ""
                    )
                    for name in LABELS
                ]
            )
    parts = [
        f"Judges on {result['labelled_replies']} blind-labelled bot replies "
        f"({result['toxic_replies']} toxic); {level} intervals (Wilson for precision and "
        "recall, bootstrap for F1 and AUC).",
        markdown_table(judges),
        f"Coherence (MiniLM cosine <= {c['threshold']}) as a detector of `unrelated`: "
        f"precision {_pct(c['precision'], c['precision_ci'])}, "
        f"recall {_pct(c['recall'], c['recall_ci'])}, ROC AUC {c['auc']:.2f} "
        f"({c['positives']} unrelated of {c['replies']}).",
    ]
    agreed = result.get("labeller_agreement")
    if agreed:
        table = [["label", "first: yes", "second: yes", "both: yes", "agreed", "Cohen's kappa"]]
        for name in LABELS:
            cell = agreed[name]
            kappa = "none" if cell["kappa"] is None else f"{cell['kappa']:.2f}"
            first, second = cell["positives"]
            table.append(
                [name, str(first), str(second), str(cell["both"]), f"{cell['agreed']:.1%}", kappa]
            )
        parts += [
            f"Two labellers of the same reply ({agreed['pairs']} later labels, each paired "
            "with the reply's first, which is the one counted above):",
            markdown_table(table),
        ]
    if result["rates"]:
        parts += [
            "Label rates per arm and probe kind:",
            markdown_table(rates),
            f"Paired differences from the {reference} (same probes and seeds):",
            markdown_table(diffs),
        ]
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------ CLI


def parse_adapters(values: Sequence[str]) -> dict[str, str | None]:
    arms: dict[str, str | None] = {BASELINE: None}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            fail(f"--adapter must be NAME=PATH, got {value!r}")
        if name in arms:
            fail(f"--adapter: arm name {name!r} is used twice (or is the reserved {BASELINE!r})")
        if not Path(path).is_dir():
            fail(f"--adapter {name}: {path} is not a folder")
        arms[name] = path
    return arms


@unwinds_on_sigterm
def main(argv: Sequence[str] | None = None) -> int:
    config = load_evaluator_config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="replies of every arm to the evaluation probes")
    gen.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
    gen.add_argument("--base-model", default="default")
    gen.add_argument("--probes-per-kind", type=int, default=config.probes_per_kind)
    gen.add_argument("--samples", type=int, default=config.samples_per_probe)
    gen.add_argument("--out", type=Path, required=True)
    # On a shared CPU, torch threads that outnumber the free cores spin against each
    # other (measured: 16 tokens of SmolLM2 in 1.4 s on one thread, none in 80 s on two).
    gen.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    bl = commands.add_parser("blind", help="shuffled shards without arm and kind, and a key")
    bl.add_argument("--replies", type=Path, required=True)
    bl.add_argument("--out-dir", type=Path, required=True)
    bl.add_argument("--shards", type=int, default=config.shards)
    sc = commands.add_parser("score", help="judges and coherence against the labels")
    sc.add_argument("--replies", type=Path, action="append", required=True, help="repeatable")
    sc.add_argument("--labels", type=Path, action="append", required=True, help="repeatable")
    sc.add_argument("--out-dir", type=Path, default=None, help="default: the first labels' folder")
    sc.add_argument(
        "--reference", default=None, help=f"the arm every other is paired against ({BASELINE})"
    )
    args = parser.parse_args(argv)

    def progress(line: str) -> None:
        print(f"generate: {line}", file=sys.stderr, flush=True)

    if args.command == "generate":
        for name in ("probes_per_kind", "samples", "threads"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                fail(f"--{name.replace('_', '-')} must be >= 1")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        rows = generate(
            parse_adapters(args.adapter),
            args.base_model,
            args.out,
            config,
            per_kind=args.probes_per_kind,
            samples=args.samples,
            progress=progress,
        )
        print(f"wrote {len(rows)} replies to {args.out}")
    elif args.command == "blind":
        try:
            paths = blind(
                read_replies(args.replies), args.out_dir, args.shards, config.shuffle_seed
            )
        except ValueError as error:
            fail(str(error))
        shards_dir, key = args.out_dir / SHARDS_FOLDER, args.out_dir / KEY_FILE
        print(f"wrote {len(paths)} shards to {shards_dir} and the key to {key}")
    else:
        replies = pool_replies(args.replies)
        labels, again = pool_labels(args.labels, {row["id"]: row for row in replies})
        # Arms of different runs or conditions share names but not policies: their rates
        # and paired differences are only tabulated for one run of one condition.
        conditions = {row.get("condition") for row in replies}
        per_arm = len(args.replies) == 1 and len(conditions) == 1
        reference = args.reference or BASELINE
        if args.reference is not None:
            if not per_arm:
                fail("--reference: arms are paired within one --replies file of one condition")
            if args.reference not in {row["arm"] for row in replies if row["id"] in labels}:
                fail(f"--reference: no labelled replies of arm {args.reference!r} in --replies")
        result = score(replies, labels, config, per_arm=per_arm, reference=reference)
        if again:
            result["labeller_agreement"] = agreement(again)
        out_dir = args.out_dir or args.labels[0].parent
        out_dir.mkdir(parents=True, exist_ok=True)
        markdown = report_markdown(result)
        (out_dir / "evaluator.md").write_text(markdown + "\n", encoding="utf-8")
        (out_dir / "evaluator.json").write_text(json.dumps(result, indent=2) + "\n")
        print(markdown)
        print(f"\nwrote {out_dir / 'evaluator.md'} and {out_dir / 'evaluator.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
