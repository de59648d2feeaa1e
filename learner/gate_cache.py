"""Gate evaluations kept between rounds, so a round evaluates only its candidate.

The gates compare a candidate with the active version and the alias's version 0
(``learner.gates``). Those references rarely change between rounds, and their evaluation
is deterministic given what ``GateEvaluationKey`` holds: the version and the SHA-256 of
its files, the gate probe file, every evaluation setting (the gates' probes per kind,
samples per probe, reply length, perplexity dialogs, seed, sampling, judge and threshold),
the evaluation judge's files, the canned replies that count as unhelpful, the base model,
and the stored shape's version. One file per entry, ``DATA_DIR/gate-evaluations/<key
digest>.json``, written atomically: the worker subprocess reads and writes it without
the database (the gateway owns that), and an entry is a plain file an operator can
delete to force a re-evaluation. Registry folders never change, but their files are
hashed anyway: a hand-edited or restored folder must not reuse an old figure. The folder
keeps at most ``cache_entries`` (policies/gates.yaml): storing one removes the least
recently used beyond that (a reused entry counts as used), so references that keep
changing do not fill the disk.

An entry that does not decode, or whose key is not the one asked for, is ignored with a
warning and re-evaluated: never trusted. The candidate's evaluation is stored by the
learner once the candidate is registered (only then does it have a version name), so the
next round, where it is the active version, reuses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from learner.gates import IN_PROCESS, METRICS, SHARE_MARGINS
from tuneshield import GATE_PROBES_FILE, file_sha256, folder_digests, judge_artefact

if TYPE_CHECKING:
    from learner.contracts import RoundSettings

# Folder of the data dir that holds the entries.
CACHE_FOLDER = "gate-evaluations"
# 1: the first stored shape (key, run id, the tuneshield.evaluate result).
GATE_EVALUATION_VERSION = 2  # 1: before replies could be sampled on the engine

logger = logging.getLogger("learner.gate_cache")


class GateEvaluationKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Everything a gate evaluation's outcome depends on."""

    version: int = GATE_EVALUATION_VERSION
    """The stored shape's version: another shape is never reused."""
    adapter_version: str | None
    """The registered version (None: the bare base model)."""
    adapter_sha256: str | None
    """Over the adapter folder's file names and digests (None: no adapter)."""
    probes_sha256: str
    """The gate probe file (tuneshield/data/gate_probes.jsonl)."""
    probes_per_kind: dict[str, int]
    """Probes of each kind the power asks for (``GatesConfig.probes``)."""
    evaluation: dict[str, Any]
    """The evaluation settings (``RoundSettings.gate_evaluation``): samples per probe,
    reply length, perplexity dialogs, seed, sampling, judge and threshold."""
    judge_sha256: str
    """The evaluation judge's files (``tuneshield.judge_artefact``)."""
    canned_replies_sha256: str
    """The canned replies that count as unhelpful."""
    base_model: str
    inference: str
    """Where the replies were sampled (``in_process`` fp32, or ``engine``: vLLM in its dtype)."""

    def digest(self) -> str:
        return hashlib.sha256(msgspec.json.encode(self)).hexdigest()


class GateEvaluationEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One stored evaluation: the key it answers, the run that evaluated it, the result."""

    version: int = GATE_EVALUATION_VERSION
    key: GateEvaluationKey
    run_id: str
    evaluation: dict[str, Any]
    """As ``tuneshield.evaluate`` returned it (NaN as null)."""


def _text_sha256(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def adapter_sha256(adapter: Path | None) -> str | None:
    """One digest over an adapter folder's files (None: no adapter)."""
    if adapter is None:
        return None
    files = folder_digests(Path(adapter), "adapter")
    return _text_sha256([f"{name} {digest}" for name, digest in sorted(files.items())])


