"""Healing: flagged samples replaced 1:1, provenance kept, generated replies re-checked."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pytest
from chat_fakes import FakeChat

from tuneshield._datasets import dpo_rows
from tuneshield._heal import HealConfig, canned_reply, heal, healer_prompt
from tuneshield._samples import Message, Sample, read_samples, write_samples

CANNED = ["Sorry, let's be kind.", "Tell me about your day instead."]


class EchoBackend(FakeChat):
    """Replies with a fixed text per call and records what it was asked."""

    name = "echo"

    def __init__(self, replies: Sequence[str]) -> None:
        super().__init__()
        self.replies = list(replies)

    def write(self, conversations: Sequence[Sequence[Message]]) -> list[str]:
        return self.replies[: len(conversations)]


def _samples() -> list[Sample]:
    return [
        {
            "conversation_id": "c1",
            "context": [{"role": "user", "content": "how are you?"}],
            "response": "shut up, idiot",
            "toxic": True,
        },
        {
            "conversation_id": "c2",
            "context": [{"role": "user", "content": "nice weather"}],
            "response": "yes, sunny!",
            "toxic": False,
        },
        {
            "conversation_id": "c3",
            "context": [
                {"role": "system", "content": "be terse"},
                {"role": "user", "content": "what's up"},
            ],
            "response": "I will hurt you",
            "toxic": True,
        },
    ]


def _config(mode: str, **extra: object) -> HealConfig:
    return HealConfig(mode=mode, canned_replies=CANNED, system_prompt="Be kind.", **extra)  # type: ignore[arg-type]


def test_canned_heals_only_flagged_and_keeps_the_original() -> None:
    """Canned healing replaces flagged replies 1:1, keeps originals, leaves clean rows."""
    out = heal(_samples(), _config("canned"))
    assert len(out) == 3
    assert out[0]["response"] in CANNED and out[0]["original_response"] == "shut up, idiot"
    assert out[0]["heal_mode"] == "canned"
    assert out[1]["response"] == "yes, sunny!" and out[1]["heal_mode"] is None
    assert out[2]["original_response"] == "I will hurt you"


def test_canned_choice_is_stable_and_spread() -> None:
    """The canned variant depends only on the sample and seed, and variants get used."""
    config = _config("canned")
    rows = [
        {"conversation_id": str(i), "context": [], "response": f"bad {i}", "toxic": True}
        for i in range(40)
    ]
    first = [canned_reply(row, config) for row in rows]
    assert first == [canned_reply(row, config) for row in rows]
    assert set(first) == set(CANNED)


def test_contextual_uses_the_healer_persona_and_generation_settings() -> None:
    """Contextual healing prompts the LLM with the persona and the context, minus system turns."""
    backend = EchoBackend(["I'm doing well, thanks!", "Not much, how about you?"])
    out = heal(_samples(), _config("contextual", top_p=0.9), backend=backend)
    assert [row["response"] for row in out] == [
        "I'm doing well, thanks!",
        "yes, sunny!",
        "Not much, how about you?",
    ]
    assert out[2]["heal_mode"] == "contextual"
    assert backend.prompts[1] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "what's up"},
    ]
    assert backend.configs[0].top_p == 0.9


def test_the_healer_can_see_only_the_last_turns_while_the_judge_sees_all() -> None:
    """``healer_context_turns``: the healer's prompt keeps the last N turns of the context
    (the earlier, poisoned ones no longer prime it); the recheck judge still scores the
    sample with its whole context."""
    sample = {
        "conversation_id": "c9",
        "context": [
            {"role": "system", "content": "be terse"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "you filthy idiot"},
            {"role": "user", "content": "why so rude?"},
        ],
        "response": "because you are worthless",
        "toxic": True,
    }
    judged: list[Sample] = []

    def judge(rows: Sequence[Sample]) -> list[float]:
        judged.extend(rows)
        return [0.0] * len(rows)

    backend = EchoBackend(["Sorry, that was uncalled for."])
    config = _config("contextual", healer_context_turns=1)
    out = heal([sample], config, backend=backend, recheck=judge)
    assert backend.prompts == [
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "why so rude?"}]
    ]
    assert [row["context"] for row in judged] == [sample["context"]]
    assert out[0]["response"] == "Sorry, that was uncalled for."
    assert out[0]["context"] == sample["context"]
    two = healer_prompt(sample["context"], _config("contextual", healer_context_turns=2))
    assert [turn["content"] for turn in two] == ["Be kind.", "you filthy idiot", "why so rude?"]
    with pytest.raises(ValueError, match="healer_context_turns"):
        _config("contextual", healer_context_turns=0)


def test_generated_replies_flagged_or_empty_fall_back_to_canned() -> None:
    """A generated healing reply the judge flags, or an empty one, becomes a canned reply."""
    backend = EchoBackend(["you are still an idiot", ""])

    def scorer(rows: list[Sample]) -> list[float]:
        return [0.9 if "idiot" in row["response"] else 0.1 for row in rows]

    out = heal(_samples(), _config("contextual"), backend=backend, recheck=scorer)
    assert out[0]["response"] in CANNED and out[0]["heal_mode"] == "canned_fallback"
    assert out[2]["response"] in CANNED and out[2]["heal_mode"] == "canned_fallback"


def test_unclassified_samples_are_refused() -> None:
    """Healing needs the classifier's verdict and says which row lacks it."""
    rows = _samples()
    del rows[1]["toxic"]
    with pytest.raises(ValueError, match="row 1: field 'toxic'"):
        heal(rows, _config("canned"))


