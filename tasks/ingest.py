"""Stage 1, ingest/filter: parse every input form, repair encoding, drop what no model should see.

The filters are datatrove pipeline steps run in-process over one ``Document`` per record (a few
hundred to a few hundred thousand records do not need an executor's process start-up). Each
filter's exclusion writer hands what it drops to the stage writer, so the first filter that
drops a record names the reason in the ledger.

Preference pairs are judged as training will use them: the text filters (words, language,
Gopher, quality) read the prompt + chosen reply, the refusal filter reads the chosen reply only
(a refused ``rejected`` is what a pair is for), and encoding repair and checks cover every text.
"""

from __future__ import annotations

import hashlib
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
from datatrove.utils.word_tokenizers import SpaCyTokenizer, strip_strings

from data_contracts.config import ConfigError, IngestConfig
from data_contracts.manifest import Manifest
from data_contracts.records import ChatSample, Message
from tasks.assets import ensure_lid_model
from tasks.base_model import resolve_base_model
from tasks.io import DEFAULT_LIMITS, Quarantined, ReadLimits, file_digest, iter_input
from tasks.stage_dir import StageDir, StageWriter
from tasks.quality import QualityModel

log = logging.getLogger(__name__)

# C0 controls except tab/newline/carriage return, DEL, and the replacement character that
# marks bytes lost in an earlier bad decode: none of them is recoverable text.
BAD_CHARS = re.compile(r"[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
WORD = re.compile(r"[^\W_]+")
HAS_FTFY = importlib.util.find_spec("ftfy") is not None


def _doc_text(rec: ChatSample) -> str:
    """What the filters judge: the turns' content (a pair's prompt + chosen), without roles.

    ``joined_text()`` prefixes every turn with "user:"/"assistant:", English words that pull
    short German or Spanish chats towards English in language id and pad word counts.
    """
    if not rec.messages:
        return rec.text or ""
    return "\n".join(m.content for m in rec.conversation())


def _views(rec: ChatSample) -> list[list[Message]]:
    """The conversations training sees: the chat, or a pair's prompt with each of its replies."""
    if rec.chosen is None:
        return [list(rec.messages)]
    rejected = Message(role="assistant", content=rec.rejected or "")
    return [rec.conversation(), [*rec.messages, rejected]]


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
    """Drop text that still holds replacement or control characters after repair.

    Every text counts, a pair's rejected reply too: DPO trains on it as much as on chosen.
    """

    name = "encoding"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        bad = BAD_CHARS.search("\n".join(_record(doc).texts()))
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
    """Drop records longer than ``max_chars`` (pasted logs, whole documents in one turn).

    A pair counts its prompt with the longer of its two replies.
    """

    name = "max_chars"

    def __init__(self, max_chars: int) -> None:
        super().__init__()
        self.max_chars = max_chars

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        rec = _record(doc)
        chars = len(doc.text) if rec.chosen is None else max(
            len("\n".join(m.content for m in view)) for view in _views(rec))
        if chars <= self.max_chars:
            return True
        doc.metadata["drop_details"] = {"chars": chars}
        return False, "too_long"


class TokenLengthFilter(BaseFilter):
    """Drop records outside [min_tokens, max_tokens] tokens of the base model's tokenizer.

    Tokens are counted on the record as training renders it: the chat template over the
    conversation (a pair: prompt + chosen for the lower bound, the longer of prompt + chosen
    and prompt + rejected for the upper one), plain text with the tokenizer's special tokens,
    or the turns joined by newlines when the tokenizer has no chat template. A batch of
    records is tokenized in one call of the fast tokenizer.
    """

    name = "token_length"

    def __init__(self, tokenizer: Any, min_tokens: int, max_tokens: int,
                 batch_size: int = 256) -> None:
        super().__init__(batch_size=batch_size)
        self.tokenizer, self.min_tokens, self.max_tokens = tokenizer, min_tokens, max_tokens
        self.counted: list[int] = []  # tokens of every record scored (for the stage metrics)

    def _render(self, messages: list[Message]) -> tuple[str, bool]:
        """The string to tokenize and whether it still needs the tokenizer's special tokens."""
        from jinja2 import TemplateError

        if self.tokenizer.chat_template:
            try:
                return self.tokenizer.apply_chat_template(
                    [m.model_dump() for m in messages], tokenize=False), False
            except TemplateError:  # e.g. a template that rejects system turns: count the text
                self.stat_update("template_error")
        return "\n".join(m.content for m in messages), True

    def count(self, records: list[ChatSample]) -> list[list[int]]:
        """Token counts of each record's views (see ``_views``; a text record has one)."""
        pieces: list[tuple[int, int, str, bool]] = []  # record, view, string, add specials
        for i, rec in enumerate(records):
            if not rec.messages:
                pieces.append((i, 0, rec.text or "", True))
            else:
                pieces += [(i, j, *self._render(view)) for j, view in enumerate(_views(rec))]
        counts = [[0] * (1 if not rec.messages else len(_views(rec))) for rec in records]
        for specials in (True, False):
            group = [p for p in pieces if p[3] == specials]
            if not group:
                continue
            # verbose=False: a record over model_max_length is counted, not fed to the model.
            ids = self.tokenizer([p[2] for p in group], add_special_tokens=specials,
                                 verbose=False)["input_ids"]
            for (i, j, _, _), tokens in zip(group, ids):
                counts[i][j] = len(tokens)
        return counts

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        results: list[bool | tuple[bool, str]] = []
        for doc, views in zip(batch, self.count([_record(d) for d in batch])):
            # views[0] is the chat itself or prompt + chosen: the short side of a pair's bound.
            shortest, longest = views[0], max(views)
            self.counted.append(longest)
            doc.metadata["tokens"] = longest
            if self.min_tokens and shortest < self.min_tokens:
                doc.metadata["drop_details"] = {"tokens": shortest, "bound": self.min_tokens}
                results.append((False, "too_few_tokens"))
            elif self.max_tokens and longest > self.max_tokens:
                doc.metadata["drop_details"] = {"tokens": longest, "bound": self.max_tokens}
                results.append((False, "too_many_tokens"))
            else:
                results.append(True)
        return results

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return self.filter_batch([doc])[0]


class RefusalFilter(BaseFilter):
    """Drop chats whose assistant turns refuse ("I cannot help with that")."""

    name = "refusal"

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p, re.IGNORECASE) for p in patterns]

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        rec = _record(doc)
        # Only the assistant refuses: a user quoting a refusal is not one. A pair is judged on
        # chosen alone: a refusal as the rejected reply is a normal (and wanted) pair.
        if rec.chosen is not None:
            answers = [rec.chosen]
        else:
            answers = [m.content for m in rec.messages if m.role == "assistant"] or rec.texts()
        for i, pattern in enumerate(self.patterns):
            if any(pattern.search(a) for a in answers):
                doc.metadata["drop_details"] = {"pattern": pattern.pattern}
                return False, f"pattern_{i}"
        return True


