"""The library's public surface changes on purpose only, and stays light to import."""

from __future__ import annotations

import subprocess
import sys

import tuneshield

EXPECTED = {
    "ATTACK_KINDS", "PROBE_KINDS", "AttackConfig", "CascadeJudge", "ChatBackend",
    "DatasetError", "DirectJudge", "EmbeddingJudge", "EvalConfig", "ExperimentConfig",
    "GenerationConfig", "HealConfig", "Judge", "LexicalJudge", "Message", "ModelError",
    "OpenAIChat", "PolicyError", "RefusalJudge", "Sample", "SampleError", "TrainConfig",
    "TrainError", "TrainResult", "TransformersChat", "build_judge", "build_poisoned_samples",
    "build_tiny_model", "calibrate", "check_independent", "classify", "dialogs_to_samples",
    "dpo_rows", "evaluate", "heal", "load_attack_config", "load_chitchat_dialogs",
    "load_config", "load_judges_policy", "load_labelled", "load_probes", "load_toxic_texts",
    "load_train_config", "make_identity_adapter", "perturb_text", "poison_dialogs",
    "policies_dir", "prepare_default_model", "read_samples", "resolve_model",
    "run_experiment", "sft_rows", "train_adapter", "train_embedding_judge", "write_samples",
}  # fmt: skip


def test_exported_names_are_exactly_the_public_api() -> None:
    """__all__ is sorted, complete and every name resolves."""
    assert set(tuneshield.__all__) == EXPECTED
    assert tuneshield.__all__ == sorted(tuneshield.__all__, key=lambda n: (not n.isupper(), n))
    for name in tuneshield.__all__:
        assert getattr(tuneshield, name) is not None


def test_import_does_not_load_torch_or_the_web_stack() -> None:
    """Importing the library pulls in neither torch/transformers nor litestar/apscheduler."""
    code = (
        "import sys, tuneshield; "
        "print(','.join(m for m in ('torch','transformers','trl','peft','litestar',"
        "'apscheduler') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == ""
