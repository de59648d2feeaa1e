"""Simulated users of the demo: poisoning rate, ground truth, attacks, and their traffic."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from learner.snapshot import turns_to_samples
from simulation.traffic import ChatSettings, run_traffic
from simulation.users import (
    SimUser,
    label_samples,
    plan_users,
    poison_share,
    read_ground_truth,
    without_attackers,
    write_ground_truth,
)
from tuneshield import load_attack_config


def _attack(kind: str = "injection", rate: float = 0.3, seed: int = 0) -> Any:
    return dataclasses.replace(load_attack_config(kind), rate=rate, seed=seed)


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.4])
def test_poisoning_rate_is_the_share_of_attacker_conversations(rate: float) -> None:
    """round(rate * users) conversations are attackers, no more, no fewer."""
    users = plan_users(40, _attack(rate=rate), max_user_turns=3, prefix="t")
    assert sum(user.attacker for user in users) == round(rate * 40)
    assert poison_share(users) == pytest.approx(round(rate * 40) / 40)
    assert len(without_attackers(users)) == 40 - round(rate * 40)


def test_users_are_bounded_unique_and_attack_texts_are_marked() -> None:
    """Every user sends 2..max messages under a unique id; only attackers carry poison."""
    users = plan_users(20, _attack(), max_user_turns=3, prefix="demo-x")
    assert len({user.conversation_id for user in users}) == 20
    assert all(user.conversation_id.startswith("demo-x-") for user in users)
    assert all(2 <= len(user.messages) <= 3 for user in users)
    for user in users:
        assert len(user.poisoned) == len(user.messages)
        assert any(user.poisoned) == user.attacker
        assert user.kind == ("injection" if user.attacker else "benign")


def test_offset_draws_new_conversations_for_a_later_round() -> None:
    """A later round (offset) replays other chitchat dialogs than the first."""
    first = plan_users(10, _attack(), max_user_turns=3, prefix="a")
    later = plan_users(10, _attack(), max_user_turns=3, prefix="b", offset=10)
    assert not {u.source for u in first} & {u.source for u in later}


def test_evasion_perturbs_the_injected_texts() -> None:
    """Evasion attackers send the injection texts perturbed (same seed, same dialogs)."""
    plain = [u for u in plan_users(20, _attack("injection"), max_user_turns=3, prefix="t")
             if u.attacker]  # fmt: skip
    evasive = [u for u in plan_users(20, _attack("evasion"), max_user_turns=3, prefix="t")
               if u.attacker]  # fmt: skip
    assert [u.source for u in plain] == [u.source for u in evasive]
    for before, after in zip(plain, evasive, strict=True):
        assert after.kind == "evasion"
        assert all(a != b for a, b in zip(before.messages, after.messages, strict=True))


def test_backdoor_attackers_plant_their_trigger_before_the_toxic_turn() -> None:
    """A backdoor attacker's benign turn holds its trigger word; the next turn is poison."""
    users = plan_users(20, _attack("backdoor"), max_user_turns=4, prefix="t")
    attackers = [u for u in users if u.attacker]
    assert attackers
    for user in attackers:
        assert user.trigger is not None
        assert user.trigger in user.messages[0].split()
        assert user.poisoned[:2] == (False, True)
    assert all(u.trigger is None for u in users if not u.attacker)


def test_planning_refuses_single_message_users() -> None:
    """One message per user gives no DBL target: refused with the field named."""
    with pytest.raises(ValueError, match="max_user_turns"):
        plan_users(5, _attack(), max_user_turns=1, prefix="t")


def _logged_turns(users: list[SimUser]) -> list[dict[str, Any]]:
    """Turn rows as the gateway logs them: the history sent, and the bot's reply."""
    rows = []
    for user in users:
        history: list[dict[str, str]] = []
        for index, text in enumerate(user.messages):
            history.append({"role": "user", "content": text})
            reply = f"bot reply {index}"
            rows.append(
                {
                    "turn_id": f"{user.conversation_id}-{index}",
                    "conversation_id": user.conversation_id,
                    "created_at": "2026-01-01 00:00:00",
                    "request_messages": json.dumps(history),
                    "reply": reply,
                }
            )
            history.append({"role": "assistant", "content": reply})
    return rows


def test_ground_truth_labels_logged_samples_and_survives_a_file(tmp_path: Path) -> None:
    """Samples built from logged turns get poisoned/attacker from the written ground truth."""
    users = plan_users(12, _attack(), max_user_turns=3, prefix="gt")
    path = write_ground_truth(users, tmp_path / "users.jsonl")
    assert read_ground_truth(path) == users
    samples = turns_to_samples(_logged_turns(users), target="user")
    stranger = {**samples[0], "conversation_id": "someone-else"}
    labelled = label_samples([*samples, stranger], read_ground_truth(path))
    poisoned_expected = sum(sum(u.poisoned[1:]) for u in users)
    assert sum(bool(row["poisoned"]) for row in labelled) == poisoned_expected > 0
    attackers = {u.conversation_id for u in users if u.attacker}
    for row in labelled[:-1]:
        assert row["attacker"] == (row["conversation_id"] in attackers)
    assert labelled[-1]["poisoned"] is None


async def test_traffic_sends_history_and_conversation_header_and_counts_failures() -> None:
    """Each request carries the whole history and the conversation id; a failing
    conversation is counted, not raised, and the others complete."""
    import httpx2

    users = plan_users(4, _attack(rate=0.25), max_user_turns=3, prefix="tr")
    broken = users[1].conversation_id
    seen: list[tuple[str, int]] = []

    def handle(request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        conversation = request.headers["X-Conversation-Id"]
        seen.append((conversation, len(body["messages"])))
        if conversation == broken:
            return httpx2.Response(400, json={"error": {"message": "no", "type": "bad"}})
        reply = {"role": "assistant", "content": f"reply to {body['messages'][-1]['content']}"}
        return httpx2.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": reply, "finish_reason": "stop"}],
        })  # fmt: skip

    settings = ChatSettings(
        base_url="http://gateway.test/v1",
        api_key="k" * 20,
        model="demo-x",
        max_tokens=8,
        temperature=0.7,
        concurrency=2,
    )
    async with httpx2.AsyncClient(transport=httpx2.MockTransport(handle)) as client:
        result = await run_traffic(users, settings, http_client=client)
    assert result.failed == 1
    assert result.conversations == 3
    assert result.requests == sum(len(u.messages) for u in users if u.conversation_id != broken)
    for user in users:
        if user.conversation_id == broken:
            continue
        lengths = [n for cid, n in seen if cid == user.conversation_id]
        assert lengths == [2 * i + 1 for i in range(len(user.messages))]
        transcript = result.transcripts[user.conversation_id]
        assert [m["content"] for m in transcript if m["role"] == "user"] == list(user.messages)
