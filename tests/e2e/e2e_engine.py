"""Helpers for the real-engine tests: the engine handle, adapter makers, and
`tuneshield serve` run as a subprocess on the tiny model."""

from __future__ import annotations

import dataclasses
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from engine import EngineConfig, EngineSupervisor
from simulation.loopback import free_port, stop, wait_until_ready
from tuneshield import DEFAULT_POLICIES_DIR

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


READY_TIMEOUT_S = 360
STOP_TIMEOUT_S = 60
# A tiny model needs little: keep the engine small so e2e tests fit beside each other.
TINY_ENGINE_ENV = {
    "TUNESHIELD_ENGINE_KV_CACHE_GIB": "1",
    "TUNESHIELD_ENGINE_MAX_MODEL_LEN": "512",
    "TUNESHIELD_ENGINE_MAX_LORAS": "2",
    "TUNESHIELD_ENGINE_STARTUP_TIMEOUT_S": str(READY_TIMEOUT_S),
    "TUNESHIELD_ENGINE_SHUTDOWN_TIMEOUT_S": "20",
}


@dataclass
class ServeRun:
    """A `tuneshield serve` subprocess that answered /healthz."""

    process: subprocess.Popen[bytes]
    port: int
    engine_port: int
    stderr: Path

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr_tail(self) -> str:
        return self.stderr.read_text()[-3000:]


@contextmanager
def serve_subprocess(
    model_dir: Path,
    data_dir: Path,
    env: Mapping[str, str],
    stderr: Path,
    stdout: IO[Any] | int = subprocess.DEVNULL,
) -> Iterator[ServeRun]:
    """`tuneshield serve` on ``model_dir`` with a small engine (``env`` may override its
    settings), ready when yielded; stopped
    (SIGINT, then kill) when the block ends, whatever happened inside it."""
    port, engine_port = free_port(), free_port()
    command = [str(Path(sys.executable).parent / "tuneshield"), "serve",
               "--model", str(model_dir), "--data-dir", str(data_dir),
               "--port", str(port), "--engine-port", str(engine_port)]  # fmt: skip
    with stderr.open("w") as errors:
        process = subprocess.Popen(
            command, stdout=stdout, stderr=errors, env={**TINY_ENGINE_ENV, **env}
        )
    run = ServeRun(process, port, engine_port, stderr)
    try:
        wait_until_ready(
            f"{run.root_url}/healthz", process, READY_TIMEOUT_S, describe_failure=run.stderr_tail
        )
        yield run
    finally:
        # SIGINT, not SIGKILL: serve must stop the engine it started (own process group).
        stop(process, signal.SIGINT, STOP_TIMEOUT_S)


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
    """The project's identity adapter (tuneshield.make_identity_adapter), at a small rank."""
    from tuneshield import load_train_config, make_identity_adapter

    train = load_train_config()
    lora = dataclasses.replace(train.lora, r=ADAPTER_RANK, lora_alpha=2 * ADAPTER_RANK)
    result = make_identity_adapter(model_dir, out_dir, dataclasses.replace(train, lora=lora))
    return result.adapter_dir


def small_policies(folder: Path) -> Path:
    """The project's policies with a round and gates sized for a tiny model and CI."""
    shutil.copytree(DEFAULT_POLICIES_DIR, folder)
    learner = yaml.safe_load((folder / "learner.yaml").read_text())
    learner["round"].update(max_steps=2, sft_epochs=1, dpo_epochs=1, heal_max_new_tokens=8)
    learner["schedule"]["enabled"] = False
    learner["worker"].update(poll_s=0.5, settle_s=0.0)
    learner["control"].update(poll_s=0.2, leader_poll_s=0.5, reconcile_s=1.0)
    (folder / "learner.yaml").write_text(yaml.safe_dump(learner))
    gates = yaml.safe_load((folder / "gates.yaml").read_text())
    # A random tiny model's figures are noise: the gates must run, not judge them. An
    # effect this large needs one reply per kind, and no interval over one reply rejects.
    gates.update(
        samples_per_probe=1,
        max_new_tokens=8,
        perplexity_samples=2,
        effect_reference=0.02,
        effect_candidate=0.98,
        max_perplexity_ratio=1e6,
        min_relevance_ratio=0.0,
    )
    (folder / "gates.yaml").write_text(yaml.safe_dump(gates))
    return folder