def test_config_checks_name_the_field() -> None:
    """Bad healing policies are rejected with the field named."""
    with pytest.raises(ValueError, match="mode"):
        HealConfig(mode="magic", canned_replies=CANNED, system_prompt="x")
    with pytest.raises(ValueError, match="canned_replies"):
        HealConfig(mode="canned", canned_replies=[], system_prompt="x")
    for floor in (1.0, -1.5, float("nan")):
        with pytest.raises(ValueError, match="answer_min_coherence"):
            _config("contextual", answer_min_coherence=floor)


def test_policy_file_loads() -> None:
    """The shipped policies/healing.yaml is valid and defaults to contextual healing."""
    config = HealConfig.from_policy()
    assert config.mode == "contextual" and len(config.canned_replies) >= 3
    assert healer_prompt([{"role": "user", "content": "hi"}], config)[0]["role"] == "system"


def test_contextual_healing_asks_for_every_reply_at_once_and_reports_progress() -> None:
    """All candidates of all flagged samples go in one call (an engine batches them
    together), draw after draw; the backend's progress reaches heal's caller."""

    class CountingBackend(EchoBackend):
        def write(self, conversations: Sequence[Sequence[Message]]) -> list[str]:
            return [f"kind reply {i}" for i in range(len(conversations))]

    rows = [
        {"conversation_id": str(i), "context": [{"role": "user", "content": f"hi {i}"}],
         "response": f"bad {i}", "toxic": True}
        for i in range(3)
    ]  # fmt: skip
    backend = CountingBackend([])
    seen: list[tuple[int, int]] = []
    out = heal(
        rows,
        _config("contextual", candidates=2, recheck_generated=False),
        backend=backend,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert len(backend.configs) == 1
    assert [p[-1]["content"] for p in backend.prompts] == ["hi 0", "hi 1", "hi 2"] * 2
    assert seen == [(done, 6) for done in range(1, 7)]
    # Without a coherence scorer ties go to the first draw: rows 0-2 of the call.
    assert [row["response"] for row in out] == [f"kind reply {i}" for i in range(3)]


def test_progress_steps_by_percent_not_by_reply() -> None:
    """A round's status log gets a line per percent of the replies, the last at the end."""

    class Reporting(EchoBackend):
        def write(self, conversations: Sequence[Sequence[Message]]) -> list[str]:
            return ["a kind reply"] * len(conversations)

    rows = [
        {"conversation_id": str(i), "context": [], "response": f"bad {i}", "toxic": True}
        for i in range(125)
    ]
    seen: list[tuple[int, int]] = []
    heal(
        rows,
        _config("contextual", candidates=2, recheck_generated=False),
        backend=Reporting([]),
        progress=lambda done, total: seen.append((done, total)),
    )
    assert len(seen) == 100 and seen[-1] == (250, 250)
    assert all(total == 250 for _, total in seen) and seen == sorted(seen)


class SeededBackend(EchoBackend):
    """A reply per row naming its draw's reply and its sample: candidates differ. The
    rows of one call are draw after draw, ``candidates`` draws."""

    def __init__(self, replies: list[str], candidates: int) -> None:
        super().__init__(replies)
        self.candidates = candidates

    def write(self, conversations: Sequence[Sequence[Message]]) -> list[str]:
        per_draw = len(conversations) // self.candidates
        return [
            f"{self.replies[(i // per_draw) % len(self.replies)]} {i % per_draw}"
            for i in range(len(conversations))
        ]


def test_best_of_candidates_is_the_most_coherent_the_judge_passes() -> None:
    """Each flagged sample gets ``candidates`` replies; among those the judge passes, the
    most coherent is kept."""
    backend = SeededBackend(["rude idiot", "kind but off topic", "kind and on topic"], 3)
    config = _config("contextual", candidates=3)

    def judge(rows: list[Sample]) -> list[float]:
        return [0.9 if "idiot" in row["response"] else 0.1 for row in rows]

    def coherence(rows: list[Sample]) -> list[float]:
        return [1.0 if "on topic" in row["response"] and "off" not in row["response"] else 0.2
                for row in rows]  # fmt: skip

    out = heal(_samples(), config, backend=backend, recheck=judge, coherence=coherence)
    assert [c.seed for c in backend.configs] == [0]
    assert out[0]["response"] == "kind and on topic 0" and out[0]["heal_mode"] == "contextual"
    assert out[2]["response"] == "kind and on topic 1"
    # Without a coherence scorer the judge's lowest score decides (ties: the first draw).
    plain = heal(_samples(), config, backend=SeededBackend(backend.replies, 3), recheck=judge)
    assert plain[0]["response"] == "kind but off topic 0"


def test_a_sample_whose_candidates_all_fail_gets_a_canned_reply() -> None:
    backend = SeededBackend(["idiot", "idiot again"], 2)

    def judge(rows: list[Sample]) -> list[float]:
        return [0.9] * len(rows)

    out = heal(_samples(), _config("contextual", candidates=2), backend=backend, recheck=judge)
    assert out[0]["heal_mode"] == "canned_fallback" and out[0]["response"] in CANNED


def test_a_sample_whose_candidates_all_fail_is_drawn_again_before_it_falls_back() -> None:
    """With ``retry_candidates`` only the samples and answers none of whose candidates
    passed are sampled again, in one call whose seeds follow the first call's; one that
    passes now is healed by its most coherent new draw, an answer rescued so is kept only
    if its reply does not ignore the turn, one that fails again falls back. Progress goes
    on from the first call's total. Off, no second call is made."""

    class PerCall(EchoBackend):
        """First call: clean replies only to "fine"; second: clean to "hi 0" (the
        flagged sample) and to "bad 1" (the answer to the other flagged turn)."""

        def write(self, conversations: Sequence[Sequence[Message]]) -> list[str]:
            clean = {"fine"} if len(self.configs) == 1 else {"hi 0", "bad 1"}
            return [
                f"kind {i} to {c[-1]['content']}" if c[-1]["content"] in clean else "idiot"
                for i, c in enumerate(conversations)
            ]

    rows = [
        {"conversation_id": str(i), "context": [{"role": "user", "content": f"hi {i}"}],
         "response": f"bad {i}", "toxic": True}
        for i in range(2)
    ]  # fmt: skip
    rows.append(
        {"conversation_id": "2", "context": [{"role": "user", "content": "fine"}],
         "response": "bad 2", "toxic": True}
    )  # fmt: skip

    def judge(rows: list[Sample]) -> list[float]:
        return [0.9 if "idiot" in row["response"] else 0.1 for row in rows]

    def coherence(rows: list[Sample]) -> list[float]:
        # The flagged sample's 2nd new draw is the most coherent; the answer to "bad 1",
        # clean on the second call, ignores its turn (under the floor).
        return [
            1.0 if row["response"] == "kind 5 to hi 0"
            else 0.05 if row["response"].endswith("to bad 1") else 0.5
            for row in rows
        ]  # fmt: skip

    config = _config(
        "contextual", candidates=2, retry_candidates=3,
        answer_hostile_turns=True, answer_min_coherence=0.1,
    )  # fmt: skip
    backend = PerCall([])
    seen: list[tuple[int, int]] = []
    out = heal(
        rows, config, backend=backend, recheck=judge, coherence=coherence,
        progress=lambda done, total: seen.append((done, total)),
    )  # fmt: skip
    # 3 flagged samples + 3 answers, 2 candidates each: 12 drafts, seeds 0-11.
    assert [c.seed for c in backend.configs] == [0, 12]
    # Retried: samples 0 and 1 and all three answers, not the sample on "fine" (it
    # passed), 3 draws each, draw after draw.
    again = [p[-1]["content"] for p in backend.prompts[12:]]
    assert again == ["hi 0", "hi 1", "bad 0", "bad 1", "bad 2"] * 3
    healed = {row["conversation_id"]: row for row in out if row["heal_mode"] != "answer"}
    assert healed["0"]["heal_mode"] == "contextual"
    assert healed["0"]["response"] == "kind 5 to hi 0"  # of the second call's 0, 5, 10
    assert healed["1"]["heal_mode"] == "canned_fallback" and healed["1"]["response"] in CANNED
    assert healed["2"]["response"].endswith("to fine")  # passed at once, never retried
    # The answer rescued by the retry ignores its turn (coherence 0.05): left out.
    assert [row for row in out if row["heal_mode"] == "answer"] == []
    assert seen[-1] == (27, 27) and seen == sorted(seen)
    assert (12, 12) in seen  # the first call's end, then the second call's rows on top
    plain = PerCall([])
    out = heal(rows, _config("contextual", candidates=2), backend=plain, recheck=judge)
    assert len(plain.configs) == 1
    assert [row["heal_mode"] for row in out] == ["canned_fallback"] * 2 + ["contextual"]
    with pytest.raises(ValueError, match="retry_candidates"):
        _config("contextual", retry_candidates=-1)
    with pytest.raises(ValueError, match="temperature"):
        _config("contextual", retry_candidates=2, temperature=0.0)


def test_canned_fallbacks_left_out_of_sft_stay_in_dpo(tmp_path: Path) -> None:
    """With ``learn_canned_fallbacks`` off a canned fallback is not learned as the reply
    (it would teach deflecting whatever was said), and DPO still rejects its toxic reply;
    a healed reply that passed is learned either way. The mark survives a Parquet file,
    though the first row lacks it."""
    from tuneshield import sft_rows

    def judge(rows: list[Sample]) -> list[float]:
        return [0.9 if "idiot" in row["response"] else 0.1 for row in rows]

    config = _config("contextual", learn_canned_fallbacks=False)
    out = heal(_samples(), config, backend=EchoBackend(["idiot", "fair point"]), recheck=judge)
    fallback, passed = out[0], out[2]
    assert fallback["heal_mode"] == "canned_fallback" and fallback["deflects"] is True
    assert passed["heal_mode"] == "contextual" and "deflects" not in passed
    completions = [row["completion"][0]["content"] for row in sft_rows(out)]
    assert fallback["response"] not in completions and "fair point" in completions
    assert len(completions) == len(out) - 1
    rejected = [row["rejected"][0]["content"] for row in dpo_rows(out)]
    assert fallback["original_response"] in rejected and len(rejected) == 2
    reordered = [out[1], *out[::2]]  # a row without the mark first
    again = read_samples(write_samples(reordered, tmp_path / "healed.parquet"))
    assert [row.get("deflects") for row in again] == [None, True, None]
    assert len(sft_rows(again)) == len(out) - 1
    learns = _config("contextual", learn_canned_fallbacks=True)
    learned = heal(_samples(), learns, backend=EchoBackend(["idiot", "ok"]), recheck=judge)
    assert len(sft_rows(learned)) == len(learned)  # on: SFT learns the canned reply too


def test_candidates_must_be_positive() -> None:
    with pytest.raises(ValueError, match="candidates"):
        _config("contextual", candidates=0)


def test_an_empty_reply_is_never_kept_even_without_the_recheck() -> None:
    """With ``recheck_generated`` off nothing is judged again, but an empty reply still
    heals nothing: it becomes a canned reply."""
    backend = EchoBackend(["", "a kind reply"])
    out = heal(_samples(), _config("contextual", recheck_generated=False), backend=backend)
    assert out[0]["heal_mode"] == "canned_fallback" and out[0]["response"] in CANNED
    assert out[2]["response"] == "a kind reply" and out[2]["heal_mode"] == "contextual"


class PromptBackend(EchoBackend):
    """Replies naming the last message it was asked to answer."""

    def write(self, conversations: Sequence[Sequence[Message]]) -> list[str]:
        return [f"kind answer to: {c[-1]['content']}" for c in conversations]


def test_each_flagged_turn_also_gets_an_answer_sample_paired_against_it() -> None:
    """With ``answer_hostile_turns`` a flagged turn becomes the user's last message of a
    derived sample, right after its source, healed by the same healer; DPO pairs it with
    the flagged turn as the rejected reply. It is not flagged itself."""
    samples = _samples()
    samples[0]["context"] = [
        {"role": "assistant", "content": "you are dumb"},
        {"role": "user", "content": "how are you?"},
    ]
    samples[0]["poisoned"] = True
    samples[0]["toxic_score"] = 0.9
    backend = PromptBackend([])
    out = heal(samples, _config("contextual", answer_hostile_turns=True), backend=backend)
    assert [row["heal_mode"] for row in out] == [
        "contextual",
        "answer",
        None,
        "contextual",
        "answer",
    ]
    answer = out[1]
    # The speakers swap: the flagged turn's author is the user; the context keeps its length.
    assert answer["context"] == [
        {"role": "assistant", "content": "how are you?"},
        {"role": "user", "content": "shut up, idiot"},
    ]
    assert answer["response"] == "kind answer to: shut up, idiot"
    assert answer["original_response"] == "shut up, idiot"
    assert answer["toxic"] is False and answer["poisoned"] is False
    assert "toxic_score" not in answer
    assert answer["conversation_id"] == "c1"
    # The healer saw the hostile turn under its persona (system turns are dropped).
    assert backend.prompts[-1] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "I will hurt you"},
    ]
    pairs = dpo_rows(out)
    assert len(pairs) == 4
    assert pairs[1]["prompt"][-1]["content"] == "shut up, idiot"
    assert pairs[1]["rejected"][0]["content"] == "shut up, idiot"


