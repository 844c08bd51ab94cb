"""Gopher's word splitting and repetition search, fast and with datatrove's exact results.

datatrove's Gopher filters split text with spaCy's English tokenizer (``spacy.blank("en")``)
and search repeated n-grams in pure Python. Both decide ingest's throughput, so both are done
here the same way, faster:

- **Words.** spaCy's tokenizer cuts the text at whitespace and tokenizes each whitespace-free
  run on its own (prefixes, suffixes, infixes, exceptions), then makes one pass over the whole
  text for exceptions spelled by several tokens; datatrove drops the whitespace-only tokens. So
  a text's words are its runs' tokens, concatenated: each distinct run is split once, by
  spaCy's algorithm ported to Python on spaCy's own English rules (``EnglishRules``; no spaCy
  ``Doc``, ``Token`` or lexeme is built), and remembered with the per-word sums the filters
  need. A text costs a ``str.split()``, dictionary look-ups and one sum. A text holding a run
  whose tokens spell an exception that spaCy's last pass would re-split ("x-e.g.", "ok:)") is
  given to spaCy whole, as datatrove does. spaCy is imported for its rules only, without
  ``spacy.blank``, which loads every installed ``spacy_factories`` entry point (presidio,
  transformers and torch: ~3.4 s, ~160 MB per process).
- **Quality and repetition.** The same rules as datatrove's Gopher filters: the quality sums
  come per run from the cache; the top n-gram is counted only when a bound from the word
  counts allows it to cross the threshold; duplicate n-grams are walked over the windows that
  can repeat only. A repeated text's result is remembered.

tests/test_words.py checks words, rules and ingest's verdicts against datatrove's own tokenizer,
filters and pipeline.
"""

from __future__ import annotations

import re
import sys
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterator
from functools import partial
from itertools import accumulate, chain, compress
from operator import mul, sub
from typing import Any

from datatrove.data import Document
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.filters.gopher_repetition_filter import (
    find_all_duplicate,
    find_duplicates,
)
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
    from spacy.tokenizer import Tokenizer
    from spacy.vocab import create_vocab

    rules = EnglishRules.load()
    return Tokenizer(
        create_vocab("en", rules.defaults),
        rules=rules.defaults.tokenizer_exceptions,
        prefix_search=rules.prefix_search,
        suffix_search=rules.suffix_search,
        infix_finditer=rules.infix_finditer,
        token_match=rules.token_match,
        url_match=rules.url_match,
    )


