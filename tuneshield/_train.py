"""Training: LoRA SFT on healed samples, then DPO on the flagged ones, into one adapter.

Stage by stage (``train_adapter``):
1. SFT with TRL's ``SFTTrainer`` on ``sft_rows(all samples)``: a fresh LoRA (or the
   ``init_adapter`` to continue from), assistant-only loss.
2. DPO with TRL's ``DPOTrainer`` on ``dpo_rows(flagged samples)``, continuing the same
   adapter; ``ref_model=None`` makes TRL freeze a copy of the SFT adapter as reference.
3. Save the adapter alone (plain LoRA, which vLLM loads) and ``manifest.json`` into a
   scratch folder, verify it, then rename it into place: a failed run leaves nothing.

Hyper-parameters come from ``policies/training.yaml``; the section keys are the field
names of ``peft.LoraConfig``, ``trl.SFTConfig`` and ``trl.DPOConfig``, passed on as is.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

from tuneshield._datasets import data_hash, dpo_rows, is_flagged, is_healed, sft_rows
from tuneshield._policies import PolicyError, build_config, read_policy
from tuneshield._samples import Sample

DATA_DIR = Path(__file__).resolve().parent / "data"
# TRL ships training templates for the models it knows; SmolLM2's is ours.
TRAINING_TEMPLATES = {"smollm2.jinja": "smollm2_training.jinja"}
MANIFEST = "manifest.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
VERSIONED_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")

ProgressFn = Callable[[str, int, int], None]
"""Called as ``progress(stage, step, total_steps)`` when a stage starts and after each step."""


class TrainError(RuntimeError):
    """Training cannot start or did not produce a valid adapter; the message says why."""


def _check_positive(section: str, values: dict[str, float]) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{section}.{name} must be > 0, got {value}")


@dataclass
class LoraSettings:
    """The LoRA adapter (``peft.LoraConfig`` fields)."""

    r: int = field(metadata={"help": "LoRA rank; vLLM's --max-lora-rank must be >= it."})
    lora_alpha: int = field(metadata={"help": "LoRA scale numerator (scale = alpha / r)."})
    lora_dropout: float = field(metadata={"help": "Dropout on the LoRA input."})
    target_modules: list[str] = field(metadata={"help": "Projection modules to adapt."})

    def __post_init__(self) -> None:
        _check_positive("lora", {"r": self.r, "lora_alpha": self.lora_alpha})
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module")


@dataclass
class StageSettings:
    """What SFT and DPO share (``trl.SFTConfig`` / ``trl.DPOConfig`` fields)."""

    section: ClassVar[str] = "stage"
    learning_rate: float = field(metadata={"help": "Peak learning rate."})
    num_train_epochs: float = field(metadata={"help": "Passes over the stage's rows."})
    per_device_train_batch_size: int = field(metadata={"help": "Rows per forward pass."})
    gradient_accumulation_steps: int = field(metadata={"help": "Forward passes per step."})
    max_length: int = field(metadata={"help": "Longest row in tokens (a cap, not padding)."})
    max_steps: int = field(metadata={"help": "Cap on optimizer steps; -1 runs the epochs."})
    gradient_checkpointing: bool = field(metadata={"help": "Recompute activations."})

    def __post_init__(self) -> None:
        _check_positive(
            self.section,
            {
                "learning_rate": self.learning_rate,
                "num_train_epochs": self.num_train_epochs,
                "per_device_train_batch_size": self.per_device_train_batch_size,
                "gradient_accumulation_steps": self.gradient_accumulation_steps,
                "max_length": self.max_length,
            },
        )
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"{self.section}.max_steps must be -1 or > 0, got {self.max_steps}")


@dataclass
class SFTSettings(StageSettings):
    """Supervised fine-tuning on every (healed) sample."""

    section: ClassVar[str] = "sft"
    assistant_only_loss: bool = field(
        metadata={"help": "Train on the replies only, not the context turns."}
    )


@dataclass
class DPOSettings(StageSettings):
    """Preference alignment on the flagged samples: healing reply over original reply."""

    section: ClassVar[str] = "dpo"
    beta: float = field(metadata={"help": "DPO temperature (paper: 0.3)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("dpo", {"beta": self.beta})


@dataclass
class TrainConfig:
    """Everything ``train_adapter`` needs besides the data (policies/training.yaml)."""

    seed: int = field(metadata={"help": "Seed for LoRA init, shuffling and dropout."})
    bf16: bool = field(metadata={"help": "bf16 mixed precision (GPUs; slow on most CPUs)."})
    lora: LoraSettings = field(metadata={"help": "The LoRA adapter."})
    sft: SFTSettings = field(metadata={"help": "The SFT stage."})
    dpo: DPOSettings = field(metadata={"help": "The DPO stage."})

    def lora_config(self) -> Any:
        """The ``peft.LoraConfig``: plain LoRA (no ``modules_to_save``), so vLLM loads it."""
        from peft import LoraConfig

        return LoraConfig(task_type="CAUSAL_LM", bias="none", **dataclasses.asdict(self.lora))

    def sft_config(self, output_dir: Path, chat_template_path: Path | None = None) -> Any:
        """The ``trl.SFTConfig`` for the SFT stage."""
        from trl.trainer.sft_config import SFTConfig

        return SFTConfig(
            **dataclasses.asdict(self.sft),
            **self._common(output_dir),
            chat_template_path=str(chat_template_path) if chat_template_path else None,
        )

    def dpo_config(self, output_dir: Path) -> Any:
        """The ``trl.DPOConfig`` for the DPO stage."""
        from trl.trainer.dpo_config import DPOConfig

        return DPOConfig(**dataclasses.asdict(self.dpo), **self._common(output_dir))

    def _common(self, output_dir: Path) -> dict[str, Any]:
        import torch

        # Losses are kept per step for the manifest; checkpoints and trackers are not
        # wanted (the adapter is saved once, atomically, at the end).
        return {
            "output_dir": str(output_dir),
            "seed": self.seed,
            "bf16": self.bf16,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
            "dataloader_pin_memory": torch.cuda.is_available(),
        }


def override_stage(config: TrainConfig, section: str, **values: Any) -> TrainConfig:
    """``config`` with the given fields of one section (lora, sft, dpo) replaced;
    ``None`` values keep the policy's."""
    changes = {name: value for name, value in values.items() if value is not None}
    if not changes:
        return config
    return dataclasses.replace(
        config, **{section: dataclasses.replace(getattr(config, section), **changes)}
    )


