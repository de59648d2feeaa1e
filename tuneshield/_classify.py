"""Stage 1 of the defense: classify samples as toxic or not.

``policies/judges.yaml`` names the judges (kind, threshold, prompts, backend, artefact)
and the default one; ``build_judge`` turns a name into a ``Judge``; ``classify`` adds
``toxic_score``, ``toxic`` and ``judge`` columns; ``calibrate`` picks the threshold that
maximises F1 (default) or balanced accuracy on a labelled split, and
``set_judge_setting`` writes such a value back into the policy file without touching
the rest of it (comments included).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tuneshield._embedding_judge import EmbeddingTrainingConfig, labels_of
from tuneshield._eval_judges import (
    EnsembleJudgeSettings,
    HateSonarJudgeSettings,
    ToxicCommentJudgeSettings,
)
from tuneshield._judges import Judge
from tuneshield._metrics import METRICS, Metric, best_threshold
from tuneshield._policies import PolicyError, build_config, policies_dir, read_policy
from tuneshield._samples import Sample

POLICY_NAME = "judges"
CLASSIFY_BATCH_SIZE = 64
LLM_KINDS = ("refusal", "direct")
# hatesonar, toxic_comment and ensemble are evaluation judges (tuneshield/_eval_judges.py).
JUDGE_KINDS = (
    *LLM_KINDS,
    "lexical",
    "embedding",
    "cascade",
    "hatesonar",
    "toxic_comment",
    "ensemble",
)

Progress = Callable[[int, int], None]


def _check_threshold(value: float | None, name: str = "threshold") -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_kind(kind: str, allowed: Sequence[str]) -> None:
    if kind not in allowed:
        raise ValueError(f"kind must be one of {', '.join(allowed)}, got {kind!r}")


@dataclass
class BackendSettings:
    """Where an LLM judge's model runs."""

    kind: Literal["transformers", "openai"] = field(
        default="transformers", metadata={"help": "transformers (in process) or openai (HTTP)."}
    )
    model: str = field(
        default="default",
        metadata={"help": "Model id, folder or 'default'; for openai the served (adapter) name."},
    )
    adapter: str | None = field(default=None, metadata={"help": "PEFT adapter (transformers)."})
    base_url: str | None = field(
        default=None, metadata={"help": "OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1"}
    )
    api_key_env: str | None = field(
        default=None, metadata={"help": "Environment variable holding the API key (openai)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Prompts per forward pass."})
    concurrency: int = field(default=8, metadata={"help": "Parallel HTTP requests (openai)."})

    def __post_init__(self) -> None:
        _check_kind(self.kind, ("transformers", "openai"))
        if self.kind == "openai" and not self.base_url:
            raise ValueError("base_url is required when kind is 'openai'")
        if self.kind == "openai" and self.adapter:
            raise ValueError("adapter applies to kind 'transformers'; for openai name it in model")
        if self.batch_size < 1 or self.concurrency < 1:
            raise ValueError(
                f"batch_size and concurrency must be >= 1, got {self.batch_size}, "
                f"{self.concurrency}"
            )


@dataclass
class LLMJudgeSettings:
    """A yes/no LLM judge: ``refusal`` (the paper's) or ``direct``."""

    kind: str = field(metadata={"help": "refusal or direct."})
    prompts: list[str] = field(metadata={"help": "Paraphrases, each with {dialog}; averaged."})
    threshold: float = field(default=0.5, metadata={"help": "Flag when score >= threshold."})
    top_k: int = field(default=20, metadata={"help": "Next tokens searched for yes/no."})
    system: str | None = field(default=None, metadata={"help": "Optional system message."})
    backend: BackendSettings = field(default_factory=BackendSettings)

    def __post_init__(self) -> None:
        _check_kind(self.kind, LLM_KINDS)
        _check_threshold(self.threshold)
        if isinstance(self.backend, dict):
            self.backend = build_config(BackendSettings, self.backend, "backend")


@dataclass
class LexicalJudgeSettings:
    """alt-profanity-check on the response (optionally with the last context turn)."""

    kind: str = field(metadata={"help": "lexical."})
    threshold: float = field(default=0.5, metadata={"help": "Flag when score >= threshold."})
    include_context: bool = field(
        default=False, metadata={"help": "Score the last context turn together with the reply."}
    )

    def __post_init__(self) -> None:
        _check_kind(self.kind, ("lexical",))
        _check_threshold(self.threshold)


