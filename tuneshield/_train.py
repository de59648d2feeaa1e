"""Training: LoRA SFT on healed samples, then DPO on the flagged ones, into one adapter.

Stage by stage (``train_adapter``):
0. Resolve the device once (``detect_device``): a CUDA GPU when there is one, else the
   CPU; ``bf16: auto`` becomes true where the hardware computes bf16 natively. The base
   model is loaded in the training dtype (bf16 or fp32); PEFT keeps the LoRA weights fp32.
1. SFT with TRL's ``SFTTrainer`` on ``sft_rows(all samples)`` (all but those screened out
   as unrelated, and canned fallbacks where healing leaves them out): a fresh LoRA (or the
   ``init_adapter`` to continue from), the loss on each sample's reply alone (prompt +
   completion rows).
2. DPO with TRL's ``DPOTrainer`` on ``dpo_rows`` (flagged samples and their answers),
   continuing the same adapter, each pair's shared prompt run once where
   ``dpo_shared_prefix`` is set (``tuneshield._pair_prefix``). The reference is the SFT
   model (the paper's): TRL copies the SFT adapter into a frozen second adapter ``ref``
   on the same base weights (a LoRA's size, not a second model) and runs reference
   forwards with it active, or once before training when ``dpo.precompute_ref_log_probs``
   is set.
3. Save the adapter alone (plain LoRA, which vLLM loads) and ``manifest.json`` into a
   scratch folder, verify it, then rename it into place: a failed run leaves nothing.

Each stage records its tokens and their FLOPs (``StageWork``) so that benchmarks can set
the achieved FLOP/s against the device's measured matmul peak (``measure_matmul_peak``).

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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Literal

from tuneshield._datasets import data_hash, dpo_rows, is_flagged, is_healed, sft_rows
from tuneshield._pair_prefix import sharing_pair_prefixes
from tuneshield._policies import PolicyError, build_config, read_policy
from tuneshield._samples import Sample

DATA_DIR = Path(__file__).resolve().parent / "data"
# TRL ships training templates for the models it knows; SmolLM2's is ours.
TRAINING_TEMPLATES = {"smollm2.jinja": "smollm2_training.jinja"}
MANIFEST = "manifest.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
VERSIONED_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")
# /proc/cpuinfo flags of native bf16 arithmetic (AVX512-BF16, AMX): without them a CPU
# emulates bf16 and autocast is slower than fp32.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")
MIB = 2**20

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
    # A default, unlike the other fields: round settings queued before this field existed
    # (learner_runs.settings) still decode, to what they meant.
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Reference log-probs once before training, not every step."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("dpo", {"beta": self.beta})


@dataclass
class CudaSettings:
    """Rows per forward pass on CUDA GPUs. The rows per optimizer step stay the stage's
    (batch x accumulation), so a round makes the same optimizer steps on any device."""

    sft_per_device_train_batch_size: int = field(metadata={"help": "SFT rows per forward."})
    dpo_per_device_train_batch_size: int = field(metadata={"help": "DPO pairs per forward."})

    def __post_init__(self) -> None:
        _check_positive("cuda", dataclasses.asdict(self))


@dataclass(frozen=True)
class TrainDevice:
    """Where a run trains and in which precision: the policy resolved once on this machine."""

    kind: Literal["cuda", "cpu"]
    name: str
    processes: int
    """Training processes (``accelerate launch``: one per GPU); rows per step are split."""
    bf16: bool
    reason: str
    """Why bf16 is on or off (the policy's value, or what ``auto`` found)."""

    @property
    def dtype_name(self) -> str:
        return "bfloat16" if self.bf16 else "float32"


@dataclass
class TrainConfig:
    """Everything ``train_adapter`` needs besides the data (policies/training.yaml)."""

    seed: int = field(metadata={"help": "Seed for LoRA init, shuffling and dropout."})
    bf16: bool | Literal["auto"] = field(
        metadata={"help": "bf16 training: true, false, or auto (bf16 where it is native)."}
    )
    lora: LoraSettings = field(metadata={"help": "The LoRA adapter."})
    sft: SFTSettings = field(metadata={"help": "The SFT stage."})
    dpo: DPOSettings = field(metadata={"help": "The DPO stage."})
    # Defaults for the fields added later: older queued round settings still decode.
    group_by_length: bool = field(
        default=False, metadata={"help": "Batch rows of similar length (less padding)."}
    )
    cuda: CudaSettings | None = field(
        default=None, metadata={"help": "Rows per forward on CUDA (None: as on the CPU)."}
    )
    lm_head_labelled_only: bool = field(
        default=False,
        metadata={"help": "The LM head projects only positions with a loss, on any device."},
    )
    dpo_shared_prefix: bool = field(
        default=False,
        metadata={"help": "One forward pass per DPO pair over its shared prompt."},
    )

    def step_rows(self, stage: str) -> int:
        """Rows (SFT) or pairs (DPO) per optimizer step: what sets a round's step count."""
        settings: StageSettings = getattr(self, stage)
        return settings.per_device_train_batch_size * settings.gradient_accumulation_steps

    def for_device(self, device: TrainDevice) -> TrainConfig:
        """This config as it trains on ``device``: bf16 resolved, and on CUDA the policy's
        rows per forward pass (at most a step's), with the accumulation that keeps the
        rows per step; over several processes (GPUs), each takes its share of a step."""
        config = dataclasses.replace(self, bf16=device.bf16)
        for stage in ("sft", "dpo"):
            settings: StageSettings = getattr(self, stage)
            step = self.step_rows(stage)
            rows = settings.per_device_train_batch_size
            if device.kind == "cuda" and self.cuda is not None:
                cuda_rows = getattr(self.cuda, f"{stage}_per_device_train_batch_size")
                rows = min(cuda_rows, step // device.processes) or 1
            if step % (rows * device.processes):
                raise TrainError(
                    f"{stage}: {step} rows per step (per_device_train_batch_size x "
                    f"gradient_accumulation_steps) cannot be split into {device.processes} "
                    f"process(es) x {rows} rows per forward pass (cuda.{stage}_per_device_"
                    "train_batch_size on CUDA): make the one a multiple of the other"
                )
            config = override_stage(
                config,
                stage,
                per_device_train_batch_size=rows,
                gradient_accumulation_steps=step // (rows * device.processes),
            )
        return config

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

        # Columns stay: the pairs' "length" (group_by_length) must reach the sampler; TRL's
        # preference collator takes only the keys it needs.
        return DPOConfig(
            **dataclasses.asdict(self.dpo),
            **self._common(output_dir),
            remove_unused_columns=False,
        )

    def _common(self, output_dir: Path) -> dict[str, Any]:
        import torch

        if not isinstance(self.bf16, bool):
            raise TypeError("bf16 is still 'auto': train with config.for_device(detect_device())")
        # Losses are kept per step for the manifest; checkpoints and trackers are not
        # wanted (the adapter is saved once, atomically, at the end).
        return {
            "output_dir": str(output_dir),
            "seed": self.seed,
            "bf16": self.bf16,
            "train_sampling_strategy": "group_by_length" if self.group_by_length else "random",
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
            "dataloader_pin_memory": torch.cuda.is_available(),
            # Said outright for bf16 on a CPU, which transformers refuses otherwise.
            "use_cpu": not torch.cuda.is_available(),
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
    if isinstance(values.get("cuda"), dict):
        values["cuda"] = build_config(CudaSettings, values["cuda"], f"{where} [cuda]")
    return build_config(TrainConfig, values, where)


def scaled_train_config(
    seed: int,
    sft_epochs: float,
    dpo_epochs: float,
    max_steps: int,
    *,
    sft_learning_rate: float | None = None,
    dpo_learning_rate: float | None = None,
    policy: TrainConfig | None = None,
) -> TrainConfig:
    """``policy`` (default: policies/training.yaml) with the seed, epochs per stage, step cap
    and (``None``: the policy's) learning rate per stage of one run."""
    config = dataclasses.replace(policy if policy is not None else load_train_config(), seed=seed)
    for stage, epochs, learning_rate in (
        ("sft", sft_epochs, sft_learning_rate),
        ("dpo", dpo_epochs, dpo_learning_rate),
    ):
        config = override_stage(
            config, stage, num_train_epochs=epochs, max_steps=max_steps, learning_rate=learning_rate
        )
    return config


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


def cpu_bf16_flags(cpuinfo: Path = CPUINFO) -> list[str]:
    """The native bf16 instruction sets (``CPU_BF16_FLAGS``) that ``cpuinfo`` lists."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return [flag for flag in CPU_BF16_FLAGS if flag in flags]
    return []


def detect_device(bf16: bool | Literal["auto"]) -> TrainDevice:
    """Where this process trains (CUDA when torch sees a GPU, else the CPU) and whether in
    bf16: the policy's true/false as it is; ``auto``, where the hardware has bf16
    arithmetic (CUDA: compute capability 8.0+; CPU: ``CPU_BF16_FLAGS``)."""
    import os

    import torch

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    kind: Literal["cuda", "cpu"]
    if torch.cuda.is_available():
        kind, name = "cuda", torch.cuda.get_device_name()
        native = bool(torch.cuda.is_bf16_supported(including_emulation=False))
        found = f"{name} {'has' if native else 'lacks'} bf16"
    else:
        kind, name = "cpu", _cpu_name()
        flags = cpu_bf16_flags()
        native = bool(flags)
        found = f"CPU flags {', '.join(flags)}" if flags else "no AVX512-BF16/AMX on this CPU"
    if bf16 == "auto":
        return TrainDevice(kind, name, processes, native, f"auto: {found}")
    return TrainDevice(kind, name, processes, bf16, f"policy: bf16 {str(bf16).lower()}")


def _cpu_name() -> str:
    import platform

    try:
        for line in CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


@dataclass
class StageWork:
    """The tokens a stage ran through the model, and what they cost in FLOPs.

    Per token, with N the base model's matrix weights below its LM head (its linear
    layers; an embedding lookup costs nothing) and A the trained adapter's (LoRA A, B):

    - a forward pass costs 2(N + A);
    - a training backward 2N + 4A: activation gradients through the frozen base (its
      weights get no gradient), activation and weight gradients for the adapter;
    - gradient checkpointing one forward more.

    So a LoRA training token costs 4N + 6A, not the 6N of full fine-tuning (``flops_6n``
    keeps that convention for comparison); a DPO reference token (no gradients) 2(N + A).
    The LM head (H weights) runs on the rows TRL's fused head projects (``head_rows``:
    every position but a row's last, padding included, or only those with a loss under
    ``lm_head_labelled_only``; the head is never a LoRA target here): 2H forward,
    and in training 4H more (its backward recomputes each logit tile, then the hidden
    states' gradient; the head is frozen). Attention's own products (QK^T and AV: 4 x
    layers x length x width per token, a few percent at these lengths) are left out: the
    figures are slight underestimates. Tokens are the real ones (attention mask): padding
    is computed but is waste, counted apart in ``padded_tokens`` (every position, padding
    included). Pairs packed over their shared prefix (``dpo_shared_prefix``) count the
    prefix once, as it runs.
    """

    base_params: int = 0
    adapter_params: int = 0
    head_params: int = 0
    checkpointing: bool = False
    tokens: int = 0
    """Real tokens through a training forward and backward."""
    reference_tokens: int = 0
    """Real tokens through a forward without gradients (DPO's reference)."""
    padded_tokens: int = 0
    head_rows: int = 0
    """Positions projected through the LM head in training forwards."""
    reference_head_rows: int = 0
    """Positions projected through the LM head in forwards without gradients."""

    @property
    def flops(self) -> float:
        forward = 2 * (self.base_params + self.adapter_params)
        backward = 2 * self.base_params + 4 * self.adapter_params
        recompute = forward if self.checkpointing else 0
        head = 2 * self.head_params
        return float((forward + backward + recompute) * self.tokens
                     + forward * self.reference_tokens
                     + 3 * head * self.head_rows + head * self.reference_head_rows)  # fmt: skip

    @property
    def flops_6n(self) -> float:
        params = self.base_params + self.head_params + self.adapter_params
        return float(6 * params * self.tokens + 2 * params * self.reference_tokens)

    def measure(self, model: Any, checkpointing: bool) -> None:
        """Count the matrix weights of ``model``: base below the LM head, the LM head,
        and the trained adapter ``default`` (the DPO reference ``ref`` costs the same,
        counted per reference token)."""
        import torch

        head = model.get_output_embeddings()
        self.checkpointing = checkpointing
        self.base_params = self.adapter_params = 0
        self.head_params = head.weight.numel()
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or module is head:
                continue
            if name.endswith((".lora_A.default", ".lora_B.default")):
                self.adapter_params += module.weight.numel()
            elif ".lora_" not in name:
                self.base_params += module.weight.numel()

    def add_other_processes(self) -> None:
        """Sum the token counts of every process of a distributed run (each counted its
        own share of the steps); the wall time is common to all."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        counts = [self.tokens, self.reference_tokens, self.padded_tokens,
                  self.head_rows, self.reference_head_rows]  # fmt: skip
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        total = torch.tensor(counts, dtype=torch.int64, device=device)
        dist.all_reduce(total)
        (self.tokens, self.reference_tokens, self.padded_tokens,
         self.head_rows, self.reference_head_rows) = (int(v) for v in total.tolist())  # fmt: skip

    def as_dict(self, seconds: float) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "reference_tokens": self.reference_tokens,
            "padded_tokens": self.padded_tokens,
            "head_rows": self.head_rows,
            "reference_head_rows": self.reference_head_rows,
            "padding_share": round(1 - self.real_tokens / self.padded_tokens, 4)
            if self.padded_tokens
            else None,
            "tokens_per_s": round(self.tokens / seconds, 1) if seconds else None,
            "base_params": self.base_params,
            "adapter_params": self.adapter_params,
            "head_params": self.head_params,
            "flops": self.flops,
            "flops_6n": self.flops_6n,
            "flops_per_s": self.flops / seconds if seconds else None,
        }

    @property
    def real_tokens(self) -> int:
        return self.tokens + self.reference_tokens


@contextmanager
def _counting(model: Any, work: StageWork, labelled_only: bool) -> Iterator[StageWork]:
    """Count the tokens of every forward pass of ``model`` into ``work`` while open, and
    the rows TRL's fused LM head projects; with ``labelled_only`` that head projects only
    the positions with a loss.

    The hook sits on the decoder (``_decoder``). Counts stay on the device until the end,
    so that counting adds no synchronisation per step.

    TRL 1.16 (pinned) projects only the positions with a loss where it runs its Triton
    kernels (CUDA, XPU); elsewhere it projects every position, the context's too, and
    masks the result, so that a compiler (Neuron) sees the same shapes on every batch.
    In eager mode on a CPU that is pure waste: a reply is a small part of its row, and
    each projected position costs a pass over the 49k-word vocabulary, forward and again
    in the backward (docs/training.md). Its module-level ``_use_triton`` decides, looked
    up at each forward, so it is swapped while the stage runs and put back after; so is
    the chunked log-prob function, to count the rows it is given.
    """
    import importlib

    import torch

    # Private names of TRL's module (Any: they are not part of its typed surface).
    trl_utils: Any = importlib.import_module("trl.trainer.utils")
    decoder = _decoder(model)
    sums: dict[bool, list[Any]] = {True: [], False: []}
    head_rows = {True: 0, False: 0}
    use_triton, log_probs = trl_utils._use_triton, trl_utils._ChunkedLogProbFunction

    class _CountedLogProbs:
        @staticmethod
        def apply(hidden: Any, *args: Any) -> Any:
            head_rows[torch.is_grad_enabled()] += int(hidden.shape[0])
            return log_probs.apply(hidden, *args)

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        mask = kwargs.get("attention_mask")
        if mask is None:
            real = ids.numel()
        elif mask.dim() == 2:
            real = mask.sum()
        else:
            # A 4D mask (pairs packed over their shared prefix): a real position sees
            # itself, a padding one does not.
            real = mask.diagonal(dim1=-2, dim2=-1).sum()
        sums[torch.is_grad_enabled()].append(real)
        work.padded_tokens += ids.numel()

    handle = decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        if labelled_only:
            trl_utils._use_triton = lambda device: True
        trl_utils._ChunkedLogProbFunction = _CountedLogProbs
        yield work
    finally:
        handle.remove()
        trl_utils._use_triton, trl_utils._ChunkedLogProbFunction = use_triton, log_probs
        work.tokens += int(sum(int(value) for value in sums[True]))
        work.reference_tokens += int(sum(int(value) for value in sums[False]))
        work.head_rows += head_rows[True]
        work.reference_head_rows += head_rows[False]


def _decoder(model: Any) -> Any:
    """The transformer below the LM head (hooks go there: PEFT calls the causal LM's
    ``forward`` directly, which skips hooks; the decoder is called)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


# Square matrix sizes for the matmul microbenchmark: large enough to saturate the device
# (an H200 reaches its bf16 plateau near 8192; a CPU near 1024-2048), small enough to run
# a product in milliseconds (GPU) or tens of milliseconds (CPU).
MATMUL_SIZES = {"cuda": (4096, 8192), "cpu": (1024, 2048)}
MATMUL_WARMUP = 3


def measure_matmul_peak(device: TrainDevice, seconds: float = 1.0) -> dict[str, Any]:
    """The device's dense matrix-multiply FLOP/s in the training dtype, measured now: per
    size of ``MATMUL_SIZES``, square products repeated for ``seconds`` after a warm-up,
    on random data; the best size is the peak that stages' FLOP/s are set against."""
    import torch

    dtype = torch.bfloat16 if device.bf16 else torch.float32
    generator = torch.Generator(device=device.kind).manual_seed(0)
    results = {}
    for size in MATMUL_SIZES[device.kind]:
        a, b = (torch.randn(size, size, dtype=dtype, device=device.kind, generator=generator)
                for _ in range(2))  # fmt: skip
        for _ in range(MATMUL_WARMUP):
            torch.matmul(a, b)
        _synchronize(device)
        products, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.matmul(a, b)
            products += 1
            if device.kind == "cuda" and products % 10 == 0:
                _synchronize(device)  # the clock must see the queued products finish
        _synchronize(device)
        elapsed = time.perf_counter() - start
        results[size] = 2 * size**3 * products / elapsed
    best = max(results, key=results.__getitem__)
    return {
        "device": device.name,
        "dtype": device.dtype_name,
        "threads": torch.get_num_threads() if device.kind == "cpu" else None,
        "size": best,
        "flops_per_s": results[best],
        "by_size": {str(size): value for size, value in results.items()},
    }


def _synchronize(device: TrainDevice) -> None:
    import torch

    if device.kind == "cuda":
        torch.cuda.synchronize()


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


def _run_stage(
    build: Callable[[], Any],
    model: Any,
    rows: int,
    checkpointing: bool,
    labelled_only: bool,
    shared_prefix: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Build the stage's trainer and train; return it and the stage's metrics.

    Setup (tokenising, TRL's reference adapter, precomputed reference log-probs) is timed
    apart from the training loop; tokens and FLOPs are counted across both, as the
    decoder runs them (pairs packed over their shared prefix with ``shared_prefix``).
    """
    import torch
    from transformers import PrinterCallback

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    work = StageWork()
    start = time.perf_counter()
    sharing = sharing_pair_prefixes(_decoder(model)) if shared_prefix else nullcontext(None)
    with sharing as prefixes, _counting(model, work, labelled_only):
        trainer = build()
        # disable_tqdm swaps tqdm for a callback printing every log line; progress is ours.
        trainer.remove_callback(PrinterCallback)
        ready = time.perf_counter()
        output = trainer.train()
        if cuda:
            torch.cuda.synchronize()
    end = time.perf_counter()
    work.measure(trainer.model, checkpointing)
    work.add_other_processes()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    steps = int(trainer.state.global_step)
    metrics = {
        "rows": rows,
        "steps": steps,
        "final_loss": logs[-1]["loss"] if logs else None,
        "mean_loss": output.training_loss,
        "loss_history": [{"step": e["step"], "loss": e["loss"]} for e in logs],
        "last_log": logs[-1] if logs else {},
        "duration_s": round(end - start, 2),
        "setup_s": round(ready - start, 2),
        "train_s": round(end - ready, 2),
        "seconds_per_step": round((end - ready) / steps, 3) if steps else None,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / MIB, 1) if cuda else None,
        **work.as_dict(end - start),
    }
    if prefixes is not None:
        metrics["shared_prefix"] = dataclasses.asdict(prefixes)
    return trainer, metrics


def _load_base(base_path: str, device: TrainDevice | None = None) -> Any:
    """The base model, in bf16 when training in bf16 (half the memory, no casts per
    forward; PEFT keeps the LoRA weights fp32), else fp32. The trainer moves it to the
    device."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device is not None and device.bf16 else torch.float32
    return AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)


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


def _dpo_trainer(
    model: Any,
    config: TrainConfig,
    output_dir: Path,
    rows: list[dict[str, Any]],
    base_path: str,
    progress: ProgressFn | None,
) -> Any:
    """TRL's DPO trainer on the SFT model. With ``ref_model=None`` and a PEFT model, TRL
    adds a frozen adapter ``ref``, a copy of the SFT adapter, on the same base weights:
    the reference is the SFT model, as in the paper, at the cost of one more LoRA (not a
    second model); its log-probs come from forwards with ``ref`` active."""
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DPOTrainer

    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=config.dpo_config(output_dir),
        train_dataset=Dataset.from_list(rows),
        # A fresh tokenizer: DPO renders with the model's own template.
        processing_class=_load_tokenizer(base_path),
        callbacks=[_progress_callback("dpo", progress)] if progress else None,
    )
    if config.group_by_length:
        # TRL's pairs hold prompt/chosen/rejected ids and no input_ids for the length
        # sampler to measure: a pair's forward is as long as its longer completion.
        pairs: Any = trainer.train_dataset  # a datasets.Dataset (TRL tokenised it)
        trainer.train_dataset = pairs.map(
            lambda pair: {
                "length": len(pair["prompt_ids"])
                + max(len(pair["chosen_ids"]), len(pair["rejected_ids"]))
            }
        )
    return trainer


def _reference_summary(trainer: Any, config: TrainConfig) -> dict[str, Any]:
    """What served as DPO's reference, and the memory it took (measured, not assumed)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    ref = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".ref." in n)
    base = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if ".lora_" not in n and "lora_magnitude" not in n
    )
    return {
        "model": "separate copy" if trainer.ref_model is not None else "SFT adapter as 'ref'",
        "precomputed": config.dpo.precompute_ref_log_probs,
        "ref_adapter_mb": round(ref / MIB, 1),
        "base_model_mb": round(base / MIB, 1),
    }


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

    Under ``accelerate launch`` (one process per GPU) every process calls this; they
    share each step's rows, and the first process alone saves the adapter (the others
    return an empty manifest).
    """
    from datasets import Dataset
    from peft import PeftModel
    from transformers import set_seed
    from trl.trainer.sft_trainer import SFTTrainer

    from tuneshield._models import resolve_model

    policy = config or load_train_config()
    device = detect_device(policy.bf16)
    config = policy.for_device(device)
    samples = list(samples)
    if not samples:
        raise TrainError("no samples to train on")
    sft_data = sft_rows(samples)
    if not sft_data:
        raise TrainError(
            "every sample was left out of SFT (unrelated to its message, or a canned "
            "fallback): nothing to learn"
        )
    dpo_data, dpo_skipped = _dpo_plan(samples, dpo)
    out_dir = Path(out_dir).expanduser()
    base_path = resolve_model(base_model)
    main = _is_main_process()
    build = _scratch_for(out_dir) if main else None
    progress = progress if main else None
    try:
        with tempfile.TemporaryDirectory(prefix="tuneshield-train-") as scratch:
            set_seed(config.seed)
            tokenizer = _load_tokenizer(base_path)
            template = training_chat_template(tokenizer, config)
            model = _load_base(base_path, device)
            if init_adapter is not None:
                model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
            sft_model = model
            sft_trainer, sft_stage = _run_stage(
                lambda: SFTTrainer(
                    model=sft_model,
                    args=config.sft_config(Path(scratch) / "sft", template),
                    train_dataset=Dataset.from_list(sft_data),
                    processing_class=tokenizer,
                    peft_config=None if init_adapter is not None else config.lora_config(),
                    callbacks=[_progress_callback("sft", progress)] if progress else None,
                ),
                model,
                len(sft_data),
                config.sft.gradient_checkpointing,
                config.lm_head_labelled_only,
            )
            stages: dict[str, Any] = {"sft": sft_stage}
            model = sft_trainer.accelerator.unwrap_model(sft_trainer.model)
            if dpo_data:
                dpo_model = model
                dpo_trainer, stages["dpo"] = _run_stage(
                    lambda: _dpo_trainer(
                        dpo_model, config, Path(scratch) / "dpo", dpo_data, base_path, progress
                    ),
                    model,
                    len(dpo_data),
                    config.dpo.gradient_checkpointing,
                    config.lm_head_labelled_only,
                    shared_prefix=config.dpo_shared_prefix,
                )
                stages["dpo"]["reference"] = _reference_summary(dpo_trainer, config)
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
                    "device": dataclasses.asdict(device),
                    "bf16_policy": policy.bf16,
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

            content = _save_atomically(model, out_dir, manifest, build) if build else {}
    except BaseException:
        if build is not None:
            shutil.rmtree(build, ignore_errors=True)
        raise
    return TrainResult(adapter_dir=out_dir, manifest=content)


def _is_main_process() -> bool:
    """False in the second and later processes of an ``accelerate launch``."""
    import os

    return os.environ.get("RANK", "0") == "0"


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
