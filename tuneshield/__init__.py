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
from tuneshield._classify import (
    CascadeJudgeSettings,
    JudgesPolicy,
    LLMJudgeSettings,
    build_judge,
    calibrate,
    classify,
    defense_judge_names,
    load_judges_policy,
    score_samples,
)
from tuneshield._console import console, stage_bars, user_errors
from tuneshield._datasets import DatasetError, dpo_rows, sft_rows
from tuneshield._embedding_judge import EmbeddingJudge, labels_of, train_embedding_judge
from tuneshield._evaluate import EvalConfig, check_independent, evaluate, perplexity
from tuneshield._heal import HealConfig, heal
from tuneshield._judges import CascadeJudge, DirectJudge, Judge, LexicalJudge, RefusalJudge
from tuneshield._labelled import (
    LABELLED_FILE,
    build_labelled_set,
    load_labelled,
    load_labelled_config,
)
from tuneshield._metrics import best_threshold, binary_metrics
from tuneshield._models import (
    DEFAULT_MODEL_ALIASES,
    ModelError,
    build_tiny_model,
    prepare_default_model,
    resolve_model,
)
from tuneshield._policies import (
    DEFAULT_POLICIES_DIR,
    POLICIES_ENV,
    PolicyError,
    build_config,
    load_config,
    policies_dir,
    read_policy,
)
from tuneshield._probes import (
    PROBE_KINDS,
    PROBES_FILE,
    build_probes,
    load_probe_config,
    load_probes,
)
from tuneshield._report import (
    PERCENT_AXIS_TOP,
    REPORT_CSS,
    arms_table,
    experiment_plots,
    figure_png,
    img_tag,
    markdown_table,
    metric_at,
)
from tuneshield._samples import ROLES, Message, Sample, SampleError, read_samples, write_samples
from tuneshield._sources import (
    BOT_ROLE,
    USER_ROLE,
    Dialog,
    load_chitchat_dialogs,
    load_toxic_texts,
    normalise,
    toxic_pool,
)
from tuneshield._stages import StageMeter
from tuneshield._train import (
    MANIFEST,
    TrainConfig,
    TrainError,
    TrainResult,
    load_train_config,
    make_identity_adapter,
    override_stage,
    scaled_train_config,
    train_adapter,
)

__all__ = [
    "ATTACK_KINDS",
    "BOT_ROLE",
    "DEFAULT_MODEL_ALIASES",
    "DEFAULT_POLICIES_DIR",
    "LABELLED_FILE",
    "MANIFEST",
    "PERCENT_AXIS_TOP",
    "POLICIES_ENV",
    "PROBES_FILE",
    "PROBE_KINDS",
    "REPORT_CSS",
    "ROLES",
    "USER_ROLE",
    "AttackConfig",
    "CascadeJudge",
    "CascadeJudgeSettings",
    "ChatBackend",
    "DatasetError",
    "Dialog",
    "DirectJudge",
    "EmbeddingJudge",
    "EvalConfig",
    "GenerationConfig",
    "HealConfig",
    "Judge",
    "JudgesPolicy",
    "LLMJudgeSettings",
    "LexicalJudge",
    "Message",
    "ModelError",
    "OpenAIChat",
    "PolicyError",
    "RefusalJudge",
    "Sample",
    "SampleError",
    "StageMeter",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "TransformersChat",
    "arms_table",
    "best_threshold",
    "binary_metrics",
    "build_config",
    "build_judge",
    "build_labelled_set",
    "build_poisoned_samples",
    "build_probes",
    "build_tiny_model",
    "calibrate",
    "check_independent",
    "classify",
    "console",
    "defense_judge_names",
    "dialogs_to_samples",
    "dpo_rows",
    "evaluate",
    "experiment_plots",
    "figure_png",
    "heal",
    "img_tag",
    "labels_of",
    "load_attack_config",
    "load_chitchat_dialogs",
    "load_config",
    "load_judges_policy",
    "load_labelled",
    "load_labelled_config",
    "load_probe_config",
    "load_probes",
    "load_toxic_texts",
    "load_train_config",
    "make_identity_adapter",
    "markdown_table",
    "metric_at",
    "normalise",
    "override_stage",
    "perplexity",
    "perturb_text",
    "poison_dialogs",
    "policies_dir",
    "prepare_default_model",
    "read_policy",
    "read_samples",
    "resolve_model",
    "scaled_train_config",
    "score_samples",
    "sft_rows",
    "stage_bars",
    "toxic_pool",
    "train_adapter",
    "train_embedding_judge",
    "user_errors",
    "write_samples",
]