class EnglishRules:
    """spaCy's English tokenizer rules (affix, infix and URL regexes, tokenizer exceptions) and
    its algorithm for one whitespace-free run, in Python.

    ``split_run`` is spaCy's ``Tokenizer._split_affixes`` + ``_attach_tokens`` (spaCy 3.8,
    tokenizer.pyx) step for step, on the same compiled regexes and exceptions: the tokens spaCy
    gives a run before its final pass. That pass (``_apply_special_cases``) re-splits a token
    sequence that spells an exception found after affix or infix splitting; ``rewrites`` are the
    sequences where that changes the tokens' texts (``effective``), and a run holding one is
    left to spaCy itself, on the whole text (the pass can see across runs).
    """

    _loaded: "EnglishRules | None" = None

    def __init__(self) -> None:
        _import_spacy_without_torch()
        from spacy import util
        from spacy.lang.en import English
        from spacy.symbols import ORTH

        self.defaults = defaults = English.Defaults
        self.prefix_search = util.compile_prefix_regex(defaults.prefixes).search
        self.suffix_search = util.compile_suffix_regex(defaults.suffixes).search
        self.infix_finditer = util.compile_infix_regex(defaults.infixes).finditer
        self.token_match = defaults.token_match
        self.url_match = defaults.url_match
        self._last_suffix: tuple[str | None, int] = (None, 0)
        self.specials: dict[str, tuple[str, ...]] = {
            string: tuple(spec[ORTH] for spec in substrings)
            for string, substrings in defaults.tokenizer_exceptions.items()}
        # The exceptions spaCy's special-case matcher looks for (faster_heuristics: those with
        # an affix or infix match, or a space), as token sequences split without exceptions.
        self.rewrites: dict[tuple[str, ...], tuple[str, ...]] = {}
        for string, orths in self.specials.items():
            if (self._prefix_len(string) or self._suffix_len(string)
                    or list(self.infix_finditer(string)) or " " in string):
                pattern = tuple(self.split_run(string, with_specials=False))
                if pattern != orths:
                    self.rewrites[pattern] = orths
        self.rewrite_lengths = sorted({len(p) for p in self.rewrites})
        self.rewrite_heads = {p[0] for p in self.rewrites}

    @classmethod
    def load(cls) -> "EnglishRules":
        if cls._loaded is None:
            cls._loaded = cls()
        return cls._loaded

    def _prefix_len(self, string: str) -> int:
        match = self.prefix_search(string)
        return match.end() - match.start() if match is not None else 0

    def _suffix_len(self, string: str) -> int:
        if string == self._last_suffix[0]:  # the affix loop asks twice for a run's core
            return self._last_suffix[1]
        match = self.suffix_search(string)
        length = match.end() - match.start() if match is not None else 0
        self._last_suffix = (string, length)
        return length

    def split_run(self, string: str, with_specials: bool = True) -> list[str]:
        """The tokens spaCy makes of one whitespace-free run, before its special-case pass."""
        specials = self.specials if with_specials else {}
        if string in specials:  # _try_specials_and_cache on the whole run
            return list(specials[string])
        prefixes: list[str] = []
        suffixes: list[str] = []
        last_size = 0
        token_match = self.token_match
        # _split_affixes
        while string and len(string) != last_size:
            if token_match and token_match(string):
                break
            if string in specials:
                break
            last_size = len(string)
            pre_len = self._prefix_len(string)
            if pre_len != 0:
                prefix = string[:pre_len]
                minus_pre = string[pre_len:]
                if minus_pre and minus_pre in specials:
                    string = minus_pre
                    prefixes.append(prefix)
                    break
            suf_len = self._suffix_len(string[pre_len:])
            if suf_len != 0:
                suffix = string[-suf_len:]
                minus_suf = string[:-suf_len]
                if minus_suf and minus_suf in specials:
                    string = minus_suf
                    suffixes.append(suffix)
                    break
            if pre_len and suf_len and (pre_len + suf_len) <= len(string):
                string = string[pre_len:-suf_len]
                prefixes.append(prefix)
                suffixes.append(suffix)
            elif pre_len:
                string = minus_pre
                prefixes.append(prefix)
            elif suf_len:
                string = minus_suf
                suffixes.append(suffix)
        # _attach_tokens (spaCy's cache is empty inside datatrove's memory zone: not consulted)
        tokens = prefixes
        if string:
            if string in specials:
                tokens += specials[string]
            elif (token_match and token_match(string)) or (
                    self.url_match and self.url_match(string)):
                tokens.append(string)
            else:
                matches = list(self.infix_finditer(string))
                if not matches:
                    tokens.append(string)
                else:
                    start = 0
                    for match in matches:
                        infix_start, infix_end = match.start(), match.end()
                        if infix_start == 0:  # == start_before_infixes
                            continue
                        if infix_start != start:
                            tokens.append(string[start:infix_start])
                        if infix_start != infix_end:
                            tokens.append(string[infix_start:infix_end])
                        start = infix_end
                    if string[start:]:
                        tokens.append(string[start:])
        tokens += reversed(suffixes)
        return tokens

    def rewritten(self, tokens: list[str]) -> bool:
        """Whether spaCy's special-case pass could change these tokens' texts."""
        if self.rewrite_heads.isdisjoint(tokens):
            return False
        for i in range(len(tokens)):
            for n in self.rewrite_lengths:
                if tuple(tokens[i:i + n]) in self.rewrites:
                    return True
        return False


