"""The library's public surface changes on purpose only, and stays light to import."""

from __future__ import annotations

import subprocess
import sys

import tuneshield

EXPECTED = {
    "ANSWER_MODE", "ATTACK_KINDS", "BOT_ROLE", "CANNED_FALLBACK", "DEFAULT_MODEL_ALIASES",
    "DEFAULT_POLICIES_DIR", "FLAGGED_DRAFT", "LABELLED_FILE", "MANIFEST", "PERCENT_AXIS_TOP",
    "POLICIES_ENV",
    "PROBES_FILE", "PROBE_KINDS", "REPORT_CSS", "ROLES", "USER_ROLE", "AttackConfig",
    "CascadeJudge",
    "CascadeJudgeSettings", "ChatBackend", "DatasetError", "Dialog", "DirectJudge",
    "EmbeddingJudge", "EvalConfig", "GenerationConfig", "HealConfig", "Judge",
    "JudgesPolicy", "LLMJudgeSettings", "LexicalJudge", "Message", "ModelError",
    "OpenAIChat", "PolicyError", "RefusalJudge", "Sample", "SampleError", "StageMeter",
    "TrainConfig", "TrainError", "TrainResult", "TransformersChat", "arms_table",
    "best_threshold", "binary_metrics", "build_config", "build_judge", "build_labelled_set",
    "build_poisoned_samples", "build_probes", "build_tiny_model", "calibrate",
    "check_independent", "classify", "console", "defense_judge_names", "dialogs_to_samples",
    "dpo_rows", "evaluate", "experiment_plots", "figure_png", "flagged_draft", "heal", "img_tag",
    "is_answer",
    "labels_of", "load_attack_config", "load_chitchat_dialogs", "load_config",
    "load_judges_policy", "load_labelled", "load_labelled_config", "load_probe_config",
    "load_probes", "load_toxic_texts", "load_train_config", "make_identity_adapter",
    "markdown_table", "metric_at", "normalise", "override_stage", "perplexity",
    "perturb_text", "poison_dialogs", "policies_dir", "prepare_default_model",
    "read_policy", "read_samples", "resolve_model", "scaled_train_config", "score_samples",
    "screen_unrelated", "sft_rows", "stage_bars", "toxic_pool", "train_adapter",
    "train_embedding_judge", "user_errors", "write_samples",
    # What a judge is made of, by content (tuneshield._artefacts; audit lineage).
    "JudgeArtefact", "file_sha256", "folder_digests", "judge_artefact",
    # The learner gates' own probe set (tuneshield._probes), apart from the evaluation's.
    "GATE_PROBES_FILE", "GATE_PROBE_KINDS", "build_gate_probes", "load_gate_probe_config",
    "load_gate_probes",
    # Evaluation-only judges and the coherence check (tuneshield._eval_judges).
    "EnsembleJudge", "HateSonarJudge", "ToxicCommentJudge", "coherence_scores",
    # The adaptive evasion attacker and its surrogate judge (tuneshield._attacks).
    "evade", "surrogate_scorer",
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
