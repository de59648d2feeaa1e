"""Privacy that reaches training data: PII scrubbed before a snapshot is written, deleted
dialogs purged from every copy the learner made of them, and a retention period.

Who does what. The store is the record: ``DialogStore.erase`` deletes the turns, keeps
their ids in a ``deletions`` row, marks the adapters trained on them and writes the audit
entry, all in one transaction, whoever asks (``DELETE /admin/dialogs``, ``tuneshield
dialogs delete``, the retention job). The copies live in files of the process that made
them: the gateway's dialog journal (the gateway purges its own at once), and the
learner's snapshots and round files under the learner's data dir (the active learner
purges them with ``purge_pending``, a job of its schedule every ``purge_interval_minutes``
and before each round's snapshot). A learner on another machine than the gateway thus
purges its own files, and a deletion made while no learner runs is purged when one starts.
The embedded DuckDB file keeps deleted rows' bytes until it is rewritten, so the purge
then compacts it (``Database.compact``).

PII: a snapshot's texts (``request_messages`` contents and ``reply``) are scrubbed with
Presidio's analyzer (Microsoft, pattern and checksum recognizers: e-mail addresses,
phone numbers through Google's ``phonenumbers``, card numbers with their Luhn check,
IBANs, IP addresses), each finding replaced by ``<ENTITY_TYPE>``. Person names and street
addresses need a named-entity model (spaCy's ``en_core_web_*``), which spaCy does not
publish on PyPI (only unofficial re-uploads are there), so none is installed: the analyzer
runs on a blank spaCy pipeline, and ``PERSON`` or ``LOCATION`` are refused in the policy
rather than silently not found.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from store import DELETION_RETENTION, Database, Deletion, DialogStore, utcnow

if TYPE_CHECKING:
    import pyarrow as pa

logger = logging.getLogger(__name__)

# The audit actor of what the learner deletes and purges on its own.
LEARNER_ACTOR = "learner"
# What replaces a finding: its kind, as Presidio's anonymizer writes it by default.
PLACEHOLDER = "<{}>"
# The entity kinds the offline analyzer finds (pattern recognizers; no NER model).
SUPPORTED_ENTITIES = (
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "CREDIT_CARD",
    "IBAN_CODE",
    "IP_ADDRESS",
    "URL",
    "US_SSN",
    "CRYPTO",
)
# Files a purge rewrites: snapshots, and every JSON-lines or Parquet file of the rounds
# (samples.jsonl, the training launch's copy of it) whose rows carry a turn_id.
SNAPSHOT_GLOB = "*.parquet"
ROUND_GLOBS = ("*.jsonl", "*.parquet")
# One purge at a time per process: the privacy job and a round's snapshot may both start
# one, and two would write the same scratch files.
_PURGING = threading.Lock()


@dataclass(frozen=True)
class PrivacyConfig:
    """policies/learner.yaml, section ``privacy``."""

    retention_days: float | None = field(
        default=None, metadata={"help": "Days a turn is kept (null: no limit)."}
    )
    purge_interval_minutes: float = field(
        default=5.0, metadata={"help": "Minutes between the learner's purge passes."}
    )
    compact_store: bool = field(
        default=True, metadata={"help": "Rewrite the DuckDB file after a purge."}
    )
    scrub_pii: bool = field(default=True, metadata={"help": "Scrub PII from snapshots."})
    pii_entities: tuple[str, ...] = field(
        default=("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE"),
        metadata={"help": "Presidio entity kinds to scrub."},
    )
    pii_min_score: float = field(
        default=0.4, metadata={"help": "Lowest Presidio score that counts as a finding."}
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "pii_entities", tuple(self.pii_entities))
        if self.retention_days is not None and self.retention_days <= 0:
            raise ValueError(f"retention_days must be > 0 or null, got {self.retention_days}")
        if self.purge_interval_minutes <= 0:
            raise ValueError(
                f"purge_interval_minutes must be > 0, got {self.purge_interval_minutes}"
            )
        if not 0 <= self.pii_min_score <= 1:
            raise ValueError(f"pii_min_score must be within [0, 1], got {self.pii_min_score}")
        unknown = sorted(set(self.pii_entities) - set(SUPPORTED_ENTITIES))
        if unknown:
            raise ValueError(
                f"pii_entities: {', '.join(unknown)} not found offline (no NER model); "
                f"known: {', '.join(SUPPORTED_ENTITIES)}"
            )

    def scrubber(self) -> PiiScrubber | None:
        """The scrubber this policy asks for (None: scrubbing is off)."""
        if not self.scrub_pii or not self.pii_entities:
            return None
        return pii_scrubber(self.pii_entities, self.pii_min_score)


# -- PII --------------------------------------------------------------------------------


class PiiScrubber:
    """Presidio's analyzer on a blank spaCy pipeline: its pattern recognizers only."""

    def __init__(self, entities: Sequence[str], min_score: float) -> None:
        # The e-mail recognizer checks domains with tldextract, which would download the
        # public suffix list on first use: no URLs, so it reads its bundled copy offline.
        os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
        import spacy
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import SpacyNlpEngine

        class BlankEnglish(SpacyNlpEngine):
            """Tokens only: what the pattern recognizers need, no model to download."""

            def load(self) -> None:
                # Presidio types the attribute by its initial None.
                self.nlp = {"en": spacy.blank("en")}  # type: ignore[assignment]

        nlp = BlankEnglish(models=[{"lang_code": "en", "model_name": "blank"}])
        nlp.load()
        registry = RecognizerRegistry(supported_languages=["en"])
        # Loading English warns once for every other language's recognizer it skips.
        presidio_log = logging.getLogger("presidio-analyzer")
        level = presidio_log.level
        presidio_log.setLevel(logging.ERROR)
        try:
            registry.load_predefined_recognizers(languages=["en"])
        finally:
            presidio_log.setLevel(level)
        self._analyzer = AnalyzerEngine(
            nlp_engine=nlp, registry=registry, supported_languages=["en"]
        )
        self.entities = list(entities)
        self.min_score = min_score

    def scrub(self, text: str) -> tuple[str, list[str]]:
        """``text`` with each finding replaced by ``<KIND>``, and the kinds found."""
        if not text:
            return text, []
        findings = self._analyzer.analyze(
            text=text, language="en", entities=self.entities, score_threshold=self.min_score
        )
        spans: list[tuple[int, int, str]] = []
        # Longest first at each start; a span inside one already taken is dropped.
        for found in sorted(findings, key=lambda f: (f.start, -(f.end - f.start))):
            if spans and found.start < spans[-1][1]:
                continue
            spans.append((found.start, found.end, found.entity_type))
        out, position = [], 0
        for start, end, kind in spans:
            out.append(text[position:start])
            out.append(PLACEHOLDER.format(kind))
            position = end
        out.append(text[position:])
        return "".join(out), [kind for _, _, kind in spans]


