"""The prose part of a chat: what the language and Gopher filters judge when
``ingest.gopher_prose_only`` is on (the default).

Gopher's rules were written for web pages: code, tables, tracebacks and shell sessions fail its
alpha-word ratio and word-length bounds, and language id reads them as no language at all.
Technical chats are made of them. Set aside here, in three passes:

- **Blocks.** Fenced code (``` or ~~~, closed; a stray fence line alone), reStructuredText
  explicit markup (``.. code-block::``, ``.. image::``, ``.. _target: url``, comments) with
  the indented lines under it (an admonition's body, ``.. note::``, is prose and stays), the
  indented block after a paragraph ending in ``::``, HTML comments.
- **Lines.** Table rows and rules, heading underlines, tracebacks, interactive prompts
  (``>>>``, ``$``), log lines, link definitions, and lines that read as code: statements
  (``def``, ``import``, ``return``, ``x = ...``, ``if ...:``), grammar rules (``::=``), or a
  line whose words, once the spans below are gone, are a small part of its characters.
- **Spans** inside a line: inline code (```x```, ````x````), reST roles (``:func:`x```),
  URLs, e-mail addresses, markdown images and link targets (a link's text stays), HTML tags,
  file paths and file names, dotted names and calls (``foo.bar(x, y=1)``), identifiers with
  ``_`` or an inner capital (``max_len``, ``DataLoader``), version strings (``v1.2.3``,
  ``>=2.0``), option flags (``--foo``, ``-x``), issue numbers (``#123``), commit hashes.
  List and heading marks (``-``, ``*``, ``1.``, ``#``) go; the item's words stay.

What is left is judged: language id and Gopher's quality rules read these words, the
repetition rules read the same lines with their spans kept (``prose_lines``: lines naming
different APIs are not duplicates). A text whose prose has fewer than ``min_words`` words is
judged whole, so junk cannot hide inside a fence: that bound is on the whole chat, a question
included.

A chat's prose is often one short question beside code, where two of Gopher's rules fire on
nothing: the stop-word rule (``ChatGopherQualityFilter``: asked of texts of some length only)
and the top-n-gram rule (``ChatGopherRepetitionFilter``: an n-gram seen once is no repetition).
Language id fails on it too: a question naming a package fastText never saw scores P(en) ~0.2,
like keyboard mash. Below the length where the stop-word rule is asked, a stop word is taken
as the evidence of English instead (``short_english``; tasks/ingest.py's ``LocalLanguageFilter``
then asks only ``ingest.language_short_threshold``). Gopher's stop words match in any case.
"""

from __future__ import annotations

import re
from collections import Counter
from operator import mul
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from datatrove.pipeline.filters.gopher_quality_filter import STOP_WORDS as GOPHER_STOP_WORDS

from tasks.words import FastGopherQualityFilter, FastGopherRepetitionFilter, word_windows

# --- blocks -------------------------------------------------------------------------------
FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[^\n]*\n.*?^[ \t]*\1[ \t]*$", re.M | re.S)
STRAY_FENCE = re.compile(r"^[ \t]*(?:`{3,}|~{3,}).*$", re.M)
HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
EXPLICIT_MARKUP = re.compile(r"^([ \t]*)\.\.(?:[ \t]|$)")  # reST: .. directive::, .. _x:, ..
# Directives whose body is prose: only their first line is set aside.
ADMONITION = re.compile(r"^[ \t]*\.\.[ \t]+(?:note|warning|tip|hint|important|caution|"
                        r"attention|danger|error|admonition|seealso|versionadded|"
                        r"versionchanged|deprecated|topic|sidebar|rubric)::", re.I)

