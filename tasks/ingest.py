"""Stage 1, ingest/filter: parse every input form, repair encoding, drop what no model should see.

The filters are datatrove pipeline steps run in-process over one ``Document`` per record (a few
hundred to a few hundred thousand records do not need an executor's process start-up). Each
filter's exclusion writer hands what it drops to the stage writer, so the first filter that
drops a record names the reason in the ledger.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters import (
    GopherQualityFilter,
    GopherRepetitionFilter,
    LanguageFilter,
)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.lid import FT176LID
from prefect import task

from data_contracts.config import IngestConfig
from data_contracts.manifest import Manifest
from data_contracts.records import ChatSample
from tasks.assets import ensure_lid_model
from tasks.io import Quarantined, StageWriter, input_digests, iter_input, up_to_date

log = logging.getLogger(__name__)

# C0 controls except tab/newline/carriage return, DEL, and the replacement character that
# marks bytes lost in an earlier bad decode: none of them is recoverable text.
BAD_CHARS = re.compile(r"[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
WORD = re.compile(r"[^\W_]+")
HAS_FTFY = importlib.util.find_spec("ftfy") is not None


def _doc_text(rec: ChatSample) -> str:
    """What the filters judge: the turns' content, without role labels.

    ``joined_text()`` prefixes every turn with "user:"/"assistant:", English words that pull
    short German or Spanish chats towards English in language id and pad word counts.
    """
    return "\n".join(rec.texts())


def _record(doc: Document) -> ChatSample:
    return doc.metadata["record"]


class _ToLedger:
    """A filter's exclusion writer: every document it drops goes to the stage's ledger."""

    def __init__(self, reason: str, writer: StageWriter, rules: Counter[str]) -> None:
        self.reason, self.writer, self.rules = reason, writer, rules

    def __enter__(self) -> "_ToLedger":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, doc: Document, rank: int = 0) -> None:
        details: dict[str, Any] = dict(doc.metadata.get("drop_details", {}))
        if rule := doc.metadata.get("filter_reason"):
            details["rule"] = rule
            self.rules[f"{self.reason}.{rule}"] += 1
        if self.reason == "language":
            details["language"] = doc.metadata.get("language")
            details["score"] = round(float(doc.metadata.get("language_score", 0.0)), 4)
        self.writer.drop(_record(doc), reason=self.reason, **details)


class RepairEncoding(PipelineStep):
    """Fix mojibake (``donâ€™t`` -> ``don’t``) in every turn with ftfy, keeping quotes as typed."""

    name = "ftfy repair"
    type = "✂️ - FORMAT"
    _requires_dependencies = ["ftfy"]

    def __init__(self) -> None:
        super().__init__()
        import ftfy

        self.repaired = 0
        # datatrove's FTFYFormatter defaults (encoding fixes only, no normalisation), minus
        # HTML unescaping: support chats quote markup on purpose.
        self._fix = ftfy.fix_text
        self._config = ftfy.TextFixerConfig(
            unescape_html=False, fix_latin_ligatures=False, fix_character_width=False,
            uncurl_quotes=False, fix_line_breaks=False, normalization=None)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            rec = _record(doc)
            texts = rec.texts()
            fixed = [self._fix(t, self._config) for t in texts]
            if fixed != texts:
                rec = rec.with_texts(fixed)
                rec.meta["encoding_repaired"] = True
                doc.metadata["record"], doc.text = rec, _doc_text(rec)
                self.repaired += 1
                self.stat_update("repaired")
            yield doc


class EncodingFilter(BaseFilter):
    """Drop text that still holds replacement or control characters after repair."""

    name = "encoding"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        bad = BAD_CHARS.search(doc.text)
        if bad is None:
            return True
        doc.metadata["drop_details"] = {"char": f"U+{ord(bad.group()):04X}"}
        return False, "replacement_char" if bad.group() == "\ufffd" else "control_char"


class MinWordsFilter(BaseFilter):
    """Drop records with fewer than ``min_words`` words (tokens with a letter or digit)."""

    name = "min_words"

    def __init__(self, min_words: int) -> None:
        super().__init__()
        self.min_words = min_words

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        n = len(WORD.findall(doc.text))
        if n >= self.min_words:
            return True
        doc.metadata["drop_details"] = {"words": n}
        return False, "too_few_words"


class MaxCharsFilter(BaseFilter):
    """Drop records longer than ``max_chars`` (pasted logs, whole documents in one turn)."""

    name = "max_chars"

    def __init__(self, max_chars: int) -> None:
        super().__init__()
        self.max_chars = max_chars

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if len(doc.text) <= self.max_chars:
            return True
        doc.metadata["drop_details"] = {"chars": len(doc.text)}
        return False, "too_long"


class RefusalFilter(BaseFilter):
    """Drop chats whose assistant turns refuse ("I cannot help with that")."""

    name = "refusal"

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p, re.IGNORECASE) for p in patterns]

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        rec = _record(doc)
        # Only the assistant refuses: a user quoting a refusal is not one.
        answers = [m.content for m in rec.messages if m.role == "assistant"] or rec.texts()
        for i, pattern in enumerate(self.patterns):
            if any(pattern.search(a) for a in answers):
                doc.metadata["drop_details"] = {"pattern": pattern.pattern}
                return False, f"pattern_{i}"
        return True


@lru_cache(maxsize=4)
def _load_fasttext(path: str) -> Any:
    from fasttext.FastText import _FastText  # what datatrove loads, minus its download

    return _FastText(path)


class LocalFT176LID(FT176LID):
    """fastText lid.176 from a local file: datatrove's FT176LID downloads lid.176.bin."""

    def __init__(self, model_path: str | Path, languages: list[str] | None = None) -> None:
        super().__init__(languages)
        self.model_path = str(model_path)

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = _load_fasttext(self.model_path)
        return self._model


