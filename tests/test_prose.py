"""The prose part of a technical turn (tasks/prose.py): what is set aside, what is judged."""

from __future__ import annotations

import pydoc_data.topics
import pytest

from tasks.prose import prose, prose_lines

ANSWER = '''Install it with `pip install ftflow==0.3.1` or from source:

```bash
$ git clone https://github.com/example/ftflow && cd ftflow
$ pip install -e .[dev]
```

Then call `ftflow.run(config, resume=True)`; see https://ftflow.readthedocs.io/en/latest/ for the
options. Pass --workers=4 to use four processes, or set FTFLOW_HOME to ~/.cache/ftflow.

| option | default | meaning |
|---|---:|---|
| workers | 0 | one per CPU |

Traceback (most recent call last):
  File "/usr/lib/python3.12/site-packages/ftflow/cli.py", line 42, in main
    run(cfg)
KeyError: 'ingest'

The error above means the config has no ``ingest`` section. Use :func:`load_config` to check it
before calling DataLoader.from_config(path) in version 2.4.1 or later (#1234).

.. code-block:: python

   cfg = load_config("configs/demo.yaml")
   print(cfg.ingest)

.. note::

   The loader reads the file only once.

.. _docs: https://example.org/docs

This is a literal block::

    >>> 1 + 1
    2

- Fixed `Loader.close()` leaking a file handle (#881)
- [Read the changelog](https://example.org/changes) for **older** releases.
'''

PROSE = """Install it with or from source:
Then call ; see for the
options. Pass to use four processes, or set to
The error above means the config has no section. Use to check it
before calling in version or later .
The loader reads the file only once.
This is a literal block:
Fixed leaking a file handle
Read the changelog for older releases."""


def test_code_markup_and_technical_spans_are_set_aside_prose_stays() -> None:
    assert prose(ANSWER) == PROSE


def test_prose_lines_keep_their_identifiers_for_the_repetition_rules() -> None:
    lines = prose_lines(ANSWER).splitlines()
    # The same lines as the words view, spans kept (so 'use `a`' and 'use `b`' differ), links
    # and emphasis gone.
    assert len(lines) == len(PROSE.splitlines())
    assert lines[0] == "Install it with `pip install ftflow==0.3.1` or from source:"
    assert lines[-1] == "Read the changelog for older releases."
    assert "DataLoader.from_config(path)" in lines[4]


@pytest.mark.parametrize("text", [
    "```python\nfor i in range(10):\n    print(i)\n```",
    "!!!@@@ ### $$$ %%% ^^^ &&& ***\n```\n??? *** ((( )))\n```",
    "| a | b |\n|---|---|\n| 1 | 2 |",
    ">>> import ftflow\n>>> ftflow.__version__\n'0.3.1'",
    "   x = compute(a, b)\n   if x > 0:\n       return x\n   raise ValueError(x)",
    "[![PyPI](https://img.shields.io/pypi/v/ftflow.svg)](https://pypi.org/project/ftflow)\n"
    ".. image:: https://example.org/badge.svg\n   :target: https://example.org",
    "2026-03-01T12:00:01Z level=info path=/v1/orders status=200\n"
    "2026-03-01T12:00:02Z level=info path=/v1/orders status=429",
])
def test_code_tables_prompts_logs_and_badges_leave_no_prose(text: str) -> None:
    assert prose(text) == ""


def test_python_reference_docs_keep_their_sentences_drop_their_grammar_and_code() -> None:
    text = pydoc_data.topics.topics["with"]
    view = prose(text)
    assert "is semantically equivalent to:" in view
    assert "The suite is executed." in view
    for code in ("with_stmt", "::=", "hit_except = False", "enter(manager)", "__enter__"):
        assert code not in view, code
    assert "If the suite was exited due to an exception" in view  # indented prose stays


def test_junk_words_stay_prose_to_be_judged() -> None:
    spam = "cheap watches discount watches best price watches luxury watches free shipping"
    assert prose(spam) == spam
    mash = "asdfghjkl qwertyuiop zxcvbnm asdf"
    assert prose(f"{mash}\n\n```\nx = 1\n```") == mash
    german = "Öffnen Sie die Anmeldeseite und klicken Sie auf Passwort vergessen."
    assert prose(german) == german
    # Spam links lose their targets, not their words.
    assert prose("[cheap watches](https://x.example.com/a) https://y.example.com/b buy now") == \
        "cheap watches buy now"