# What a distinct run adds to a text's sums, packed in one int (one field per FIELD bits, so a
# text's sums are one ``sum()`` of its runs' values): words holding a non-punctuation character,
# their characters, words holding a letter (the Gopher quality questions), ``[^\W_]+`` words
# (ingest's min_words count), and whether spaCy's special-case pass could rewrite the run.
FIELD = 40
_MASK = (1 << FIELD) - 1
ALNUM_WORD = re.compile(r"[^\W_]+")


class TextWords:
    r"""A text's words, with the per-word sums the Gopher quality rules need and its count of
    ``[^\W_]+`` words."""

    __slots__ = ("words", "non_symbol", "non_symbol_chars", "alpha", "alnum_words")

    def __init__(self, words: list[str], packed: int) -> None:
        self.words = words
        self.non_symbol = packed & _MASK
        self.non_symbol_chars = (packed >> FIELD) & _MASK
        self.alpha = (packed >> (2 * FIELD)) & _MASK
        self.alnum_words = (packed >> (3 * FIELD)) & _MASK


_alpha_map = partial(map, str.isalpha)


def _packed(words: tuple[str, ...] | list[str], alnum_words: int, rewritten: bool) -> int:
    non_symbol = [w for w in words if not PUNCTUATION_SET.issuperset(w)]
    alpha = sum(map(any, map(_alpha_map, words)))  # words holding a letter
    return (len(non_symbol) | sum(map(len, non_symbol)) << FIELD | alpha << 2 * FIELD
            | alnum_words << 3 * FIELD | int(rewritten) << 4 * FIELD)


class RunCachedWordTokenizer(WordTokenizer):
    """datatrove's English word tokenizer (the same words), without spaCy on the way.

    spaCy's tokenizer cuts the text at whitespace and tokenizes each whitespace-free run on its
    own (then one pass over the whole text for exceptions split across tokens, see
    ``EnglishRules``). A run not seen before is tokenized by ``EnglishRules.split_run`` (spaCy's
    algorithm on spaCy's rules, in Python) and remembered with its sums; a text costs a
    ``str.split()``, dictionary look-ups and one sum. A text holding a run that spaCy's
    special-case pass would rewrite goes to spaCy whole, as datatrove does. ``max_runs`` bounds
    the run cache (a corpus of IDs and numbers adds runs without end).
    """

    def __init__(self, max_runs: int = 200_000, max_texts: int = 1024) -> None:
        super().__init__("en")
        self.max_runs, self.max_texts = max_runs, max_texts
        self._rules: EnglishRules | None = None
        self._spacy: Any = None
        self._spacy_texts = 0
        self._runs: dict[str, tuple[str, ...]] = {}
        self._sums: dict[str, int] = {}
        self._texts: dict[str, TextWords] = {}  # the last texts analysed (filters share them)

    def _add_runs(self, runs: list[str]) -> None:
        if self._rules is None:
            self._rules = EnglishRules.load()
        missing = set(runs).difference(self._runs)
        if len(self._runs) + len(missing) > self.max_runs:
            self._runs, self._sums = {}, {}
            missing = set(runs)
        for run in missing:
            tokens = self._rules.split_run(run)
            words = tuple(w for t in tokens if (w := t.strip()))
            self._runs[run] = words
            self._sums[run] = _packed(words, len(ALNUM_WORD.findall(run)),
                                      self._rules.rewritten(tokens))

    def _spacy_words(self, text: str) -> list[str]:
        """spaCy's words for a whole text (datatrove's SpaCyTokenizer, minus its memory zone:
        the tokenizer is rebuilt every 1,000 texts to bound its vocabulary)."""
        if self._spacy is None or self._spacy_texts >= 1000:
            self._spacy, self._spacy_texts = english_tokenizer(), 0
        self._spacy_texts += 1
        return [w for t in self._spacy(text) if (w := t.text.strip())]

    def analyse(self, text: str) -> TextWords:
        """text's words and sums (remembered for the next ``max_texts`` texts: ingest's word
        count and the Gopher filters ask for the same text in turn)."""
        found = self._texts.get(text)
        if found is not None:
            return found
        runs = text.split()
        sums = self._sums
        try:
            packed = sum(map(sums.__getitem__, runs))
        except KeyError:
            self._add_runs(runs)
            sums = self._sums
            packed = sum(map(sums.__getitem__, runs))
        if packed >> (4 * FIELD):  # a run spaCy's special-case pass may rewrite
            words = self._spacy_words(text)
            alnum = (packed >> (3 * FIELD)) & _MASK
            found = TextWords(words, _packed(words, alnum, False))
        else:
            found = TextWords(list(chain.from_iterable(map(self._runs.__getitem__, runs))),
                              packed)
        if len(self._texts) >= self.max_texts:
            self._texts = {}
        self._texts[text] = found
        return found

    def word_tokenize(self, text: str) -> list[str]:
        return list(self.analyse(text).words)

    def sent_tokenize(self, text: str) -> list[str]:
        raise NotImplementedError("word splitting only")

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        raise NotImplementedError("word splitting only")