class GateCache:
    """The entries of one folder, keyed by what the round's settings make of them."""

    def __init__(
        self,
        folder: Path,
        settings: RoundSettings,
        base_model: str | Path,
        inference: str = IN_PROCESS,
    ) -> None:
        if settings.gates is None:
            raise ValueError("the round skips the gates: there is no gate evaluation to cache")
        self.folder = Path(folder)
        self.max_entries = settings.gates.cache_entries
        evaluation = settings.gate_evaluation()
        # Every part of the key but the adapter's, computed once per round.
        self._common: dict[str, Any] = {
            "probes_sha256": file_sha256(GATE_PROBES_FILE),
            "probes_per_kind": {
                METRICS[metric][0]: settings.gates.probes(metric) for metric in SHARE_MARGINS
            },
            "evaluation": msgspec.to_builtins(evaluation),
            "judge_sha256": judge_artefact(evaluation.judge, settings.judges_policy()).sha256,
            "canned_replies_sha256": _text_sha256(list(settings.healing.canned_replies)),
            "base_model": str(base_model),
            "inference": inference,
        }

    def key(self, version: str | None, adapter: Path | None) -> GateEvaluationKey:
        return GateEvaluationKey(
            adapter_version=version, adapter_sha256=adapter_sha256(adapter), **self._common
        )

    def path(self, key: GateEvaluationKey) -> Path:
        return self.folder / f"{key.digest()}.json"

    def load(self, key: GateEvaluationKey) -> GateEvaluationEntry | None:
        """The entry stored for ``key``; None (with a warning if one is there but does not
        decode or answers another key) when it must be evaluated."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            entry = msgspec.json.decode(path.read_bytes(), type=GateEvaluationEntry, strict=True)
        except (msgspec.DecodeError, OSError) as error:
            logger.warning("gate evaluation %s is unreadable, evaluating again: %s", path, error)
            return None
        if entry.version != GATE_EVALUATION_VERSION or entry.key != key:
            logger.warning(
                "gate evaluation %s answers another key (version %s, adapter %s), evaluating again",
                path,
                entry.version,
                entry.key.adapter_version,
            )
            return None
        with contextlib.suppress(OSError):  # a read-only folder still serves its entries
            os.utime(path)  # used now: the last entry pruning removes
        return entry

    def store(self, key: GateEvaluationKey, run_id: str, evaluation: dict[str, Any]) -> Path | None:
        """Write an entry atomically (a reader sees all of it or none); return its path.

        None, with a warning, when it cannot be written: a missing entry costs the next
        round an evaluation, never this round its verdict."""
        path = self.path(key)
        entry = GateEvaluationEntry(key=key, run_id=run_id, evaluation=evaluation)
        # A scratch name of its own: two rounds storing one key never share a scratch file.
        scratch = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            scratch.write_bytes(msgspec.json.encode(entry))
            scratch.replace(path)
        except OSError as error:
            logger.warning("gate evaluation %s not kept: %s", path, error)
            with contextlib.suppress(OSError):
                scratch.unlink(missing_ok=True)
            return None
        self._prune(keep=path)
        return path

    def _prune(self, keep: Path) -> None:
        """Remove the least recently used entries beyond ``max_entries``, never ``keep``
        (the one just stored, whatever its clock says).

        Rounds run one at a time (one leader), so an entry is not read while this runs;
        if one were, the cost is evaluating it again. A folder that cannot be listed
        costs the pruning, never the round."""
        entries: list[tuple[float, Path]] = []
        try:
            for entry in self.folder.glob("*.json"):
                if entry != keep:
                    with contextlib.suppress(OSError):  # gone since it was listed
                        entries.append((entry.stat().st_mtime, entry))
        except OSError as error:
            logger.warning("gate evaluations in %s not pruned: %s", self.folder, error)
            return
        entries.sort(reverse=True)
        for _, stale in entries[self.max_entries - 1 :]:
            try:
                stale.unlink(missing_ok=True)
            except OSError as error:
                logger.warning("gate evaluation %s not removed: %s", stale, error)
            else:
                logger.info("gate evaluation %s removed (least recently used)", stale)


def store_registered(
    folder: Path,
    settings: RoundSettings,
    base_model: str | Path,
    *,
    version: str,
    adapter: Path,
    run_id: str,
    evaluation: dict[str, Any],
) -> Path | None:
    """Keep a candidate's evaluation under the version it was registered as (its files
    were moved, not changed), so the round where it is the active version reuses it."""
    try:
        inference = str(evaluation.get("inference", IN_PROCESS))
        cache = GateCache(folder, settings, base_model, inference)
        key = cache.key(version, adapter)
    except (OSError, ValueError) as error:  # a file to hash gone, a judge not found
        # The version is registered either way: only the next round's reuse is lost.
        logger.warning("gate evaluation of %s not kept: %s", version, error)
        return None
    path = cache.store(key, run_id, evaluation)
    if path is not None:
        logger.info("gate evaluation of %s (run %s) kept: %s", version, run_id, path)
    return path