def test_chat_gopher_rules_skip_what_one_short_sentence_cannot_show() -> None:
    from datatrove.data import Document

    from tasks.prose import ChatGopherQualityFilter, ChatGopherRepetitionFilter
    from tasks.words import RunCachedWordTokenizer

    words = RunCachedWordTokenizer()
    top = ((2, 0.3), (3, 0.28), (4, 0.26))
    datatrove_rep = ChatGopherRepetitionFilter(top_n_grams=top, language=words)
    chat_rep = ChatGopherRepetitionFilter(top_n_grams=top, top_n_gram_min_count=2, language=words)
    question = Document(text="Can you explain this part of beartype?", id="q")
    assert datatrove_rep.filter(question) == (False, "top_3_gram")  # a unique 3-gram, 'weighed'
    assert chat_rep.filter(question) is True
    spam = Document(text="buy now buy now buy now cheap cheap watches", id="s")
    assert chat_rep.filter(spam) == datatrove_rep.filter(spam) == (False, "top_2_gram")

    quality = ChatGopherQualityFilter(min_doc_words=5, min_stop_words=1, stop_words_min_words=15,
                                      language=words)
    assert quality.filter(Document(text="Quick question about cloudpickle. Installation",
                                   id="q")) is True
    keywords = ("cheap watches discount watches best price watches luxury watches free shipping "
                "replica bags outlet sale designer bags lowest prices")
    assert quality.filter(Document(text=keywords, id="k")) == (False, "gopher_enough_stop_words")
    # Gopher's stop words in any case: a changelog line of 15 words whose one stop word opens
    # the sentence holds one ('The'), the keyword list above still none.
    changelog = ("The docs say this: Add support for lazy imports by @Viicos in pydantic core "
                 "schema release notes")
    assert quality.filter(Document(text=changelog, id="c")) is True


def test_short_english_is_a_short_text_with_a_gopher_stop_word() -> None:
    from tasks.prose import short_english

    assert short_english("How do I use cymem? The docs say this:", 15)
    assert short_english("Can you explain this part of loguru?", 15)
    assert not short_english("asdfghjkl qwertyuiop zxcvbnm asdf", 15)  # keyboard mash
    assert not short_english("Wie installiere ich das Paket? Ich bekomme einen Fehler.", 15)
    assert not short_english("cheap watches discount watches best price", 15)
    assert not short_english("How do I use cymem? The docs say this: " * 2, 15)  # 18 words


def test_hint_guards_change_nothing() -> None:
    """The link, span and husk patterns run only on lines with a hint of a match: on every
    line, the same result as running them always (a seeded fuzz of their characters)."""
    import random

    import tasks.prose as p

    rng = random.Random(7)
    alphabet = list("ab Z1.,;:!?()[]{}<>\"“”'`*~=^|@/_-#$\t") + ["://", "www.", "![", "](",
                                                                 "``", "~~", ">=2.0"]
    words = ["ab", "Z1", " ", " ", "word", "w"]
    # mostly words, a few marks: lines without a hint are common, as in real chats
    lines = ["".join(rng.choice(alphabet if rng.random() < 0.15 else words)
                     for _ in range(rng.randint(0, 30))) for _ in range(6000)]
    lines += ["it ' ' is", 'say "" here', "a ,  ; b", "x |sub| y", "see ~~old~~ now",
              "mail a@b.io", "call {x} now", "www.example.org", "list ( , ) end", "“ ” q"]
    for line in lines:
        always = p.LINKS.sub(" ", p.RST_LINK.sub(r"\1", p.MD_LINK.sub(
            r"\1", p.MD_IMAGE.sub(" ", line))))
        assert p._unlinked(line) == always, line
        assert p._husked(line) == p.re.sub(
            r"\([\s,;]*\)|\[[\s,;]*\]|\{\s*\}|\"\s*\"|“\s*”|'\s*'|(?<=[,;:])(?:\s*[,;:])+",
            " ", line), line
        assert p.SPAN_HINT.search(line) or not p.LINE_SPANS.search(line), line
