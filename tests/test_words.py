"""Gopher's words and rules (tasks/words.py) against datatrove's own tokenizer and filters."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from datatrove.data import Document
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.utils.word_tokenizers import SpaCyTokenizer

from data_contracts.config import IngestConfig
from tasks.ingest import run_ingest
from tasks.words import (
    FastGopherQualityFilter,
    FastGopherRepetitionFilter,
    RunCachedWordTokenizer,
)

REPO = Path(__file__).resolve().parents[1]

TRICKY = [
    "Don't worry -- it's v1.2.3, ready... in 3 days :) e-mail a.b@x.org or https://x.io/a?b=1",
    "tabs\tand\u00a0no-break\u2009thin spaces,\x1cfile separators\u3000and  double  spaces",
    "   leading and trailing whitespace \n\n\n  ",
    "def f(x):\n    return x**2  # squares\n\n| col | val |\n|-----|-----|\n| a | 1 |",
    "C:\\Users\\me\\AppData\\Local\\Temp\\x.log  /usr/lib/python3.11/site-packages/pip",
    "U.S.A. e.g. i.e. Mr. Dr. St. 5km $3.50 €4 100% #hashtag @user ... … ——",
    "ab c a bc ab c a bc abc abc",  # equal concatenations from different words
    "",
]


def _corpus() -> list[str]:
    """Real text: the sample chats, Python's own reference docs (code, tables, grammar), and
    generated repetitive or spammy text."""
    texts = list(TRICKY)
    # The sample data holds broken lines on purpose (bad bytes, bad JSON): the readable ones.
    raw = (REPO / "sample_data" / "support_chat.jsonl").read_bytes().decode("utf-8", "replace")
    for line in raw.splitlines()[:200]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            texts.append("\n".join(str(m.get("content")) for m in rec["messages"]
                                   if isinstance(m, dict)))
    import pydoc_data.topics

    for topic in sorted(pydoc_data.topics.topics)[:40]:
        body = pydoc_data.topics.topics[topic]
        texts += [body[:3000], body[3000:6000]]
    rng = random.Random(0)
    vocab = "buy now cheap click here free offer the best deal of to and is".split()
    for _ in range(120):
        k = rng.randint(3, 60)
        words = [rng.choice(vocab[: rng.randint(2, len(vocab))]) for _ in range(k)]
        texts.append(" ".join(words) + ("\n" + " ".join(words[:5])) * rng.randint(0, 3))
    return texts


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return _corpus()


@pytest.fixture(scope="module")
def reference_words(corpus: list[str]) -> SpaCyTokenizer:
    return SpaCyTokenizer("en")


def test_words_are_exactly_datatrove_spacy_words(corpus: list[str],
                                                 reference_words: SpaCyTokenizer) -> None:
    ours = RunCachedWordTokenizer(max_runs=500)  # small: the cache is rebuilt along the way
    for text in corpus:
        assert ours.word_tokenize(text) == reference_words.word_tokenize(text), text[:80]
    assert len(ours._runs) <= 500


@pytest.mark.parametrize("web", [True, False], ids=["gopher-web", "ftflow-chat"])
def test_gopher_rules_decide_as_datatrove(corpus: list[str], reference_words: SpaCyTokenizer,
                                          web: bool) -> None:
    """Gopher's web thresholds and ftflow's chat ones, so that each rule drops something."""
    ours = RunCachedWordTokenizer()
    if web:
        quality, repetition = {}, {}
    else:
        quality = {"min_doc_words": 5, "max_doc_words": None, "max_non_alpha_words_ratio": 0.65,
                   "min_stop_words": 1}
        repetition = {"top_n_grams": ((2, 0.3), (3, 0.28), (4, 0.26))}
    pairs = [
        (GopherQualityFilter(**quality, language=reference_words),
         FastGopherQualityFilter(**quality, language=ours)),
        (GopherRepetitionFilter(**repetition, language=reference_words),
         FastGopherRepetitionFilter(**repetition, language=ours)),
    ]
    seen: set[str] = set()
    # Not in the corpus: a text holding the literal "IS_ALPHA", whose words datatrove's spaCy
    # path makes depend on what it tokenized before (it retries without the string once spaCy
    # raises); ours are the same every time.
    for text in corpus:
        if not text.split():
            continue  # datatrove's quality filter divides by zero on a text without words
        for reference, fast in pairs:
            expected = reference.filter(Document(text=text, id="x"))
            assert fast.filter(Document(text=text, id="x")) == expected, text[:80]
            seen.add(str(expected))
    assert len(seen) >= 6, seen  # both keeps and several different rules were exercised


def test_ingest_imports_neither_presidio_nor_transformers_nor_torch(tmp_path: Path,
                                                                    home: Path) -> None:
    """spacy.blank("en") loads every spaCy plugin (presidio -> transformers -> torch)."""
    from tasks.assets import ensure_lid_model

    ensure_lid_model(home)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "messages": [
        {"role": "user", "content": "How do I export my invoices to a CSV file?"},
        {"role": "assistant", "content": "Open Settings, then Billing, and click the export "
                                         "button at the top of the list."}]}) + "\n")
    code = (
        "import sys, json\n"
        "from data_contracts.config import IngestConfig\n"
        "from tasks.ingest import run_ingest\n"
        f"m = run_ingest({str(src)!r}, {str(tmp_path / 'out')!r}, IngestConfig(workers=1), "
        f"home={str(home)!r})\n"
        "heavy = [n for n in ('presidio_analyzer', 'transformers', 'torch') if n in sys.modules]\n"
        "print(json.dumps({'kept': m.kept, 'heavy': heavy}))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                               "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"kept": 1, "heavy": []}


def _stage_files(out: Path) -> dict[str, list[str]]:
    return {p.name: gzip.open(p, "rt").read().splitlines() for p in sorted(out.glob("*.gz"))}


def test_output_is_the_same_for_any_worker_count(tmp_path: Path, home: Path) -> None:
    rng = random.Random(3)
    topics = ["password", "invoice", "export", "router", "refund", "login", "upload"]
    lines = []
    for i in range(700):
        topic = rng.choice(topics)
        if i % 9 == 0:
            text = "buy now " * rng.randint(2, 20)  # repetition
        elif i % 13 == 0:
            text = "Wie kann ich mein Passwort zurücksetzen? Ich komme nicht in mein Konto."
        else:
            text = (f"Hi, my {topic} stopped working {rng.choice(['today', 'again', 'twice'])}"
                    f" after order {rng.randint(1000, 9999)}. What should I do about it?")
        lines.append(json.dumps({"id": f"r{i}", "messages": [
            {"role": "user", "content": text},
            {"role": "assistant", "content": f"Please open Settings and reset the {topic} "
                                             "there, then try again in a few minutes."}]}))
    lines.insert(100, "{broken json")
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    runs = {}
    for workers in (1, 3):
        out = tmp_path / f"out-{workers}"
        m = run_ingest(src, out, IngestConfig(workers=workers), home=home).check()
        runs[workers] = (m, _stage_files(out))
    (m1, files1), (m3, files3) = runs[1], runs[3]
    assert files1 == files3
    assert (m1.kept, m1.filtered, m1.quarantined, m1.metrics) == (
        m3.kept, m3.filtered, m3.quarantined, m3.metrics)
    assert m1.filtered["gopher_repetition"] > 0 and m1.filtered["language"] > 0
    assert m1.records_in == 701 and m1.kept + sum(m1.filtered.values()) + 1 == 701


def test_prose_sets_aside_code_tables_tracebacks_and_prompts() -> None:
    from tasks.prose import prose

    text = ("## Install\n\nRun the installer, then check the version:\n\n```bash\n$ pip install x\n"
            "x --version\n```\n\n| option | default |\n|---|---|\n| --fast | off |\n\n"
            "Traceback (most recent call last):\n  File \"a.py\", line 3, in <module>\n"
            "    main()\n>>> import x\nIf it fails, send us the log.\n```\nunclosed fence")
    # A fence never closed is one line set aside: what follows is read line by line (code
    # lines go by their shape), so nothing hides behind a stray fence.
    assert prose(text).split() == ("Install Run the installer, then check the version: "
                                   "If it fails, send us the log. unclosed fence").split()


def test_local_language_id_predicts_as_datatrove(corpus: list[str], home: Path) -> None:
    from datatrove.utils.lid import FT176LID

    from tasks.assets import ensure_lid_model
    from tasks.ingest import LocalFT176LID

    path = ensure_lid_model(home)
    for languages in (["en"], ["en", "de", "xx"], None):
        ours = LocalFT176LID(path, languages)
        reference = FT176LID(languages)
        reference._model = ours.model  # datatrove's own predict on the same local model
        for text in corpus + ["Wie kann ich mein Passwort zurücksetzen?", "¿Dónde está?"]:
            doc = Document(text=text or " ", id="x")
            assert ours.predict(doc) == reference.predict(doc), text[:60]