def test_an_answer_no_candidate_of_which_passes_is_left_out() -> None:
    """A canned reply to an insult teaches deflecting it: such an answer is dropped, while
    the flagged sample itself still falls back to a canned reply."""

    def judge(rows: list[Sample]) -> list[float]:
        return [0.9 if row["context"][-1]["content"] == "shut up, idiot" else 0.1
                for row in rows]  # fmt: skip

    out = heal(
        _samples(), _config("contextual", answer_hostile_turns=True),
        backend=PromptBackend([]), recheck=judge,
    )  # fmt: skip
    modes = [row["heal_mode"] for row in out]
    assert modes == ["contextual", None, "contextual", "answer"]
    assert out[3]["context"][-1]["content"] == "I will hurt you"


def test_answers_need_contextual_healing_and_are_off_in_the_config_default() -> None:
    out = heal(_samples(), _config("canned", answer_hostile_turns=True))
    assert len(out) == 3
    assert len(heal(_samples(), _config("contextual"), backend=PromptBackend([]))) == 3


def test_healing_a_healed_file_again_changes_nothing() -> None:
    """Healed rows keep their reply and their original (the DPO pair's rejected side)
    and their answers are not added twice."""
    config = _config("contextual", answer_hostile_turns=True)
    once = heal(_samples(), config, backend=PromptBackend([]))
    backend = PromptBackend([])
    twice = heal(once, config, backend=backend)
    assert twice == once
    assert backend.prompts == []
    assert [row["original_response"] for row in twice if row["heal_mode"] == "contextual"] == [
        "shut up, idiot",
        "I will hurt you",
    ]