@lru_cache(maxsize=4)
def pii_scrubber(entities: tuple[str, ...], min_score: float) -> PiiScrubber:
    """One scrubber per setting per process (building the analyzer takes a second)."""
    return PiiScrubber(entities, min_score)


def scrub_turns(table: pa.Table, scrubber: PiiScrubber) -> tuple[pa.Table, dict[str, int]]:
    """``table`` (turn rows) with PII scrubbed from ``reply`` and from the text of every
    message in ``request_messages``; and how many findings of each kind.

    A conversation's earlier messages repeat in each of its later rows: each distinct text
    is analysed once.
    """
    import pyarrow as pa

    counts: dict[str, int] = {}
    seen: dict[str, str] = {}

    def clean(text: str) -> str:
        if text not in seen:
            scrubbed, kinds = scrubber.scrub(text)
            seen[text] = scrubbed
            for kind in kinds:
                counts[kind] = counts.get(kind, 0) + 1
        return seen[text]

    replies = [None if r is None else clean(r) for r in table.column("reply").to_pylist()]
    requests = [
        None if raw is None else _scrub_messages(raw, clean)
        for raw in table.column("request_messages").to_pylist()
    ]
    for name, values in (("reply", replies), ("request_messages", requests)):
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, pa.array(values, type=table.schema.field(name).type))
    return table, counts


