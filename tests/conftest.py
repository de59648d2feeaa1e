"""Shared fixtures. Add fixtures here; do not rewrite other people's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No model hub on these machines: anything that tries one must fail fast, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template, built once per session."""
    from tuneshield._models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