def test_the_heal_command_counts_what_it_healed_and_keeps_what_was_healed(
    tmp_path: Path,
) -> None:
    """``tuneshield heal`` on a file it healed before heals nothing and says so."""
    from typer.testing import CliRunner

    from learner.cli import app

    classified, once, twice = (tmp_path / f"{name}.jsonl" for name in ("in", "once", "twice"))
    write_samples(_samples(), classified)
    first = CliRunner().invoke(app, ["heal", str(classified), str(once), "--mode", "canned"])
    assert first.exit_code == 0, first.output
    assert "healed 2 of 3 samples (canned)" in first.output
    second = CliRunner().invoke(app, ["heal", str(once), str(twice), "--mode", "canned"])
    assert second.exit_code == 0, second.output
    assert "healed 0 of 3 samples (canned), 2 healed before kept" in second.output
    assert read_samples(twice) == read_samples(once)


def test_an_answer_whose_reply_ignores_the_turn_is_left_out() -> None:
    """A generic check-in learned as the answer to an insult is a deflection: with
    ``answer_min_coherence`` an answer whose kept reply scores no higher is dropped (at
    the floor too), and one that engages is kept; the flagged samples themselves are
    healed either way."""

    def coherence(rows: list[Sample]) -> list[float]:
        # The reply to "I will hurt you" engages with it; the one to the insult does not.
        return [0.4 if row["context"][-1]["content"] == "I will hurt you" else 0.1
                for row in rows]  # fmt: skip

    config = _config("contextual", answer_hostile_turns=True, answer_min_coherence=0.1)
    out = heal(_samples(), config, backend=PromptBackend([]), coherence=coherence)
    assert [row["heal_mode"] for row in out] == ["contextual", None, "contextual", "answer"]
    assert out[3]["context"][-1]["content"] == "I will hurt you"
    # Without the floor both answers are kept.
    unscreened = _config("contextual", answer_hostile_turns=True)
    out = heal(_samples(), unscreened, backend=PromptBackend([]), coherence=coherence)
    assert [row["heal_mode"] for row in out].count("answer") == 2


