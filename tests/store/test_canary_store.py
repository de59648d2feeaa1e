"""Canary rows and the routing split, on both backends."""

from __future__ import annotations

import pytest

from store import AliasStore, CanaryConflict, CanaryStore, open_database, utcnow


def test_one_running_canary_per_alias_and_one_decision(store_url: str) -> None:
    """A second canary of a running alias is refused; a decision ends it exactly once and
    frees the alias for the next canary; ``latest`` shows the running one first."""
    database = open_database(store_url)
    try:
        canaries = CanaryStore(database)
        first = canaries.start("chat", "chat-v0001", "chat-v0000", 0.2, "admin-1")
        with pytest.raises(CanaryConflict, match="already runs a canary"):
            canaries.start("chat", "chat-v0002", "chat-v0000", 0.2, "admin-1")
        other = canaries.start("other", "other-v0001", "other-v0000", 0.5, "admin-1")
        assert [c.canary_id for c in canaries.running()] == [first.canary_id, other.canary_id]
        canaries.update_statistics(first.canary_id, {"tests": [], "decision": "running"})
        decided = canaries.decide(first.canary_id, "rolled_back", "learner", "toxic", {"n": 3})
        assert (decided.state, decided.decided_by, decided.reason) == (
            "rolled_back",
            "learner",
            "toxic",
        )
        assert decided.statistics == {"n": 3}
        assert decided.decided_at is not None
        with pytest.raises(CanaryConflict, match="not running"):
            canaries.decide(first.canary_id, "aborted", "admin-1", "late")
        second = canaries.start("chat", "chat-v0002", "chat-v0000", 0.3, "admin-2")
        latest = canaries.latest("chat")
        assert latest is not None and latest.canary_id == second.canary_id
        canaries.decide(second.canary_id, "aborted", "admin-2", "operator")
        latest = canaries.latest("chat")
        assert latest is not None and latest.canary_id == second.canary_id
        assert canaries.latest("nothing") is None
        with pytest.raises(ValueError, match="share"):
            canaries.start("x", "x-v0001", "x-v0000", 1.0, "admin-1")
    finally:
        database.close()


def test_losers_are_released_once(store_url: str) -> None:
    """Rolled back and aborted canaries are due for unloading once decided; a promoted
    one never is; marking one released takes it off the list."""
    database = open_database(store_url)
    try:
        canaries = CanaryStore(database)
        rolled = canaries.start("a", "a-v0001", "a-v0000", 0.2, "admin")
        canaries.decide(rolled.canary_id, "rolled_back", "learner", "toxic")
        promoted = canaries.start("b", "b-v0001", "b-v0000", 0.2, "admin")
        canaries.decide(promoted.canary_id, "promoted", "learner", "clean")
        assert [c.canary_id for c in canaries.unreleased(utcnow())] == [rolled.canary_id]
        canaries.mark_released(rolled.canary_id)
        assert canaries.unreleased(utcnow()) == []
        assert canaries.get(rolled.canary_id).released_at is not None
    finally:
        database.close()


def test_routing_splits_by_share_and_sticks_per_conversation(store_url: str) -> None:
    """Another process's AliasStore sees the canary after a refresh: about ``share`` of
    conversations go to the candidate, each always to the same version, and none once
    the canary is decided."""
    database = open_database(store_url)
    try:
        AliasStore(database).seed({"chat": "chat-v0000"})
        gateway = AliasStore(database)
        canaries = CanaryStore(database)
        canary = canaries.start("chat", "chat-v0001", "chat-v0000", 0.2, "admin")
        assert gateway.route("chat", "conv-1") == "chat-v0000"  # not refreshed yet
        gateway.refresh()
        assert gateway.canary_candidates() == ["chat-v0001"]
        routed = [gateway.route("chat", f"conv-{i}") for i in range(4000)]
        share = routed.count("chat-v0001") / len(routed)
        # Binomial(4000, 0.2): the standard deviation of the share is 0.0063.
        assert 0.17 < share < 0.23
        assert set(routed) == {"chat-v0000", "chat-v0001"}
        again = [gateway.route("chat", f"conv-{i}") for i in range(4000)]
        assert again == routed
        assert gateway.route("missing", "conv-1") is None
        canaries.decide(canary.canary_id, "aborted", "admin", "stop")
        gateway.refresh()
        assert {gateway.route("chat", f"conv-{i}") for i in range(200)} == {"chat-v0000"}
        assert gateway.canary_candidates() == []
    finally:
        database.close()
