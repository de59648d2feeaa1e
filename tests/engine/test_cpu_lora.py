"""The grouped CPU LoRA products against vLLM's own torch ops, and how they are installed."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import pytest
import torch

import engine._cpu_lora as cpu_lora
from engine import EngineConfig
from engine._cpu_lora import GROUPED_LORA_ENV, bgmv_expand, bgmv_expand_slice, bgmv_shrink, install
from engine._supervisor import engine_environment

vllm_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

SLOTS, RANK, WIDTH, TOKENS = 3, 4, 24, 10
MODULES = ("vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu",
           "vllm.lora.ops.torch_ops.lora_ops")  # fmt: skip
NAMES = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def indices_cases() -> list[torch.Tensor]:
    """One adapter for every token, several, and some tokens without one (-1)."""
    return [
        torch.full((TOKENS,), 1),
        torch.tensor([0, 2, 2, 1, 0, 0, 2, 1, 1, 0]),
        torch.tensor([2, -1, 2, 2, -1, 0, 0, 2, -1, 1]),
    ]


def expected_products(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor):
    """Token by token, with no LoRA term where the index is -1."""
    rows = [
        torch.zeros(weights.shape[-2]) if slot < 0 else weights[slot].squeeze(0) @ token
        for token, slot in zip(inputs, indices.tolist(), strict=True)
    ]
    return torch.stack(rows)


@pytest.mark.parametrize("indices", indices_cases())
def test_shrink_and_expand_give_each_token_its_adapters_product(
    indices: torch.Tensor,
) -> None:
    torch.manual_seed(0)
    inputs, shrink = torch.randn(TOKENS, WIDTH), torch.randn(SLOTS, 1, RANK, WIDTH)
    small, expand = torch.randn(TOKENS, RANK), torch.randn(SLOTS, 1, WIDTH, RANK)
    ours, theirs = torch.zeros(TOKENS, RANK), torch.zeros(TOKENS, RANK)
    bgmv_shrink(inputs, shrink, ours, indices, 0.5)
    expected = 0.5 * expected_products(inputs, shrink, indices)
    torch.testing.assert_close(ours, expected)
    ours_out, theirs_out = torch.ones(TOKENS, WIDTH), torch.ones(TOKENS, WIDTH)
    bgmv_expand(small, expand, ours_out, indices, add_inputs=True)
    torch.testing.assert_close(ours_out, 1 + expected_products(small, expand, indices))
    sliced = torch.ones(TOKENS, 2 * WIDTH)
    bgmv_expand_slice(small, expand, sliced, indices, WIDTH, WIDTH, add_inputs=False)
    torch.testing.assert_close(sliced[:, WIDTH:], expected_products(small, expand, indices))
    assert torch.equal(sliced[:, :WIDTH], torch.ones(TOKENS, WIDTH))
    if int(indices.min()) >= 0:
        # vLLM's ops give the same sums wherever every token names a slot.
        vllm_ops.bgmv_shrink(inputs, shrink, theirs, indices, 0.5)
        torch.testing.assert_close(ours, theirs)
        vllm_ops.bgmv_expand(small, expand, theirs_out, indices, add_inputs=True)
        torch.testing.assert_close(ours_out, theirs_out)
        theirs_sliced = torch.ones(TOKENS, 2 * WIDTH)
        vllm_ops.bgmv_expand_slice(small, expand, theirs_sliced, indices, WIDTH, WIDTH, False)
        torch.testing.assert_close(sliced, theirs_sliced)


def test_expand_overwrites_broadcasts_one_row_and_meets_a_narrower_output() -> None:
    """The corners of vLLM's expand: add_inputs off, one product row for every output row,
    an output narrower than the adapter's (padded) width."""
    torch.manual_seed(2)
    small, expand = torch.randn(1, RANK), torch.randn(SLOTS, 1, WIDTH, RANK)
    for add_inputs in (False, True):
        ours, theirs = torch.ones(5, WIDTH - 4), torch.ones(5, WIDTH - 4)
        bgmv_expand(small, expand, ours, torch.tensor([1]), add_inputs=add_inputs)
        vllm_ops.bgmv_expand(small, expand, theirs, torch.tensor([1]), add_inputs=add_inputs)
        torch.testing.assert_close(ours, theirs)
        assert not torch.equal(ours, torch.ones(5, WIDTH - 4))


def test_a_token_without_an_adapter_gets_no_lora_term_where_vllm_takes_the_last_slot() -> None:
    """vLLM's ops index weights[-1]: the base model's tokens got the last slot's adapter."""
    torch.manual_seed(1)
    inputs, weights = torch.randn(2, WIDTH), torch.randn(SLOTS, 1, RANK, WIDTH)
    indices = torch.tensor([-1, 0])
    ours, theirs = torch.zeros(2, RANK), torch.zeros(2, RANK)
    bgmv_shrink(inputs, weights, ours, indices)
    vllm_ops.bgmv_shrink(inputs, weights, theirs, indices)
    assert torch.equal(ours[0], torch.zeros(RANK))
    torch.testing.assert_close(theirs[0], weights[SLOTS - 1, 0] @ inputs[0])
    torch.testing.assert_close(ours[1], theirs[1])