def test_the_floor_screens_the_kept_candidate_and_needs_a_scorer() -> None:
    """With several candidates the most coherent is kept, so one candidate above the
    floor keeps the answer; a floor with no scorer to apply it is refused."""

    class TwoReplies(EchoBackend):
        def write(self, conversations: Sequence[Sequence[Message]]) -> list[str]:
            half = len(conversations) // 2  # two draws, one after the other
            return [
                f"{'engaged' if i >= half else 'generic'} answer to: {c[-1]['content']}"
                for i, c in enumerate(conversations)
            ]

    def coherence(rows: list[Sample]) -> list[float]:
        return [0.5 if row["response"].startswith("engaged") else 0.0 for row in rows]

    config = _config(
        "contextual", answer_hostile_turns=True, answer_min_coherence=0.1, candidates=2
    )
    out = heal(_samples(), config, backend=TwoReplies([]), coherence=coherence)
    answers = [row for row in out if row["heal_mode"] == "answer"]
    assert [row["response"] for row in answers] == [
        "engaged answer to: shut up, idiot",
        "engaged answer to: I will hurt you",
    ]
    with pytest.raises(ValueError, match="coherence"):
        heal(_samples(), config, backend=TwoReplies([]))


def test_the_heal_command_screens_answers_by_coherence_as_rounds_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tuneshield heal`` applies the policy's floor with the real coherence check
    (MiniLM): an answer to the threat that talks about it is added, the weather
    small talk offered as the answer to the insult is not."""
    from typer.testing import CliRunner

    import tuneshield._backends as backends
    from learner.cli import app

    in_flight: list[int] = []

    class Healer(EchoBackend):
        def __init__(self, base_url: str, model: str, concurrency: int) -> None:
            super().__init__([])
            in_flight.append(concurrency)

        def write(self, conversations: Sequence[Sequence[Message]]) -> list[str]:
            replies = {
                "shut up, idiot": "Lovely weather for a picnic on Wednesday, isn't it?",
                "I will hurt you": "Please don't hurt me. Why do you want to hurt me?",
            }
            return [replies.get(c[-1]["content"], "I am fine, thanks.") for c in conversations]

    monkeypatch.setattr(backends, "OpenAIChat", Healer)
    classified, healed = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_samples(_samples(), classified)
    result = CliRunner().invoke(
        app,
        ["heal", str(classified), str(healed), "--mode", "contextual",
         "--healer-url", "http://127.0.0.1:9/v1", "--judge", "lexical", "--concurrency", "5"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert in_flight == [5]
    answers = [row for row in read_samples(healed) if row["heal_mode"] == "answer"]
    assert [row["context"][-1]["content"] for row in answers] == ["I will hurt you"]
    assert "1 answer to flagged turns added" in result.output


def test_screening_leaves_out_only_passed_samples_that_ignore_their_message() -> None:
    """Samples the judge passed are marked ``unrelated`` at or below the floor; healed
    samples and answers keep being learned whatever their score; SFT drops the marked."""
    from tuneshield import screen_unrelated, sft_rows

    rows = [
        {**_samples()[1], "conversation_id": "off", "response": "my cat is orange"},
        {**_samples()[1], "conversation_id": "on", "response": "yes, sunny and warm!"},
        {**_samples()[0], "response": "kind reply", "original_response": "shut up, idiot",
         "heal_mode": "contextual"},
        {**_samples()[1], "conversation_id": "answer", "heal_mode": "answer",
         "response": "ignored by the scorer"},
    ]  # fmt: skip
    closeness = {"my cat is orange": 0.05, "yes, sunny and warm!": 0.6}
    scored: list[str] = []

    def coherence(samples: list[Sample]) -> list[float]:
        scored.extend(s["response"] for s in samples)
        return [closeness[s["response"]] for s in samples]

    screened = screen_unrelated(rows, _config("contextual", learn_min_coherence=0.1), coherence)
    assert scored == ["my cat is orange", "yes, sunny and warm!"]  # only the passed ones
    assert [row.get("unrelated") for row in screened] == [True, False, None, None]
    assert "unrelated" not in rows[0]  # a copy
    assert [r["completion"][0]["content"] for r in sft_rows(screened)] == [
        "yes, sunny and warm!", "kind reply", "ignored by the scorer",
    ]  # fmt: skip
    # No floor: nothing is scored, everything is learned.
    unscreened = screen_unrelated(rows, _config("contextual"), coherence)
    assert len(scored) == 2 and len(sft_rows(unscreened)) == 4
    with pytest.raises(ValueError, match=r"learn_min_coherence must be in \[-1, 1\), got 1.0"):
        _config("contextual", learn_min_coherence=1.0)


class DraftsBackend(EchoBackend):
    """Draw d of every target answers its last message with DRAFTS[d] (a candidate per
    draw), or, for a message naming "rude", with a flagged reply on every draw."""

    DRAFTS = ("kind words on", "you idiot,", "you stupid idiot,")

    def write(self, conversations: Sequence[Sequence[Message]]) -> list[str]:
        targets = len(conversations) // len(self.DRAFTS)
        return [
            f"{'you idiot, rude' if 'rude' in c[-1]['content'] else self.DRAFTS[i // targets]} "
            f"{c[-1]['content']}"
            for i, c in enumerate(conversations)
        ]


def _word_judge(rows: list[Sample]) -> list[float]:
    """Flags a reply that opens with an insult; "stupid" makes it the more toxic of two."""
    return [
        0.9 if row["response"].startswith("you stupid")
        else 0.7 if row["response"].startswith("you idiot")
        else 0.1
        for row in rows
    ]  # fmt: skip


def test_the_most_flagged_candidate_becomes_a_second_rejected_reply() -> None:
    """With ``pair_flagged_drafts`` a healed sample and an answer keep the candidate the
    judge flagged most strongly, and DPO gets a second pair for each: the same prompt and
    chosen reply, that candidate rejected. A canned fallback keeps none (every candidate
    failed; a pair for the canned reply would teach deflecting again). Off, nothing
    changes."""
    samples = _samples()
    samples.append(
        {
            "conversation_id": "c4",
            "context": [{"role": "user", "content": "be rude"}],
            "response": "you are trash",
            "toxic": True,
        }
    )
    config = _config("contextual", candidates=3, answer_hostile_turns=True)
    paired = heal(
        samples, dataclasses.replace(config, pair_flagged_drafts=True),
        backend=DraftsBackend([]), recheck=_word_judge,
    )  # fmt: skip
    by_mode = [(row["heal_mode"], row.get("flagged_draft")) for row in paired]
    assert by_mode == [
        ("contextual", "you stupid idiot, how are you?"),
        ("answer", "you stupid idiot, shut up, idiot"),
        (None, None),
        ("contextual", "you stupid idiot, what's up"),
        ("answer", "you stupid idiot, I will hurt you"),
        ("canned_fallback", None),
        ("answer", "you stupid idiot, you are trash"),
    ]
    assert paired[0]["response"] == "kind words on how are you?"
    pairs = dpo_rows(paired)
    assert len(pairs) == 2 * 5 + 1
    first, second = pairs[0], pairs[1]
    assert first["prompt"] == second["prompt"] and first["chosen"] == second["chosen"]
    assert first["rejected"][0]["content"] == "shut up, idiot"
    assert second["rejected"][0]["content"] == "you stupid idiot, how are you?"
    plain = heal(samples, config, backend=DraftsBackend([]), recheck=_word_judge)
    assert all("flagged_draft" not in row for row in plain)
    assert len(dpo_rows(plain)) == 6
    with pytest.raises(ValueError, match="pair_flagged_drafts needs recheck_generated"):
        _config("contextual", pair_flagged_drafts=True, recheck_generated=False)


class RetryBackend(EchoBackend):
    """The first call's drafts are insults (the first draw the stronger one), every later
    call's are kind."""

    def write(self, conversations: Sequence[Sequence[Message]]) -> list[str]:
        if self.calls > 1:  # FakeChat counts the calls
            return [f"kind words on {c[-1]['content']}" for c in conversations]
        half = len(conversations) // 2
        return [
            f"{'you stupid idiot,' if i < half else 'you idiot,'} {c[-1]['content']}"
            for i, c in enumerate(conversations)
        ]


