"""LoRA SFT + DPO training into a vLLM-loadable adapter, on a tiny random model."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tuneshield._datasets import sft_rows
from tuneshield._policies import PolicyError
from tuneshield._samples import write_samples
from tuneshield._train import (
    DATA_DIR,
    StageWork,
    TrainConfig,
    TrainDevice,
    TrainError,
    TrainResult,
    cpu_bf16_flags,
    detect_device,
    load_train_config,
    make_identity_adapter,
    measure_matmul_peak,
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


def test_sft_learns_the_target_reply_only_not_the_contexts_assistant_turns(
    tiny_model_dir: Path, config: TrainConfig, tmp_path: Path
) -> None:
    """The template marks every assistant turn, the context's too (above): in DBL those are
    the target speaker's earlier turns as sent, an attacker's insults among them. SFT rows
    are prompt + completion, so the tokens TRL trains on are the target reply's alone."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.sft_trainer import SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = training_chat_template(tokenizer, config)
    config = config.for_device(detect_device(config.bf16))
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=config.sft_config(tmp_path / "sft", template),
        train_dataset=Dataset.from_list(sft_rows(SAMPLES[:1])),
        processing_class=tokenizer,
        peft_config=config.lora_config(),
    )
    row = trainer.train_dataset[0]
    trained = [label for label in row["labels"] if label != -100]  # TRL's loss labels
    assert tokenizer.decode(trained) == "that sounds lovely, tell me more<|im_end|>\n"


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


def test_nothing_left_to_fine_tune_is_refused_up_front(
    tiny_model_dir: Path, config: TrainConfig, tmp_path: Path
) -> None:
    """Every sample screened out as unrelated: a clear error before any model loads."""
    screened = [{**row, "unrelated": True} for row in SAMPLES]
    with pytest.raises(TrainError, match="every sample was left out of SFT"):
        train_adapter(tiny_model_dir, screened, tmp_path / "adapter", config)
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


CPU = TrainDevice(kind="cpu", name="test cpu", processes=1, bf16=False, reason="test")
GPU = TrainDevice(kind="cuda", name="test gpu", processes=1, bf16=True, reason="test")