def test_bf16_weights_give_products_in_the_output_dtype() -> None:
    torch.manual_seed(3)
    inputs, weights = torch.randn(4, WIDTH).to(torch.bfloat16), torch.randn(2, RANK, WIDTH)
    weights = weights.to(torch.bfloat16)
    indices = torch.tensor([0, 1, 1, 0])
    output, theirs = torch.zeros(4, RANK), torch.zeros(4, RANK)
    bgmv_shrink(inputs, weights, output, indices)
    vllm_ops.bgmv_shrink(inputs, weights, theirs, indices)
    assert output.dtype == torch.float32
    torch.testing.assert_close(output, expected_products(inputs.float(), weights.float(), indices))
    torch.testing.assert_close(output, theirs)


def test_no_rows_give_no_products_and_a_length_mismatch_is_refused() -> None:
    weights = torch.randn(SLOTS, 1, RANK, WIDTH)
    empty = torch.zeros(0, RANK)
    bgmv_shrink(torch.zeros(0, WIDTH), weights, empty, torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0, RANK)
    with pytest.raises(ValueError, match="3 LoRA indices for 4 rows"):
        bgmv_shrink(torch.zeros(4, WIDTH), weights, torch.zeros(4, RANK), torch.zeros(3).long())


@pytest.fixture
def restored_vllm_ops() -> Iterator[None]:
    modules = [importlib.import_module(name) for name in MODULES]
    saved = [{name: getattr(module, name) for name in NAMES} for module in modules]
    wrapper = modules[1].PunicaWrapperCPU
    linear, kept = wrapper.__dict__["add_lora_linear"], cpu_lora._vllm_add_lora_linear
    yield
    for module, functions in zip(modules, saved, strict=True):
        for name, function in functions.items():
            setattr(module, name, function)
    wrapper.add_lora_linear, cpu_lora._vllm_add_lora_linear = linear, kept


SLICES = (WIDTH, RANK * 2, RANK * 2)  # q, k and v of a qkv projection