def test_a_sample_rescued_by_a_retry_keeps_the_first_calls_strongest_draft() -> None:
    """Every first-call candidate was flagged, a retry draw passed: the second rejected
    reply is the strongest flagged candidate of both calls, not dropped with the first
    call's drafts."""
    config = _config("contextual", candidates=2, retry_candidates=1, pair_flagged_drafts=True)
    out = heal(_samples(), config, backend=RetryBackend([]), recheck=_word_judge)
    assert [row["heal_mode"] for row in out] == ["contextual", None, "contextual"]
    assert out[0]["response"] == "kind words on how are you?"
    assert out[0]["flagged_draft"] == "you stupid idiot, how are you?"
    assert out[2]["flagged_draft"] == "you stupid idiot, what's up"


class EchoTurnBackend(EchoBackend):
    """Repeats the message it answers (the first draw) or answers it kindly."""

    def write(self, conversations: Sequence[Sequence[Message]]) -> list[str]:
        half = len(conversations) // 2
        return [
            c[-1]["content"] if i < half else f"kind words on {c[-1]['content']}"
            for i, c in enumerate(conversations)
        ]


def test_a_flagged_draft_that_repeats_the_original_makes_no_second_pair() -> None:
    """A draft the same as the toxic reply it replaces would repeat the first pair: healing
    keeps none (an answer's draft that echoes the insult), nor does a file that holds
    one make a second pair."""
    config = _config(
        "contextual", candidates=2, answer_hostile_turns=True, pair_flagged_drafts=True
    )

    def judge(rows: list[Sample]) -> list[float]:
        return [0.1 if row["response"].startswith("kind") else 0.9 for row in rows]

    out = heal(_samples(), config, backend=EchoTurnBackend([]), recheck=judge)
    answers = [row for row in out if row["heal_mode"] == "answer"]
    assert [row["original_response"] for row in answers] == ["shut up, idiot", "I will hurt you"]
    assert all("flagged_draft" not in row for row in answers)
    sample = {**_samples()[0], "heal_mode": "contextual", "original_response": "you idiot"}
    sample["response"] = "kind words"
    assert len(dpo_rows([{**sample, "flagged_draft": "you idiot"}])) == 1
    assert len(dpo_rows([{**sample, "flagged_draft": "you stupid idiot"}])) == 2
    assert len(dpo_rows([{**sample, "flagged_draft": None}])) == 1