class LocalLanguageFilter(LanguageFilter):
    """datatrove's LanguageFilter on a local lid.176 model (works offline)."""

    name = "language"

    def __init__(self, model_path: str | Path, languages: list[str] | None,
                 language_threshold: float) -> None:
        super().__init__(languages=languages, language_threshold=language_threshold)
        self.model = LocalFT176LID(model_path, languages)
        self.seen: Counter[str] = Counter()  # top language of every record scored

    def filter(self, doc: Document) -> bool:
        keep = super().filter(doc)
        self.seen[doc.metadata["language"]] += 1
        return keep


def resolve_lid_model(cfg: IngestConfig, home: str | Path) -> Path:
    """The language-id model: cfg.lid_model if set, else <home>/assets/lid.176.ftz (fetched)."""
    if cfg.lid_model:
        path = Path(cfg.lid_model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"ingest.lid_model: no such file: {path}")
        return path
    return ensure_lid_model(home)


def build_filters(cfg: IngestConfig, home: str | Path) -> list[BaseFilter]:
    """The filter steps in the order they run, from the stage's config."""
    # Gopher's stop-word list is English: with other languages wanted it would drop them all.
    english_only = cfg.languages == ["en"]
    steps: list[BaseFilter] = [EncodingFilter(), MinWordsFilter(cfg.min_words),
                               MaxCharsFilter(cfg.max_chars)]
    steps.append(LocalLanguageFilter(resolve_lid_model(cfg, home), cfg.languages or None,
                                     cfg.language_threshold))
    if cfg.gopher_quality:
        steps.append(GopherQualityFilter(
            min_doc_words=cfg.gopher_min_doc_words,
            max_doc_words=None,  # max_chars bounds length
            max_non_alpha_words_ratio=cfg.gopher_min_alpha_words_ratio,
            min_stop_words=cfg.gopher_min_stop_words if english_only else None,
        ))
    if cfg.gopher_repetition:
        frac = cfg.repetition_top_ngram_frac
        steps.append(GopherRepetitionFilter(
            dup_line_frac=cfg.repetition_dup_line_frac,
            # Chats repeat the product's words in question and answer; a short exchange hits
            # Gopher's web thresholds (0.20/0.18/0.16) by accident, so the top-n-gram bar moves.
            top_n_grams=((2, frac), (3, max(frac - 0.02, 0.01)), (4, max(frac - 0.04, 0.01))),
        ))
    if cfg.refusal_filter:
        steps.append(RefusalFilter(cfg.refusal_patterns))
    return steps


