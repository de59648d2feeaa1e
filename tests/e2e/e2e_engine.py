"""Helpers for the real-engine fixture: the engine handle and adapter makers."""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass
from pathlib import Path

from learner.engine import EngineConfig, EngineSupervisor

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_RANK = 8


@dataclass
class TinyEngine:
    """A running vLLM on the tiny model, and two adapter folders made for it."""

    config: EngineConfig
    supervisor: EngineSupervisor
    model_dir: Path
    identity_adapter: Path
    """B = 0: the base model's outputs under an adapter name."""
    random_adapter: Path
    """Random A and B: outputs that differ from the base model's."""

    @property
    def root_url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_random_adapter(model_dir: Path, out_dir: Path, seed: int = 1) -> Path:
    """A plain LoRA with random A *and* B (PEFT's init_lora_weights=False)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=ADAPTER_RANK,
        lora_alpha=2 * ADAPTER_RANK,
        target_modules=LORA_TARGETS,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(model, config).save_pretrained(str(out_dir))
    return out_dir


def make_tiny_identity_adapter(model_dir: Path, out_dir: Path) -> Path:
    """The project's identity adapter (tuneshield._train), at a small rank."""
    from tuneshield._train import load_train_config, make_identity_adapter

    train = load_train_config()
    lora = dataclasses.replace(train.lora, r=ADAPTER_RANK, lora_alpha=2 * ADAPTER_RANK)
    result = make_identity_adapter(model_dir, out_dir, dataclasses.replace(train, lora=lora))
    return result.adapter_dir