# --- lines --------------------------------------------------------------------------------
SET_ASIDE_LINE = re.compile(
    r"^(?:"
    r"\s*[|+].*[|+]\s*"  # table rows and rules
    r"|[^|\n]*\|[^|\n]*\|.*"  # rows without outer pipes (two or more cells)
    r"|\s*([=+\-~^*#_.`'\"])\1{2,}[ =+\-~^*#_.]*"  # rules, heading underlines (=== *** ~~~)
    r"|Traceback \(most recent call last\):.*"
    r"|\s+File \".*\", line \d+.*"
    r"|\s+at [\w.$<>]+\(.*\)\s*"
    r"|[\w.]+(?:Error|Exception|Warning|Exit|Interrupt)(?::.*)?"  # a traceback's last line
    r"|\s*(?:>>>|\.\.\.|\$|%|PS>|C:\\>|In \[\d*\]:|Out\[\d*\]:) .*"  # prompts
    r"|\s*\[?\d{4}-\d\d-\d\d[T ]\d\d:\d\d.*"  # log lines
    r"|\s*\[[^\]\n]+\]:\s*\S+.*"  # markdown link definitions
    r"|\s*:[\w -]+:(?:\s.*)?"  # reST field lists and directive options (:target: url)
    r"|.*[│┃║╭╮╰╯┌┐└┘├┤╔╗╚╝].*"  # boxes drawn by command-line tools
    r")$", re.M)
CODE_LINE = re.compile(
    r"^\s*(?:"
    r"(?:def|class|async\s+def)\s+\w+.*[:({]"  # definitions
    r"|(?:import\s+[\w.]+|from\s+[.\w]+\s+import\s).*"
    r"|(?:if|elif|else|for|while|with|try|except|finally|match|case)\b(?:(?!\. ).)*:"
    r"|(?:return|raise|yield|await|assert|del|print)\b.*[(=\[]"
    r"|(?:return|raise|yield|await|pass|break|continue)(?:\s+\S+)?;?"
    r"|(?:var|let|const|function|fn|pub|func|public|private|static|void|struct|namespace)"
    r"\b.*[=({;]"
    r"|#(?:include|define|!).*"
    r"|@[\w.]+(?:\(.*\))?"  # decorators
    r"|[\w.\[\]'\"]+\s*(?:=|\+=|-=|\*=|/=|:=|==|->)\s*\S.*"  # assignments
    r"|[\w.]+\(.*"  # a line opening with a call
    r"|.*::=.*"  # grammar rules
    r"|.*[{\[(]"  # ends inside brackets
    r"|[)\]}].*"  # starts by closing one
    r")\s*$")
LIST_MARK = re.compile(r"^[ \t]*(?:[-*•+]|\d+[.)]|[a-z][.)]|#{1,6})[ \t]+", re.M)
LITERAL_INTRO = re.compile(r"::[ \t]*$")

