"""The worker's file protocol: status events, progress across stages, errors reported;
the records that cross the process boundary decode strictly; a round runs on the settings
it was queued with and reads no policy file."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from learner.contracts import (
    ContractError,
    RoundSettings,
    RoundSpec,
    decode_round_settings,
    decode_round_spec,
    decode_worker_result,
    encode,
    encode_round_settings,
)
from learner.round_pipeline import RoundPlan
from learner.worker import (
    RESULT_FILE,
    SPEC_FILE,
    STATUS_FILE,
    StatusFile,
    main,
    overall_progress,
    read_status,
    run_round,
    write_record,
)


def test_progress_adds_finished_stages_and_the_current_share(tmp_path: Path) -> None:
    """Progress is the weight of the stages before the current one plus its done share;
    a half-written last line is ignored; done is 100%."""
    status = StatusFile(tmp_path / STATUS_FILE)
    status.write("stage", stage="snapshot")
    status.progress("classify", 10, 10)
    status.progress("sft", 1, 4)
    with (tmp_path / STATUS_FILE).open("a") as handle:
        handle.write('{"event": "progr')
    stage, progress = overall_progress(read_status(tmp_path / STATUS_FILE))
    assert stage == "sft"
    assert abs(progress - (0.02 + 0.08 + 0.15 + 0.35 / 4)) < 1e-9
    finished = StatusFile(tmp_path / "finished.jsonl")
    finished.progress("sft", 4, 4)
    finished.write("done")
    assert overall_progress(read_status(finished.path)) == ("done", 1.0)


def test_status_line_of_another_version_is_refused(tmp_path: Path) -> None:
    """A complete status line from another release is an error naming the version."""
    path = tmp_path / STATUS_FILE
    path.write_text('{"version": 9, "time": "t", "event": "done"}\n')
    with pytest.raises(ContractError, match="status event: version 9 is not 1"):
        read_status(path)


def test_worker_failure_is_written_to_the_status_file(tmp_path: Path) -> None:
    """A round folder without round.json exits 1 and leaves the error in status.jsonl."""
    assert main([str(tmp_path)]) == 1
    errors = [e for e in read_status(tmp_path / STATUS_FILE) if e.event == "error"]
    assert len(errors) == 1 and (errors[0].error or "").startswith("FileNotFoundError")
    assert main([]) == 2


def settings(**plan: Any) -> RoundSettings:
    return RoundSettings.from_policies(plan=RoundPlan.from_policy(**plan))


def spec_json(**plan: Any) -> dict[str, Any]:
    spec = RoundSpec(
        run_id="r1",
        settings=settings(**plan),
        snapshot="snap.parquet",
        base_model="tiny",
        parent_adapter=None,
        active_adapter=None,
    )
    data: dict[str, Any] = json.loads(encode(spec))
    return data


def test_round_settings_round_trip() -> None:
    """Encoded settings decode to the same record: plan, training, healing, judges,
    evaluation and gates, as they were read."""
    original = settings(max_steps=3)
    again = decode_round_settings(encode_round_settings(original))
    assert again == original and again.plan.max_steps == 3
    assert again.train_config().sft.max_steps == 3
    assert decode_round_spec(json.dumps(spec_json())).settings.plan == RoundPlan.from_policy()


def test_settings_keep_bf16_auto_and_the_gpu_shape_for_the_worker_to_resolve() -> None:
    """The queued settings carry training.yaml's bf16 (auto: resolved by the worker on its
    own machine, not by the learner) and the CUDA batch shape; settings queued before
    those fields existed decode to what they meant (fp32 as recorded, random batches, the
    CPU shape everywhere, a reference forward per DPO step, the head on every position,
    a DPO pair as two rows)."""
    queued = settings()
    assert queued.training.bf16 == "auto" and queued.training.cuda is not None
    data = json.loads(encode_round_settings(queued))
    assert queued.training.lm_head_labelled_only is queued.training.dpo_shared_prefix is True
    del data["training"]["group_by_length"], data["training"]["cuda"]
    del data["training"]["dpo"]["precompute_ref_log_probs"]
    del data["training"]["lm_head_labelled_only"], data["training"]["dpo_shared_prefix"]
    data["training"]["bf16"] = False
    old = decode_round_settings(json.dumps(data)).train_config()
    assert (old.bf16, old.group_by_length, old.cuda) == (False, False, None)
    assert old.lm_head_labelled_only is old.dpo_shared_prefix is False
    assert old.dpo.precompute_ref_log_probs is False
    data["training"]["bf16"] = "sometimes"
    with pytest.raises(ContractError, match="bf16"):
        decode_round_settings(json.dumps(data))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(version=1), "round spec .*version 1 is not 3"),
        (lambda d: d["settings"].update(version=1), "round settings version 1 is not 3"),
        (lambda d: d.update(gates={}), "unknown field `gates` at `\\$`"),
        (lambda d: d["settings"]["plan"].update(sft_epoch=2), "`sft_epoch` at `\\$.settings.plan`"),
        (
            lambda d: d["settings"]["training"]["lora"].update(rank=8),
            "`rank` at `\\$.settings.training.lora`",
        ),
        (lambda d: d["settings"]["plan"].update(max_steps="3"), "\\$.settings.plan.max_steps"),
        (lambda d: d["settings"]["plan"].update(heal_mode="magic"), "heal_mode"),
        (lambda d: d.pop("run_id"), "run_id"),
        (lambda d: d["settings"]["judges"]["judges"]["embedding"].update(x=1), "judges.embedding"),
        (lambda d: d["settings"]["gates"].update(judge="embedding"), "independent"),
    ],
)
def test_malformed_or_foreign_spec_is_refused_naming_the_field(change: Any, message: str) -> None:
    """round.json of another version, with an unknown field (nested configs too), a wrong
    type (no coercion), a bad value or a judge the defense uses is refused, named."""
    data = spec_json()
    change(data)
    with pytest.raises(ContractError, match=message):
        decode_round_spec(json.dumps(data))


def test_settings_missing_or_not_json_are_refused() -> None:
    """A run row without settings, or with text that is not JSON, is a clear error."""
    with pytest.raises(ContractError, match="queued without"):
        decode_round_settings(None)
    with pytest.raises(ContractError, match="not valid JSON"):
        decode_round_settings("{")
    with pytest.raises(ContractError, match="version None"):
        decode_round_settings('{"plan": {}}')


def test_malformed_or_foreign_result_is_refused_naming_the_field(tmp_path: Path) -> None:
    """result.json of another version, with an unknown field or a wrong type, is refused."""
    from learner.contracts import CandidateRecord, WorkerResult

    record = CandidateRecord(
        adapter_dir="a", samples_path="s", samples=3, flagged=1, flagged_before_cap=1,
        healed=1, judge="embedding", threshold=0.5, training={}, hyperparameters={},
        stages=[], parent_adapter=None, peak_rss_gib=1.0,
    )  # fmt: skip
    write_record(tmp_path / RESULT_FILE, WorkerResult(candidate=record, gates=None,
                 evaluations=None, seconds=1.0))  # fmt: skip
    good = json.loads((tmp_path / RESULT_FILE).read_text())
    assert decode_worker_result(json.dumps(good)).passed
    for change, message in [
        (lambda d: d.update(version=1), "worker result .*version 1 is not 2"),
        (lambda d: d["candidate"].update(toxic_trained=0), "`toxic_trained` at `\\$.candidate`"),
        (lambda d: d["candidate"].update(samples="3"), "\\$.candidate.samples"),
        (lambda d: d.update(gates={"passed": True}), "\\$.gates"),
    ]:
        data = json.loads(json.dumps(good))
        change(data)
        with pytest.raises(ContractError, match=message):
            decode_worker_result(json.dumps(data))


@pytest.mark.slow
def test_round_runs_on_its_settings_without_reading_policies(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's round (classify → heal → SFT → DPO → gates) takes every config from
    round.json: with policies/ empty and every policy reader raising, it still runs, and
    the settings it was queued with (not today's files) are what it trained with."""
    import learner.snapshot
    import tuneshield
    from tuneshield import build_poisoned_samples, load_attack_config, load_chitchat_dialogs

    attack = dataclasses.replace(load_attack_config("injection"), rate=0.5, seed=0)
    samples = build_poisoned_samples(load_chitchat_dialogs(limit=3, seed=0), attack)[:8]
    queued = RoundSettings.from_policies(
        plan=RoundPlan.from_policy(
            judge="lexical", heal_mode="canned", max_steps=1, sft_epochs=1, dpo_epochs=1
        ),
        # A large effect to detect: the gates' power needs 2 replies per kind, not 203.
        gate_overrides={"judge": "embedding", "effect_reference": 0.05,
                        "effect_candidate": 0.95, "samples_per_probe": 1,
                        "max_new_tokens": 4, "perplexity_samples": 2},
    )  # fmt: skip
    spec = RoundSpec(
        run_id="r1",
        settings=queued,
        snapshot=str(tmp_path / "snap.parquet"),
        base_model=str(tiny_model_dir),
        parent_adapter=None,
        active_adapter=None,
    )
    round_dir = tmp_path / "round"
    round_dir.mkdir()
    write_record(round_dir / SPEC_FILE, spec)

    def no_policies(name: str, directory: Path | None = None) -> dict[str, Any]:
        raise AssertionError(f"the worker read policies/{name}.yaml during a round")

    monkeypatch.setenv("TUNESHIELD_POLICIES_DIR", str(tmp_path / "empty"))
    # Every module that bound the reader (``from ... import read_policy``), whatever its path.
    reader = tuneshield.read_policy
    for module in list(sys.modules.values()):
        if vars(module).get("read_policy") is reader:
            monkeypatch.setattr(module, "read_policy", no_policies)
    monkeypatch.setattr(learner.snapshot, "read_snapshot_samples", lambda *a, **k: samples)

    result = run_round(round_dir)

    assert result.candidate.judge == "lexical" and result.candidate.samples == len(samples)
    assert result.gates is not None and result.gates.judge == "embedding"
    assert result.evaluations is not None
    assert result.candidate.hyperparameters["training"]["sft"]["max_steps"] == 1
    # The config as it trained (bf16 resolved on this machine), and where.
    assert isinstance(result.candidate.hyperparameters["training"]["bf16"], bool)
    assert result.candidate.hyperparameters["device"]["kind"] in ("cpu", "cuda")
    written = decode_worker_result((round_dir / RESULT_FILE).read_bytes())
    assert written == msgspec.json.decode(msgspec.json.encode(result), type=type(result))
    assert [e.event for e in read_status(round_dir / STATUS_FILE)][-1] == "done"


