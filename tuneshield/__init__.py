"""TuneShield: keep a chatbot that learns from its users from learning their toxicity.

The defense of arXiv 2507.05660 as a library: classify training samples with a judge,
heal the flagged ones, fine-tune with LoRA SFT, then align with DPO toward the healed
replies; plus the data, attacks and evaluation to show that it works. No web or
scheduler code here; heavy libraries (torch, transformers, trl, peft) load on first use.
"""

from __future__ import annotations

from tuneshield._attacks import (
    ATTACK_KINDS,
    AttackConfig,
    build_poisoned_samples,
    dialogs_to_samples,
    load_attack_config,
    perturb_text,
    poison_dialogs,
)
from tuneshield._backends import ChatBackend, GenerationConfig, OpenAIChat, TransformersChat
from tuneshield._classify import build_judge, calibrate, classify, load_judges_policy
from tuneshield._datasets import DatasetError, dpo_rows, sft_rows
from tuneshield._embedding_judge import EmbeddingJudge, train_embedding_judge
from tuneshield._evaluate import EvalConfig, check_independent, evaluate
from tuneshield._experiment import ExperimentConfig, run_experiment
from tuneshield._heal import HealConfig, heal
from tuneshield._judges import CascadeJudge, DirectJudge, Judge, LexicalJudge, RefusalJudge
from tuneshield._labelled import load_labelled
from tuneshield._models import ModelError, build_tiny_model, prepare_default_model, resolve_model
from tuneshield._policies import PolicyError, load_config, policies_dir
from tuneshield._probes import PROBE_KINDS, load_probes
from tuneshield._samples import Message, Sample, SampleError, read_samples, write_samples
from tuneshield._sources import load_chitchat_dialogs, load_toxic_texts
from tuneshield._train import (
    TrainConfig,
    TrainError,
    TrainResult,
    load_train_config,
    make_identity_adapter,
    train_adapter,
)

__all__ = [
    "ATTACK_KINDS",
    "PROBE_KINDS",
    "AttackConfig",
    "CascadeJudge",
    "ChatBackend",
    "DatasetError",
    "DirectJudge",
    "EmbeddingJudge",
    "EvalConfig",
    "ExperimentConfig",
    "GenerationConfig",
    "HealConfig",
    "Judge",
    "LexicalJudge",
    "Message",
    "ModelError",
    "OpenAIChat",
    "PolicyError",
    "RefusalJudge",
    "Sample",
    "SampleError",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "TransformersChat",
    "build_judge",
    "build_poisoned_samples",
    "build_tiny_model",
    "calibrate",
    "check_independent",
    "classify",
    "dialogs_to_samples",
    "dpo_rows",
    "evaluate",
    "heal",
    "load_attack_config",
    "load_chitchat_dialogs",
    "load_config",
    "load_judges_policy",
    "load_labelled",
    "load_probes",
    "load_toxic_texts",
    "load_train_config",
    "make_identity_adapter",
    "perturb_text",
    "poison_dialogs",
    "policies_dir",
    "prepare_default_model",
    "read_samples",
    "resolve_model",
    "run_experiment",
    "sft_rows",
    "train_adapter",
    "train_embedding_judge",
    "write_samples",
]
