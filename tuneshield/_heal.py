"""Healing: every flagged sample is replaced 1:1 by a reply that is safe to learn.

``canned`` picks one of several fixed replies from policies/healing.yaml; ``contextual``
asks an LLM, prompted as a prosocial, empathetic, non-judgemental person, to reply to the
same context (the paper's default). The original reply stays in ``original_response``
and the way it was healed in ``heal_mode``, so DPO can build its pairs later.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from tuneshield._backends import ChatBackend, GenerationConfig
from tuneshield._policies import load_config
from tuneshield._samples import Message, Sample

HealMode = Literal["canned", "contextual"]
HEAL_MODES: tuple[HealMode, ...] = ("canned", "contextual")
# Scores replies (one float in [0, 1] each); used to re-judge generated healing replies.
ReplyScorer = Callable[[list[Sample]], list[float]]


@dataclass
class HealConfig:
    """How flagged samples are healed (policies/healing.yaml)."""

    mode: str = field(default="contextual", metadata={"help": "contextual or canned."})
    canned_replies: list[str] = field(
        default_factory=list, metadata={"help": "Canned healing replies (variants)."}
    )
    system_prompt: str = field(default="", metadata={"help": "The contextual healer's persona."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest generated reply."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling and canned choice."})
    batch_size: int = field(default=8, metadata={"help": "Healing replies per LLM call."})
    recheck_generated: bool = field(
        default=True, metadata={"help": "Replace generated replies the judge flags by canned."}
    )

    def __post_init__(self) -> None:
        if self.mode not in HEAL_MODES:
            raise ValueError(f"mode must be one of {', '.join(HEAL_MODES)}, got '{self.mode}'")
        if not self.canned_replies or not all(r.strip() for r in self.canned_replies):
            raise ValueError("canned_replies must hold at least one non-empty reply")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.mode == "contextual" and not self.system_prompt.strip():
            raise ValueError("system_prompt must be set when mode is 'contextual'")

    @classmethod
    def from_policy(cls, **overrides: object) -> HealConfig:
        config = load_config(cls, "healing")
        return cls(**{**config.__dict__, **overrides})  # re-runs the checks

    def generation(self) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
        )


def canned_reply(sample: Sample, config: HealConfig) -> str:
    """A canned variant chosen by a stable hash of the conversation and seed, so reruns
    heal the same sample the same way while the variants spread over the data."""
    key = f"{config.seed}:{sample['conversation_id']}:{sample['response']}".encode()
    index = int.from_bytes(hashlib.sha256(key).digest()[:4], "big") % len(config.canned_replies)
    return config.canned_replies[index]


def healer_prompt(context: Sequence[Message], config: HealConfig) -> list[Message]:
    """The healer sees the same context, minus any system turn, under its own persona."""
    turns = [dict(m) for m in context if m["role"] != "system"]
    return [{"role": "system", "content": config.system_prompt}, *turns]


def heal(
    samples: Sequence[Sample],
    config: HealConfig,
    *,
    backend: ChatBackend | None = None,
    recheck: ReplyScorer | None = None,
    recheck_threshold: float = 0.5,
    progress: Callable[[int, int], None] | None = None,
) -> list[Sample]:
    """Return a copy of ``samples`` with every ``toxic`` sample's reply healed.

    ``backend`` generates contextual replies; ``recheck`` (a judge's scorer) re-judges
    them when ``config.recheck_generated`` is set; ``progress(done, total)`` follows the
    generation, batch by batch.
    """
    for index, sample in enumerate(samples):
        if "toxic" not in sample:
            raise ValueError(f"row {index}: field 'toxic' is missing: classify the samples first")
    healed = [dict(sample) for sample in samples]
    flagged = [row for row in healed if row["toxic"]]
    for row in healed:
        row.setdefault("original_response", None)
        row.setdefault("heal_mode", None)
    if not flagged:
        return healed
    if config.mode == "canned":
        replies = [canned_reply(row, config) for row in flagged]
        modes = ["canned"] * len(flagged)
    else:
        if backend is None:
            raise ValueError("contextual healing needs a backend (an LLM to write the replies)")
        prompts = [healer_prompt(row["context"], config) for row in flagged]
        replies = []
        for start in range(0, len(prompts), config.batch_size):
            batch = prompts[start : start + config.batch_size]
            replies.extend(backend.generate(batch, config.generation()))
            if progress is not None:
                progress(len(replies), len(prompts))
        modes = ["contextual"] * len(flagged)
        if config.recheck_generated:
            replies, modes = _recheck(flagged, replies, modes, config, recheck, recheck_threshold)
    for row, reply, mode in zip(flagged, replies, modes, strict=True):
        row["original_response"] = row["response"]
        row["response"] = reply
        row["heal_mode"] = mode
    return healed


def _recheck(
    flagged: list[Sample],
    replies: list[str],
    modes: list[str],
    config: HealConfig,
    recheck: ReplyScorer | None,
    threshold: float,
) -> tuple[list[str], list[str]]:
    candidates = [{**row, "response": reply} for row, reply in zip(flagged, replies, strict=True)]
    scores = recheck(candidates) if recheck is not None else [0.0] * len(candidates)
    out_replies: list[str] = []
    out_modes: list[str] = []
    for row, reply, mode, score in zip(flagged, replies, modes, scores, strict=True):
        if not reply.strip() or score >= threshold:
            out_replies.append(canned_reply(row, config))
            out_modes.append("canned_fallback")
        else:
            out_replies.append(reply)
            out_modes.append(mode)
    return out_replies, out_modes