REASONS = {
    EncodingFilter: "encoding", MinWordsFilter: "min_words", MaxCharsFilter: "max_chars",
    LocalLanguageFilter: "language", GopherQualityFilter: "gopher_quality",
    GopherRepetitionFilter: "gopher_repetition", RefusalFilter: "refusal",
}


def _documents(inputs: str | Path | list[str], writer: StageWriter,
               seen: Counter[str]) -> Iterator[Document]:
    """One Document per parsed record; unparseable inputs go straight to quarantine."""
    for item in iter_input(inputs):
        seen["records_in"] += 1
        if isinstance(item, Quarantined):
            writer.quarantine(item)
            continue
        yield Document(text=_doc_text(item), id=item.id, metadata={"record": item})


def _kept_record(doc: Document) -> ChatSample:
    rec = _record(doc)
    if lang := doc.metadata.get("language"):
        rec.meta["language"] = lang
        rec.meta["language_score"] = round(float(doc.metadata["language_score"]), 4)
    return rec


def _metrics(steps: list[PipelineStep], rules: Counter[str]) -> dict[str, float]:
    """Language distribution of the records scored, sub-rule drop counts, repairs."""
    metrics: dict[str, float] = {}
    for step in steps:
        if isinstance(step, LocalLanguageFilter):
            metrics.update({f"language.{k}": float(v) for k, v in sorted(step.seen.items())})
        if isinstance(step, RepairEncoding):
            metrics["encoding_repaired"] = float(step.repaired)
    metrics.update({f"rule.{k}": float(v) for k, v in sorted(rules.items())})
    return metrics


def run_ingest(input_path: str | Path | list[str], out_dir: str | Path, cfg: IngestConfig, *,
               home: str | Path) -> Manifest:
    """Parse raw inputs into ChatSamples, repair encoding and filter; every record accounted."""
    digests, cdig = input_digests(input_path), cfg.digest()
    if up_to_date(out_dir, digests, cdig):
        log.info("ingest: %s is up to date, skipping", out_dir)
        return Manifest.read(out_dir)
    writer = StageWriter(out_dir, "ingest")
    rules: Counter[str] = Counter()
    filters = build_filters(cfg, home)
    for step in filters:
        step.exclusion_writer = _ToLedger(REASONS[type(step)], writer, rules)
    steps: list[PipelineStep] = list(filters)
    if cfg.repair_encoding and HAS_FTFY:
        steps.insert(0, RepairEncoding())
    seen: Counter[str] = Counter()
    docs: DocumentsPipeline = _documents(input_path, writer, seen)
    for step in steps:
        docs = step.run(docs)
    for doc in docs:
        writer.keep(_kept_record(doc))
    metrics = _metrics(steps, rules)
    repair = "ftfy" if isinstance(steps[0], RepairEncoding) else "off"
    info = {"filters": [REASONS[type(f)] for f in filters], "encoding_repair": repair}
    manifest = writer.finish(seen["records_in"], input_digests=digests, config_digest=cdig,
                             metrics=metrics, info=info)
    log.info("ingest: %d in, %d kept, filtered %s, %d quarantined", manifest.records_in,
             manifest.kept, manifest.filtered, manifest.quarantined)
    return manifest


ingest_task = task(name="ingest", retries=2, retry_delay_seconds=[2, 10], tags=["ftflow"])(
    run_ingest)
