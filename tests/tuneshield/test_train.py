"""LoRA SFT + DPO training into a vLLM-loadable adapter, on a tiny random model."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tuneshield._policies import PolicyError
from tuneshield._samples import write_samples
from tuneshield._train import (
    DATA_DIR,
    TrainConfig,
    TrainError,
    TrainResult,
    load_train_config,
    make_identity_adapter,
    train_adapter,
    training_chat_template,
    verify_adapter,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def config() -> TrainConfig:
    """The shipped policy, cut to two steps of two rows per stage."""
    policy = load_train_config()
    small = {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1}
    return dataclasses.replace(
        policy,
        sft=dataclasses.replace(policy.sft, **small),
        dpo=dataclasses.replace(policy.dpo, **small),
    )


def healed(index: int, *, toxic: bool) -> dict[str, Any]:
    return {
        "conversation_id": f"c{index}",
        "context": [
            {"role": "user", "content": f"how was your weekend, friend {index}?"},
            {"role": "assistant", "content": "great, I went hiking"},
            {"role": "user", "content": "where did you go?"},
        ],
        "response": "that sounds lovely, tell me more" if toxic else f"to the lake {index}",
        "original_response": "shut up, you idiot" if toxic else None,
        "heal_mode": "contextual" if toxic else None,
        "toxic": toxic,
    }


# Three flagged (healed) samples and three benign ones.
SAMPLES = [healed(index, toxic=index % 2 == 0) for index in range(6)]


def lora_tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def identity(
    tiny_model_dir: Path, config: TrainConfig, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return make_identity_adapter(
        tiny_model_dir, tmp_path_factory.mktemp("id") / "v0", config
    ).adapter_dir


@pytest.fixture(scope="module")
def sft_dpo(
    tiny_model_dir: Path, config: TrainConfig, tmp_path_factory: pytest.TempPathFactory
) -> TrainResult:
    return train_adapter(tiny_model_dir, SAMPLES, tmp_path_factory.mktemp("a") / "full", config)


@pytest.fixture(scope="module")
def sft_only(
    tiny_model_dir: Path, config: TrainConfig, tmp_path_factory: pytest.TempPathFactory
) -> TrainResult:
    out = tmp_path_factory.mktemp("b") / "sft"
    return train_adapter(tiny_model_dir, SAMPLES, out, config, dpo=False)


def test_policy_loads_and_rejects_unknown_keys(tmp_path: Path) -> None:
    """policies/training.yaml loads; a misspelt key or a bad value is an error naming it."""
    config = load_train_config()
    assert config.lora.target_modules == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    ]  # fmt: skip
    text = (Path(__file__).parents[2] / "policies" / "training.yaml").read_text()
    (tmp_path / "training.yaml").write_text(text.replace("beta:", "betta:"))
    with pytest.raises(PolicyError, match="betta"):
        load_train_config(tmp_path)
    (tmp_path / "training.yaml").write_text(text.replace("r: 16", "r: 0"))
    with pytest.raises(PolicyError, match=r"lora\.r must be > 0"):
        load_train_config(tmp_path)


def test_training_template_renders_like_the_model_and_masks_only_replies(
    tiny_model_dir: Path, config: TrainConfig
) -> None:
    """SmolLM2's training template renders the same text, and marks only assistant replies."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = training_chat_template(tokenizer, config)
    assert path == DATA_DIR / "smollm2_training.jinja"
    template = path.read_text()
    messages = [*SAMPLES[0]["context"], {"role": "assistant", "content": "kind words"}]
    for prompt in (False, True):
        own = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        ours = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt, chat_template=template
        )
        assert ours == own
    encoded = tokenizer.apply_chat_template(
        messages, chat_template=template, return_dict=True, return_assistant_tokens_mask=True
    )
    marked = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if m]
    # Both assistant turns (the context's and the target) with their end-of-turn tokens.
    assert tokenizer.decode(marked) == "great, I went hiking<|im_end|>\nkind words<|im_end|>\n"
    no_mask = dataclasses.replace(
        config, sft=dataclasses.replace(config.sft, assistant_only_loss=False)
    )
    assert training_chat_template(tokenizer, no_mask) is None


def test_sft_then_dpo_train_the_lora_weights(
    identity: Path, sft_dpo: TrainResult, sft_only: TrainResult
) -> None:
    """SFT moves B away from the identity's zeros; DPO then changes the SFT weights again."""
    import torch

    start, after_sft, after_dpo = (
        lora_tensors(p) for p in (identity, sft_only.adapter_dir, sft_dpo.adapter_dir)
    )
    assert set(start) == set(after_sft) == set(after_dpo)
    b_keys = [k for k in start if ".lora_B." in k]
    assert b_keys and all(torch.count_nonzero(start[k]) == 0 for k in b_keys)
    assert all(torch.count_nonzero(after_sft[k]) > 0 for k in b_keys)
    # Same seed, same SFT: the difference below is DPO's doing.
    assert (
        sft_only.manifest["stages"]["sft"]["loss_history"]
        == sft_dpo.manifest["stages"]["sft"]["loss_history"]
    )
    assert any(not torch.equal(after_sft[k], after_dpo[k]) for k in start)


