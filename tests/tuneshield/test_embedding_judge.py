"""The embedding judge: training, the artefact round trip, and its guards."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tuneshield._embedding_judge import (
    ArtefactError,
    EmbeddingArtefact,
    EmbeddingJudge,
    EmbeddingTrainingConfig,
    next_version,
    train_embedding_judge,
    training_data_hash,
)
from tuneshield._samples import Sample

TOXIC_WORDS = ("hate", "kill", "stupid", "ugly")
FAKE_PRINT = "fake-encoder"


def fake_encoder(texts: Sequence[str]) -> Any:
    """Two features: how many toxic words, and text length; unit-normalised like MiniLM."""
    rows = np.array(
        [[sum(w in t.lower() for w in TOXIC_WORDS) + 0.01, len(t) / 100 + 0.01] for t in texts],
        dtype=np.float32,
    )
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def labelled(response: str, label: int, context: str = "how are you?") -> Sample:
    return {
        "conversation_id": response,
        "context": [{"role": "user", "content": context}] if context else [],
        "response": response,
        "label": label,
    }


HANDFUL = [
    labelled("I hate you, you stupid thing", 1),
    labelled("I will kill you", 1),
    labelled("you are ugly and stupid", 1),
    labelled("people like you I hate", 1, context=""),
    labelled("I am doing well, thanks for asking", 0),
    labelled("pretty good, just got back from a walk", 0),
    labelled("fine, a bit tired after work today", 0, context=""),
    labelled("great, I baked bread this morning", 0),
]
CONFIG = EmbeddingTrainingConfig(cv_folds=2)


def test_train_save_load_round_trip(tmp_path: Path) -> None:
    """A saved artefact loads back with the same weights, scores and provenance."""
    artefact = train_embedding_judge(
        HANDFUL, CONFIG, encoder=fake_encoder, fingerprint=FAKE_PRINT, version="embedding-v7"
    )
    folder = artefact.save(tmp_path / "embedding-v7")
    loaded = EmbeddingArtefact.load(folder)
    np.testing.assert_allclose(loaded.coef, artefact.coef)
    assert loaded.intercept == pytest.approx(artefact.intercept)
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["version"] == "embedding-v7"
    assert meta["training"]["data_sha256"] == training_data_hash(HANDFUL)
    assert meta["training"]["samples"] == 8 and meta["training"]["toxic"] == 4
    assert meta["embedding_model"]["weights_sha256"] == FAKE_PRINT
    assert 0.0 <= meta["cross_validation"]["threshold"] <= 1.0
    before = EmbeddingJudge(artefact, encoder=fake_encoder, fingerprint=FAKE_PRINT)
    after = EmbeddingJudge(loaded, encoder=fake_encoder, fingerprint=FAKE_PRINT)
    probes = [labelled("I hate you so much", 1), labelled("thanks, I had a nice day", 0)]
    assert after.score(probes) == pytest.approx(before.score(probes))
    toxic, benign = after.score(probes)
    assert toxic > benign


def test_artefact_from_another_encoder_is_refused() -> None:
    """Loading weights trained on a different encoder fails with a retrain hint."""
    artefact = train_embedding_judge(HANDFUL, CONFIG, encoder=fake_encoder, fingerprint=FAKE_PRINT)
    with pytest.raises(ArtefactError, match="another embedding model"):
        EmbeddingJudge(artefact, encoder=fake_encoder, fingerprint="other")


def test_malformed_or_future_artefacts_are_refused(tmp_path: Path) -> None:
    """A missing file or an unknown format version is an ArtefactError, never a crash."""
    with pytest.raises(ArtefactError, match=r"missing metadata\.json"):
        EmbeddingArtefact.load(tmp_path)
    artefact = train_embedding_judge(HANDFUL, CONFIG, encoder=fake_encoder, fingerprint=FAKE_PRINT)
    artefact.metadata["format_version"] = 99
    with pytest.raises(ArtefactError, match="format_version 99"):
        EmbeddingArtefact.load(artefact.save(tmp_path / "future"))


def test_training_needs_both_classes() -> None:
    """All-benign training data is rejected with the counts."""
    with pytest.raises(ValueError, match="0 toxic and 4 benign"):
        train_embedding_judge(HANDFUL[4:], CONFIG, encoder=fake_encoder, fingerprint=FAKE_PRINT)


def test_data_hash_changes_with_a_label() -> None:
    """Flipping one label changes the training-data hash recorded in the artefact."""
    flipped = [dict(s) for s in HANDFUL]
    flipped[0]["label"] = 0
    assert training_data_hash(flipped) != training_data_hash(HANDFUL)


def test_next_version_counts_up(tmp_path: Path) -> None:
    """New artefacts get the next free embedding-vN name."""
    assert next_version(tmp_path) == "embedding-v1"
    (tmp_path / "embedding-v1").mkdir()
    (tmp_path / "embedding-v3").mkdir()
    assert next_version(tmp_path) == "embedding-v4"


def test_real_minilm_judge_round_trip(tmp_path: Path) -> None:
    """With the shipped MiniLM encoder, a judge trained on a handful separates toxic from benign."""
    artefact = train_embedding_judge(HANDFUL, CONFIG)
    judge = EmbeddingJudge(EmbeddingArtefact.load(artefact.save(tmp_path / "a")))
    toxic, benign = judge.score(
        [labelled("you stupid ugly idiot, I hate you", 1), labelled("doing well, thanks", 0)]
    )
    assert toxic > benign
