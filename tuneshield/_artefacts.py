"""What a judge is made of, by content: the SHA-256 of every file its scores depend on.

Policies name a judge (``embedding``), and the files behind a name can change: a
retrained artefact, another model in an LLM judge's folder, another release of the
lexical model. ``judge_artefact`` hashes the files ``build_judge`` loads for a judge —
the embedding judge's artefact folder and its encoder, the lexical judge's model files,
an LLM judge's local model folder and adapter, both parts of a cascade — into one
digest, so that a learning round can say which judge scored its data. A model served
elsewhere (an OpenAI-compatible endpoint, a hub id not on disk) cannot be hashed here: it
is named instead. Files are read once per process (cached by path, size and mtime).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneshield._classify import (
    CascadeJudgeSettings,
    EmbeddingJudgeSettings,
    JudgesPolicy,
    LexicalJudgeSettings,
    LLMJudgeSettings,
)
from tuneshield._eval_judges import (
    EnsembleJudgeSettings,
    HateSonarJudgeSettings,
    ToxicCommentJudgeSettings,
)
from tuneshield._policies import PolicyError

# The package whose model files the lexical judge loads (alt-profanity-check).
LEXICAL_PACKAGE = "profanity_check"
LEXICAL_DATA = "data"
# Files read per hashing block: bounded memory for multi-GB model weights.
HASH_BLOCK_BYTES = 1 << 20
# Distinct file versions whose digests a process keeps.
HASH_CACHE_FILES = 4096


@dataclass(frozen=True)
class JudgeArtefact:
    """The files behind one judge, by content."""

    judge: str
    sha256: str
    """Over the sorted file names with their digests, then the remote models' names."""
    files: dict[str, str] = field(default_factory=dict)
    """``<judge>/<part>/<path in the part's folder>`` → the file's SHA-256."""
    remote: list[str] = field(default_factory=list)
    """Models this judge calls but that are not files here: named, not hashed."""

    def to_json(self) -> dict[str, Any]:
        return {
            "judge": self.judge,
            "sha256": self.sha256,
            "files": dict(self.files),
            "remote": list(self.remote),
        }


@functools.lru_cache(maxsize=HASH_CACHE_FILES)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    # Size and mtime are part of the key: a file rewritten in place is read again.
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's content, computed once per process and file version."""
    resolved = Path(path).resolve()
    status = resolved.stat()
    return _digest(str(resolved), status.st_size, status.st_mtime_ns)


def folder_digests(folder: Path, label: str) -> dict[str, str]:
    """``label/<relative path>`` → SHA-256 of every regular file under ``folder``
    (links followed, as the loaders follow them); hidden entries (caches, locks) skipped."""
    found: dict[str, str] = {}
    for path in sorted(Path(folder).rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        found[f"{label}/{relative.as_posix()}"] = file_sha256(path)
    return found


def _lexical_folder() -> Path | None:
    spec = importlib.util.find_spec(LEXICAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / LEXICAL_DATA


def _parts(name: str, policy: JudgesPolicy) -> tuple[dict[str, str], list[str]]:
    """The files (and remote models) of judge ``name`` in ``policy``."""
    settings = policy.judges.get(name)
    if settings is None:
        raise PolicyError(f"no judge named {name!r}; known: {', '.join(sorted(policy.judges))}")
    files: dict[str, str] = {}
    remote: list[str] = []
    if isinstance(settings, EmbeddingJudgeSettings):
        from tuneshield._embedding_judge import resolve_artefact
        from tuneshield._embeddings import embedding_model_dir

        files.update(folder_digests(resolve_artefact(settings.artefact), f"{name}/artefact"))
        files.update(folder_digests(embedding_model_dir(), f"{name}/encoder"))
    elif isinstance(settings, LexicalJudgeSettings):
        folder = _lexical_folder()
        if folder is None:
            remote.append(f"{name}: {LEXICAL_PACKAGE} is not installed")
        else:
            files.update(folder_digests(folder, f"{name}/model"))
    elif isinstance(settings, LLMJudgeSettings):
        backend = settings.backend
        if backend.kind == "openai":
            remote.append(f"{name}: {backend.model} at {backend.base_url}")
        else:
            from tuneshield._models import ModelError, resolve_model

            try:
                model = Path(resolve_model(backend.model))
            except ModelError as error:
                model = None
                remote.append(f"{name}: model {backend.model} ({error})")
            if model is not None and model.is_dir():
                files.update(folder_digests(model, f"{name}/model"))
            elif model is not None:
                remote.append(f"{name}: hub model {model}")
            adapter = Path(backend.adapter).expanduser() if backend.adapter else None
            if adapter is not None and adapter.is_dir():
                files.update(folder_digests(adapter, f"{name}/adapter"))
            elif adapter is not None:
                remote.append(f"{name}: adapter {adapter} (not a folder here)")
    elif isinstance(settings, HateSonarJudgeSettings | ToxicCommentJudgeSettings):
        from tuneshield._eval_judges import MODEL_PACKAGES, model_folder

        found = model_folder(settings.kind)
        if found is None:
            remote.append(f"{name}: {MODEL_PACKAGES[settings.kind]} is not installed")
        else:
            files.update(folder_digests(found, f"{name}/model"))
    elif isinstance(settings, CascadeJudgeSettings | EnsembleJudgeSettings):
        parts = (
            settings.parts
            if isinstance(settings, EnsembleJudgeSettings)
            else (settings.cheap, settings.strong)
        )
        for part in parts:
            part_files, part_remote = _parts(part, policy)
            files.update({f"{name}/{key}": value for key, value in part_files.items()})
            remote.extend(part_remote)
    return files, remote


def judge_artefact(name: str, policy: JudgesPolicy) -> JudgeArtefact:
    """The files judge ``name`` of ``policy`` loads, hashed, and one digest over them."""
    files, remote = _parts(name, policy)
    digest = hashlib.sha256()
    for key in sorted(files):
        digest.update(f"{key} {files[key]}\n".encode())
    for entry in remote:
        digest.update(f"remote {entry}\n".encode())
    return JudgeArtefact(judge=name, sha256=digest.hexdigest(), files=files, remote=remote)
