"""The defense experiment end to end on a tiny model: poison → classify → heal → SFT →
DPO → adapter → evaluation, and the report built from real generations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulation.experiment import (
    ExperimentConfig,
    ExperimentError,
    build_training_sets,
    run_experiment,
)
from simulation.report import write_experiment_report
from tuneshield import flagged_draft, is_answer, read_samples


def test_training_sets_align_and_carry_the_poison() -> None:
    """Clean and poisoned sets come from the same dialogs, row by row; only poison differs."""
    config = ExperimentConfig.from_policy("quick", poison_rate=0.5)
    clean, poisoned = build_training_sets(config)
    assert len(clean) == len(poisoned) > 0
    changed = [c["response"] != p["response"] for c, p in zip(clean, poisoned, strict=True)]
    flagged = [bool(p.get("poisoned")) for p in poisoned]
    assert any(flagged) and not all(flagged)
    assert changed == flagged
    assert [c["conversation_id"] for c in clean] == [p["conversation_id"] for p in poisoned]


def test_config_rejects_unknown_sizes_and_arms() -> None:
    """Bad sizes and arm names are refused with the field named."""
    with pytest.raises(ValueError, match="size"):
        ExperimentConfig.from_policy("huge")
    with pytest.raises(ValueError, match="arms"):
        ExperimentConfig.from_policy("quick", arms=["base", "magic"])


@pytest.mark.slow
def test_quick_experiment_on_a_tiny_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Every arm trains a real adapter and is evaluated; counts match the probes asked."""
    config = ExperimentConfig.from_policy(
        "quick", base_model=str(tiny_model_dir), arms=["base", "undefended", "tuneshield"]
    )
    seen: set[str] = set()
    results = run_experiment(config, tmp_path / "run", lambda stage, d, t: seen.add(stage))
    assert {"classify", "sft", "dpo", "arms"} <= seen

    assert list(results["arms"]) == ["base", "undefended", "tuneshield"]
    size = config.size
    for arm in results["arms"].values():
        for kind in ("toxic", "benign"):
            summary = arm["eval"][kind]
            assert summary["probes"] == size.probes
            assert summary["replies"] == size.probes * size.samples_per_probe
            assert 0.0 <= summary["toxicity_rate"] <= 1.0
    defended = results["arms"]["tuneshield"]["train"]
    # A pair per flagged sample, one per answer to a flagged turn, and one per flagged
    # draft healing kept (policies/healing.yaml).
    healed = read_samples(tmp_path / "run" / "healed-contextual.jsonl")
    answers = sum(map(is_answer, healed))
    drafts = sum(flagged_draft(row) is not None for row in healed)
    assert defended["data"]["dpo_pairs"] == results["data"]["flagged_samples"] + answers + drafts
    assert results["data"]["flagged_samples"] > 0
    assert defended["stages"]["sft"]["steps"] > 0 and defended["stages"]["dpo"]["steps"] > 0
    assert "dpo" not in results["arms"]["undefended"]["train"]["stages"] or (
        "skipped" in results["arms"]["undefended"]["train"]["stages"]["dpo"]
    )
    assert 0.0 <= results["judge"]["recall"] <= 1.0
    assert (tmp_path / "run" / "adapters" / "tuneshield" / "adapter_model.safetensors").exists()

    report = write_experiment_report(results, tmp_path / "report")
    assert "<img" in report.read_text()
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["arms"]["base"]["eval"]["toxic"]["replies"] == size.probes * size.samples_per_probe
    assert "| tuneshield |" in (tmp_path / "report" / "report.md").read_text()

    # A resumed run of the same configuration reuses the healed sets and finished arms:
    # stopped after training the tuneshield arm, before evaluating it.
    stopped = json.loads((tmp_path / "run" / "results.partial.json").read_text())
    del stopped["arms"]["tuneshield"]
    (tmp_path / "run" / "results.partial.json").write_text(json.dumps(stopped))
    resumed_stages: set[str] = set()
    resumed = run_experiment(
        config, tmp_path / "run", lambda stage, d, t: resumed_stages.add(stage), resume=True
    )
    assert not {"classify", "heal_contextual", "sft", "dpo"} & resumed_stages
    assert resumed["arms"]["undefended"] == results["arms"]["undefended"]
    assert resumed["arms"]["tuneshield"]["train"] == results["arms"]["tuneshield"]["train"]
    assert resumed["arms"]["tuneshield"]["eval"]["toxic"]["replies"] == size.probes * (
        size.samples_per_probe
    )
    assert resumed["judge"] == results["judge"]
    stage_names = [s["stage"] for s in resumed["stages"]]
    assert stage_names.count("train_undefended") == 1 and "evaluate_tuneshield" in stage_names

    other = ExperimentConfig.from_policy("quick", base_model=str(tiny_model_dir), arms=["base"])
    with pytest.raises(ExperimentError, match="another configuration"):
        run_experiment(other, tmp_path / "run", resume=True)