# --- spans --------------------------------------------------------------------------------
MD_IMAGE = re.compile(r"!\[[^\]\n]*\]\([^)\n]*\)")
MD_LINK = re.compile(r"\[([^\]\n]*)\](?:\([^)\s]*\)|\[[^\]\n]*\])")  # its text stays
RST_LINK = re.compile(r"`([^`<\n]*?)\s*<[^>`\n]*>`_{1,2}")  # `text <url>`_: its text stays
LINK_PATTERNS = [  # link plumbing: set aside from both views
    r"<(?:https?|ftp|mailto)[^>\s]*>",  # autolinks
    r"(?:https?|ftp|file|s3|gs|git|ssh)://[^\s<>\"'`)\]]*",  # URLs
    r"\bwww\.[^\s<>\"'`)\]]+",
    r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",  # e-mail addresses
    r"</?[A-Za-z][\w-]*(?:\s[^<>\n]*)?/?>",  # HTML tags (their text stays)
    r"\*+|~~",  # emphasis marks
]
LINKS = re.compile("|".join(LINK_PATTERNS))
# Technical tokens, set aside from the words view: spans that may hold spaces are looked for
# in the line; the rest inside one whitespace-free run, each distinct run once (RUN_CACHE).
LINE_SPANS = re.compile("|".join([
    r"``.+?``",  # reST inline literal
    r"`[^`\n]+`_{0,2}",  # inline code, reST interpreted text and links
    r":[\w:+-]+:(?=`)",  # reST role before its text (the text is the span above)
    r"[<>=!~^]=?\s*v?\d+(?:\.[\w*]+)+",  # version constraints
    r"\|[\w -]+\|",  # reST substitutions (|badge|)
    r"\{[^{}\n]*\}",  # placeholders and literal dicts
]))
CALLS = re.compile(r"\b[A-Za-z_][\w.-]*\([^()\n]*\)")  # foo(x, y=1), foo.bar(x)
RUN_SPANS = re.compile("|".join([
    r"\"[^\"\s]+\"|“[^”\s]+”|(?<!\w)'[^'\s]+'(?!\w)",  # a quoted token: a literal in plain text
    r"(?<![\w/])(?:~|\.{1,2})?(?:/[\w.@%+~-]+)+/?",  # paths
    r"\b[A-Za-z]:\\\S*",  # Windows paths
    r"\b[A-Za-z_][\w-]*(?:\.[A-Za-z_]\w*)+",  # dotted names, file names
    r"\b\w*_\w*",  # identifiers with _ (snake_case, __dunder__, reST refs_)
    r"\b[a-z]+[A-Z]\w*",  # camelCase
    r"\b[A-Z][a-z0-9]+[A-Z]\w*",  # PascalCase with an inner capital (DataLoader)
    r"\b[A-Z]{2,}[a-z]+[A-Z]\w*",
    r"\bv?\d+(?:\.\d+)+(?:[-.+]?[A-Za-z]+\d*)*\b",  # versions, numbers with dots
    r"(?<![\w-])--?[A-Za-z][\w-]*(?:=\S*)?",  # option flags
    r"(?<![\w&])#\d+\b",  # issue numbers
    r"\b(?:GH|PR|gh)-\d+\b",
    r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b",  # hashes
    r"\$\{?\w+\}?",  # shell variables
]))
# A character each of LINKS' and LINE_SPANS' patterns needs: a line without one is left as is.
LINK_HINT = re.compile(r"[<@*]|://|www\.|~~")
SPAN_HINT = re.compile(r"[`<>=!~^|{]")


class _RunCache(dict[str, str]):
    """A run's rest once its RUN_SPANS are set aside, computed on first sight (a look-up
    from C for a run seen before, which most are)."""

    def __missing__(self, run: str) -> str:
        rest = self[run] = RUN_SPANS.sub(" ", run)
        return rest


RUN_CACHE = _RunCache()
MAX_RUNS = 200_000  # bound on RUN_CACHE (a corpus of IDs adds runs without end)
# What set-aside spans leave behind: empty brackets and quotes, runs of separators.
# A run of separators keeps its first (group 1); scanned only on a line with a hint of one.
HUSKS = re.compile(r"([,;:])(?:\s*[,;:])+|\([\s,;]*\)|\[[\s,;]*\]|\{\s*\}|\"\s*\"|“\s*”|'\s*'")
HUSK_HINT = re.compile(r"[(\[{\"“']|[,;:]\s*[,;:]")
LETTERS = re.compile(r"[^\W\d_]{2,}")  # what a prose line is made of: words of letters
WORD = re.compile(r"[^\W_]+")
STOP_WORDS = frozenset(GOPHER_STOP_WORDS)


def _blocks(text: str) -> list[str]:
    """The lines of text outside code fences, reST markup blocks and literal blocks."""
    text = HTML_COMMENT.sub("", FENCE.sub("", text))
    text = STRAY_FENCE.sub("", text)
    kept: list[str] = []
    block_indent: int | None = None  # set while inside a block: lines indented more go
    literal_from: int | None = None  # a paragraph ended in '::' at this indent
    for line in text.split("\n"):
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if block_indent is not None:
            if not stripped or indent > block_indent:
                continue
            block_indent = None
        if literal_from is not None and stripped:
            if indent > literal_from:
                block_indent = literal_from
                literal_from = None
                continue
            literal_from = None
        if EXPLICIT_MARKUP.match(line):
            if not ADMONITION.match(line):
                block_indent = indent
            continue
        if LITERAL_INTRO.search(line):
            literal_from = indent
            line = LITERAL_INTRO.sub(":", line)
        kept.append(line)
    return kept


