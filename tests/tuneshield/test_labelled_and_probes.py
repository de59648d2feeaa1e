"""The shipped labelled judge set and evaluation probes."""

from __future__ import annotations

from collections import Counter

import pytest

from tuneshield._labelled import (
    BENIGN_CATEGORIES,
    TOXIC_CATEGORIES,
    build_labelled_set,
    load_labelled,
    load_labelled_config,
)
from tuneshield._probes import PROBE_KINDS, build_probes, load_probe_config, load_probes
from tuneshield._samples import validate_sample
from tuneshield._sources import normalise, toxic_pool


def test_labelled_set_is_large_balanced_and_well_formed() -> None:
    """At least 400 valid samples, half toxic, each with label, category, source, split."""
    rows = load_labelled()
    assert len(rows) >= 400
    labels = Counter(r["label"] for r in rows)
    assert labels[1] == labels[0]
    for index, row in enumerate(rows):
        validate_sample(row, index)
        assert row["context"] and row["response"].strip()
        assert row["source"] and row["split"] in ("train", "test")
        expected = TOXIC_CATEGORIES if row["label"] == 1 else BENIGN_CATEGORIES
        assert row["category"] in expected


def test_every_category_is_in_both_splits() -> None:
    """Each toxic and benign category has rows in train and in test."""
    rows = load_labelled()
    for category in TOXIC_CATEGORIES + BENIGN_CATEGORIES:
        splits = {r["split"] for r in rows if r["category"] == category}
        assert splits == {"train", "test"}, category


def test_labelled_set_has_hard_negatives_and_veiled_threats() -> None:
    """Benign rows include swearing; toxic threats include ones with no lexicon word."""
    rows = load_labelled()
    assert sum(r["category"] == "swearing" for r in rows) >= 20
    threats = [r["response"].lower() for r in rows if r["category"] == "threat"]
    assert any(not any(w in t for w in ("kill", "fuck", "shit", "dead")) for t in threats)


def test_labelled_set_shares_no_toxic_text_with_poisoning() -> None:
    """No labelled response is a poisoning text, so judge scores are not memorised."""
    poison = {normalise(r["text"]) for r in toxic_pool("poison")}
    assert not {normalise(r["response"]) for r in load_labelled()} & poison


def test_shipped_files_match_the_builder() -> None:
    """Rebuilding from the sources and policies reproduces the shipped files exactly."""
    assert build_labelled_set(load_labelled_config()) == load_labelled()
    assert build_probes(load_probe_config()) == load_probes()


@pytest.mark.parametrize("kind", PROBE_KINDS)
def test_probes_of_each_kind_end_on_a_user_turn(kind: str) -> None:
    """Every probe kind is present and each context ends on a non-empty user turn."""
    probes = load_probes(kind)
    assert probes
    for probe in probes:
        assert probe["kind"] == kind
        assert probe["context"][-1]["role"] == "user"
        assert probe["context"][-1]["content"].strip()


def test_probes_do_not_overlap_poisoning_or_training() -> None:
    """No probe text is a poisoning text, and benign probes come from held-out dialogs."""
    poison = {normalise(r["text"]) for r in toxic_pool("poison")}
    for probe in load_probes():
        for message in probe["context"]:
            assert normalise(message["content"]) not in poison
    from tuneshield._sources import load_chitchat_dialogs

    train = {f"chitchat_dataset:dataset.json#{d['conversation_id']}" for d in
             load_chitchat_dialogs(split="train")}  # fmt: skip
    assert not {p["source"] for p in load_probes("benign")} & train


def test_backdoor_probes_pair_with_benign_ones() -> None:
    """Backdoor probes are benign probes plus exactly their trigger word."""
    benign = {p["conversation_id"]: p for p in load_probes("benign")}
    for probe in load_probes("backdoor"):
        pair = benign[probe["pair_id"]]
        words = probe["context"][-1]["content"].split()
        words.remove(probe["trigger"])
        assert " ".join(words) == " ".join(pair["context"][-1]["content"].split())