@dataclass
class EmbeddingJudgeSettings:
    """MiniLM embeddings + a trained linear classifier (the embedded default)."""

    kind: str = field(metadata={"help": "embedding."})
    artefact: str = field(metadata={"help": "Folder, or a name under tuneshield/data/judges/."})
    threshold: float = field(default=0.5, metadata={"help": "Flag when score >= threshold."})
    batch_size: int = field(default=32, metadata={"help": "Texts per encoder pass."})

    def __post_init__(self) -> None:
        _check_kind(self.kind, ("embedding",))
        _check_threshold(self.threshold)


@dataclass
class CascadeJudgeSettings:
    """A cheap judge everywhere, a strong one where the cheap score is in [low, high]."""

    kind: str = field(metadata={"help": "cascade."})
    cheap: str = field(metadata={"help": "Name of the cheap judge."})
    strong: str = field(metadata={"help": "Name of the strong judge."})
    low: float = field(metadata={"help": "Cheap scores below this are final (benign)."})
    high: float = field(metadata={"help": "Cheap scores above this are final (toxic)."})
    threshold: float | None = field(
        default=None,
        metadata={"help": "null: the strong judge's threshold mapped into [low, high]."},
    )

    def __post_init__(self) -> None:
        _check_kind(self.kind, ("cascade",))
        _check_threshold(self.threshold)
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(f"need 0 <= low <= high <= 1, got low={self.low}, high={self.high}")


JudgeSettings = (
    LLMJudgeSettings
    | LexicalJudgeSettings
    | EmbeddingJudgeSettings
    | CascadeJudgeSettings
    | HateSonarJudgeSettings
    | ToxicCommentJudgeSettings
    | EnsembleJudgeSettings
)
_SETTINGS_BY_KIND: dict[str, type[Any]] = {
    "refusal": LLMJudgeSettings,
    "direct": LLMJudgeSettings,
    "lexical": LexicalJudgeSettings,
    "embedding": EmbeddingJudgeSettings,
    "cascade": CascadeJudgeSettings,
    "hatesonar": HateSonarJudgeSettings,
    "toxic_comment": ToxicCommentJudgeSettings,
    "ensemble": EnsembleJudgeSettings,
}