def _unlinked(line: str) -> str:
    """line without images, link targets, URLs, addresses, HTML tags and emphasis marks.

    Each pattern runs only on a line holding a character it cannot match without (most lines
    of a chat hold none): the same result, without scanning every line four times."""
    if "[" in line:
        if "![" in line:
            line = MD_IMAGE.sub(" ", line)
        line = MD_LINK.sub(r"\1", line)
    if "`" in line and "<" in line:
        line = RST_LINK.sub(r"\1", line)
    if LINK_HINT.search(line):
        line = LINKS.sub(" ", line)
    return line


def _spanless(line: str) -> str:
    """line without its technical tokens."""
    if SPAN_HINT.search(line):
        line = LINE_SPANS.sub(" ", line)
    if "(" in line:
        line = CALLS.sub(" ", line)
    if len(RUN_CACHE) >= MAX_RUNS:
        RUN_CACHE.clear()
    return " ".join(map(RUN_CACHE.__getitem__, line.split()))


def _husk(match: re.Match[str]) -> str:
    return f"{sep} " if (sep := match.group(1)) else " "


def _husked(line: str) -> str:
    """line without the empty brackets, quotes and separator runs its spans left."""
    return HUSKS.sub(_husk, line) if HUSK_HINT.search(line) else line


def _prose_line(line: str) -> tuple[str, str]:
    """The prose of one line and the line as the repetition rules read it: ('', '') for a
    set-aside line, else its words without the spans, and the line without its links and
    list mark."""
    if not line.strip() or SET_ASIDE_LINE.match(line):
        return "", ""
    line = LIST_MARK.sub("", line, count=1)
    if CODE_LINE.match(line):
        return "", ""
    unlinked = _unlinked(line)
    rest = _husked(_spanless(unlinked)).split()
    letters = sum(map(len, LETTERS.findall(" ".join(rest))))
    if not letters or letters < 0.6 * len("".join(rest)):
        return "", ""  # a line of symbols, numbers and set-aside spans
    return " ".join(rest), " ".join(unlinked.split())


def views(text: str) -> tuple[str, str]:
    """(prose, prose lines): text without its code, markup, tables, tracebacks, prompts and
    technical spans; and the same lines as written, spans kept, links and list marks gone
    (what the repetition rules read: two lines differing only in their identifiers are not
    duplicates)."""
    words, lines = [], []
    for line in _blocks(text):
        p, kept = _prose_line(line)
        if p:
            words.append(p)
            lines.append(kept)
    return "\n".join(words), "\n".join(lines)


def prose(text: str) -> str:
    """The words view of text (see ``views``)."""
    return views(text)[0]


def prose_lines(text: str) -> str:
    """The lines view of text (see ``views``)."""
    return views(text)[1]


class ProseOnly(PipelineStep):
    """From here on the filters read the prose part of each document (full text kept).

    ``spans=False`` gives the prose lines with their technical spans kept (for the
    repetition rules). A document whose prose has fewer than ``min_words`` words is read whole.
    """

    name = "prose only"
    type = "✂️ - FORMAT"

    def __init__(self, min_words: int, spans: bool = True) -> None:
        super().__init__()
        self.min_words, self.spans = min_words, spans

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            if "prose_views" not in doc.metadata:  # the first of the two views computes both
                words, lines = views(doc.text)
                enough = len(WORD.findall(words)) >= self.min_words
                doc.metadata["prose_views"] = (words, lines) if enough else None
                if enough:
                    doc.metadata["full_text"] = doc.text
            if seen := doc.metadata["prose_views"]:
                doc.text = seen[0] if self.spans else seen[1]
                self.stat_update("prose_view")
            yield doc