def lora_layer(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A layer's input and output and its three slices' stacked A and B, as vLLM holds
    them (slots x 1 x rank x in, slots x 1 x out x rank)."""
    torch.manual_seed(7)
    x = torch.randn(TOKENS, WIDTH).to(dtype)
    y = torch.randn(TOKENS, sum(SLICES)).to(dtype)
    a = tuple((0.3 * torch.randn(SLOTS, 1, RANK, WIDTH)).to(dtype) for _ in SLICES)
    b = tuple((0.3 * torch.randn(SLOTS, 1, width, RANK)).to(dtype) for width in SLICES)
    return x, y, *a, *b


def layer_reference(x, y, a, b, indices: torch.Tensor, scale: float) -> torch.Tensor:
    """Token by token in float32: y + (x @ A.T * scale) @ B.T of the token's slot."""
    expected, offset = y.float().clone(), 0
    for lora_a, lora_b, width in zip(a, b, SLICES, strict=True):
        for token, slot in enumerate(indices.tolist()):
            if slot >= 0:
                shrunk = x[token].float() @ lora_a[slot, 0].float().t() * scale
                expected[token, offset : offset + width] += shrunk @ lora_b[slot, 0].float().t()
        offset += width
    return expected


@pytest.mark.usefixtures("restored_vllm_ops")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("indices", [*indices_cases(), torch.full((TOKENS,), -1)])
def test_a_lora_layer_gives_each_token_its_adapters_term_the_short_way_or_vllms(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, indices: torch.Tensor
) -> None:
    """One adapter for the step takes the short way (it must not reach the per-token
    ops); several adapters, or none (-1), go through vLLM's wrapper to the grouped ops."""
    punica = importlib.import_module("vllm.lora.punica_wrapper.punica_cpu")
    monkeypatch.setenv(GROUPED_LORA_ENV, "1")
    install()
    assert punica.PunicaWrapperCPU.add_lora_linear is cpu_lora.add_lora_linear
    wrapper = punica.PunicaWrapperCPU(TOKENS, TOKENS, "cpu")
    wrapper._update_prefill_metadata(indices)
    wrapper.is_prefill = True
    x, y, *stacked = lora_layer(dtype)
    a, b = tuple(stacked[: len(SLICES)]), tuple(stacked[len(SLICES) :])
    for scale in (1.0, 0.5):
        expected = layer_reference(x, y, a, b, indices, scale)
        if len(set(indices.tolist())) == 1:  # the short way never calls the ops
            for name in NAMES:  # (restored_vllm_ops puts them back)
                setattr(punica, name, None)
        output = y.clone()
        wrapper.add_lora_linear(output, x, a, b, scale, SLICES)
        tolerance = 1e-5 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(output.float(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.usefixtures("restored_vllm_ops")
def test_install_replaces_the_ops_only_when_the_supervisor_asks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    modules = [importlib.import_module(name) for name in MODULES]
    monkeypatch.delenv(GROUPED_LORA_ENV, raising=False)
    install()
    assert all(module.bgmv_shrink is not bgmv_shrink for module in modules)
    monkeypatch.setenv(GROUPED_LORA_ENV, "1")
    install()
    install()  # vLLM may load a plugin more than once in a process
    assert all(getattr(module, name).__module__ == "engine._cpu_lora"
               for module in modules for name in NAMES)  # fmt: skip
    # The prefill op vLLM's CPU LoRA layers call: two sequences of 3 and 2 tokens, in slot
    # 2 and without an adapter, get slot 2's product and none (vLLM's: slot 2's again).
    torch.manual_seed(4)
    inputs, weights = torch.randn(5, WIDTH), torch.randn(SLOTS, 1, RANK, WIDTH)
    output = torch.zeros(5, RANK)
    prefill = importlib.import_module("vllm.lora.ops.torch_ops.lora_ops")
    prefill.sgmv_shrink(inputs, weights, output, torch.tensor([0, 3]), torch.tensor([3, 2]),
                        torch.tensor([2, -1]), 2, 3, 5, 1.0)  # fmt: skip
    torch.testing.assert_close(output[:3], inputs[:3] @ weights[2, 0].t())
    assert torch.equal(output[3:], torch.zeros(2, RANK))


@pytest.mark.usefixtures("restored_vllm_ops")
@pytest.mark.parametrize("case", ["float32 output", "an unknown argument", "a buffer"])
def test_a_step_with_one_adapter_goes_vllms_way_where_the_short_one_would_differ(
    monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """Mixed dtypes (vLLM's shrink sums into float32), an argument the short way does not
    know (vLLM's wrapper passes them on to its ops) or a caller's own buffer: vLLM's
    wrapper, with the same result as before."""
    punica = importlib.import_module("vllm.lora.punica_wrapper.punica_cpu")
    monkeypatch.setenv(GROUPED_LORA_ENV, "1")
    install()
    calls = []
    vllms = cpu_lora._vllm_add_lora_linear

    def spy(*args: object, **kwargs: object) -> None:
        calls.append(kwargs)
        vllms(*args, **kwargs)

    monkeypatch.setattr(cpu_lora, "_vllm_add_lora_linear", spy)
    wrapper = punica.PunicaWrapperCPU(TOKENS, TOKENS, "cpu")
    indices = torch.full((TOKENS,), 1)
    wrapper._update_prefill_metadata(indices)
    wrapper.is_prefill = True
    x, y, *stacked = lora_layer(torch.bfloat16)
    a, b = tuple(stacked[: len(SLICES)]), tuple(stacked[len(SLICES) :])
    output, extra = y.clone(), {}
    if case == "float32 output":
        output = output.float()
    elif case == "an unknown argument":
        extra = {"layer_name": "qkv_proj"}
    else:
        extra = {"buffer": tuple(torch.zeros(TOKENS, RANK) for _ in SLICES)}
    wrapper.add_lora_linear(output, x, a, b, 1.0, SLICES, **extra)
    assert len(calls) == 1
    expected = layer_reference(x, y, a, b, indices, 1.0)
    torch.testing.assert_close(output.float(), expected, rtol=5e-2, atol=5e-2)


@pytest.mark.usefixtures("restored_vllm_ops")
def test_install_leaves_vllms_ops_when_their_signature_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lora_ops = importlib.import_module("vllm.lora.ops.torch_ops.lora_ops")

    def bgmv_shrink(inputs: torch.Tensor, weights: torch.Tensor) -> None:  # a changed op
        raise AssertionError

    monkeypatch.setattr(lora_ops, "bgmv_shrink", bgmv_shrink)
    monkeypatch.setenv(GROUPED_LORA_ENV, "1")
    install()
    assert lora_ops.bgmv_shrink is bgmv_shrink
    assert lora_ops.bgmv_expand.__module__ != "engine._cpu_lora"
    punica = importlib.import_module("vllm.lora.punica_wrapper.punica_cpu")
    assert punica.PunicaWrapperCPU.add_lora_linear is not cpu_lora.add_lora_linear


@pytest.mark.usefixtures("restored_vllm_ops")
def test_install_leaves_vllms_lora_layer_when_its_signature_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    punica = importlib.import_module("vllm.lora.punica_wrapper.punica_cpu")

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, output_slices):  # changed
        raise AssertionError

    monkeypatch.setattr(punica.PunicaWrapperCPU, "add_lora_linear", add_lora_linear)
    monkeypatch.setenv(GROUPED_LORA_ENV, "1")
    install()
    assert punica.PunicaWrapperCPU.add_lora_linear is add_lora_linear
    assert punica.bgmv_shrink is cpu_lora.bgmv_shrink  # the ops are replaced all the same


def test_the_engine_environment_carries_the_policy_setting() -> None:
    on = engine_environment(EngineConfig(), build="cpu", base={}, preload=[])
    off = engine_environment(EngineConfig(cpu_grouped_lora=False), build="cpu", base={}, preload=[])
    assert on[GROUPED_LORA_ENV] == "1" and off[GROUPED_LORA_ENV] == "0"
    assert GROUPED_LORA_ENV not in engine_environment(EngineConfig(), build="cuda", base={})