class QualityFilter(BaseFilter):
    """Drop records the user's quality classifier scores below ``threshold`` P(good)."""

    name = "low_quality"

    def __init__(self, model: QualityModel, threshold: float, batch_size: int = 256) -> None:
        super().__init__(batch_size=batch_size)
        self.model, self.threshold = model, threshold
        self.scored: list[float] = []

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        results: list[bool | tuple[bool, str]] = []
        for doc, p_good in zip(batch, self.model.p_good(_record(d) for d in batch)):
            self.scored.append(p_good)
            doc.metadata["p_good"] = p_good
            if p_good >= self.threshold:
                results.append(True)
            else:
                doc.metadata["drop_details"] = {"p_good": round(p_good, 4)}
                results.append(False)
        return results

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return self.filter_batch([doc])[0]


class CachedWordTokenizer(SpaCyTokenizer):
    """datatrove's spaCy word tokenizer (the same tokens) with spaCy's lexeme cache kept.

    datatrove tokenizes each text inside ``memory_zone()``, so every word's lexeme is built
    again for every record: the Gopher filters then spend ~80% of ingest's time in spaCy. Here
    lexemes stay cached, and the pipeline is rebuilt once the vocabulary passes
    ``max_lexemes``, which bounds memory as the zone did (a corpus of IDs and numbers adds
    lexemes without end).
    """

    def __init__(self, language: str = "en", max_lexemes: int = 200_000) -> None:
        super().__init__(language)
        self.max_lexemes = max_lexemes

    def word_tokenize(self, text: str) -> list[str]:
        if self._tokenizer is not None and len(self._tokenizer.vocab) > self.max_lexemes:
            self._tokenizer = None  # a fresh vocabulary (the property rebuilds it)
        nlp = self.tokenizer
        nlp.max_length = len(text) + 10
        return strip_strings([token.text for token in nlp.make_doc(text)])


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


