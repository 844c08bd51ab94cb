"""Gopher's word splitting and repetition search, fast and with datatrove's exact results.

datatrove's Gopher filters split text with spaCy's English tokenizer (``spacy.blank("en")``)
and search repeated n-grams in pure Python. Both decide ingest's throughput, so both are done
here the same way, faster:

- **Words.** spaCy's tokenizer cuts the text at whitespace and tokenizes each whitespace-free
  run on its own (prefixes, suffixes, infixes, exceptions; the run is its cache key), and
  datatrove drops the whitespace-only tokens. So the words of a text are the concatenated
  tokens of its runs: each distinct run is tokenized once by spaCy and remembered, and a text
  costs a ``str.split()`` and dictionary look-ups, with no spaCy ``Doc`` or ``Token`` built.
  The tokenizer is made from spaCy's English defaults directly: ``spacy.blank`` loads every
  installed ``spacy_factories`` entry point, which imports presidio, transformers and torch
  (~3.4 s, ~160 MB per process).
- **Quality and repetition.** The same rules as datatrove's Gopher filters, with the per-word
  questions remembered per distinct word, n-grams counted as word tuples built in C, and
  datatrove's sequential duplicate-n-gram walk run only on a text where a window repeats.

tests/test_words.py checks both against datatrove's own tokenizer and filter.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

from datatrove.data import Document
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.filters.gopher_repetition_filter import find_duplicates
from datatrove.utils.text import PUNCTUATION_SET, split_into_words
from datatrove.utils.word_tokenizers import WordTokenizer


def _import_spacy_without_torch() -> None:
    """Import spaCy with torch hidden from thinc, which imports it only to offer GPU shims.

    The tokenizer never uses them; torch would cost ingest ~1.5 s and ~100 MB per process.
    Once spaCy is in, later ``import torch`` calls work as usual (thinc keeps has_torch False,
    which affects only thinc's own torch layers, never used here).
    """
    if "thinc" in sys.modules or "torch" in sys.modules:
        return
    hidden = [name for name in ("torch", "cupy") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import torch` fail
    try:
        import spacy.tokenizer  # noqa: F401
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def english_tokenizer() -> Any:
    """spaCy's English tokenizer, as ``spacy.blank("en").tokenizer`` builds it, without the
    ``Language`` object (whose registry loads every installed spaCy plugin: presidio, with
    transformers and torch)."""
    _import_spacy_without_torch()
    from spacy import util
    from spacy.lang.en import English
    from spacy.tokenizer import Tokenizer
    from spacy.vocab import create_vocab

    defaults = English.Defaults
    return Tokenizer(
        create_vocab("en", defaults),
        rules=defaults.tokenizer_exceptions,
        prefix_search=util.compile_prefix_regex(defaults.prefixes).search,
        suffix_search=util.compile_suffix_regex(defaults.suffixes).search,
        infix_finditer=util.compile_infix_regex(defaults.infixes).finditer,
        token_match=defaults.token_match,
        url_match=defaults.url_match,
    )


class RunCachedWordTokenizer(WordTokenizer):
    """datatrove's English word tokenizer (same words), one spaCy call per distinct run.

    ``max_runs`` bounds the memory of the run cache (and of spaCy's vocabulary, rebuilt with
    it): a corpus of IDs and numbers adds runs without end.
    """

    def __init__(self, max_runs: int = 200_000) -> None:
        super().__init__("en")
        self.max_runs = max_runs
        self._spacy: Any = None
        self._runs: dict[str, tuple[str, ...]] = {}

    def _tokenize_run(self, run: str) -> tuple[str, ...]:
        if self._spacy is None or len(self._runs) >= self.max_runs:
            self._spacy, self._runs = english_tokenizer(), {}
        words = tuple(w for t in self._spacy(run) if (w := t.text.strip()))
        self._runs[run] = words
        return words

    def word_tokenize(self, text: str) -> list[str]:
        runs, words = self._runs, []
        for run in text.split():
            tokens = runs.get(run)
            if tokens is None:
                tokens = self._tokenize_run(run)
            words += tokens
        return words

    def sent_tokenize(self, text: str) -> list[str]:
        raise NotImplementedError("word splitting only")

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        raise NotImplementedError("word splitting only")


def _windows(words: list[str], n: int) -> Iterator[tuple[str, ...]]:
    """The n-word windows of words, as tuples (built in C by zip)."""
    return zip(*(words[k:] for k in range(n)))


class FastGopherRepetitionFilter(GopherRepetitionFilter):
    """datatrove's GopherRepetitionFilter with the same result for every text.

    Top n-grams are counted as word tuples (words hold no whitespace, so equal tuples are
    exactly equal ``" ".join`` strings, and Counter keeps datatrove's first-seen order among
    equal counts); duplicate n-grams are looked for with the concatenated strings built in C,
    and the duplicate walk runs on those strings only when some window does repeat.
    """

    name = "👯 Gopher Repetition"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = doc.text
        if not text:
            return False, "empty"
        paragraphs = self.paragraph_exp.split(text.strip())
        paragraphs_duplicates, char_duplicates = find_duplicates(paragraphs)
        if self.dup_para_frac and paragraphs_duplicates / len(paragraphs) > self.dup_para_frac:
            return False, "dup_para_frac"
        if self.dup_para_char_frac and char_duplicates / len(text) > self.dup_para_char_frac:
            return False, "dup_para_char_frac"
        lines = self._line_splitter.split(text)
        line_duplicates, char_duplicates = find_duplicates(lines)
        if self.dup_line_frac and line_duplicates / len(lines) > self.dup_line_frac:
            return False, "dup_line_frac"
        if self.dup_line_char_frac and char_duplicates / len(text) > self.dup_line_char_frac:
            return False, "dup_line_char_frac"

        words = split_into_words(text, self.language)
        for n, n_frac in self.top_n_grams:
            if len(words) < n:
                continue
            top, count = Counter(_windows(words, n)).most_common(1)[0]
            if (sum(map(len, top)) + n - 1) * count / len(text) > n_frac:
                return False, f"top_{n}_gram"
        for n, n_frac in self.dup_n_grams:
            joined = list(map("".join, _windows(words, n)))
            if len(set(joined)) == len(joined):
                continue  # no window repeats: datatrove's walk would count nothing
            if _all_duplicate_chars(joined, n) / len(text) > n_frac:
                return False, f"duplicated_{n}_n_grams"
        return True


def _all_duplicate_chars(joined: list[str], n: int) -> int:
    """datatrove's find_all_duplicate(words, n) on its windows' strings, built once: a window
    seen before counts its characters and the walk jumps past it."""
    unique: set[str] = set()
    repeated, idx = 0, 0
    while idx < len(joined):
        gram = joined[idx]
        if gram in unique:
            repeated += len(gram)
            idx += n
        else:
            unique.add(gram)
            idx += 1
    return repeated


class FastGopherQualityFilter(GopherQualityFilter):
    """datatrove's GopherQualityFilter with the same result for every text; what it asks of
    each word (punctuation only? a letter in it?) is remembered per distinct word."""

    name = "🥇 Gopher Quality"

    def __init__(self, *args: Any, max_words: int = 500_000, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_words = max_words
        self._word_facts: dict[str, tuple[bool, bool]] = {}

    def _facts(self, word: str) -> tuple[bool, bool]:
        """(holds a character that is not punctuation, holds a letter), as datatrove asks."""
        facts = self._word_facts.get(word)
        if facts is None:
            if len(self._word_facts) >= self.max_words:
                self._word_facts = {}
            facts = self._word_facts[word] = (any(ch not in PUNCTUATION_SET for ch in word),
                                              any(c.isalpha() for c in word))
        return facts

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = doc.text
        words = split_into_words(text, self.language)
        n_words = len(words)
        facts = list(map(self._facts, words))
        non_symbol_lengths = [len(w) for w, (word, _) in zip(words, facts) if word]
        n_non_symbol = len(non_symbol_lengths)
        if self.min_doc_words and n_non_symbol < self.min_doc_words:
            return False, "gopher_short_doc"
        if self.max_doc_words and n_non_symbol > self.max_doc_words:
            return False, "gopher_long_doc"
        # np.mean of integers: their exact sum over their count, as here; nan when empty.
        avg = sum(non_symbol_lengths) / n_non_symbol if n_non_symbol else float("nan")
        if self.min_avg_word_length and avg < self.min_avg_word_length:
            return False, "gopher_below_avg_threshold"
        if self.max_avg_word_length and avg > self.max_avg_word_length:
            return False, "gopher_above_avg_threshold"
        if self.max_symbol_word_ratio and text.count("#") / n_words > self.max_symbol_word_ratio:
            return False, "gopher_too_many_hashes"
        if self.max_symbol_word_ratio and (
                (text.count("...") + text.count("…")) / n_words > self.max_symbol_word_ratio):
            return False, "gopher_too_many_ellipsis"
        lines = text.splitlines()
        if self.max_bullet_lines_ratio and sum(
                s.lstrip().startswith(("•", "-")) for s in lines) / len(lines) \
                > self.max_bullet_lines_ratio:
            return False, "gopher_too_many_bullets"
        if self.max_ellipsis_lines_ratio and sum(
                s.rstrip().endswith(("...", "…")) for s in lines) / len(lines) \
                > self.max_ellipsis_lines_ratio:
            return False, "gopher_too_many_end_ellipsis"
        if self.max_non_alpha_words_ratio and (
                sum(alpha for _, alpha in facts) / n_words < self.max_non_alpha_words_ratio):
            return False, "gopher_below_alpha_threshold"
        if self.min_stop_words and len(self.stop_words.intersection(words)) < self.min_stop_words:
            return False, "gopher_enough_stop_words"
        return True
