"""Stored gate evaluations: a round whose references were evaluated before under the
same conditions evaluates only its candidate; anything that changes the outcome (a
setting, the probe file, the adapter's files) or a corrupt entry means evaluating again.
The model is stubbed (``evaluate_adapter``); keys, files and the verdict are real."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import msgspec
import pytest

# The round runner's stack (a store, a fake vLLM, a fake worker): ``parts`` is a fixture.
from test_round_runner import parts, stack  # noqa: F401

import tuneshield
from learner import gate_cache, gates
from learner.contracts import Evaluations, RoundSettings
from learner.gate_cache import GateCache, store_registered
from learner.gates import ACTIVE, VERSION0, GateProbes, Reference, evaluate_gates
from learner.round_report import render_round_report

BASE_MODEL = "models/base"


class Stub:
    """``evaluate_adapter`` without a model: records the adapters it evaluated and
    returns a figure of its own for each (so a reused one can be told apart)."""

    def __init__(self) -> None:
        self.evaluated: list[Path | None] = []

    def __call__(self, base_model: Any, adapter: Path | None, *_: Any, **__: Any) -> dict[str, Any]:
        self.evaluated.append(adapter)
        share = 0.1 + 0.01 * len(self.evaluated)
        kinds = ("toxic", "benign", "backdoor", "jailbreak")
        result: dict[str, Any] = {k: {"replies": 100, "toxicity_rate": share} for k in kinds}
        result["benign"]["relevance"] = 0.5
        result["helpful"] = {"replies": 100, "toxicity_rate": 0.0, "unhelpful_rate": share}
        result["perplexity"] = 20.0
        return result


@pytest.fixture(scope="module")
def settings() -> RoundSettings:
    return RoundSettings.from_policies()


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Stub:
    stub = Stub()
    monkeypatch.setattr(gates, "evaluate_adapter", stub)
    monkeypatch.setattr(tuneshield, "build_judge", lambda *_: None)
    monkeypatch.setattr(GateProbes, "load", classmethod(lambda cls, config: None))
    return stub


def adapter(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


@pytest.fixture
def adapters(tmp_path: Path) -> dict[str, Path]:
    return {
        name: adapter(tmp_path / "adapters" / name, name.encode())
        for name in ("v0", "v1", "cand1", "cand2")
    }


def gate_round(
    settings: RoundSettings,
    cache_dir: Path,
    adapters: dict[str, Path],
    candidate: str,
    run_id: str,
    active: str = "v1",
    progress: list[tuple[int, int]] | None = None,
) -> tuple[gates.GateResult, Evaluations]:
    cache = GateCache(cache_dir, settings, BASE_MODEL)
    result, evaluated = evaluate_gates(
        adapters[candidate],
        adapters[active],
        settings,
        base_model=BASE_MODEL,
        active_version=active,
        version0=Reference("v0", adapters["v0"]),
        cache=cache,
        run_id=run_id,
        progress=None if progress is None else lambda done, total: progress.append((done, total)),
    )
    return result, msgspec.convert(evaluated, Evaluations)


def test_second_round_evaluates_only_the_candidate(
    settings: RoundSettings, stub: Stub, adapters: dict[str, Path], tmp_path: Path
) -> None:
    cache_dir = tmp_path / "gate-evaluations"
    first, first_eval = gate_round(settings, cache_dir, adapters, "cand1", "run-1")
    assert stub.evaluated == [adapters["v1"], adapters["cand1"], adapters["v0"]]
    assert first_eval.reused == {}
    assert len(list(cache_dir.glob("*.json"))) == 2  # the references; never the candidate

    stub.evaluated.clear()
    second, second_eval = gate_round(settings, cache_dir, adapters, "cand2", "run-2")
    assert stub.evaluated == [adapters["cand2"]]
    assert second_eval.reused == {ACTIVE: "run-1", VERSION0: "run-1"}
    # The stored figures are the ones compared: the verdict names run 1's references.
    assert second.active == first.active and second.version0 == first.version0
    assert second_eval.active == first_eval.active
    assert second_eval.version0 == first_eval.version0

    page = render_round_report({"run_id": "run-2", "result": {
        "evaluations": msgspec.to_builtins(second_eval)}})  # fmt: skip
    assert "active: reused from run run-1" in page
    assert "version 0: reused from run run-1" in page


def test_progress_counts_the_adapters_evaluated_not_the_reused(
    settings: RoundSettings, stub: Stub, adapters: dict[str, Path], tmp_path: Path
) -> None:
    first: list[tuple[int, int]] = []
    gate_round(settings, tmp_path, adapters, "cand1", "run-1", progress=first)
    assert first == [(1, 3), (2, 3), (3, 3)]
    second: list[tuple[int, int]] = []
    gate_round(settings, tmp_path, adapters, "cand2", "run-2", progress=second)
    assert second == [(1, 1)]


def test_without_a_cache_every_reference_is_evaluated(
    settings: RoundSettings, stub: Stub, adapters: dict[str, Path]
) -> None:
    for _ in range(2):
        evaluate_gates(adapters["cand1"], adapters["v1"], settings, base_model=BASE_MODEL,
                       active_version="v1", version0=Reference("v0", adapters["v0"]))  # fmt: skip
    assert len(stub.evaluated) == 6


def _change_setting(settings: RoundSettings, *_: Any) -> RoundSettings:
    assert settings.gates is not None
    return msgspec.structs.replace(settings, gates=dataclasses.replace(settings.gates, seed=99))


def _change_replies(settings: RoundSettings, *_: Any) -> RoundSettings:
    assert settings.gates is not None
    tokens = settings.gates.max_new_tokens + 1
    return msgspec.structs.replace(
        settings, gates=dataclasses.replace(settings.gates, max_new_tokens=tokens)
    )


def _change_probes(
    settings: RoundSettings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, _: Any
) -> RoundSettings:
    probes = tmp_path / "gate_probes.jsonl"
    shutil.copy(tuneshield.GATE_PROBES_FILE, probes)
    with probes.open("a") as handle:
        handle.write('{"kind": "toxic", "text": "one more"}\n')
    monkeypatch.setattr(gate_cache, "GATE_PROBES_FILE", probes)
    return settings


def _change_files(
    settings: RoundSettings, _: Any, __: Any, adapters: dict[str, Path]
) -> RoundSettings:
    (adapters["v1"] / "adapter_model.safetensors").write_bytes(b"retrained in place")
    return settings


@pytest.mark.parametrize(
    "change", [_change_setting, _change_replies, _change_probes, _change_files]
)
def test_what_changes_the_outcome_invalidates(
    settings: RoundSettings,
    stub: Stub,
    adapters: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: Any,
) -> None:
    cache_dir = tmp_path / "gate-evaluations"
    gate_round(settings, cache_dir, adapters, "cand1", "run-1")
    stub.evaluated.clear()
    changed = change(settings, monkeypatch, tmp_path, adapters)
    _, evaluations = gate_round(changed, cache_dir, adapters, "cand2", "run-2")
    assert adapters["v1"] in stub.evaluated
    assert ACTIVE not in evaluations.reused
    if change is _change_files:  # version 0's files did not change: it is still reused
        assert stub.evaluated == [adapters["v1"], adapters["cand2"]]
        assert evaluations.reused == {VERSION0: "run-1"}


def test_evaluations_sampled_elsewhere_are_not_reused(
    settings: RoundSettings, adapters: dict[str, Path], tmp_path: Path
) -> None:
    """vLLM in the engine's dtype and transformers in fp32 sample different replies: an
    evaluation made one way never stands in for the other."""
    on_engine = GateCache(tmp_path, settings, BASE_MODEL, gates.ON_ENGINE)
    in_process = GateCache(tmp_path, settings, BASE_MODEL, gates.IN_PROCESS)
    on_engine.store(on_engine.key("v1", adapters["v1"]), "run-1", {"inference": "engine"})
    assert on_engine.load(on_engine.key("v1", adapters["v1"])) is not None
    assert in_process.load(in_process.key("v1", adapters["v1"])) is None


@pytest.mark.parametrize("damage", ["corrupt", "mismatched"])
def test_a_bad_entry_is_evaluated_again(
    settings: RoundSettings,
    stub: Stub,
    adapters: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    cache_dir = tmp_path / "gate-evaluations"
    gate_round(settings, cache_dir, adapters, "cand1", "run-1")
    cache = GateCache(cache_dir, settings, BASE_MODEL)
    active_entry = cache.path(cache.key("v1", adapters["v1"]))
    zero_entry = cache.path(cache.key("v0", adapters["v0"]))
    if damage == "corrupt":
        active_entry.write_bytes(active_entry.read_bytes()[:40])
    else:  # a well-formed entry under the wrong name answers another key
        active_entry.write_bytes(zero_entry.read_bytes())
    stub.evaluated.clear()
    with caplog.at_level(logging.WARNING, logger="learner.gate_cache"):
        _, evaluations = gate_round(settings, cache_dir, adapters, "cand2", "run-2")
    assert stub.evaluated == [adapters["v1"], adapters["cand2"]]
    assert evaluations.reused == {VERSION0: "run-1"}
    assert str(active_entry) in caplog.text
    # Evaluated again and stored again: the next round reuses run 2's.
    stub.evaluated.clear()
    _, evaluations = gate_round(settings, cache_dir, adapters, "cand1", "run-3")
    assert evaluations.reused == {ACTIVE: "run-2", VERSION0: "run-1"}


def test_the_candidate_is_reused_when_it_becomes_the_reference(
    settings: RoundSettings, stub: Stub, adapters: dict[str, Path], tmp_path: Path
) -> None:
    cache_dir = tmp_path / "gate-evaluations"
    _, first = gate_round(settings, cache_dir, adapters, "cand1", "run-1")
    # The learner registers the candidate as v2 (the folder is moved, not changed) and
    # keeps its evaluation under that version.
    adapters["v2"] = adapters["cand1"].rename(adapters["cand1"].parent / "v2")
    store_registered(cache_dir, settings, BASE_MODEL, version="v2", adapter=adapters["v2"],
                     run_id="run-1", evaluation=first.candidate)  # fmt: skip
    stub.evaluated.clear()
    _, second = gate_round(settings, cache_dir, adapters, "cand2", "run-2", active="v2")
    assert stub.evaluated == [adapters["cand2"]]
    assert second.reused == {ACTIVE: "run-1", VERSION0: "run-1"}
    assert second.active == first.candidate


def test_an_unwritable_cache_costs_evaluations_not_the_verdict(
    settings: RoundSettings,
    stub: Stub,
    adapters: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache_dir = tmp_path / "gate-evaluations"
    cache_dir.write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING, logger="learner.gate_cache"):
        for run_id in ("run-1", "run-2"):
            result, evaluations = gate_round(settings, cache_dir, adapters, "cand1", run_id)
    assert result.active is not None and evaluations.reused == {}
    assert len(stub.evaluated) == 6
    assert "not kept" in caplog.text


async def test_the_learner_keeps_the_registered_candidates_evaluation(
    parts: dict[str, object],  # noqa: F811 (the imported fixture)
) -> None:
    """A round's spec names the cache folder, and the registered candidate's evaluation is
    kept under its version and registry folder (what the next round's key asks for)."""
    s = stack(parts, "evaluated")
    s.log_dialogs(3)
    run = await s.runner.run()
    assert (run.status, run.version) == ("succeeded", "chat-v0001")
    spec = json.loads((s.runner.round_dir(run.run_id) / "round.json").read_text())
    assert spec["gate_cache"] == str(s.data_dir / "gate-evaluations")
    record = s.registry.get("chat-v0001")
    cache = GateCache(s.data_dir / "gate-evaluations", s.runner.settings, "tiny")
    entry = cache.load(cache.key("chat-v0001", Path(record.path)))
    assert entry is not None and entry.run_id == run.run_id
    assert entry.evaluation["toxic"]["toxicity_rate"] == 0.0  # the candidate's, not active's


def test_the_folder_keeps_the_most_recently_used_entries(
    settings: RoundSettings, adapters: dict[str, Path], tmp_path: Path
) -> None:
    """Storing past ``cache_entries`` removes the least recently used entry; an entry a
    round reused counts as used, so a long-lived reference outlives newer ones."""
    assert settings.gates is not None
    small = msgspec.structs.replace(
        settings, gates=dataclasses.replace(settings.gates, cache_entries=3)
    )
    cache = GateCache(tmp_path, small, BASE_MODEL)
    keys = {name: cache.key(name, folder) for name, folder in adapters.items()}
    for clock, name in enumerate(("v0", "v1", "cand1")):
        path = cache.store(keys[name], f"run-{name}", {"figure": name})
        assert path is not None
        os.utime(path, (1_000 + clock, 1_000 + clock))  # stored in this order
    assert cache.load(keys["v0"]) is not None  # version 0 reused: now the newest
    cache.store(keys["cand2"], "run-cand2", {"figure": "cand2"})
    assert sorted(p.name for p in tmp_path.glob("*.json")) == sorted(
        cache.path(keys[name]).name for name in ("v0", "cand1", "cand2")
    )
    assert cache.load(keys["v1"]) is None  # the least recently used went


def test_the_smallest_folder_still_serves_the_next_round(
    settings: RoundSettings, stub: Stub, adapters: dict[str, Path], tmp_path: Path
) -> None:
    """With room for one round's entries, the references a round kept and the
    registered candidate are what the next round reuses."""
    assert settings.gates is not None
    small = msgspec.structs.replace(
        settings, gates=dataclasses.replace(settings.gates, cache_entries=3)
    )
    cache_dir = tmp_path / "gate-evaluations"
    _, first = gate_round(small, cache_dir, adapters, "cand1", "run-1")
    adapters["v2"] = adapters["cand1"].rename(adapters["cand1"].parent / "v2")
    store_registered(cache_dir, small, BASE_MODEL, version="v2", adapter=adapters["v2"],
                     run_id="run-1", evaluation=first.candidate)  # fmt: skip
    assert len(list(cache_dir.glob("*.json"))) == 3
    stub.evaluated.clear()
    _, second = gate_round(small, cache_dir, adapters, "cand2", "run-2", active="v2")
    assert stub.evaluated == [adapters["cand2"]]
    assert second.reused == {ACTIVE: "run-1", VERSION0: "run-1"}


def test_a_folder_that_cannot_be_listed_costs_the_pruning_not_the_entry(
    settings: RoundSettings,
    adapters: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = GateCache(tmp_path, settings, BASE_MODEL)
    key = cache.key("v1", adapters["v1"])

    def unlistable(self: Path, pattern: str) -> list[Path]:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Path, "glob", unlistable)
    with caplog.at_level(logging.WARNING, logger="learner.gate_cache"):
        assert cache.store(key, "run-1", {"figure": 1}) == cache.path(key)
    assert "not pruned" in caplog.text
    monkeypatch.undo()
    assert cache.load(key) is not None


def test_too_few_entries_for_one_round_is_refused() -> None:
    with pytest.raises(ValueError, match="cache_entries must be >= 3"):
        gates.GatesConfig(cache_entries=2)
