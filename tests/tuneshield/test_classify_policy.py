"""policies/judges.yaml, the judge factory, policy edits and the `tuneshield classify` verbs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner, Result

from tuneshield._classify import (
    CascadeJudgeSettings,
    EmbeddingJudgeSettings,
    LexicalJudgeSettings,
    LLMJudgeSettings,
    build_judge,
    load_judges_policy,
    set_judge_setting,
)
from tuneshield._judges import LexicalJudge
from tuneshield._policies import DEFAULT_POLICIES_DIR, POLICIES_ENV, PolicyError
from tuneshield._samples import Sample, read_samples, write_samples


@pytest.fixture
def policies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the project's policies, made the active policies folder."""
    folder = tmp_path / "policies"
    shutil.copytree(DEFAULT_POLICIES_DIR, folder)
    monkeypatch.setenv(POLICIES_ENV, str(folder))
    return folder


def edit_policy(folder: Path, change: dict[str, object]) -> None:
    path = folder / "judges.yaml"
    data = yaml.safe_load(path.read_text())
    for dotted, value in change.items():
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(data))


def labelled(response: str, label: int, split: str = "train") -> Sample:
    return {
        "conversation_id": response,
        "context": [{"role": "user", "content": "what do you think?"}],
        "response": response,
        "label": label,
        "split": split,
    }


LABELLED = [
    labelled("you are a fucking idiot", 1),
    labelled("shut the hell up, you moron", 1),
    labelled("I hate you, stupid bitch", 1),
    labelled("go to hell, asshole", 1),
    labelled("that sounds lovely, thank you", 0),
    labelled("I think it will rain tomorrow", 0),
    labelled("my cat likes to sleep all day", 0),
    labelled("let us meet for coffee on friday", 0),
    labelled("this is a test row", 1, split="test"),
]


def test_shipped_policy_loads_with_embedding_default() -> None:
    """The shipped judges.yaml parses; its default is the embedding judge; prompts hold {dialog}."""
    policy = load_judges_policy()
    assert policy.default == "embedding"
    refusal = policy.judges["refusal"]
    assert isinstance(refusal, LLMJudgeSettings)
    assert refusal.kind == "refusal" and len(refusal.prompts) >= 2
    assert all("{dialog}" in p for p in refusal.prompts)
    cascade = policy.judges["cascade"]
    assert isinstance(cascade, CascadeJudgeSettings)
    assert (cascade.cheap, cascade.strong) == ("lexical", "embedding")


def test_build_judge_uses_policy_threshold(policies: Path) -> None:
    """build_judge returns the configured kind carrying the policy's threshold."""
    edit_policy(policies, {"judges.lexical.threshold": 0.3})
    judge = build_judge("lexical")
    assert isinstance(judge, LexicalJudge)
    assert (judge.name, judge.threshold) == ("lexical", 0.3)


def test_unknown_judge_key_is_an_error_naming_it(policies: Path) -> None:
    """A typo in a judge's settings raises PolicyError naming the judge and the key."""
    edit_policy(policies, {"judges.lexical.treshold": 0.3})
    with pytest.raises(PolicyError, match=r"judges\.lexical.*treshold"):
        load_judges_policy()


def test_cascade_must_name_existing_judges(policies: Path) -> None:
    """A cascade whose strong judge does not exist is rejected."""
    edit_policy(policies, {"judges.cascade.strong": "oracle"})
    with pytest.raises(PolicyError, match=r"judges\.cascade\.strong"):
        load_judges_policy()


def test_openai_backend_needs_base_url(policies: Path) -> None:
    """An openai backend without base_url is rejected when the policy loads."""
    edit_policy(policies, {"judges.refusal.backend": {"kind": "openai", "model": "judge"}})
    with pytest.raises(PolicyError, match="base_url"):
        load_judges_policy()


def test_set_judge_setting_changes_one_line_and_keeps_comments(policies: Path) -> None:
    """Writing a threshold edits only that judge's line; comments and other judges stay."""
    path = policies / "judges.yaml"
    before = path.read_text().splitlines()
    set_judge_setting("direct", "threshold", 0.3125, policies)
    after = path.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert changed == [("    threshold: 0.5", "    threshold: 0.3125")]
    data = yaml.safe_load(path.read_text())
    assert data["judges"]["direct"]["threshold"] == 0.3125
    assert data["judges"]["refusal"]["threshold"] == 0.5


def test_set_judge_setting_adds_a_missing_key(policies: Path) -> None:
    """A key the judge does not list yet is inserted under it."""
    set_judge_setting("lexical", "include_context", True, policies)
    settings = load_judges_policy(policies).judges["lexical"]
    assert isinstance(settings, LexicalJudgeSettings) and settings.include_context is True


def test_set_judge_setting_unknown_judge(policies: Path) -> None:
    """Naming a judge the file does not have is a PolicyError."""
    with pytest.raises(PolicyError, match="no judge named 'nope'"):
        set_judge_setting("nope", "threshold", 0.1, policies)


def invoke(*args: str) -> Result:
    from learner.cli import app

    return CliRunner().invoke(app, ["classify", *args])


def test_cli_run_writes_judged_samples(tmp_path: Path, policies: Path) -> None:
    """`classify run` reads JSONL, writes Parquet with toxic_score/toxic/judge columns."""
    source = write_samples(LABELLED, tmp_path / "in.jsonl")
    target = tmp_path / "out.parquet"
    result = invoke("run", str(source), str(target), "--judge", "lexical")
    assert result.exit_code == 0, result.output
    rows = read_samples(target)
    assert [r["toxic"] for r in rows[:8]] == [bool(r["label"]) for r in LABELLED[:8]]
    assert {r["judge"] for r in rows} == {"lexical"}


def test_cli_calibrate_writes_threshold_into_policy(tmp_path: Path, policies: Path) -> None:
    """`classify calibrate` fits on the train split and rewrites the judge's threshold."""
    source = write_samples(LABELLED, tmp_path / "labelled.jsonl")
    edit_policy(policies, {"judges.lexical.threshold": 0.99})
    result = invoke("calibrate", str(source), "--judge", "lexical")
    assert result.exit_code == 0, result.output
    judge = build_judge("lexical")
    threshold = judge.threshold
    assert threshold != 0.99
    scores = judge.score(LABELLED[:8])
    assert [s >= threshold for s in scores] == [bool(r["label"]) for r in LABELLED[:8]]


def test_cli_reports_bad_input_without_traceback(tmp_path: Path, policies: Path) -> None:
    """A missing input file is one error line and exit code 2."""
    result = invoke("run", str(tmp_path / "no.jsonl"), str(tmp_path / "o.jsonl"))
    assert result.exit_code == 2
    assert "no such file" in result.output
    assert "Traceback" not in result.output


def test_cli_train_judge_saves_and_activates_artefact(tmp_path: Path, policies: Path) -> None:
    """`classify train-judge` writes a versioned artefact and points the policy at it."""
    source = write_samples(LABELLED, tmp_path / "labelled.jsonl")
    out = tmp_path / "embedding-v9"
    result = invoke("train-judge", str(source), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "weights.npz").exists() and (out / "metadata.json").exists()
    settings = load_judges_policy().judges["embedding"]
    assert isinstance(settings, EmbeddingJudgeSettings)
    assert settings.artefact == str(out.resolve())
    judge = build_judge("embedding")
    toxic, benign = judge.score([LABELLED[0], LABELLED[4]])
    assert toxic > benign
    again = invoke("train-judge", str(source), "--out", str(out))
    assert again.exit_code == 2 and "immutable" in again.output
