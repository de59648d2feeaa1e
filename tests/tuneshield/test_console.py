"""What the CLI verbs share: stage bars are the only progress display."""

from __future__ import annotations

import os

import pytest
from tqdm import tqdm

from tuneshield import stage_bars


def library_bar() -> None:
    """A bar drawn as TRL's DPO trainer draws its reference log-prob pass."""
    for _ in tqdm(range(3), desc="a library's bar", disable=bool(os.environ.get("TQDM_DISABLE"))):
        pass


def test_stage_bars_silence_the_libraries_tqdm_bars(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A library's own tqdm bar (TRL's reference log-prob pass) would interleave with the
    stage bars: inside them it prints nothing, and the environment is restored after."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with stage_bars() as progress:
        progress("train", 1, 2)
        library_bar()
    assert "a library's bar" not in capsys.readouterr().err
    assert "TQDM_DISABLE" not in os.environ
    library_bar()
    assert "a library's bar" in capsys.readouterr().err