def test_bf16_auto_follows_the_hardware_and_true_or_false_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auto is bf16 on a CPU with AVX512-BF16 or AMX and fp32 without; true/false stand;
    the policy accepts auto and refuses other words."""
    import tuneshield._train as train

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 avx512_bf16\n")
    assert cpu_bf16_flags(info) == ["avx512_bf16", "amx_bf16"]
    info.write_text("flags\t\t: fpu avx2 avx512f\n")
    assert cpu_bf16_flags(info) == [] and cpu_bf16_flags(tmp_path / "missing") == []
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    for flags, expected in ((["amx_bf16"], True), ([], False)):
        monkeypatch.setattr(train, "cpu_bf16_flags", lambda flags=flags: flags)
        device = detect_device("auto")
        assert (device.kind, device.bf16) == ("cpu", expected)
        assert device.reason.startswith("auto: ")
        assert detect_device(not expected).bf16 is (not expected)
    assert load_train_config().bf16 == "auto"
    text = (Path(__file__).parents[2] / "policies" / "training.yaml").read_text()
    (tmp_path / "training.yaml").write_text(text.replace("bf16: auto", "bf16: maybe"))
    with pytest.raises(PolicyError, match="bf16"):
        load_train_config(tmp_path)


def test_gpu_batch_shape_keeps_the_rows_per_optimizer_step() -> None:
    """On CUDA the policy's rows per forward pass apply and the accumulation keeps a step's
    rows (so a round's step count is the same on any device); on the CPU nothing changes;
    several processes share a step; a shape that cannot split a step is an error."""
    policy = load_train_config()
    assert policy.cuda is not None
    on_cpu = policy.for_device(CPU)
    assert on_cpu.sft == policy.sft and on_cpu.bf16 is False
    on_gpu = policy.for_device(GPU)
    assert on_gpu.bf16 is True
    for stage in ("sft", "dpo"):
        rows = getattr(policy.cuda, f"{stage}_per_device_train_batch_size")
        assert getattr(on_gpu, stage).per_device_train_batch_size == rows
        assert on_gpu.step_rows(stage) == policy.step_rows(stage)
    two = policy.for_device(dataclasses.replace(GPU, processes=2))
    assert 2 * two.step_rows("sft") == policy.step_rows("sft")
    with pytest.raises(TrainError, match="cannot be split"):
        policy.for_device(dataclasses.replace(GPU, processes=3))
    with pytest.raises(TypeError, match="auto"):
        policy.sft_config(Path("unused"))


def test_stages_count_tokens_flops_and_dpo_keeps_one_model(
    sft_dpo: TrainResult, config: TrainConfig
) -> None:
    """Each stage records its tokens and FLOPs (4N + 6A per training token, 2(N + A) per
    reference token, 6H and 2H per row through the LM head); DPO's reference is the SFT
    adapter copied on the same base (one LoRA more, no second model), its log-probs
    precomputed as the policy says."""
    manifest = sft_dpo.manifest
    assert manifest["bf16_policy"] == config.bf16 and manifest["device"]["kind"] == "cpu"
    assert isinstance(manifest["config"]["bf16"], bool)
    for stage in ("sft", "dpo"):
        metrics = manifest["stages"][stage]
        n, a, h = metrics["base_params"], metrics["adapter_params"], metrics["head_params"]
        assert n > 0 and 0 < a < n and h > 0
        assert 0 < metrics["tokens"] <= metrics["padded_tokens"]
        # The replies' positions only: a small part of each row (without the setting,
        # every position but each row's last).
        assert 0 < 2 * metrics["head_rows"] < metrics["tokens"]
        expected = (4 * n + 6 * a) * metrics["tokens"] + 2 * (n + a) * metrics["reference_tokens"]
        expected += 6 * h * metrics["head_rows"] + 2 * h * metrics["reference_head_rows"]
        assert metrics["flops"] == pytest.approx(expected)
        rate = metrics["flops"] / metrics["duration_s"]  # duration_s is rounded to 10 ms
        assert metrics["flops_per_s"] == pytest.approx(rate, rel=0.05)
        assert metrics["setup_s"] + metrics["train_s"] == pytest.approx(
            metrics["duration_s"], abs=0.02
        )
    assert manifest["stages"]["sft"]["reference_tokens"] == 0
    dpo = manifest["stages"]["dpo"]
    assert dpo["reference_tokens"] > 0
    reference = dpo["reference"]
    assert reference["model"] == "SFT adapter as 'ref'"
    assert reference["precomputed"] is config.dpo.precompute_ref_log_probs
    # The reference adds the adapter's bytes: a few percent of the base model, not 100%.
    assert 0 < reference["ref_adapter_mb"] < 0.1 * reference["base_model_mb"]


def test_precomputed_reference_gives_the_same_dpo_losses(
    tiny_model_dir: Path, config: TrainConfig, tmp_path: Path
) -> None:
    """Reference log-probs computed once before training or by a reference forward per
    step are the same numbers: with every pair in each step (so that the shuffle, which
    the precomputing pass moves along, cannot matter) the DPO losses match step by step."""
    losses = {}
    for precompute in (True, False):
        whole = dataclasses.replace(
            config,
            dpo=dataclasses.replace(
                config.dpo, per_device_train_batch_size=3, precompute_ref_log_probs=precompute
            ),
        )
        result = train_adapter(tiny_model_dir, SAMPLES, tmp_path / str(precompute), whole)
        dpo = result.manifest["stages"]["dpo"]
        assert dpo["reference"]["precomputed"] is precompute and dpo["reference_tokens"] > 0
        losses[precompute] = [e["loss"] for e in dpo["loss_history"]]
    assert len(losses[True]) == 2
    assert losses[False] == pytest.approx(losses[True], rel=1e-4)


def test_flop_formula_and_matmul_peak() -> None:
    """The FLOP count follows the documented formula (checkpointing adds a forward) and the
    matmul microbenchmark returns a positive rate for the training dtype."""
    work = StageWork(base_params=100, adapter_params=10, tokens=3, reference_tokens=2)
    assert work.flops == (4 * 100 + 6 * 10) * 3 + 2 * 110 * 2
    assert work.flops_6n == 6 * 110 * 3 + 2 * 110 * 2
    work.checkpointing = True
    assert work.flops == (4 * 100 + 6 * 10 + 2 * 110) * 3 + 2 * 110 * 2
    # The LM head: 2H forward per projected row, 4H more in training (the backward
    # recomputes the logits, then the hidden states' gradient).
    body = work.flops
    work.head_params, work.head_rows, work.reference_head_rows = 50, 4, 7
    assert work.flops == body + 6 * 50 * 4 + 2 * 50 * 7
    assert work.flops_6n == 6 * 160 * 3 + 2 * 160 * 2
    peak = measure_matmul_peak(CPU, seconds=0.05)
    assert peak["flops_per_s"] > 0 and peak["dtype"] == "float32"


def test_lm_head_on_labelled_positions_gives_the_same_losses_for_fewer_rows(
    tiny_model_dir: Path, config: TrainConfig, tmp_path: Path
) -> None:
    """With ``lm_head_labelled_only`` TRL's fused LM head projects only the positions that
    carry a loss, here on the CPU where TRL itself projects every position: fewer rows,
    the same tokens through the model and the same losses step by step in both stages;
    TRL's module is left as it was found."""
    import trl.trainer.utils as trl_utils

    found = trl_utils._use_triton, trl_utils._ChunkedLogProbFunction
    stages = {}
    for labelled_only in (True, False):
        arm = dataclasses.replace(config, lm_head_labelled_only=labelled_only)
        result = train_adapter(tiny_model_dir, SAMPLES, tmp_path / str(labelled_only), arm)
        stages[labelled_only] = result.manifest["stages"]
        assert (trl_utils._use_triton, trl_utils._ChunkedLogProbFunction) == found
    for stage in ("sft", "dpo"):
        labelled, every = stages[True][stage], stages[False][stage]
        assert labelled["tokens"] == every["tokens"] > 0
        # A row's last position predicts nothing; every other real or padded one is
        # projected without the setting, the context's too.
        assert 0 < labelled["head_rows"] < every["head_rows"] <= every["padded_tokens"]
        assert labelled["flops"] < every["flops"]
        losses = [[e["loss"] for e in stages[arm][stage]["loss_history"]] for arm in (True, False)]
        assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-4)
    references = [stages[arm]["dpo"]["reference_head_rows"] for arm in (True, False)]
    assert 0 < references[0] < references[1]


