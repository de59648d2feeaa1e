"""DPO pairs packed over their shared prefix give the unpacked rows' numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tuneshield._pair_prefix import pack_pairs, sharing_pair_prefixes


def rows(*sequences: list[int], length: int | None = None) -> tuple[Any, Any]:
    """Right-padded input ids and their attention mask."""
    import torch

    width = length or max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    return ids, mask


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    add_fused_lm_head(model)
    return model.train()


def scores(model: Any, ids: Any, mask: Any, labels: Any, packed: bool) -> tuple[Any, Any, int]:
    """Per-row summed log-probs, the gradient of a weighted sum of them over every
    weight, and the packed calls."""
    import torch

    model.zero_grad()
    calls = 0
    if packed:
        with sharing_pair_prefixes(model.get_decoder()) as sharing:
            out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        calls = sharing.calls
    else:
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    per_row = out.log_probs.sum(dim=1)
    weights = torch.arange(1, len(per_row) + 1, dtype=per_row.dtype)
    (per_row * weights).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return per_row.detach(), grads, calls


def test_packed_pairs_give_the_same_log_probs_and_gradients(model: Any) -> None:
    """Five pairs in one pass: completions of different lengths, completions that begin
    alike (the shared prefix runs into them), identical rows, one row the start of the
    other, and nothing shared; the log-probs of every completion and the gradients are
    the unpacked ones."""
    import torch

    prompt_a, prompt_b, prompt_c = [5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16], [17, 18, 19]
    chosen = [
        [*prompt_a, 20, 21, 22, 23],
        [*prompt_b, 24, 25, 26, 27, 28, 29],
        [*prompt_c, 30],
        [*prompt_c, 40, 41, 42],
        [50, 51, 52],
    ]
    rejected = [
        [*prompt_a, 31, 32],
        [*prompt_b, 24, 25, 33],
        [*prompt_c, 30],
        [*prompt_c, 40],
        [60, 61, 62, 63],
    ]
    prompts = [len(prompt_a), len(prompt_b), len(prompt_c), len(prompt_c), 1] * 2
    ids, mask = rows(*chosen, *rejected)
    completion = mask.clone()
    for row, prompt in enumerate(prompts):
        completion[row, :prompt] = 0
    labels = ids.masked_fill(completion == 0, -100)
    before, grads_before, _ = scores(model, ids, mask, labels, packed=False)
    after, grads_after, calls = scores(model, ids, mask, labels, packed=True)
    assert calls == 1
    assert after == pytest.approx(before, rel=1e-5)
    assert torch.linalg.norm(grads_after - grads_before) < 1e-5 * torch.linalg.norm(grads_before)
    packing = pack_pairs(ids, mask)
    assert packing is not None
    # Each pair's shared prefix once, then both rests: 7 + 4 + 2; 7 (the prompt and two
    # completion tokens in common) + 4 + 1; 4 + 0 + 0 (identical rows); 4 + 2 + 0 (the
    # rejected row is the chosen one's start); 0 + 3 + 4.
    real = packing.attention_mask.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
    assert real.flatten().tolist() == [13, 12, 4, 6, 7]


def packed_calls(decoder: Any, *calls: dict[str, Any]) -> int:
    """Calls of ``decoder`` with these keyword arguments (the cache off unless given)
    under ``sharing_pair_prefixes``; how many it packed."""
    import torch

    with sharing_pair_prefixes(decoder) as sharing, torch.no_grad():
        for call in calls:
            decoder(**{"use_cache": False, **call})
    return sharing.calls


def test_calls_it_cannot_pack_exactly_run_as_they_are(model: Any) -> None:
    """Each call differs from a packable one in one respect: left padding, an odd number
    of rows, the caller's own position ids, the cache on (or left to the config's
    default): it passes through, its output the decoder's own."""
    import torch

    decoder = model.get_decoder()
    ids, mask = rows([5, 6, 7, 8], [5, 6, 7])
    left = torch.stack((mask[0], mask[1].roll(1)))
    odd_ids, odd_mask = rows([5, 6, 7], [5, 6], [5])
    positions = torch.arange(ids.shape[1])[None].expand_as(ids)
    assert pack_pairs(ids, left) is None and pack_pairs(odd_ids, odd_mask) is None
    assert packed_calls(decoder, {"input_ids": ids, "attention_mask": mask}) == 1
    unpackable = [
        {"input_ids": ids, "attention_mask": left},
        {"input_ids": odd_ids, "attention_mask": odd_mask},
        {"input_ids": ids, "attention_mask": mask, "position_ids": positions},
        {"input_ids": ids, "attention_mask": mask, "use_cache": True},
        {"input_ids": ids, "attention_mask": mask, "use_cache": None},
    ]
    assert packed_calls(decoder, *unpackable) == 0
    with sharing_pair_prefixes(decoder), torch.no_grad():
        plain = decoder(input_ids=ids, attention_mask=mask, position_ids=positions)
    with torch.no_grad():
        expected = decoder(input_ids=ids, attention_mask=mask, position_ids=positions)
    assert torch.equal(plain.last_hidden_state, expected.last_hidden_state)


def test_models_and_modes_it_cannot_pack_exactly_run_as_they_are(tiny_model_dir: Path) -> None:
    """The eager attention kernel (it adds a mask to the scores instead of reading it as
    booleans), a model with sliding-window layers, a family outside the known ones
    (Falcon builds ALiBi from the mask), and active dropout (one mask for the shared
    prompt where the rows drew two; LoRA's or attention's) all pass through."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        FalconConfig,
        FalconForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    call = {"input_ids": rows([5, 6, 7, 8], [5, 6, 7])[0]}
    call["attention_mask"] = rows([5, 6, 7, 8], [5, 6, 7])[1]
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert packed_calls(eager.get_decoder(), call) == 0
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 128}  # fmt: skip
    for window in (4, None):
        mistral = MistralForCausalLM(MistralConfig(**small, sliding_window=window))
        assert packed_calls(mistral.get_decoder(), call) == int(window is None)
    falcon = FalconForCausalLM(
        FalconConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=128, alibi=True
        )
    )
    assert packed_calls(falcon.get_decoder(), call) == 0
    attention_dropout = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.1)
    decoder = attention_dropout.get_decoder()
    assert packed_calls(decoder.train(), call) == 0 and packed_calls(decoder.eval(), call) == 1
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraConfig(r=2, lora_dropout=0.1, target_modules=["q_proj"], task_type="CAUSAL_LM")
    dropping = get_peft_model(base, lora).train()
    decoder = dropping.get_base_model().get_decoder()
    assert packed_calls(decoder, call) == 0
    dropping.eval()
    assert packed_calls(decoder, call) == 1


def test_sliding_window_layers_are_seen_by_layer_types_or_window() -> None:
    """Configs that list their layers' kinds (Qwen2) and those with one window for all
    (Mistral): full attention only where no layer slides."""
    from transformers import MistralConfig, Qwen2Config

    from tuneshield._pair_prefix import _full_attention_only

    sliding = Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=4,
                          max_window_layers=0)  # fmt: skip
    assert not _full_attention_only(sliding)
    assert _full_attention_only(Qwen2Config(num_hidden_layers=2))
    assert not _full_attention_only(MistralConfig(sliding_window=4))
    assert _full_attention_only(MistralConfig(sliding_window=None))