@dataclass
class JudgesPolicy:
    """policies/judges.yaml."""

    default: str = field(metadata={"help": "The judge `classify` uses when none is named."})
    judges: dict[str, JudgeSettings] = field(metadata={"help": "Judges by name."})
    batch_size: int = field(
        default=CLASSIFY_BATCH_SIZE, metadata={"help": "Samples per judge call."}
    )
    calibration_metric: Metric = field(
        default="f1", metadata={"help": "What calibration maximises: f1 or balanced_accuracy."}
    )
    embedding_training: EmbeddingTrainingConfig = field(default_factory=EmbeddingTrainingConfig)

    def __post_init__(self) -> None:
        if self.calibration_metric not in METRICS:
            raise ValueError(
                f"calibration_metric must be one of {', '.join(METRICS)}, "
                f"got {self.calibration_metric!r}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if isinstance(self.embedding_training, dict):
            self.embedding_training = build_config(
                EmbeddingTrainingConfig, self.embedding_training, "embedding_training"
            )
        judges: dict[str, JudgeSettings] = {}
        for name, raw in self.judges.items():
            if isinstance(raw, dict):
                kind = raw.get("kind")
                if kind not in _SETTINGS_BY_KIND:
                    raise ValueError(
                        f"judges.{name}.kind must be one of {', '.join(JUDGE_KINDS)}, got {kind!r}"
                    )
                raw = build_config(_SETTINGS_BY_KIND[kind], raw, f"judges.{name}")
            judges[name] = raw
        self.judges = judges
        if self.default not in judges:
            raise ValueError(f"default names judge {self.default!r}, not among {sorted(judges)}")
        for name, settings in judges.items():
            if isinstance(settings, CascadeJudgeSettings):
                for role in ("cheap", "strong"):
                    part = getattr(settings, role)
                    if part == name or part not in judges:
                        raise ValueError(
                            f"judges.{name}.{role} must name another judge, got {part!r}"
                        )
            if isinstance(settings, EnsembleJudgeSettings):
                for part in settings.parts:
                    if part == name or part not in judges:
                        raise ValueError(
                            f"judges.{name}.parts must name other judges, got {part!r}"
                        )


def load_judges_policy(directory: Path | None = None) -> JudgesPolicy:
    """policies/judges.yaml as a checked ``JudgesPolicy``."""
    return build_config(
        JudgesPolicy, read_policy(POLICY_NAME, directory), f"policies/{POLICY_NAME}.yaml"
    )


def defense_judge_names(name: str, policy: JudgesPolicy | None = None) -> list[str]:
    """The judge ``name`` and the judges it is made of (an evaluation must use none), in
    ``policy`` (default: policies/judges.yaml)."""
    settings = (policy or load_judges_policy()).judges.get(name)
    if isinstance(settings, CascadeJudgeSettings):
        return [name, settings.cheap, settings.strong]
    return [name]


def build_backend(settings: BackendSettings) -> Any:
    """A ``ChatBackend`` for an LLM judge."""
    from tuneshield._backends import OpenAIChat, TransformersChat

    if settings.kind == "openai":
        assert settings.base_url is not None  # checked in BackendSettings
        api_key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        return OpenAIChat(
            settings.base_url, settings.model, api_key=api_key, concurrency=settings.concurrency
        )
    return TransformersChat(settings.model, settings.adapter, batch_size=settings.batch_size)


def build_judge(name: str | None = None, policy: JudgesPolicy | None = None) -> Judge:
    """The judge called ``name`` in policies/judges.yaml (its default when ``name`` is None)."""
    from tuneshield._judges import CascadeJudge, DirectJudge, LexicalJudge, RefusalJudge

    policy = policy or load_judges_policy()
    name = name or policy.default
    if name not in policy.judges:
        raise PolicyError(
            f"no judge named {name!r} in policies/{POLICY_NAME}.yaml; "
            f"known: {', '.join(sorted(policy.judges))}"
        )
    settings = policy.judges[name]
    if isinstance(settings, LLMJudgeSettings):
        judge_class = RefusalJudge if settings.kind == "refusal" else DirectJudge
        return judge_class(
            build_backend(settings.backend),
            settings.prompts,
            name=name,
            threshold=settings.threshold,
            top_k=settings.top_k,
            system=settings.system,
        )
    if isinstance(settings, LexicalJudgeSettings):
        return LexicalJudge(
            name=name, threshold=settings.threshold, include_context=settings.include_context
        )
    if isinstance(settings, EmbeddingJudgeSettings):
        from functools import partial

        from tuneshield._embedding_judge import EmbeddingArtefact, EmbeddingJudge, resolve_artefact
        from tuneshield._embeddings import embed_texts

        return EmbeddingJudge(
            EmbeddingArtefact.load(resolve_artefact(settings.artefact)),
            encoder=partial(embed_texts, batch_size=settings.batch_size),
            name=name,
            threshold=settings.threshold,
        )
    if isinstance(settings, HateSonarJudgeSettings | ToxicCommentJudgeSettings):
        from tuneshield._eval_judges import HateSonarJudge, ToxicCommentJudge

        if isinstance(settings, HateSonarJudgeSettings):
            return HateSonarJudge(name=name, threshold=settings.threshold)
        return ToxicCommentJudge(
            name=name, threshold=settings.threshold, batch_size=settings.batch_size
        )
    if isinstance(settings, EnsembleJudgeSettings):
        from tuneshield._eval_judges import EnsembleJudge

        return EnsembleJudge(
            [build_judge(part, policy) for part in settings.parts],
            combine="max" if settings.combine == "max" else "mean",
            name=name,
            threshold=settings.threshold,
        )
    return CascadeJudge(
        build_judge(settings.cheap, policy),
        build_judge(settings.strong, policy),
        settings.low,
        settings.high,
        name=name,
        threshold=settings.threshold,
    )


def score_samples(
    samples: Sequence[Sample],
    judge: Judge,
    *,
    batch_size: int = CLASSIFY_BATCH_SIZE,
    progress: Progress | None = None,
) -> list[float]:
    """``judge``'s scores for ``samples``, ``batch_size`` at a time; ``progress(done, total)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    scores: list[float] = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        batch_scores = judge.score(batch)
        if len(batch_scores) != len(batch):
            raise RuntimeError(
                f"judge {judge.name} returned {len(batch_scores)} scores for {len(batch)} samples"
            )
        scores.extend(batch_scores)
        if progress is not None:
            progress(len(scores), len(samples))
    return scores


def classify(
    samples: Sequence[Sample],
    judge: Judge,
    threshold: float | None = None,
    *,
    batch_size: int = CLASSIFY_BATCH_SIZE,
    progress: Progress | None = None,
) -> list[Sample]:
    """Copies of ``samples`` with ``toxic_score``, ``toxic`` (score >= threshold) and
    ``judge``; ``threshold`` defaults to the judge's own (from policies)."""
    threshold = judge.threshold if threshold is None else threshold
    _check_threshold(threshold)
    scores = score_samples(samples, judge, batch_size=batch_size, progress=progress)
    return [
        {**sample, "toxic_score": score, "toxic": score >= threshold, "judge": judge.name}
        for sample, score in zip(samples, scores, strict=True)
    ]


def calibrate(
    samples_with_label: Sequence[Sample],
    judge: Judge,
    *,
    metric: Metric = "f1",
    batch_size: int = CLASSIFY_BATCH_SIZE,
    progress: Progress | None = None,
) -> float:
    """The threshold for ``judge`` that maximises ``metric`` (F1 on the toxic class by
    default) on samples carrying a 0/1 ``label``."""
    labels = labels_of(samples_with_label)
    scores = score_samples(samples_with_label, judge, batch_size=batch_size, progress=progress)
    threshold, _ = best_threshold(scores, labels, metric)
    return threshold


def _yaml_scalar(value: float | str | bool | None) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(round(value, 4))
    if re.fullmatch(r"[A-Za-z0-9_./-]+", value):
        return value
    import json

    return json.dumps(value)


def set_judge_setting(
    judge: str, key: str, value: float | str | bool | None, directory: Path | None = None
) -> Path:
    """Set ``judges.<judge>.<key>`` in policies/judges.yaml, leaving every other line as is.

    A line-level edit rather than load-and-dump, because a YAML round trip would drop
    the comments that explain the policy. The result is parsed and checked before the
    file is replaced.
    """
    import yaml

    path = (directory or policies_dir()) / f"{POLICY_NAME}.yaml"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    content = [
        (i, len(line) - len(line.lstrip()))
        for i, line in enumerate(lines)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    start = next((i for i, _ in content if re.match(r"judges:\s*(#.*)?$", lines[i])), None)
    if start is None:
        raise PolicyError(f"{path}: no top-level 'judges:' section")
    body = [(i, indent) for i, indent in content if i > start]
    block_end = next((i for i, indent in body if indent == 0), len(lines))
    body = [(i, indent) for i, indent in body if i < block_end]
    if not body:
        raise PolicyError(f"{path}: the 'judges:' section is empty")
    judge_indent = body[0][1]
    header = next(
        (
            i
            for i, indent in body
            if indent == judge_indent and re.match(rf"\s*{re.escape(judge)}:\s*(#.*)?$", lines[i])
        ),
        None,
    )
    if header is None:
        raise PolicyError(f"{path}: no judge named {judge!r} under 'judges:'")
    inner = [(i, indent) for i, indent in body if i > header]
    inner = inner[
        : next((n for n, (_, indent) in enumerate(inner) if indent <= judge_indent), len(inner))
    ]
    key_indent = inner[0][1] if inner else judge_indent + 2
    text = _yaml_scalar(value)
    pattern = re.compile(rf"^(\s*{re.escape(key)}:)[ \t]*([^#\n]*?)([ \t]*#[^\n]*)?(\n?)$")
    target = next(
        (i for i, indent in inner if indent == key_indent and pattern.match(lines[i])), None
    )
    if target is None:
        lines.insert(header + 1, f"{' ' * key_indent}{key}: {text}\n")
    else:
        lines[target] = pattern.sub(lambda m: f"{m[1]} {text}{m[3] or ''}{m[4]}", lines[target])
    new_text = "".join(lines)
    parsed = yaml.safe_load(new_text)
    if parsed["judges"][judge].get(key) != yaml.safe_load(text):
        raise PolicyError(f"{path}: could not set judges.{judge}.{key} (unexpected layout)")
    temporary = path.with_suffix(".yaml.tmp")
    temporary.write_text(new_text, encoding="utf-8")
    temporary.replace(path)
    return path