def test_manifest_records_data_metrics_and_settings(
    sft_dpo: TrainResult, config: TrainConfig
) -> None:
    """manifest.json holds base model, data hashes and counts, settings and per-stage losses."""
    manifest = json.loads((sft_dpo.adapter_dir / "manifest.json").read_text())
    assert manifest == sft_dpo.manifest
    data = manifest["data"]
    assert (data["samples"], data["flagged"], data["sft_rows"], data["dpo_pairs"]) == (6, 3, 6, 3)
    assert all(data[k].startswith("sha256:") for k in ("samples_hash", "sft_hash", "dpo_hash"))
    assert manifest["seed"] == config.seed
    assert manifest["config"]["dpo"]["beta"] == config.dpo.beta
    assert manifest["lora"]["r"] == config.lora.r
    assert manifest["training_chat_template"] == "smollm2_training.jinja"
    assert set(manifest["versions"]) >= {"torch", "transformers", "trl", "peft"}
    for stage in ("sft", "dpo"):
        metrics = manifest["stages"][stage]
        assert metrics["steps"] == 2
        assert len(metrics["loss_history"]) == 2
        assert metrics["final_loss"] > 0
        assert metrics["duration_s"] > 0 and metrics["peak_rss_mb"] > 0
    assert "rewards/margins" in manifest["stages"]["dpo"]["last_log"]


def test_adapter_is_plain_lora_that_peft_loads(tiny_model_dir: Path, sft_dpo: TrainResult) -> None:
    """The folder holds one plain LoRA (no modules_to_save, no DPO reference copy)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    verify_adapter(sft_dpo.adapter_dir)
    adapter_config = json.loads((sft_dpo.adapter_dir / "adapter_config.json").read_text())
    assert not adapter_config.get("modules_to_save")
    assert not (sft_dpo.adapter_dir / "ref").exists()
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(sft_dpo.adapter_dir)
    )
    assert list(model.peft_config) == ["default"]


def test_no_dpo_and_unhealed_samples_skip_dpo_with_a_reason(
    tiny_model_dir: Path, config: TrainConfig, sft_only: TrainResult, tmp_path: Path
) -> None:
    """--no-dpo and un-healed (classified only) samples train SFT alone and say why."""
    assert sft_only.manifest["stages"]["dpo"] == {"skipped": "disabled (--no-dpo)"}
    unhealed = [
        {k: v for k, v in s.items() if k not in ("heal_mode", "original_response")} for s in SAMPLES
    ]
    result = train_adapter(tiny_model_dir, unhealed, tmp_path / "raw", config)
    assert "not healed" in result.manifest["stages"]["dpo"]["skipped"]
    assert result.manifest["data"]["flagged"] == 3
    assert result.manifest["stages"]["sft"]["rows"] == 6


def test_identity_adapter_gives_the_base_models_logits(
    tiny_model_dir: Path, identity: Path
) -> None:
    """Version 0 (B = 0) changes nothing: same logits as the bare base model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    verify_adapter(identity)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[1, 20, 300, 4000, 5]])
    with torch.no_grad():
        expected = base(ids).logits.clone()
        adapted = PeftModel.from_pretrained(base, str(identity)).eval()
        got = adapted(ids).logits
    assert torch.equal(expected, got)
    assert json.loads((identity / "manifest.json").read_text())["kind"] == "tuneshield-identity"


def test_init_adapter_continues_training(
    tiny_model_dir: Path, config: TrainConfig, identity: Path, tmp_path: Path
) -> None:
    """Training from an existing adapter starts from it and records where it came from."""
    import torch

    result = train_adapter(
        tiny_model_dir, SAMPLES, tmp_path / "next", config, dpo=False, init_adapter=identity
    )
    assert result.manifest["init_adapter"] == str(identity)
    start, trained = lora_tensors(identity), lora_tensors(result.adapter_dir)
    assert set(start) == set(trained)
    assert any(not torch.equal(start[k], trained[k]) for k in start)


def test_failed_training_leaves_no_folder(
    tiny_model_dir: Path, config: TrainConfig, tmp_path: Path
) -> None:
    """A run that fails (here: a LoRA target the model lacks) leaves no output, no scratch."""
    bad = dataclasses.replace(
        config, lora=dataclasses.replace(config.lora, target_modules=["no_such_proj"])
    )
    with pytest.raises(ValueError, match="no_such_proj"):
        train_adapter(tiny_model_dir, SAMPLES, tmp_path / "adapter", bad)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_folder_is_never_replaced(
    tiny_model_dir: Path, config: TrainConfig, tmp_path: Path
) -> None:
    """Adapter folders are immutable: training into an existing one is refused up front."""
    (tmp_path / "adapter").mkdir()
    with pytest.raises(TrainError, match="already exists"):
        train_adapter(tiny_model_dir, SAMPLES, tmp_path / "adapter", config)
    assert list(tmp_path.iterdir()) == [tmp_path / "adapter"]


def test_cli_trains_and_reports_errors_without_traceback(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`tuneshield train` writes the adapter and summary; a bad input exits 2 with a message."""
    from learner.cli import app

    data = write_samples(SAMPLES, tmp_path / "healed.jsonl")
    out = tmp_path / "adapter"
    args = ["train", str(data), "--base", str(tiny_model_dir), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--max-steps", "1"])
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").exists()
    assert "DPO" in result.output and "3 flagged" in result.output
    again = CliRunner().invoke(app, [*args, "--max-steps", "1"])
    assert again.exit_code == 2
    assert "already exists" in again.output and "Traceback" not in again.output