def _scrub_messages(raw: str, clean: Callable[[str], str]) -> str:
    messages = json.loads(raw)
    if not isinstance(messages, list):
        return raw
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = clean(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    part["text"] = clean(part["text"])
    return json.dumps(messages, ensure_ascii=False)


# -- Purge ------------------------------------------------------------------------------


def purge_files(data_dir: Path, turn_ids: Iterable[str]) -> list[Path]:
    """Rewrite every snapshot and round file under ``data_dir`` that holds a row of
    ``turn_ids``, without those rows; return the files rewritten.

    Each file is replaced whole (written beside it, then renamed over it): a reader sees
    the old file or the new one, never a half-written one.
    """
    from learner.rounds import ROUNDS_FOLDER
    from learner.snapshot import SNAPSHOTS_FOLDER

    ids = set(turn_ids)
    if not ids:
        return []
    paths = sorted((Path(data_dir) / SNAPSHOTS_FOLDER).glob(SNAPSHOT_GLOB))
    rounds = Path(data_dir) / ROUNDS_FOLDER
    for pattern in ROUND_GLOBS:
        paths += sorted(rounds.rglob(pattern))
    return [path for path in paths if _purge_file(path, ids)]


def _purge_file(path: Path, ids: set[str]) -> bool:
    if path.name.startswith("."):
        return False  # a file being written: its writer renames it into place
    scratch = path.with_name(f".{path.name}.purging")
    try:
        if path.suffix == ".parquet":
            changed = _purge_parquet(path, scratch, ids)
        else:
            changed = _purge_jsonl(path, scratch, ids)
        if changed:
            os.replace(scratch, path)
        return changed
    finally:
        scratch.unlink(missing_ok=True)


def _purge_parquet(path: Path, scratch: Path, ids: set[str]) -> bool:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if "turn_id" not in table.column_names:
        return False
    gone = pc.is_in(table["turn_id"], value_set=pa.array(sorted(ids), pa.string()))
    if not pc.any(gone).as_py():
        return False
    pq.write_table(table.filter(pc.invert(gone)), scratch)
    return True


def _purge_jsonl(path: Path, scratch: Path, ids: set[str]) -> bool:
    kept: list[bytes] = []
    changed = False
    for line in path.read_bytes().splitlines(keepends=True):
        try:
            row = json.loads(line)
        except ValueError:
            kept.append(line)
            continue
        if isinstance(row, dict) and row.get("turn_id") in ids:
            changed = True
        else:
            kept.append(line)
    if changed:
        scratch.write_bytes(b"".join(kept))
    return changed


@dataclass(frozen=True)
class PurgeReport:
    """What one purge pass did."""

    deletions: list[str]
    files: list[Path]
    compacted: bool


def purge_pending(
    database: Database, data_dir: Path, *, compact: bool = True, actor: str = LEARNER_ACTOR
) -> PurgeReport:
    """Purge the copies of every deletion not purged yet from the files under
    ``data_dir``, compact the store's file (when ``compact`` and any deletion was
    pending), and record it (``deletions.files_purged_at``, an audit entry naming the
    files)."""
    dialogs = DialogStore(database)
    with _PURGING:
        pending = dialogs.pending_purges()
        if not pending:
            return PurgeReport([], [], False)
        files = purge_files(data_dir, (turn for d in pending for turn in d.turn_ids))
        ids = [deletion.deletion_id for deletion in pending]
        dialogs.record_purge(ids, actor=actor, files=[str(path) for path in files])
        compacted = database.compact() if compact else False
    logger.info(
        "privacy: purged %d deletion(s) from %d file(s)%s",
        len(ids),
        len(files),
        ", store compacted" if compacted else "",
    )
    return PurgeReport(ids, files, compacted)


def apply_retention(database: Database, config: PrivacyConfig) -> Deletion | None:
    """Delete the turns older than the retention period (none: no period, or nothing that
    old); their copies go with the next ``purge_pending``."""
    if config.retention_days is None:
        return None
    cutoff = utcnow() - timedelta(days=config.retention_days)
    deletion = DialogStore(database).erase(
        actor=LEARNER_ACTOR, created_before=cutoff, reason=DELETION_RETENTION, record_empty=False
    )
    if deletion.turns:
        logger.info("privacy: %d turn(s) older than %s deleted", deletion.turns, cutoff)
        return deletion
    return None


def privacy_pass(database: Database, data_dir: Path, config: PrivacyConfig) -> PurgeReport:
    """One pass of the learner's privacy job: retention, then the pending purges."""
    apply_retention(database, config)
    return purge_pending(database, data_dir, compact=config.compact_store)
