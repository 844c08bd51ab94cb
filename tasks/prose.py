"""The prose part of a turn: what the language and Gopher filters judge when
``ingest.gopher_prose_only`` is on.

Gopher's rules were written for web pages: code, tables, tracebacks and shell sessions fail its
alpha-word ratio and word-length bounds, and language id reads them as no language at all.
Technical chats are made of them. Set aside here: fenced code blocks (``` or ~~~), indented
blocks (4 spaces or a tab), table rows and rules (``| a | b |``, ``+---+``), traceback lines and
interactive prompts (``>>>``, ``$ ``), and the ``#`` marks of markdown headings. The rest, the prose, is judged; a text with too little
prose left is judged whole, so junk cannot hide inside a fence.
"""

from __future__ import annotations

import re

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

FENCE = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n.*?(?:^[ \t]*\1[^\n]*$|\Z)", re.M | re.S)
SET_ASIDE_LINE = re.compile(
    r"^(?:"
    r"(?: {4,}|\t)\S.*"  # indented code
    r"|\s*[|+].*[|+]\s*"  # table rows and rules
    r"|[^|\n]*\|[^|\n]*\|.*"  # rows without outer pipes (two or more cells)
    r"|\s*[=+-]{3,}[ =+-]*"  # rules under headings and rst tables
    r"|Traceback \(most recent call last\):.*"
    r"|\s+File \".*\", line \d+.*"
    r"|\s+at [\w.$<>]+\(.*\)\s*"
    r"|\s*(?:>>>|\$|PS>|C:\\>) .*"  # prompts
    r")$", re.M)
HEADING = re.compile(r"^#{1,6}[ \t]+", re.M)  # a markdown heading's marks, not its words
WORD = re.compile(r"[^\W_]+")


def prose(text: str) -> str:
    """text without its code blocks, tables, tracebacks and prompts."""
    text = FENCE.sub("", text)
    return HEADING.sub("", SET_ASIDE_LINE.sub("", text))


class ProseOnly(PipelineStep):
    """From here on the filters read the prose part of each document (full text kept)."""

    name = "prose only"
    type = "✂️ - FORMAT"

    def __init__(self, min_words: int) -> None:
        super().__init__()
        self.min_words = min_words

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            view = prose(doc.text)
            if view != doc.text and len(WORD.findall(view)) >= self.min_words:
                doc.metadata["full_text"], doc.text = doc.text, view
                self.stat_update("prose_view")
            yield doc


class FullText(PipelineStep):
    """The filters after this one read the whole document again."""

    name = "full text"
    type = "✂️ - FORMAT"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            if "full_text" in doc.metadata:
                doc.text = doc.metadata.pop("full_text")
            yield doc