def _tokenizer_name(cfg: IngestConfig, base_model: str) -> str:
    """The tokenizer the token-length bounds count with ("" when they are off)."""
    if not (cfg.min_tokens or cfg.max_tokens):
        return ""
    name = cfg.tokenizer or base_model
    if not name:
        raise ConfigError("ingest.min_tokens/max_tokens need a tokenizer: set ingest.tokenizer "
                          "(the pipeline passes train.base_model when it is empty)")
    return name


def load_tokenizer(name: str, home: str | Path, trust_remote_code: bool = False) -> Any:
    """The base model's tokenizer: a hub id, a local folder, or builtin:* (built on first use)."""
    from transformers import AutoTokenizer

    path = resolve_base_model(name, home)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def resolve_quality_model(cfg: IngestConfig) -> Path | None:
    """cfg.quality_model as an existing file, or None when the quality filter is off."""
    if not cfg.quality_model:
        return None
    path = Path(cfg.quality_model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ingest.quality_model: no such file: {path}")
    return path


def build_filters(cfg: IngestConfig, home: str | Path, base_model: str = "",
                  trust_remote_code: bool = False) -> list[BaseFilter]:
    """The filter steps in the order they run, from the stage's config."""
    # Gopher's stop-word list is English: with other languages wanted it would drop them all.
    english_only = cfg.languages == ["en"]
    steps: list[BaseFilter] = [EncodingFilter(), MinWordsFilter(cfg.min_words),
                               MaxCharsFilter(cfg.max_chars)]
    if tokenizer := _tokenizer_name(cfg, base_model):
        steps.append(TokenLengthFilter(load_tokenizer(tokenizer, home, trust_remote_code),
                                       cfg.min_tokens, cfg.max_tokens))
    steps.append(LocalLanguageFilter(resolve_lid_model(cfg, home), cfg.languages or None,
                                     cfg.language_threshold))
    words = CachedWordTokenizer("en")  # datatrove's English word splitting, shared by both
    if cfg.gopher_quality:
        steps.append(GopherQualityFilter(
            min_doc_words=cfg.gopher_min_doc_words,
            max_doc_words=None,  # max_chars bounds length
            max_non_alpha_words_ratio=cfg.gopher_min_alpha_words_ratio,
            min_stop_words=cfg.gopher_min_stop_words if english_only else None,
            language=words,
        ))
    if cfg.gopher_repetition:
        frac = cfg.repetition_top_ngram_frac
        steps.append(GopherRepetitionFilter(
            dup_line_frac=cfg.repetition_dup_line_frac,
            # Chats repeat the product's words in question and answer; a short exchange hits
            # Gopher's web thresholds (0.20/0.18/0.16) by accident, so the top-n-gram bar moves.
            top_n_grams=((2, frac), (3, max(frac - 0.02, 0.01)), (4, max(frac - 0.04, 0.01))),
            language=words,
        ))
    if cfg.refusal_filter:
        steps.append(RefusalFilter(cfg.refusal_patterns))
    if quality := resolve_quality_model(cfg):
        steps.append(QualityFilter(QualityModel(quality), cfg.quality_threshold))
    return steps


REASONS = {
    EncodingFilter: "encoding", MinWordsFilter: "min_words", MaxCharsFilter: "max_chars",
    TokenLengthFilter: "token_length", LocalLanguageFilter: "language",
    GopherQualityFilter: "gopher_quality", GopherRepetitionFilter: "gopher_repetition",
    RefusalFilter: "refusal", QualityFilter: "low_quality",
}


def _documents(inputs: str | Path | list[str], writer: StageWriter,
               seen: Counter[str], limits: ReadLimits = DEFAULT_LIMITS) -> Iterator[Document]:
    """One Document per parsed record; unparseable inputs go straight to quarantine."""
    for item in iter_input(inputs, limits):
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
    if "tokens" in doc.metadata:
        rec.meta["tokens"] = doc.metadata["tokens"]
    if "p_good" in doc.metadata:
        rec.meta["quality_p_good"] = round(doc.metadata["p_good"], 4)
    return rec


def _metrics(steps: list[PipelineStep], rules: Counter[str]) -> dict[str, float]:
    """Language distribution of the records scored, sub-rule drop counts, repairs."""
    metrics: dict[str, float] = {}
    for step in steps:
        if isinstance(step, LocalLanguageFilter):
            metrics.update({f"language.{k}": float(v) for k, v in sorted(step.seen.items())})
        if isinstance(step, RepairEncoding):
            metrics["encoding_repaired"] = float(step.repaired)
        if isinstance(step, TokenLengthFilter) and step.counted:
            metrics["tokens.mean"] = round(sum(step.counted) / len(step.counted), 2)
            metrics["tokens.max"] = float(max(step.counted))
        if isinstance(step, QualityFilter) and step.scored:
            metrics["quality.p_good_mean"] = round(sum(step.scored) / len(step.scored), 4)
    metrics.update({f"rule.{k}": float(v) for k, v in sorted(rules.items())})
    return metrics


def _config_digest(cfg: IngestConfig, tokenizer: str) -> str:
    """The section's digest, plus what it names but does not hold: the tokenizer it falls back
    to and the quality model's bytes (a model retrained in place must rerun the stage)."""
    extra = []
    if tokenizer:
        extra.append(f"tokenizer={tokenizer}")
    if quality := resolve_quality_model(cfg):
        extra.append(f"quality_model={file_digest(str(quality))}")
    if not extra:
        return cfg.digest()
    return hashlib.sha256("|".join([cfg.digest(), *extra]).encode()).hexdigest()[:16]


def run_ingest(input_path: str | Path | list[str], out_dir: str | Path, cfg: IngestConfig, *,
               home: str | Path, base_model: str = "",
               trust_remote_code: bool = False) -> Manifest:
    """Parse raw inputs into ChatSamples, repair encoding and filter; every record accounted.

    ``base_model`` (the run's train.base_model) is the tokenizer the token-length bounds use
    when ``cfg.tokenizer`` is empty; ``trust_remote_code`` is the run's train setting.
    """
    tokenizer = _tokenizer_name(cfg, base_model)
    stage = StageDir(out_dir, "ingest", _config_digest(cfg, tokenizer), input_path)
    if (done := stage.finished()) is not None:
        return done
    writer = stage.writer()
    rules: Counter[str] = Counter()
    filters = build_filters(cfg, home, base_model, trust_remote_code)
    for step in filters:
        step.exclusion_writer = _ToLedger(REASONS[type(step)], writer, rules)
    steps: list[PipelineStep] = list(filters)
    if cfg.repair_encoding and HAS_FTFY:
        steps.insert(0, RepairEncoding())
    seen: Counter[str] = Counter()
    limits = ReadLimits(cfg.max_record_bytes, cfg.max_decompression_ratio)
    docs: DocumentsPipeline = _documents(input_path, writer, seen, limits)
    for step in steps:
        docs = step.run(docs)
    for doc in docs:
        writer.keep(_kept_record(doc))
    metrics = _metrics(steps, rules)
    repair = "ftfy" if isinstance(steps[0], RepairEncoding) else "off"
    info: dict[str, Any] = {"filters": [REASONS[type(f)] for f in filters],
                            "encoding_repair": repair}
    if tokenizer:
        info["tokenizer"] = tokenizer
    if cfg.quality_model:
        info["quality_model"] = str(resolve_quality_model(cfg))
    manifest = writer.finish(seen["records_in"], metrics=metrics, info=info)
    log.info("ingest: %d in, %d kept, filtered %s, %d quarantined", manifest.records_in,
             manifest.kept, manifest.filtered, manifest.quarantined)
    return manifest
