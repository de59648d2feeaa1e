"""Top-p from partial sorts against vLLM's own whole-vocabulary sort, and how it is installed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import engine._cpu_sampling as cpu_sampling
from engine import EngineConfig
from engine._cpu_sampling import NUCLEUS_SAMPLING_ENV, PARTIAL_SORT_WIDTHS, install, nucleus_logits
from engine._supervisor import engine_environment

sampler = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")
VLLM_FUNCTION = sampler.apply_top_k_top_p_pytorch
VOCABULARY = 3 * PARTIAL_SORT_WIDTHS[-1]


def logits_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows from peaked (a nucleus of a few tokens) to flat (wider than every partial
    sort), each with its own p; one row at p = 1 (no top-p)."""
    torch.manual_seed(3)
    spreads = [8.0, 4.0, 2.0, 1.0, 0.5, 0.2, 0.05, 0.01, 3.0, 3.0]
    logits = torch.stack([spread * torch.randn(VOCABULARY) for spread in spreads])
    p = torch.tensor([0.95, 0.9, 0.95, 0.5, 0.95, 0.99, 0.95, 0.9, 0.1, 1.0])
    return logits, p


def test_the_same_tokens_are_kept_as_by_vllms_whole_sort() -> None:
    logits, p = logits_rows()
    sizes = (VLLM_FUNCTION(logits.clone(), None, p.clone()).isfinite()).sum(dim=1)
    # The rows cover every way through: within the narrow partial sort, the wide one, and
    # wider than both (sorted whole).
    assert int(sizes[:-1].min()) < PARTIAL_SORT_WIDTHS[0] < int(sizes[:-1].median())
    assert PARTIAL_SORT_WIDTHS[-1] < int(sizes[:-1].max()) < VOCABULARY
    sorted_whole = []

    def whole_sort(rows: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
        sorted_whole.append(rows.shape[0])
        return VLLM_FUNCTION(rows, None, limits)

    ours = nucleus_logits(logits.clone(), p.clone(), whole_sort)
    theirs = VLLM_FUNCTION(logits.clone(), None, p.clone())
    assert torch.equal(ours.isfinite(), theirs.isfinite())
    assert torch.equal(ours[ours.isfinite()], logits[theirs.isfinite()])
    assert torch.equal(ours[-1], logits[-1])  # p = 1: the row is left as it is
    assert sorted_whole == [int((sizes[:-1] > PARTIAL_SORT_WIDTHS[-1]).sum())]


@pytest.mark.parametrize("vocabulary", [100, PARTIAL_SORT_WIDTHS[0], 1000])
def test_a_narrow_vocabulary_masked_logits_and_nan_rows_keep_what_vllm_keeps(
    vocabulary: int,
) -> None:
    """Logits already at -inf (a logits processor's), a vocabulary narrower than the
    partial sorts, a row of NaN: the same tokens kept as by vLLM's function."""
    torch.manual_seed(5)
    logits = 2 * torch.randn(5, vocabulary)
    logits[0, : vocabulary // 2] = float("-inf")
    logits[1, 1:] = float("-inf")  # one token left
    logits[2, 3] = float("nan")
    p = torch.tensor([0.9, 0.5, 0.9, 0.95, 0.3])
    ours = nucleus_logits(
        logits.clone(), p.clone(), lambda rows, limits: VLLM_FUNCTION(rows, None, limits)
    )
    theirs = VLLM_FUNCTION(logits.clone(), None, p.clone())
    assert torch.equal(ours.isfinite(), theirs.isfinite())
    assert int(ours[1].isfinite().sum()) == 1


def test_no_row_with_top_p_leaves_the_logits_and_sorts_nothing() -> None:
    logits = torch.randn(3, VOCABULARY)

    def whole_sort(rows: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
        raise AssertionError

    assert torch.equal(nucleus_logits(logits.clone(), torch.ones(3), whole_sort), logits)


@pytest.fixture
def restored_vllm_function() -> Iterator[None]:
    saved, kept = sampler.apply_top_k_top_p_pytorch, cpu_sampling._vllm_function
    yield
    sampler.apply_top_k_top_p_pytorch, cpu_sampling._vllm_function = saved, kept


@pytest.mark.usefixtures("restored_vllm_function")
def test_install_replaces_vllms_function_only_when_the_supervisor_asks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(NUCLEUS_SAMPLING_ENV, raising=False)
    install()
    assert sampler.apply_top_k_top_p_pytorch is VLLM_FUNCTION
    monkeypatch.setenv(NUCLEUS_SAMPLING_ENV, "1")
    install()
    install()  # vLLM may load a plugin more than once in a process
    assert sampler.apply_top_k_top_p_pytorch is cpu_sampling.apply_top_k_top_p_pytorch
    assert cpu_sampling._vllm_function is VLLM_FUNCTION
    # vLLM's sampler entry point now masks top-p the new way, and top-k as before.
    logits, p = logits_rows()
    expected = VLLM_FUNCTION(logits.clone(), None, p.clone())
    torch.testing.assert_close(sampler.apply_top_k_top_p(logits.clone(), None, p), expected)
    k = torch.full((logits.shape[0],), 5)
    expected = VLLM_FUNCTION(logits.clone(), k, p.clone(), allow_cpu_sync=True)
    torch.testing.assert_close(sampler.apply_top_k_top_p(logits.clone(), k, p), expected)


@pytest.mark.usefixtures("restored_vllm_function")
def test_install_leaves_vllms_function_when_its_signature_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def apply_top_k_top_p_pytorch(logits: torch.Tensor, p: torch.Tensor) -> None:  # changed
        raise AssertionError

    monkeypatch.setattr(sampler, "apply_top_k_top_p_pytorch", apply_top_k_top_p_pytorch)
    monkeypatch.setenv(NUCLEUS_SAMPLING_ENV, "1")
    install()
    assert sampler.apply_top_k_top_p_pytorch is apply_top_k_top_p_pytorch


def test_the_engine_environment_carries_the_policy_setting() -> None:
    on = engine_environment(EngineConfig(), build="cpu", base={}, preload=[])
    config = EngineConfig(cpu_nucleus_sampling=False)
    off = engine_environment(config, build="cpu", base={}, preload=[])
    assert on[NUCLEUS_SAMPLING_ENV] == "1" and off[NUCLEUS_SAMPLING_ENV] == "0"
    assert NUCLEUS_SAMPLING_ENV not in engine_environment(EngineConfig(), build="cuda", base={})