class ChatGopherQualityFilter(FastGopherQualityFilter):
    """Gopher's quality rules, the stop-word rule only on a text of ``stop_words_min_words``
    words or more (words with a letter or digit; 0: on every text, as datatrove).

    Gopher asks two stop words (the, be, to, of, and, that, have, with) of 50-word web pages,
    in any case: "The docs say this:" holds one (datatrove's list is lowercase and matched as
    written, so a changelog line or a question whose only stop word opens a sentence failed).
    A chat's prose is often one short question beside code ("Quick question about httpx."):
    no stop word there says nothing, while a keyword list of 15 words and more still has to
    show one. The rule runs last, as in datatrove, so a text failing another rule is named
    by that one.
    """

    def __init__(self, *args: Any, min_stop_words: int | None = None,
                 stop_words_min_words: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, min_stop_words=None, **kwargs)
        self.stop_word_rule, self.stop_words_min_words = min_stop_words, stop_words_min_words

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        verdict = super().filter(doc)
        if verdict is not True or not self.stop_word_rule:
            return verdict
        if len(WORD.findall(doc.text)) < self.stop_words_min_words:
            return True
        words = self.language.word_tokenize(doc.text)
        if len(self.stop_words.intersection(words)) >= self.stop_word_rule:
            return True  # most texts: no need to lowercase them
        if len(self.stop_words.intersection(map(str.lower, words))) < self.stop_word_rule:
            return False, "gopher_enough_stop_words"
        return True


class ChatGopherRepetitionFilter(FastGopherRepetitionFilter):
    """Gopher's repetition rules, the top-n-gram rule only for an n-gram that occurs at least
    ``top_n_gram_min_count`` times (1: as datatrove).

    datatrove weighs the most frequent n-gram even when it occurs once, so on a text of one
    short sentence ("Can you explain this part of httpx?": 'Can you explain this' is 53% of
    its characters) the rule fires with nothing repeated. Gopher's pages had 50 words and more.
    """

    def __init__(self, *args: Any, top_n_gram_min_count: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.top_n_gram_min_count = top_n_gram_min_count

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self.top_n_gram_min_count <= 1:
            return super().filter(doc)
        words = self.language.word_tokenize(doc.text)
        if not words:
            return super().filter(doc)
        counts = Counter(words)
        most = max(counts.values())
        # An n-gram of n words weighs at most n * max(count(w) * len(w)) + (n - 1) * max
        # count(w) characters (tasks/words.py): under the bar, the rule cannot fire whether the
        # n is kept or not, so its windows are not counted.
        heaviest = max(map(mul, counts.values(), map(len, counts)))
        top_n_grams = self.top_n_grams
        self.top_n_grams = tuple(  # type: ignore[assignment]
            (n, frac) for n, frac in top_n_grams if len(words) >= n and (
                not (n * heaviest + (n - 1) * most) / len(doc.text) > frac
                or most >= self.top_n_gram_min_count and Counter(
                    word_windows(words, n)).most_common(1)[0][1] >= self.top_n_gram_min_count))
        try:
            return super().filter(doc)
        finally:
            self.top_n_grams = top_n_grams


def short_english(text: str, max_words: int) -> bool:
    """Whether text is short (under max_words words) and holds one of Gopher's English stop
    words, in any case: evidence of English where fastText has too little to go on."""
    words = WORD.findall(text)
    return len(words) < max_words and not STOP_WORDS.isdisjoint(w.lower() for w in words)


class FullText(PipelineStep):
    """The filters after this one read the whole document again."""

    name = "full text"
    type = "✂️ - FORMAT"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            doc.metadata.pop("prose_views", None)
            if "full_text" in doc.metadata:
                doc.text = doc.metadata.pop("full_text")
            yield doc