def word_windows(words: list[str], n: int) -> Iterator[tuple[str, ...]]:
    """The n-word windows of words, as tuples (built in C by zip)."""
    return zip(*(words[k:] for k in range(n)))


def text_words(language: Any, text: str) -> TextWords:
    """text's words (and quality sums) from our tokenizer, or any datatrove WordTokenizer."""
    if isinstance(language, RunCachedWordTokenizer):
        return language.analyse(text)
    words = split_into_words(text, language)
    return TextWords(words, _packed(words, len(ALNUM_WORD.findall(text)), False))


REMEMBERED = 4096  # texts whose Gopher result a filter keeps (a repeated text is not judged again)


def _remembered(step: Any, text: str, judge: Any) -> bool | tuple[bool, str]:
    """judge(text), kept for the last REMEMBERED texts: a result depends on the text alone."""
    memo: dict[str, bool | tuple[bool, str]] = step.__dict__.setdefault("_memo", {})
    result = memo.get(text)
    if result is None:
        if len(memo) >= REMEMBERED:
            memo.clear()
        result = memo[text] = judge(text)
    return result


def _find_duplicates(items: list[str]) -> tuple[int, int]:
    """datatrove's find_duplicates, with nothing to walk when no item repeats."""
    if len(set(items)) == len(items):
        return 0, 0
    return find_duplicates(items)


class FastGopherRepetitionFilter(GopherRepetitionFilter):
    """datatrove's GopherRepetitionFilter with the same result for every text.

    - Top n-grams: a bound first. The top n-gram's count is at most the count of each of its
      words, so its characters times its count are at most n * max(count(w) * len(w)) +
      (n - 1) * max(count(w)); a text under the threshold with that bound cannot fail the rule.
      Otherwise its windows are counted as word tuples (words hold no whitespace: equal tuples
      are exactly equal ``" ".join`` strings, and Counter keeps datatrove's first-seen order
      among equal counts).
    - Duplicate n-grams: two windows can only be equal (as datatrove's ``"".join`` strings) if
      their first c characters are, c being the shortest window's length; only windows whose
      c-character key repeats are built and walked, with datatrove's walk (a window seen
      before counts its characters and the walk jumps past it) over them.
    """

    name = "👯 Gopher Repetition"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return _remembered(self, doc.text, self._judge)

    def _judge(self, text: str) -> bool | tuple[bool, str]:
        if not text:
            return False, "empty"
        paragraphs = self.paragraph_exp.split(text.strip())
        paragraphs_duplicates, char_duplicates = _find_duplicates(paragraphs)
        if self.dup_para_frac and paragraphs_duplicates / len(paragraphs) > self.dup_para_frac:
            return False, "dup_para_frac"
        if self.dup_para_char_frac and char_duplicates / len(text) > self.dup_para_char_frac:
            return False, "dup_para_char_frac"
        lines = self._line_splitter.split(text)
        line_duplicates, char_duplicates = _find_duplicates(lines)
        if self.dup_line_frac and line_duplicates / len(lines) > self.dup_line_frac:
            return False, "dup_line_frac"
        if self.dup_line_char_frac and char_duplicates / len(text) > self.dup_line_char_frac:
            return False, "dup_line_char_frac"

        words = text_words(self.language, text).words
        if self.top_n_grams and words:
            counts = Counter(words)
            most = max(counts.values())
            heaviest = max(map(mul, counts.values(), map(len, counts)))
        for n, n_frac in self.top_n_grams:
            if len(words) < n:
                continue
            if n >= 1 and not (n * heaviest + (n - 1) * most) / len(text) > n_frac:
                continue  # the bound is under the threshold: so is the top n-gram
            top, count = Counter(word_windows(words, n)).most_common(1)[0]
            if (sum(map(len, top)) + n - 1) * count / len(text) > n_frac:
                return False, f"top_{n}_gram"
        if not self.dup_n_grams:
            return True
        dups = _DuplicateWindows(words, min(n for n, _ in self.dup_n_grams))
        if not dups.candidates and dups.n_min >= 1 and all(
                isinstance(f, (int, float)) and f >= 0 for _, f in self.dup_n_grams):
            return True  # no two windows can be equal: 0 duplicated characters for every n
        for n, n_frac in self.dup_n_grams:
            if dups.chars(n) / len(text) > n_frac:
                return False, f"duplicated_{n}_n_grams"
        return True


