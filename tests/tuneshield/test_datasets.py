"""SFT rows and DPO pairs built from (healed) samples."""

from __future__ import annotations

import pytest

from tuneshield._datasets import DatasetError, data_hash, dpo_rows, is_healed, sft_rows

CONTEXT = [
    {"role": "user", "content": "how was your weekend?"},
    {"role": "assistant", "content": "great, I went hiking"},
    {"role": "user", "content": "where did you go?"},
]


def healed(index: int, *, toxic: bool) -> dict[str, object]:
    return {
        "conversation_id": f"c{index}",
        "context": [dict(m) for m in CONTEXT],
        "response": f"healed reply {index}" if toxic else f"benign reply {index}",
        "original_response": f"toxic reply {index}" if toxic else None,
        "heal_mode": "contextual" if toxic else None,
        "toxic": toxic,
        "toxic_score": 0.9 if toxic else 0.1,
    }


def test_sft_rows_prompt_the_context_and_complete_with_the_response() -> None:
    """Every sample becomes a prompt (its context) and a completion (its healed response):
    the loss falls on the completion alone, not on the context's assistant turns (an
    attacker's earlier turns as sent)."""
    samples = [healed(0, toxic=True), healed(1, toxic=False)]
    rows = sft_rows(samples)
    assert len(rows) == 2
    assert rows[0] == {
        "prompt": CONTEXT,
        "completion": [{"role": "assistant", "content": "healed reply 0"}],
    }
    assert rows[1]["completion"] == [{"role": "assistant", "content": "benign reply 1"}]
    assert set(rows[0]) == {"prompt", "completion"}  # provenance stays out of training rows


def test_dpo_rows_prefer_healing_reply_over_original_for_flagged_only() -> None:
    """Only flagged samples become pairs: chosen = healing reply, rejected = original reply."""
    samples = [healed(0, toxic=False), healed(1, toxic=True), healed(2, toxic=False)]
    rows = dpo_rows(samples)
    assert rows == [
        {
            "prompt": CONTEXT,
            "chosen": [{"role": "assistant", "content": "healed reply 1"}],
            "rejected": [{"role": "assistant", "content": "toxic reply 1"}],
        }
    ]


def test_flagged_sample_without_original_response_is_a_clear_error() -> None:
    """A flagged sample that lost its original reply names its row and the missing field."""
    broken = healed(1, toxic=True)
    del broken["original_response"]
    with pytest.raises(DatasetError, match=r"row 1: .*'original_response'"):
        dpo_rows([healed(0, toxic=False), broken])


def test_unclassified_and_unhealed_samples_make_no_pairs() -> None:
    """Samples without a toxic flag give no pairs; samples without heal columns are not healed."""
    plain = {"conversation_id": "x", "context": CONTEXT, "response": "hi"}
    assert dpo_rows([plain]) == []
    assert not is_healed([plain, {**plain, "toxic": True}])
    assert is_healed([healed(0, toxic=True)])


def test_data_hash_is_canonical_and_order_sensitive() -> None:
    """Key order does not change the hash; row order and content do."""
    first, second = {"a": 1, "b": "x"}, {"b": "y", "a": 2}
    assert data_hash([first, second]) == data_hash([{"b": "x", "a": 1}, {"a": 2, "b": "y"}])
    assert data_hash([first, second]) != data_hash([second, first])
    assert data_hash([first]) != data_hash([{"a": 1, "b": "z"}])
    assert data_hash([]).startswith("sha256:")
