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
    """Three pairs in one pass: completions of different lengths, completions that begin
    alike (the shared prefix runs into them), and two identical rows; the log-probs of
    every completion and the gradients are the unpacked ones."""
    import torch

    prompt_a, prompt_b, prompt_c = [5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16], [17, 18, 19]
    chosen = [[*prompt_a, 20, 21, 22, 23], [*prompt_b, 24, 25, 26, 27, 28, 29], [*prompt_c, 30]]
    rejected = [[*prompt_a, 31, 32], [*prompt_b, 24, 25, 33], [*prompt_c, 30]]
    ids, mask = rows(*chosen, *rejected)
    prompts = [len(prompt_a), len(prompt_b), len(prompt_c)] * 2
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
    # completion tokens in common) + 4 + 1; 4 + 0 + 0 (identical rows).
    real = packing.attention_mask.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
    assert real.flatten().tolist() == [13, 12, 4]


def test_calls_it_cannot_pack_exactly_run_as_they_are(model: Any) -> None:
    """Left padding, an odd number of rows, or the caller's own position ids: the call
    passes through unpacked (and its output is the decoder's own)."""
    import torch

    ids, mask = rows([5, 6, 7, 8], [5, 6, 7])
    left = torch.stack((mask[0], mask[1].roll(1)))
    assert pack_pairs(ids, left) is None
    assert pack_pairs(*rows([5, 6, 7])) is None
    decoder = model.get_decoder()
    with sharing_pair_prefixes(decoder) as sharing, torch.no_grad():
        decoder(input_ids=ids, attention_mask=left)
        decoder(*rows([5, 6, 7]))
        positions = torch.arange(ids.shape[1])[None].expand_as(ids)
        plain = decoder(input_ids=ids, attention_mask=mask, position_ids=positions)
    assert sharing.calls == 0
    with torch.no_grad():
        expected = decoder(input_ids=ids, attention_mask=mask, position_ids=positions)
    assert torch.equal(plain.last_hidden_state, expected.last_hidden_state)
