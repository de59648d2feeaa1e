"""End-to-end fixtures: one real vLLM engine per session, on the tiny model.

Starting vLLM costs 1-2 minutes on a small CPU machine, so every e2e test shares one
engine (``tiny_engine``). Tests load adapters under names of their own and unload them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_engine import TinyEngine, free_port, make_random_adapter, make_tiny_identity_adapter

from engine import EngineSupervisor, load_engine_config


@pytest.fixture(scope="session")
def tiny_engine(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TinyEngine]:
    """vLLM (CPU or GPU build, whichever is installed) serving the tiny model with LoRA."""
    folder = tmp_path_factory.mktemp("engine")
    identity = make_tiny_identity_adapter(tiny_model_dir, folder / "identity")
    random = make_random_adapter(tiny_model_dir, folder / "random")
    # float32 so that vLLM's logprobs can be compared with transformers' exactly.
    config = load_engine_config(
        port=free_port(),
        dtype="float32",
        max_model_len=512,
        max_lora_rank=16,
        max_loras=2,
        kv_cache_gib=1,
        startup_timeout_s=360,
        shutdown_timeout_s=20,
    )
    supervisor = EngineSupervisor(
        config, tiny_model_dir, log_path=folder / "engine.log", monitor=False
    )
    with supervisor:
        yield TinyEngine(config, supervisor, tiny_model_dir, identity, random)