@pytest.mark.slow
def test_training_spreads_over_processes_and_the_first_one_saves(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """With several devices the training stage runs under ``accelerate launch``, one
    process each (here two CPU processes, launched as for two GPUs): every step's rows are
    shared, the first process saves one loadable adapter, the token counts cover both
    processes, and progress reaches the worker."""
    from learner.round_pipeline import train_on_gpus
    from tuneshield import load_train_config, override_stage
    from tuneshield._train import verify_adapter

    samples = [
        {"conversation_id": f"c{i}", "context": [{"role": "user", "content": f"hi {i}"}],
         "response": f"hello there {i}", "toxic": False}
        for i in range(8)
    ]  # fmt: skip
    config = load_train_config()
    for stage in ("sft", "dpo"):
        config = override_stage(config, stage, per_device_train_batch_size=1,
                                gradient_accumulation_steps=2, max_steps=2)  # fmt: skip
    seen: list[tuple[str, int, int]] = []
    result = train_on_gpus(
        tiny_model_dir, samples, tmp_path / "round" / "adapter", config, dpo=False,
        init_adapter=None, progress=lambda *event: seen.append(event), processes=2,
    )  # fmt: skip
    verify_adapter(result.adapter_dir)
    sft = result.manifest["stages"]["sft"]
    assert result.manifest["device"]["processes"] == 2 and sft["steps"] == 2
    # 2 steps x 2 rows, one row per process per step: both processes' tokens are counted.
    assert sft["tokens"] == sft["padded_tokens"] > 0
    assert sum(1 for p in (tmp_path / "round").iterdir() if p.name.startswith(".adapter")) == 0
    assert ("sft", 2, 2) in seen