def load_train_config(directory: Path | None = None) -> TrainConfig:
    """``policies/training.yaml`` as a ``TrainConfig``; unknown keys are errors."""
    data = read_policy("training", directory)
    where = "policies/training.yaml"
    sections = {"lora": LoraSettings, "sft": SFTSettings, "dpo": DPOSettings}
    values = dict(data)
    for name, cls in sections.items():
        section = values.get(name)
        if not isinstance(section, dict):
            raise PolicyError(f"{where}: missing section '{name}'")
        values[name] = build_config(cls, section, f"{where} [{name}]")
    return build_config(TrainConfig, values, where)


def scaled_train_config(
    seed: int,
    sft_epochs: float,
    dpo_epochs: float,
    max_steps: int,
    sft_learning_rate: float | None = None,
) -> TrainConfig:
    """policies/training.yaml with the seed, epochs per stage, step cap and (``None``: the
    policy's) SFT learning rate of one run."""
    config = dataclasses.replace(load_train_config(), seed=seed)
    for stage, epochs in (("sft", sft_epochs), ("dpo", dpo_epochs)):
        config = override_stage(config, stage, num_train_epochs=epochs, max_steps=max_steps)
    return override_stage(config, "sft", learning_rate=sft_learning_rate)


@dataclass
class TrainResult:
    """Where the adapter went and what its manifest says."""

    adapter_dir: Path
    manifest: dict[str, Any]


def training_chat_template(tokenizer: Any, config: TrainConfig) -> Path | None:
    """The template file SFT must use for assistant-only loss, or None when the model's
    own template serves (it has ``{% generation %}`` markers, or TRL swaps in one)."""
    if not config.sft.assistant_only_loss:
        return None
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if not template:
        raise TrainError("the base model's tokenizer has no chat template")
    if has_generation_markers(template):
        return None
    for original, training in TRAINING_TEMPLATES.items():
        if template == (DATA_DIR / original).read_text(encoding="utf-8"):
            return DATA_DIR / training
    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        raise TrainError(
            "sft.assistant_only_loss needs a chat template with {% generation %} markers and "
            "neither TuneShield nor TRL has one for this model: set assistant_only_loss: false "
            "in policies/training.yaml"
        ) from None
    return None