class _DuplicateWindows:
    """datatrove's find_all_duplicate(words, n) for every n >= n_min, on the windows that can
    repeat: a window's ``"".join`` is the slice of the joined words between its word offsets,
    and equal windows share their first c characters (c: the shortest n_min-word window)."""

    def __init__(self, words: list[str], n_min: int) -> None:
        self.words, self.n_min = words, n_min
        self.offsets = [0, *accumulate(map(len, words))]
        self.joined = "".join(words)
        starts = self.offsets[:len(words) - n_min + 1] if n_min >= 1 else []
        self.candidates: list[int] = []
        if len(starts) > 1:
            shortest = min(map(sub, self.offsets[n_min:], starts))
            joined = self.joined
            keys = [joined[p:p + shortest] for p in starts]
            if len(set(keys)) < len(keys):
                seen = Counter(keys)
                self.candidates = list(compress(range(len(keys)),
                                                map((1).__lt__, map(seen.__getitem__, keys))))

    def chars(self, n: int) -> int:
        if n < self.n_min or n < 1:
            return find_all_duplicate(self.words, n)
        # candidates are ascending: those with an n-word window (start <= len - n)
        starts = self.candidates[:bisect_right(self.candidates, len(self.words) - n)]
        offsets, joined = self.offsets, self.joined
        grams = [joined[offsets[i]:offsets[i + n]] for i in starts]
        if len(set(grams)) == len(grams):
            return 0
        # datatrove's walk; the windows left out are unequal to any other: visiting one only
        # steps the walk on
        repeated, after, unique = 0, 0, set()
        for i, gram in zip(starts, grams):
            if i < after:
                continue
            if gram in unique:
                repeated += len(gram)
                after = i + n
            else:
                unique.add(gram)
                after = i + 1
        return repeated


class FastGopherQualityFilter(GopherQualityFilter):
    """datatrove's GopherQualityFilter with the same result for every text: what it asks of
    each word (punctuation only? a letter in it?) is summed per distinct whitespace-free run
    by the tokenizer (``TextWords``)."""

    name = "🥇 Gopher Quality"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return _remembered(self, doc.text, self._judge)

    def _judge(self, text: str) -> bool | tuple[bool, str]:
        found = text_words(self.language, text)
        words = found.words
        n_words = len(words)
        n_non_symbol = found.non_symbol
        if self.min_doc_words and n_non_symbol < self.min_doc_words:
            return False, "gopher_short_doc"
        if self.max_doc_words and n_non_symbol > self.max_doc_words:
            return False, "gopher_long_doc"
        # np.mean of integers: their exact sum over their count, as here; nan when empty.
        avg = found.non_symbol_chars / n_non_symbol if n_non_symbol else float("nan")
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
                found.alpha / n_words < self.max_non_alpha_words_ratio):
            return False, "gopher_below_alpha_threshold"
        if self.min_stop_words and len(self.stop_words.intersection(words)) < self.min_stop_words:
            return False, "gopher_enough_stop_words"
        return True
