"""Checks every synthetic row passes before it joins the training data, each with a reason.

In order: the record contract and roles (``synthetic_contract``), the text of each generated
reply (``synthetic_invalid``: empty, length, broken characters, leaked chat-template tokens, too
few words, word salad, an echo of the prompt), its language (``synthetic_language``, fastText
lid.176 as at ingest), an optional JSON schema (``synthetic_schema``), near-duplicates of the
real data or an earlier synthetic row (deduplicated, naming the row it duplicates), and last an
optional LLM-as-judge score (``synthetic_judge``).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from data_contracts.config import AugmentConfig
from data_contracts.records import ChatSample, RecordError, parse_record

INVALID = "synthetic_invalid"
CONTRACT = "synthetic_contract"
LANGUAGE = "synthetic_language"
SCHEMA = "synthetic_schema"
JUDGE = "synthetic_judge"
NEAR_DUPLICATE = "near_duplicate"  # a dedup kind, counted per strategy like a reason

# Chat-template markup of the common families; a clean reply contains none of it.
LEAK_PATTERNS = [
    r"<\|[a-z_]+(\|>)?", r"</?s>", r"<unk>", r"<pad>", r"\[/?INST\]", r"<</?SYS>>",
    r"^(system|user|assistant)\s*$", r"^#{2,3} ?(Instruction|Response):",
]
LEAK_RE = re.compile("|".join(LEAK_PATTERNS), re.IGNORECASE | re.MULTILINE)
_WORD_RE = re.compile(r"^[\W_]*[^\W\d_]+(?:['’-][^\W\d_]+)*[\W_]*$")


def _normalize_for_copy_check(text: str) -> str:
    """Lower-cased, whitespace collapsed: the form in which a reply is compared to its prompt."""
    return " ".join(text.lower().split())


def printable_ratio(text: str) -> float:
    """Share of characters that are printable text (the replacement char U+FFFD is not)."""
    if not text:
        return 0.0
    good = sum(1 for ch in text if (ch.isprintable() or ch in "\n\t") and ch != "\ufffd")
    return good / len(text)


def word_token_ratio(text: str) -> float:
    """Share of whitespace-separated tokens that are words (no digits glued to letters)."""
    tokens = text.split()
    return sum(1 for t in tokens if _WORD_RE.match(t)) / len(tokens) if tokens else 0.0


def validate_generation(text: str | None, prompt: str, cfg: AugmentConfig,
                        special_tokens: tuple[str, ...] = ()) -> str | None:
    """Why a generated reply is unusable, or None when it is valid."""
    if text is None or not text.strip():
        return "empty generation"
    if len(text) > cfg.max_chars:
        return f"too long: {len(text)} chars > {cfg.max_chars}"
    ratio = printable_ratio(text)
    if ratio < cfg.min_printable_ratio:
        return f"not printable text: {ratio:.2f} printable < {cfg.min_printable_ratio}"
    if any(ch == "\ufffd" or (not ch.isprintable() and ch not in "\n\t") for ch in text):
        return "broken characters (control characters or U+FFFD)"
    leaked = LEAK_RE.search(text)
    if leaked is None:
        leaked = next((t for t in special_tokens if t and t in text), None)
    if leaked is not None:
        token = leaked if isinstance(leaked, str) else leaked.group(0)
        return f"chat template or special token leaked: {token.strip()!r}"
    words = len(text.split())
    if words < cfg.min_words:
        return f"too few words: {words} < {cfg.min_words}"
    wratio = word_token_ratio(text)
    if wratio < cfg.min_word_token_ratio:
        return f"not fluent text: {wratio:.2f} of tokens are words < {cfg.min_word_token_ratio}"
    gen, ask = _normalize_for_copy_check(text), _normalize_for_copy_check(prompt)
    if ask and (gen == ask or gen.startswith(ask)):
        return "copies the prompt"
    return None


def check_contract(rec: ChatSample) -> str | None:
    """The row as the record contract reads it (roles alternating, ending right): None if ok."""
    if rec.kind == "text":
        return "a synthetic row must be a chat or a preference pair"
    raw: dict[str, Any] = {"messages": [m.model_dump() for m in rec.messages]}
    if rec.kind == "preference":
        raw = {"prompt": raw["messages"], "chosen": rec.chosen, "rejected": rec.rejected}
    try:
        parse_record(raw)
    except RecordError as err:
        return str(err)
    if rec.kind == "preference" and (rec.chosen or "").strip() == (rec.rejected or "").strip():
        return "chosen and rejected are the same reply"
    return None


class LanguageCheck:
    """fastText lid.176 (the model ingest uses) on each reply."""

    def __init__(self, model_path: Path, languages: list[str], threshold: float) -> None:
        from fasttext.FastText import _FastText

        self.model = _FastText(str(model_path))
        self.languages, self.threshold = set(languages), threshold

    def __call__(self, text: str) -> str | None:
        labels, scores = self.model.predict(" ".join(text.split()), k=1)
        lang, score = labels[0].removeprefix("__label__"), float(scores[0])
        if lang in self.languages and score >= self.threshold:
            return None
        return f"language {lang} ({score:.2f}); wanted {sorted(self.languages)} >= {self.threshold}"


@lru_cache(maxsize=4)
def _schema_validator(path: str) -> Any:
    import jsonschema

    schema = json.loads(Path(path).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def check_schema(text: str, schema_path: str) -> str | None:
    """None when the reply is JSON satisfying the schema, else why not."""
    try:
        value = json.loads(text)
    except ValueError as err:
        return f"not JSON: {err}"
    error = next(iter(_schema_validator(schema_path).iter_errors(value)), None)
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "<root>"
    return f"schema: {where}: {error.message[:200]}"


class NearDuplicates:
    """Real rows and accepted synthetic rows, matched as dedup matches them (word 5-grams,
    MinHash LSH candidates confirmed by the exact Jaccard; tasks.dedup_sketch)."""

    def __init__(self, threshold: float, ngram: int = 5, num_perm: int = 128) -> None:
        from tasks.dedup_sketch import BandLSH

        self.threshold, self.ngram, self.num_perm = threshold, ngram, num_perm
        self.lsh = BandLSH(min(threshold, 0.7), num_perm)
        self.exact: dict[bytes, str] = {}
        self.grams: dict[str, Any] = {}

    def match(self, text: str) -> tuple[str, float] | None:
        """(id of the row it duplicates, Jaccard), or None."""
        from tasks.dedup_common import exact_jaccard
        from tasks.dedup_sketch import sketch

        sk = sketch([text], self.ngram, self.num_perm)
        key, grams = sk.keys[0], sk.grams[0]
        if key in self.exact:
            return self.exact[key], 1.0
        best: tuple[str, float] | None = None
        for rid in sorted(self.lsh.query(self.lsh.band_keys(sk.sigs)[0])):
            j = exact_jaccard(grams, self.grams[rid])
            if j >= self.threshold and (best is None or j > best[1]):
                best = (rid, j)
        return best

    def add(self, rid: str, text: str) -> None:
        self.add_many([(rid, text)])

    def add_many(self, rows: list[tuple[str, str]], chunk: int = 1024) -> None:
        """Index rows (id, text); signatures computed a batch at a time (the real data: many
        rows)."""
        from tasks.dedup_sketch import sketch

        rows = [(rid, text) for rid, text in dict(rows).items() if rid not in self.grams]
        for i in range(0, len(rows), chunk):
            part = rows[i:i + chunk]
            sk = sketch([text for _, text in part], self.ngram, self.num_perm)
            for (rid, _), key, grams, bands in zip(part, sk.keys, sk.grams,
                                                   self.lsh.band_keys(sk.sigs), strict=True):
                self.exact.setdefault(key, rid)
                self.grams[rid] = grams
                self.lsh.insert(rid, bands)


JUDGE_RUBRIC = (
    "Rate the response to the instruction below on a 1-5 scale, judging relevance (does it "
    "answer what was asked), accuracy (is it correct and free of invented facts) and format "
    "(clear, complete, no stray markup). 5: excellent on all three; 4: good; 3: acceptable "
    "with flaws; 2: poor; 1: useless or wrong.\nAnswer with a first line of the form "
    "'Score: N', then one sentence of reasons.\n\n"
    "Instruction:\n{instruction}\n\nResponse:\n{response}"
)
_SCORE_RE = re.compile(r"score\s*[:=]\s*([1-5])", re.IGNORECASE)


def judge_score(text: str | None) -> int | None:
    """The 1-5 score in a judge's answer ('Score: N'), or None when it gave none."""
    match = _SCORE_RE.search(text or "")
    return int(match.group(1)) if match else None