def test_dpo_pairs_share_their_prompt_for_the_same_losses(
    tiny_model_dir: Path, config: TrainConfig, tmp_path: Path
) -> None:
    """With ``dpo_shared_prefix`` each DPO pair runs as one row, its prompt once (here two
    pairs per forward pass, so packed rows are padded too): fewer tokens through the model
    in training and in the reference pass, the same LM-head rows and the same DPO losses
    step by step; SFT is untouched."""
    stages = {}
    for shared in (True, False):
        # In fp32: the packed pass sums the same terms in another order, which bf16 rounds
        # differently (6.5e-4 relative on the second DPO step on a CPU with AVX512-BF16,
        # where `bf16: auto` trains in bf16).
        arm = dataclasses.replace(config, dpo_shared_prefix=shared, bf16=False)
        stages[shared] = train_adapter(tiny_model_dir, SAMPLES, tmp_path / str(shared), arm)
        stages[shared] = stages[shared].manifest["stages"]
    packed, unpacked = stages[True]["dpo"], stages[False]["dpo"]
    sharing = packed["shared_prefix"]
    assert "shared_prefix" not in unpacked and "shared_prefix" not in stages[True]["sft"]
    # Every decoder call of the stage was packed, and the counts agree with the stage's.
    assert sharing["positions_unpacked"] == unpacked["tokens"] + unpacked["reference_tokens"]
    assert sharing["positions_packed"] == packed["tokens"] + packed["reference_tokens"]
    assert 0 < packed["tokens"] < unpacked["tokens"]
    assert 0 < packed["reference_tokens"] < unpacked["reference_tokens"]
    assert packed["head_rows"] == unpacked["head_rows"] > 0
    for stage in ("sft", "dpo"):
        losses = [[e["loss"] for e in stages[arm][stage]["loss_history"]] for arm in (True, False)]
        assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-4)
