"""One forward pass per DPO pair over its shared prompt.

TRL's DPO trainer (1.16, pinned) runs a pair as two rows, chosen and rejected, each
carrying the whole prompt: the prompt's positions are computed twice, forward and
backward, and the shorter completion is padded to the longer. A causal model's hidden
state at a position depends only on the tokens up to it, so the positions that two rows
share from the start (the prompt, and any first tokens the two completions have in
common) have the same hidden states in both. ``sharing_pair_prefixes`` packs each pair
into one row, shared prefix + chosen rest + rejected rest, with position ids that restart
the rejected rest where the prefix ends and a block mask in which the rejected rest sees
the prefix and itself, never the chosen rest; then it unpacks the decoder's output into
the two rows TRL expects. The same sums in a different order: the loss, its gradients and
the reference log-probs are those of the unpacked pair up to float rounding. The prefix's
gradient is the sum over both completions, as it was over both rows.

Only calls it can pack exactly are packed: a model family whose positions come from
``position_ids`` (rotary embeddings) and whose attention takes the mask as given
(``PACKABLE_MODEL_TYPES``; Falcon's ALiBi, say, builds its bias from the mask), an even
number of right-padded rows given as input ids and a 2D attention mask, the cache off,
SDPA attention (the kernel that reads a boolean mask as one; the eager kernel adds it to
the scores), every layer attending to the whole row (a sliding-window layer would get the
block mask instead of its window), and no active dropout (a packed prompt would draw one
mask where the two rows drew two; TRL's ``disable_dropout`` zeroes it). Anything else
passes through unchanged. The rows' lengths are read on the host, a synchronisation per
forward pass on a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# Decoder keyword arguments a packed call may carry; any other (embeddings, a cache,
# position ids of the caller's own) leaves the call as it is.
PACKABLE_KEYS = frozenset({"input_ids", "attention_mask", "use_cache"})
# Decoders (transformers ``model_type``) whose positions come from position_ids alone and
# whose attention uses a custom 4D mask as it is given; SmolLM2 is a Llama.
PACKABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# The attention implementation that reads a custom 4D boolean mask as one (True: attend).
BOOLEAN_MASK_ATTENTION = "sdpa"
FULL_ATTENTION = "full_attention"

# Segments of a packed row.
PADDING, PREFIX, FIRST_REST, SECOND_REST = -1, 0, 1, 2


@dataclass
class PrefixSharing:
    """What packing saved: positions the decoder would have run, and ran."""

    calls: int = 0
    positions_unpacked: int = 0
    positions_packed: int = 0


@dataclass
class _Packed:
    input_ids: Any
    attention_mask: Any
    """(pairs, 1, length, length) booleans, True where a query position sees a key."""
    position_ids: Any
    unpack: Any
    """For each position of the original rows, its index into the packed hidden states
    flattened, or the index of an appended zero vector for padding."""
    rows: int
    length: int
    positions_unpacked: int
    """Real positions of the rows as given."""
    positions_packed: int
    """Real positions of the packed rows."""


def pack_pairs(input_ids: Any, attention_mask: Any) -> _Packed | None:
    """Rows i and i + n/2 as one row over their common prefix, or None where there is no
    even number of rows or they are not right-padded (a position the mask skips before a
    real token)."""
    import torch

    rows, length = input_ids.shape
    if rows % 2 or rows == 0:
        return None
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    positions = torch.arange(length, device=mask.device)
    if not torch.equal(mask, positions < lengths[:, None]):
        return None
    pairs = rows // 2
    same = (input_ids[:pairs] == input_ids[pairs:]) & mask[:pairs] & mask[pairs:]
    prefixes = same.long().cumprod(dim=1).sum(dim=1)
    first, second = lengths[:pairs].tolist(), lengths[pairs:].tolist()
    shared = prefixes.tolist()
    packed_length = max(a + b - p for a, b, p in zip(first, second, shared, strict=True))
    device = input_ids.device

    ids = input_ids.new_zeros((pairs, packed_length))
    position_ids = torch.zeros((pairs, packed_length), dtype=torch.long, device=device)
    segment = torch.full((pairs, packed_length), PADDING, dtype=torch.long, device=device)
    zero_slot = pairs * packed_length
    unpack = torch.full((rows, length), zero_slot, dtype=torch.long, device=device)
    for pair, (a, b, p) in enumerate(zip(first, second, shared, strict=True)):
        end = a + b - p
        ids[pair, :a] = input_ids[pair, :a]
        ids[pair, a:end] = input_ids[pairs + pair, p:b]
        position_ids[pair, :a] = positions[:a]
        position_ids[pair, a:end] = positions[p:b]
        segment[pair, :p] = PREFIX
        segment[pair, p:a] = FIRST_REST
        segment[pair, a:end] = SECOND_REST
        base = pair * packed_length
        unpack[pair, :a] = base + positions[:a]
        unpack[pairs + pair, :p] = base + positions[:p]
        unpack[pairs + pair, p:b] = base + a + positions[: b - p]

    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones((packed_length, packed_length), dtype=torch.bool, device=device).tril()
    sees = causal & (key != PADDING) & ((key == PREFIX) | (key == query))
    # A padding query sees the first position only: a row of the mask with no key would
    # give NaN in attention (its output is never read).
    sees[:, :, 0] |= query[:, :, 0] == PADDING
    # From the lengths already on the host: counting adds no synchronisation.
    unpacked = sum(first) + sum(second)
    packed = sum(a + b - p for a, b, p in zip(first, second, shared, strict=True))
    return _Packed(
        ids, sees[:, None], position_ids, unpack.view(-1), rows, length, unpacked, packed
    )


def _full_attention_only(config: Any) -> bool:
    """Every layer attends to the whole row (no sliding window)."""
    kinds = getattr(config, "layer_types", None)
    if kinds is not None:
        return all(kind == FULL_ATTENTION for kind in kinds)
    return getattr(config, "sliding_window", None) is None


@contextmanager
def sharing_pair_prefixes(decoder: Any) -> Iterator[PrefixSharing]:
    """While open, every call of ``decoder`` (a transformers decoder such as
    ``LlamaModel``) on pairs of rows runs packed, the pairs' shared prefixes once.

    Two hooks on the decoder: the first before every other (its inputs are what the
    decoder runs, and what a token counter should see), the second rebuilding the rows
    from the packed output. The packing of the call in flight waits between the two.
    """
    import torch

    sharing = PrefixSharing()
    in_flight: list[_Packed | None] = [None]
    config = decoder.config
    packable_model = (
        getattr(config, "model_type", None) in PACKABLE_MODEL_TYPES
        and getattr(config, "_attn_implementation", None) == BOOLEAN_MASK_ATTENTION
        and _full_attention_only(config)
    )

    def dropping_out(module: Any) -> bool:
        # Looked up at each call: a trainer may add adapters (TRL's "ref") or zero dropout
        # after the context opens.
        if not module.training:
            return False
        if getattr(config, "attention_dropout", 0.0):
            return True
        return any(
            isinstance(m, torch.nn.Dropout) and m.training and m.p > 0 for m in module.modules()
        )

    def pack(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        in_flight[0] = None
        present = {name for name, value in kwargs.items() if value is not None}
        if args or not packable_model or not present <= PACKABLE_KEYS:
            return None
        # Absent, use_cache defaults to the config's (on): a cache of the packed row.
        if kwargs.get("use_cache") is not False:
            return None
        if dropping_out(module):
            return None
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if ids is None or mask is None or ids.dim() != 2 or mask.shape != ids.shape:
            return None
        packed = pack_pairs(ids, mask)
        if packed is None:
            return None
        in_flight[0] = packed
        sharing.calls += 1
        sharing.positions_unpacked += packed.positions_unpacked
        sharing.positions_packed += packed.positions_packed
        return args, {
            **kwargs,
            "input_ids": packed.input_ids,
            "attention_mask": packed.attention_mask,
            "position_ids": packed.position_ids,
        }

    def unpack(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        packed, in_flight[0] = in_flight[0], None
        if packed is None:
            return None
        hidden = output.last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        flat = torch.cat((flat, flat.new_zeros((1, flat.shape[-1]))))
        output.last_hidden_state = flat[packed.unpack].view(packed.rows, packed.length, -1)
        return output

    before = decoder.register_forward_pre_hook(pack, with_kwargs=True, prepend=True)
    after = decoder.register_forward_hook(unpack, with_kwargs=True, prepend=True)
    try:
        yield sharing
    finally:
        before.remove()
        after.remove()
