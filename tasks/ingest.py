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

import contextlib
import functools
import hashlib
import importlib.util
import logging
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters import LanguageFilter
from datatrove.pipeline.filters.base_filter import BaseFilter, get_filter_result
from datatrove.utils.lid import FT176LID

from data_contracts.config import ConfigError, IngestConfig
from data_contracts.manifest import Manifest
from data_contracts.records import ChatSample, Message
from tasks.assets import ensure_lid_model
from tasks.base_model import resolve_base_model
from tasks.parallel import pool_or_here, worker_count
from tasks.io import DEFAULT_LIMITS, Quarantined, ReadLimits, file_digest, iter_input
from tasks.stage_dir import StageDir, StageWriter
from tasks.words import (
    FastGopherQualityFilter,
    FastGopherRepetitionFilter,
    RunCachedWordTokenizer,
)
from tasks.prose import (
    ChatGopherQualityFilter,
    ChatGopherRepetitionFilter,
    FullText,
    ProseOnly,
    short_english,
)
from tasks.quality import QualityModel

log = logging.getLogger(__name__)

# C0 controls except tab/newline/carriage return, DEL, and the replacement character that
# marks bytes lost in an earlier bad decode: none of them is recoverable text.
BAD_CHARS = re.compile(r"[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Text ftfy leaves as it is under RepairEncoding's settings: printable ASCII, tab and line
# breaks (no mojibake, C1 control, surrogate, terminal escape or control character to fix).
NOT_PLAIN_ASCII = re.compile(r"[^\t\n\r\x20-\x7e]")
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


# A record's verdict: kept (the record, with what the filters learned in its meta) or dropped
# (the filter's reason, its details, the sub-rule if any, the record as the filters saw it).
Dropped = tuple[str, dict[str, Any], str | None, ChatSample]
Verdict = ChatSample | Dropped


class _Collect:
    """A filter's exclusion writer: every document it drops becomes that record's verdict."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.drops: dict[int, Dropped] = {}

    def __enter__(self) -> "_Collect":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, doc: Document, rank: int = 0) -> None:
        details: dict[str, Any] = dict(doc.metadata.get("drop_details", {}))
        rule = doc.metadata.get("filter_reason")
        if rule:
            details["rule"] = rule
        if self.reason == "language":
            details["language"] = doc.metadata.get("language")
            details["score"] = round(float(doc.metadata.get("language_score", 0.0)), 4)
        self.drops[doc.metadata["i"]] = (self.reason, details, rule, _record(doc))


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
            fixed = [t if NOT_PLAIN_ASCII.search(t) is None else self._fix(t, self._config)
                     for t in texts]
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
    """Drop records with fewer than ``min_words`` words (tokens with a letter or digit).

    With ``words`` (the Gopher filters' tokenizer) the count comes from its per-run sums: a
    ``[^\\W_]+`` word never spans whitespace, so a text's count is the sum of its runs'.
    """

    name = "min_words"

    def __init__(self, min_words: int, words: RunCachedWordTokenizer | None = None) -> None:
        super().__init__()
        self.min_words = min_words
        self.words = words

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        n = (self.words.analyse(doc.text).alnum_words if self.words is not None
             else len(WORD.findall(doc.text)))
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

    def predict(self, doc: Document) -> tuple[tuple[str, float], dict[str, float]]:
        """FT176LID.predict's result without its dict of all 176 labels per record: fastText
        returns the labels best first, and only the wanted languages' scores are looked up."""
        langs, scores = self.model.predict(doc.text.replace("\n", " "), k=self.k)
        best = (langs[0].split("__")[2], scores[0].item())
        if not self.languages:
            return best, {lang.split("__")[2]: s.item() for lang, s in zip(langs, scores)}
        wanted: dict[str, float] = {}
        for lang in self.languages:
            try:
                wanted[lang] = scores[langs.index(f"__label__{lang}")].item()
            except ValueError:  # not among the k labels returned
                wanted[lang] = 0.0
        return best, wanted


class LocalLanguageFilter(LanguageFilter):
    """datatrove's LanguageFilter on a local lid.176 model (works offline).

    A batch is identified in one fastText call asking for the 2 best labels only (a text seen
    lately is not asked again). When the best
    is unique (ahead of the second) and wanted (or any language is), the decision needs no
    other score: every wanted score is at most the best one, so "some wanted score > threshold"
    is "best score > threshold". Otherwise the record goes through datatrove's own filter (all
    176 labels), as does every record when an option this shortcut does not cover is set.
    """

    name = "language"

    def __init__(self, model_path: str | Path, languages: list[str] | None,
                 language_threshold: float, short_threshold: float | None = None,
                 short_words: int = 15) -> None:
        super().__init__(languages=languages, language_threshold=language_threshold)
        # English only: a text under short_words words holding a Gopher stop word needs
        # P(en) > short_threshold ("How do I use cymem? The docs say this:" scores 0.2 beside a
        # README table: fastText has seven words and a name it never saw to go on)
        self.short_threshold = short_threshold if languages == ["en"] else None
        self.short_words = short_words
        self.model = LocalFT176LID(model_path, languages)
        self.seen: Counter[str] = Counter()  # top language of every record scored
        # best label, its score, whether it is ahead of the second: per text identified lately
        # (a repeated text is not identified again: fastText's answer is the same)
        self._best: dict[str, tuple[str, float, bool]] = {}
        self.max_remembered = 4096

    def filter(self, doc: Document) -> bool:
        keep = super().filter(doc)
        self.seen[doc.metadata["language"]] += 1
        return keep or self._short_english(doc)

    def _short_english(self, doc: Document) -> bool:
        """A short English text that fastText scores low: its P(en) over short_threshold."""
        if self.short_threshold is None or not short_english(doc.text, self.short_words):
            return False
        return self.model.predict(doc)[1].get("en", 0.0) > self.short_threshold

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        if self.label_only or self.keep_top_pairs_threshold != -1 or self.backend != "ft176":
            return [self.filter(doc) for doc in batch]
        best = self._best
        if len(best) + len(batch) > self.max_remembered:
            best.clear()
        new = list(dict.fromkeys(doc.text for doc in batch if doc.text not in best))
        if new:
            # one line each, as fastText's predict() makes it (datatrove replaces the newlines)
            lines = [text.replace("\n", " ") + "\n" for text in new]
            labels, scores = self.model.model.f.multilinePredict(lines, 2, 0.0, "strict")
            for text, top, probs in zip(new, labels, scores):
                # float32 scores as Python floats, as datatrove's predict has them (compared
                # with a numpy float32, the threshold would be rounded to float32)
                probs = probs.tolist()
                unique = len(probs) < 2 or probs[1] != probs[0]
                best[text] = (top[0].split("__")[2], probs[0], unique)
        results: list[bool | tuple[bool, str]] = []
        wanted = self.languages
        for doc in batch:
            lang, score, unique = best[doc.text]
            if not unique or (wanted and lang not in wanted):
                results.append(self.filter(doc))  # datatrove's own filter, all 176 labels
                continue
            doc.metadata["language"], doc.metadata["language_score"] = lang, score
            self.seen[lang] += 1
            results.append(score > self.language_threshold or self._short_english(doc))
        return results


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
    words = RunCachedWordTokenizer()  # datatrove's English word splitting, shared by all three
    steps: list[BaseFilter] = [EncodingFilter(), MinWordsFilter(cfg.min_words, words),
                               MaxCharsFilter(cfg.max_chars)]
    if tokenizer := _tokenizer_name(cfg, base_model):
        steps.append(TokenLengthFilter(load_tokenizer(tokenizer, home, trust_remote_code),
                                       cfg.min_tokens, cfg.max_tokens))
    steps.append(LocalLanguageFilter(resolve_lid_model(cfg, home), cfg.languages or None,
                                     cfg.language_threshold, cfg.language_short_threshold,
                                     cfg.gopher_stop_words_min_words))
    if cfg.gopher_quality:
        steps.append(ChatGopherQualityFilter(
            min_doc_words=cfg.gopher_min_doc_words,
            max_doc_words=None,  # max_chars bounds length
            max_non_alpha_words_ratio=cfg.gopher_min_alpha_words_ratio,
            min_stop_words=cfg.gopher_min_stop_words if english_only else None,
            stop_words_min_words=cfg.gopher_stop_words_min_words,
            language=words,
        ))
    if cfg.gopher_repetition:
        frac = cfg.repetition_top_ngram_frac
        steps.append(ChatGopherRepetitionFilter(
            dup_line_frac=cfg.repetition_dup_line_frac,
            # Chats repeat the product's words in question and answer; a short exchange hits
            # Gopher's web thresholds (0.20/0.18/0.16) by accident, so the top-n-gram bar moves.
            top_n_grams=((2, frac), (3, max(frac - 0.02, 0.01)), (4, max(frac - 0.04, 0.01))),
            dup_n_grams=tuple((n, round(cfg.repetition_dup_ngram_frac - 0.01 * (n - 5), 4))
                              for n in range(5, 11)),  # Gopher: 0.15 for 5-grams ... 0.10
            top_n_gram_min_count=cfg.repetition_top_ngram_min_count,
            language=words,
        ))
    if cfg.refusal_filter:
        steps.append(RefusalFilter(cfg.refusal_patterns))
    if quality := resolve_quality_model(cfg):
        steps.append(QualityFilter(QualityModel(quality), cfg.quality_threshold))
    return steps


def build_steps(cfg: IngestConfig, filters: list[BaseFilter]) -> list[PipelineStep]:
    """The whole chain judge() runs: encoding repair, then the filters, each dropping into a
    collector; with gopher_prose_only, language id and the Gopher rules read the prose part."""
    for step in filters:
        step.exclusion_writer = _Collect(REASONS[type(step)])
    steps: list[PipelineStep] = list(filters)
    prose_judged = [i for i, s in enumerate(steps) if isinstance(
        s, (LocalLanguageFilter, FastGopherQualityFilter, FastGopherRepetitionFilter))]
    if cfg.gopher_prose_only and prose_judged:
        steps.insert(prose_judged[-1] + 1, FullText())
        if isinstance(steps[prose_judged[-1]], FastGopherRepetitionFilter):
            steps.insert(prose_judged[-1], ProseOnly(cfg.gopher_min_doc_words, spans=False))
        steps.insert(prose_judged[0], ProseOnly(cfg.gopher_min_doc_words))
    if cfg.repair_encoding and HAS_FTFY:
        steps.insert(0, RepairEncoding())
    return steps


REASONS = {
    EncodingFilter: "encoding", MinWordsFilter: "min_words", MaxCharsFilter: "max_chars",
    TokenLengthFilter: "token_length", LocalLanguageFilter: "language",
    FastGopherQualityFilter: "gopher_quality", ChatGopherQualityFilter: "gopher_quality",
    FastGopherRepetitionFilter: "gopher_repetition", ChatGopherRepetitionFilter: "gopher_repetition",
    RefusalFilter: "refusal", QualityFilter: "low_quality",
}


CHUNK = 256  # records judged together (the batch filters' batch), in a worker or here


@dataclass
class _Stats:
    """What the filters counted over the records judged: language, repairs, tokens, scores."""

    languages: Counter[str] = field(default_factory=Counter)
    repaired: int = 0
    tokens: list[int] = field(default_factory=list)
    p_good: list[float] = field(default_factory=list)

    def add(self, other: "_Stats") -> None:
        self.languages.update(other.languages)
        self.repaired += other.repaired
        self.tokens += other.tokens
        self.p_good += other.p_good


def _take_stats(steps: list[PipelineStep]) -> _Stats:
    """The steps' counts since the last call (and reset them: a worker judges many chunks)."""
    stats = _Stats()
    for step in steps:
        if isinstance(step, LocalLanguageFilter):
            stats.languages, step.seen = step.seen, Counter()
        elif isinstance(step, RepairEncoding):
            stats.repaired, step.repaired = step.repaired, 0
        elif isinstance(step, TokenLengthFilter):
            stats.tokens, step.counted = step.counted, []
        elif isinstance(step, QualityFilter):
            stats.p_good, step.scored = step.scored, []
    return stats


def _run_filter(step: BaseFilter, docs: list[Document]) -> list[Document]:
    """datatrove's BaseFilter.run over a list, minus its per-document stats and generator
    plumbing: the documents kept, in order; each dropped one goes to the step's exclusion
    writer with its reason. Batch filters get datatrove's batches (batch_size documents);
    the others get the whole list at once (``filter_batch`` is ``filter`` on each, unless
    the filter batches its own work, as language id does)."""
    size = step.batch_size if step.batch_size > 1 else max(len(docs), 1)
    writer = step.exclusion_writer
    kept: list[Document] = []
    for start in range(0, len(docs), size):
        batch = docs[start:start + size]
        for doc, result in zip(batch, step.filter_batch(batch)):
            keep, reason = get_filter_result(result)
            if keep:
                kept.append(doc)
                continue
            if reason:
                doc.metadata["filter_reason"] = reason
            writer.write(doc)
    return kept


def judge(steps: list[PipelineStep], records: list[ChatSample]) -> tuple[list[Verdict], _Stats]:
    """Every record's verdict, in input order, after the steps (repair, then the filters in
    order: the first filter that drops a record names the reason). Each step takes the whole
    chunk in turn; a filter's decision on a record depends on that record alone, so this is
    datatrove's document-by-document pipeline with the same results."""
    collectors = [step.exclusion_writer for step in steps if isinstance(step, BaseFilter)]
    for collector in collectors:
        collector.drops = {}
    docs = [Document(text=_doc_text(rec), id=rec.id, metadata={"record": rec, "i": i})
            for i, rec in enumerate(records)]
    for step in steps:
        docs = _run_filter(step, docs) if isinstance(step, BaseFilter) else list(step.run(docs))
    kept = {doc.metadata["i"]: _kept_record(doc) for doc in docs}
    drops = {i: d for collector in collectors for i, d in collector.drops.items()}
    return [kept[i] if i in kept else drops[i] for i in range(len(records))], _take_stats(steps)


_worker_steps: list[PipelineStep] | None = None


def _init_worker(steps: list[PipelineStep]) -> None:
    """Pool initializer: a forked worker inherits the parent's steps, models loaded."""
    global _worker_steps
    _worker_steps = steps


def _judge_in_worker(records: list[ChatSample]) -> tuple[list[Verdict], _Stats]:
    assert _worker_steps is not None, "worker started without _init_worker"
    return judge(_worker_steps, records)


Submit = Callable[[list[ChatSample]], "Future[tuple[list[Verdict], _Stats]]"]


def _judging(steps: list[PipelineStep], workers: int
             ) -> contextlib.AbstractContextManager[tuple[Submit, int]]:
    """How chunks get judged: here (at once), or by a pool with up to `window` in flight."""
    return pool_or_here(workers, functools.partial(judge, steps), _judge_in_worker,
                        _init_worker, (steps,))


def _chunks(inputs: str | Path | list[str], writer: StageWriter, seen: Counter[str],
            limits: ReadLimits = DEFAULT_LIMITS) -> Iterator[list[ChatSample]]:
    """Parsed records in chunks of CHUNK; unparseable inputs go straight to quarantine."""
    chunk: list[ChatSample] = []
    for item in iter_input(inputs, limits):
        seen["records_in"] += 1
        if isinstance(item, Quarantined):
            writer.quarantine(item)
            continue
        chunk.append(item)
        if len(chunk) >= CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def verdicts(chunks: Iterable[list[ChatSample]], steps: list[PipelineStep], workers: int,
             stats: _Stats) -> Iterator[Verdict]:
    """Every record's verdict in input order, whichever way chunks are judged: the output and
    the ledger are the same for any `ingest.workers`."""
    with _judging(steps, workers) as (submit, window):
        pending: deque[Future[tuple[list[Verdict], _Stats]]] = deque()
        for chunk in chunks:
            pending.append(submit(chunk))
            while len(pending) > window:
                done, chunk_stats = pending.popleft().result()
                stats.add(chunk_stats)
                yield from done
        while pending:
            done, chunk_stats = pending.popleft().result()
            stats.add(chunk_stats)
            yield from done


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


def _metrics(stats: _Stats, rules: Counter[str], repair: bool) -> dict[str, float]:
    """Language distribution of the records scored, sub-rule drop counts, repairs."""
    metrics: dict[str, float] = {f"language.{k}": float(v)
                                 for k, v in sorted(stats.languages.items())}
    if repair:
        metrics["encoding_repaired"] = float(stats.repaired)
    if stats.tokens:
        metrics["tokens.mean"] = round(sum(stats.tokens) / len(stats.tokens), 2)
        metrics["tokens.max"] = float(max(stats.tokens))
    if stats.p_good:
        metrics["quality.p_good_mean"] = round(sum(stats.p_good) / len(stats.p_good), 4)
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
    filters = build_filters(cfg, home, base_model, trust_remote_code)
    steps = build_steps(cfg, filters)
    repair = isinstance(steps[0], RepairEncoding)
    seen: Counter[str] = Counter()
    rules: Counter[str] = Counter()
    stats = _Stats()
    limits = ReadLimits(cfg.max_record_bytes, cfg.max_decompression_ratio)
    for verdict in verdicts(_chunks(input_path, writer, seen, limits), steps,
                            worker_count(cfg.workers), stats):
        if isinstance(verdict, ChatSample):
            writer.keep(verdict)
            continue
        reason, details, rule, rec = verdict
        if rule:
            rules[f"{reason}.{rule}"] += 1
        writer.drop(rec, reason=reason, **details)
    metrics = _metrics(stats, rules, repair)
    info: dict[str, Any] = {"filters": [REASONS[type(f)] for f in filters],
                            "encoding_repair": "ftfy" if repair else "off"}
    if tokenizer:
        info["tokenizer"] = tokenizer
    if cfg.quality_model:
        info["quality_model"] = str(resolve_quality_model(cfg))
    manifest = writer.finish(seen["records_in"], metrics=metrics, info=info)
    log.info("ingest: %d in, %d kept, filtered %s, %d quarantined", manifest.records_in,
             manifest.kept, manifest.filtered, manifest.quarantined)
    return manifest
