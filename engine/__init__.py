"""The engine role: a vLLM replica with runtime LoRA, and how adapter versions reach it.

- ``EngineSupervisor`` starts one vLLM server (CPU or CUDA build), waits until it answers
  and restarts it when it dies (``tuneshield engine``).
- ``VLLMClient`` speaks vLLM's runtime-LoRA contract (load, unload, list, probe) with
  typed errors for its 400/404 answers.
- ``HotSwap`` loads a version, proves it answers, then flips the public alias in the
  store; ``reconcile_engine`` loads every alias's active version into an engine that
  lacks it (after a restart).
"""

from __future__ import annotations

from engine._cli import engine
from engine._client import (
    AdapterAlreadyLoaded,
    AdapterError,
    AdapterNotFound,
    AdapterRejected,
    EngineUnavailable,
    VLLMClient,
    VLLMError,
)
from engine._hotswap import (
    HotSwap,
    SwapRefused,
    SwapResult,
    ensure_identity_adapter,
    identity_version,
    restore_on_ready,
)
from engine._supervisor import (
    EngineConfig,
    EngineError,
    EngineSupervisor,
    load_engine_config,
    require_rank_fits,
    resolve_build,
    resolve_dtype,
)

__all__ = [
    "AdapterAlreadyLoaded",
    "AdapterError",
    "AdapterNotFound",
    "AdapterRejected",
    "EngineConfig",
    "EngineError",
    "EngineSupervisor",
    "EngineUnavailable",
    "HotSwap",
    "SwapRefused",
    "SwapResult",
    "VLLMClient",
    "VLLMError",
    "engine",
    "ensure_identity_adapter",
    "identity_version",
    "load_engine_config",
    "require_rank_fits",
    "resolve_build",
    "resolve_dtype",
    "restore_on_ready",
]
