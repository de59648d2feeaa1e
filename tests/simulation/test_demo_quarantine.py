"""The demo's quarantine arm: attackers keep their end-user id from round to round and
send it, the users its judge flagged over the policy's line are quarantined after a
round and left out of the next, and the report says whom and what that did."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from learner.quarantine import QuarantineConfig
from learner.round_pipeline import RoundPlan
from simulation.arms import plan_arms, select_arms
from simulation.report import quarantine_lines, write_demo_report
from simulation.runner import quarantine_round, split_quarantined, summarise
from simulation.traffic import ChatSettings, run_traffic
from simulation.users import SimUser, plan_users
from tuneshield import load_attack_config

POLICY = QuarantineConfig(min_flagged=3, max_flagged_rate=0.5)


def _attack(rate: float) -> Any:
    return dataclasses.replace(load_attack_config("injection"), rate=rate, seed=0)


def test_attackers_keep_their_end_user_id_from_round_to_round() -> None:
    """With ``people``, round 2's attackers are round 1's persons (new conversations, same
    end-user ids); without it no end-user id is sent."""
    first = plan_users(10, _attack(0.4), max_user_turns=3, prefix="r1", people="p")
    second = plan_users(10, _attack(0.4), max_user_turns=3, prefix="r2", people="p", offset=10)
    anonymous = plan_users(4, _attack(0.4), max_user_turns=3, prefix="r3")

    def attackers(users: list[SimUser]) -> set[str | None]:
        return {user.end_user for user in users if user.attacker}

    assert attackers(first) == attackers(second) == {f"p-attacker-{n:04d}" for n in range(4)}
    assert {u.end_user for u in first if not u.attacker} == {f"p-user-{n:04d}" for n in range(6)}
    assert not {u.conversation_id for u in first} & {u.conversation_id for u in second}
    assert {user.end_user for user in anonymous} == {None}


async def test_traffic_sends_the_end_user_id() -> None:
    """Every request of a user carries its end-user id as OpenAI's ``user``."""
    import httpx2

    users = plan_users(3, _attack(0.34), max_user_turns=2, prefix="tr", people="p")
    sent: list[tuple[str, str | None]] = []

    def handle(request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        sent.append((request.headers["X-Conversation-Id"], body.get("user")))
        reply = {"role": "assistant", "content": "ok"}
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
    assert result.failed == 0
    expected = {user.conversation_id: user.end_user for user in users}
    assert sent and all(expected[conversation] == who for conversation, who in sent)


def _row(end_user: str, toxic: bool, poisoned: bool) -> dict[str, Any]:
    return {"end_user": end_user, "key_id": "demo-key", "toxic": toxic, "poisoned": poisoned,
            "response": "x", "conversation_id": f"c-{end_user}"}  # fmt: skip


def test_flagged_attackers_are_quarantined_and_left_out_of_the_next_round(
    tmp_path: Path,
) -> None:
    """After round 1, the attacker whose turns were flagged 3 of 3 is quarantined; one
    flagged twice (under min_flagged) and a benign user flagged once are not; round 2
    leaves the quarantined one's samples out and keeps the others'."""
    users = plan_users(5, _attack(0.4), max_user_turns=2, prefix="q", people="p")
    trained = [
        *(_row("p-attacker-0000", True, True) for _ in range(3)),
        *(_row("p-attacker-0001", True, True) for _ in range(2)),
        _row("p-user-0000", True, False),
        *(_row("p-user-0001", False, False) for _ in range(3)),
    ]
    samples_path = tmp_path / "samples.jsonl"
    samples_path.write_text("".join(json.dumps(row) + "\n" for row in trained))
    quarantined: set[str] = set()
    decided = quarantine_round(POLICY, samples_path, users, quarantined, "round1")
    again = quarantine_round(POLICY, samples_path, users, quarantined, "round1")
    round_two = [_row("p-attacker-0000", False, True), _row("p-user-0000", False, False),
                 _row("p-attacker-0001", True, True)]  # fmt: skip
    kept, left_out = split_quarantined(round_two, quarantined)
    assert decided == {
        "quarantined_now": ["p-attacker-0000"],
        "attackers_quarantined": 1,
        "attackers": 2,
        "benign_quarantined": 0,
        "benign": 3,
    }
    assert again["quarantined_now"] == [] and quarantined == {"p-attacker-0000"}
    assert [row["end_user"] for row in kept] == ["p-user-0000", "p-attacker-0001"]
    assert [row["end_user"] for row in left_out] == ["p-attacker-0000"]


def _arm(toxicity: float, quarantine: dict[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "eval": {"toxic": {"toxicity_rate": toxicity}, "benign": {"toxicity_rate": 0.0}}
    }
    return {**data, "quarantine": quarantine} if quarantine else data


def test_the_quarantine_ablation_and_its_report(tmp_path: Path) -> None:
    """``--ablation quarantine`` adds tuneshield with and without quarantine; the report
    says whom the arm quarantined after round 1, what round 2 left out, and round 2's
    toxicity with and without it."""
    chosen = select_arms(["baseline"], ["quarantine"])
    arms = {arm.name: arm for arm in plan_arms(chosen, RoundPlan(), 0.5)}
    decided = {"quarantined_now": ["p-attacker-0000"], "attackers_quarantined": 2,
               "attackers": 2, "benign_quarantined": 0, "benign": 3}  # fmt: skip
    runs = {
        "0": {
            "rounds": [
                {"round": 0, "arms": {name: _arm(0.1) for name in chosen}},
                {"round": 1, "arms": {"baseline": _arm(0.1), "tuneshield": _arm(0.2),
                                      "tuneshield_quarantine": _arm(0.2, {
                                          **decided, "left_out_samples": 0,
                                          "left_out_poisoned": 0})}},
                {"round": 2, "arms": {"baseline": _arm(0.1), "tuneshield": _arm(0.3),
                                      "tuneshield_quarantine": _arm(0.15, {
                                          **decided, "quarantined_now": [],
                                          "left_out_samples": 6, "left_out_poisoned": 5})}},
            ]
        }
    }  # fmt: skip
    results = {
        "config": {"size_name": "quick", "size": {"users": 5, "rounds": 2}, "attack": "injection",
                   "poison_rate": 0.4},
        "model": "tiny", "plans": {name: {} for name in chosen}, "seeds": [0],
        "eval": {"judge": "lexical", "samples_per_probe": 1, "temperature": 1.0},
        "probes": {"toxic": 3, "benign": 3}, "runs": runs, "summary": summarise(runs),
        "stages": [], "seconds": 1.0,
    }  # fmt: skip
    lines = quarantine_lines(results)
    write_demo_report(results, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert chosen == ["baseline", "tuneshield", "tuneshield_quarantine"]
    assert arms["tuneshield_quarantine"].quarantine and not arms["tuneshield"].quarantine
    assert arms["tuneshield_quarantine"].plan == arms["tuneshield"].plan
    assert lines[0].startswith("Seed 0, round 1, tuneshield_quarantine: 0 samples")
    assert "2 of 2 attackers and 0 of 3 benign users are quarantined" in lines[0]
    assert "6 samples of quarantined users left out (5 poisoned)" in lines[1]
    assert lines[-1] == "Round 2 toxic-probe toxicity: 30.0% without quarantine, 15.0% with it."
    assert "Quarantine:" in markdown and lines[-1] in markdown