def verify_adapter(folder: Path) -> None:
    """Raise ``TrainError`` unless ``folder`` holds a plain LoRA adapter vLLM can load."""
    from safetensors import safe_open

    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        raise TrainError(f"{folder}: adapter files missing: {', '.join(missing)}")
    adapter_config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if adapter_config.get("peft_type") != "LORA":
        raise TrainError(f"{folder}: peft_type is {adapter_config.get('peft_type')!r}, not LORA")
    for key in ("modules_to_save", "trainable_token_indices"):
        if adapter_config.get(key):
            raise TrainError(f"{folder}: adapter_config.json sets {key}; vLLM rejects it")
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as tensors:
        foreign = [k for k in tensors.keys() if ".lora_A." not in k and ".lora_B." not in k]  # noqa: SIM118
    if foreign:
        raise TrainError(f"{folder}: tensors other than LoRA A/B saved: {foreign[:3]}")


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux; it is the process peak so far, not per stage.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in VERSIONED_PACKAGES}


def _progress_callback(stage: str, progress: ProgressFn) -> Any:
    from transformers import TrainerCallback

    class _Report(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            progress(stage, 0, state.max_steps)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            progress(stage, state.global_step, state.max_steps)

    return _Report()


def _run_stage(trainer: Any, rows: int) -> dict[str, Any]:
    """Train; return the stage's metrics for the manifest."""
    from transformers import PrinterCallback

    # disable_tqdm swaps tqdm for a callback that prints every log line; progress is ours.
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    output = trainer.train()
    duration = time.perf_counter() - start
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    steps = int(trainer.state.global_step)
    return {
        "rows": rows,
        "steps": steps,
        "final_loss": logs[-1]["loss"] if logs else None,
        "mean_loss": output.training_loss,
        "loss_history": [{"step": e["step"], "loss": e["loss"]} for e in logs],
        "last_log": logs[-1] if logs else {},
        "duration_s": round(duration, 2),
        "seconds_per_step": round(duration / steps, 3) if steps else None,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _load_base(base_path: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)


def _load_tokenizer(base_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_path)


def _lora_summary(model: Any) -> dict[str, Any]:
    lora = model.peft_config["default"]
    return {
        "r": lora.r,
        "lora_alpha": lora.lora_alpha,
        "lora_dropout": lora.lora_dropout,
        "target_modules": sorted(lora.target_modules),
    }


def _save_atomically(
    model: Any, out_dir: Path, manifest: Callable[[], dict[str, Any]], build: Path
) -> dict[str, Any]:
    # Only the trained adapter: DPO adds a frozen "ref" copy that must not ship.
    model.save_pretrained(str(build), selected_adapters=["default"])
    verify_adapter(build)
    content = manifest()
    (build / MANIFEST).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    if out_dir.exists():
        raise TrainError(f"{out_dir} appeared while training; adapter folders are never replaced")
    build.rename(out_dir)
    return content


def _scratch_for(out_dir: Path) -> Path:
    """A build folder next to ``out_dir`` (same filesystem, so the final rename is atomic)."""
    out_dir = out_dir.expanduser()
    if out_dir.exists():
        raise TrainError(f"{out_dir} already exists; adapter folders are never replaced")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.building-"))


def _dpo_plan(samples: Sequence[Sample], dpo: bool) -> tuple[list[dict[str, Any]], str | None]:
    """The DPO rows, or none and the reason DPO is skipped."""
    if not dpo:
        return [], "disabled (--no-dpo)"
    if not any(is_flagged(s) for s in samples):
        return [], "no flagged samples"
    if not is_healed(samples):
        return [], "samples are not healed (no heal_mode / original_response columns)"
    return dpo_rows(samples), None


def train_adapter(
    base_model: str | Path,
    samples: Sequence[Sample],
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    dpo: bool = True,
    init_adapter: str | Path | None = None,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """LoRA SFT on all samples, then DPO on the flagged ones; save adapter + manifest.

    ``samples`` are healed samples (a flagged sample's ``response`` is its healing reply
    and ``original_response`` the reply it replaced). Un-healed samples train SFT as they
    are, with no DPO. ``out_dir`` must not exist; it appears complete or not at all.
    """
    from datasets import Dataset
    from peft import PeftModel
    from transformers import set_seed
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.sft_trainer import SFTTrainer

    from tuneshield._models import resolve_model

    config = config or load_train_config()
    samples = list(samples)
    if not samples:
        raise TrainError("no samples to train on")
    sft_data = sft_rows(samples)
    dpo_data, dpo_skipped = _dpo_plan(samples, dpo)
    out_dir = Path(out_dir).expanduser()
    base_path = resolve_model(base_model)
    build = _scratch_for(out_dir)
    try:
        with tempfile.TemporaryDirectory(prefix="tuneshield-train-") as scratch:
            set_seed(config.seed)
            tokenizer = _load_tokenizer(base_path)
            template = training_chat_template(tokenizer, config)
            model = _load_base(base_path)
            if init_adapter is not None:
                model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
            sft_trainer = SFTTrainer(
                model=model,
                args=config.sft_config(Path(scratch) / "sft", template),
                train_dataset=Dataset.from_list(sft_data),
                processing_class=tokenizer,
                peft_config=None if init_adapter is not None else config.lora_config(),
                callbacks=[_progress_callback("sft", progress)] if progress else None,
            )
            stages: dict[str, Any] = {"sft": _run_stage(sft_trainer, len(sft_data))}
            model = sft_trainer.accelerator.unwrap_model(sft_trainer.model)
            if dpo_data:
                dpo_trainer = DPOTrainer(
                    model=model,
                    ref_model=None,
                    args=config.dpo_config(Path(scratch) / "dpo"),
                    train_dataset=Dataset.from_list(dpo_data),
                    # A fresh tokenizer: DPO renders with the model's own template.
                    processing_class=_load_tokenizer(base_path),
                    callbacks=[_progress_callback("dpo", progress)] if progress else None,
                )
                stages["dpo"] = _run_stage(dpo_trainer, len(dpo_data))
                model = dpo_trainer.accelerator.unwrap_model(dpo_trainer.model)
            else:
                stages["dpo"] = {"skipped": dpo_skipped}

            def manifest() -> dict[str, Any]:
                return {
                    "kind": "tuneshield-lora",
                    "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "base_model": str(base_model),
                    "base_model_path": base_path,
                    "init_adapter": str(init_adapter) if init_adapter is not None else None,
                    "seed": config.seed,
                    "lora": _lora_summary(model),
                    "training_chat_template": template.name if template else None,
                    "config": dataclasses.asdict(config),
                    "data": {
                        "samples": len(samples),
                        "flagged": sum(is_flagged(s) for s in samples),
                        "healed": is_healed(samples),
                        "sft_rows": len(sft_data),
                        "dpo_pairs": len(dpo_data),
                        "samples_hash": data_hash(samples),
                        "sft_hash": data_hash(sft_data),
                        "dpo_hash": data_hash(dpo_data),
                    },
                    "stages": stages,
                    "versions": _versions(),
                }

            content = _save_atomically(model, out_dir, manifest, build)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return TrainResult(adapter_dir=out_dir, manifest=content)


def make_identity_adapter(
    base_model: str | Path, out_dir: str | Path, config: TrainConfig | None = None
) -> TrainResult:
    """An untrained LoRA (B = 0, PEFT's default init): the base model's exact outputs,
    served under an adapter name (version 0 of every alias in vLLM)."""
    from peft import get_peft_model
    from transformers import set_seed

    from tuneshield._models import resolve_model

    config = config or load_train_config()
    out_dir = Path(out_dir).expanduser()
    base_path = resolve_model(base_model)
    build = _scratch_for(out_dir)
    try:
        set_seed(config.seed)
        model = get_peft_model(_load_base(base_path), config.lora_config())

        def manifest() -> dict[str, Any]:
            return {
                "kind": "tuneshield-identity",
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "base_model": str(base_model),
                "base_model_path": base_path,
                "seed": config.seed,
                "lora": _lora_summary(model),
                "versions": _versions(),
            }

        content = _save_atomically(model, out_dir, manifest, build)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return TrainResult(adapter_dir=out_dir, manifest=content)
