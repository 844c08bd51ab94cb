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
    FIELD,
    EnglishRules,
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

# Runs our tokenizer splits without spaCy: each family once, and the special-case pass
# (an exception spelled by tokens found after affix or infix splitting: "x-e.g.", "ok:)").
ADVERSARIAL = [
    "v1.2.3 1.17.13-rc1 2.0.0b3 python3.11 node@18.2.0 >=2.31,<3 ~=1.4 3.26.11. (5.0.2)",
    "#65472568 RB-12345 request_id=1aaf2d633bd4 519e1801-8965-e807-5c19-016d15aeddf0 "
    "NL44TAJO7416087470 SKU:AB-12/34 latency_ms=781 (519e1801-8965-e807).",
    "https://example.com/a/b?c=1&d=2#frag http://x.io. www.foo.org/path), (https://a.b/c) "
    "ftp://host:21/x https://x.y/z.",
    "john.mueller@gmail.com, <linda.tanaka@company.co.in> mail:a+b@x.y. (me@x.org)",
    "don't can't won't I'm you're it's y'all gonna gotta ma'am o'clock 'cause ’em don’t CAN'T "
    "Let's It’s shouldn't've",
    "«quoted» „German“ ‹x› —dash— –en– ¿qué? ¡sí! …ellipsis… ‘single’ “double” ・ 、。",
    "中文文本，没有空格。日本語のテキスト。한국어 텍스트입니다. 混合text混合 ｆｕｌｌ　ｗｉｄｔｈ",
    "ok:) fine;) x-e.g. b-a. yes:D etc.:) <3 :-) (ಠ_ಠ) o.O foo/a. word...:) e.g., i.e.)",
    "$3.50 €4,99 100% 5km 10a.m. 3p.m. 1,000,000 -5 +81312339258, 821-56-7707, 4.5/5 1st 2nd",
    "<div class=\"x\">a&amp;b</div> **bold** __init__ `code()` a/b\\c ../x.py:12 C++ C# .NET",
    "x\u0301 ﬁne \u200bzero\u200bwidth soft\u00adhyphen İstanbul straße Ωmega",
]


def _corpus() -> list[str]:
    """Real text: the sample chats, Python's own reference docs (code, tables, grammar), and
    generated repetitive or spammy text."""
    texts = list(TRICKY) + ADVERSARIAL
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
    # Words whose concatenations collide across segmentations ("a bc" and "ab c"): duplicate
    # n-grams equal as datatrove's "".join strings but not as word tuples.
    pieces = ["a", "b", "ab", "ba", "c", "bc", "abc", "ca"]
    for _ in range(150):
        texts.append(" ".join(rng.choice(pieces) for _ in range(rng.randint(5, 80))))
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
    for text in ADVERSARIAL:  # each also alone: no run seen before
        assert RunCachedWordTokenizer().word_tokenize(text) == \
            reference_words.word_tokenize(text), text


SOUP = list("aAbeEgimMpstT.,;:!?'\"’‘“”()[]{}<>-–—_/\\@#$%^&*+=~`|0123456789 …°€£") + [
    "e.g.", "a.m.", "p.m.", "can't", "don't", "U.S.", "Dr.", "'s", "n't", "http://", "www.",
    ".com", ":)", "<3", "--", "...", "Mr.", "vs.", "o.O", "'em", "'cause", "and/or", "w/o",
    "10a.m.", "ಠ_ಠ", "中文", "Ω", "ß", "İ", "ﬁ", "\u200b", "\u00ad", "x\u0301"]


def test_words_match_spacy_on_symbol_soup(reference_words: SpaCyTokenizer) -> None:
    """Seeded random runs of punctuation, digits, exceptions and URL pieces: the cases spaCy's
    prefix/suffix/infix loop, its exceptions and its special-case pass disagree on most."""
    rng = random.Random(11)
    ours = RunCachedWordTokenizer()
    for _ in range(3000):
        text = rng.choice([" ", "  ", "\n", "\t"]).join(
            "".join(rng.choice(SOUP) for _ in range(rng.randint(1, 6)))
            for _ in range(rng.randint(1, 6)))
        assert ours.word_tokenize(text) == reference_words.word_tokenize(text), repr(text)
    assert any(ours._sums[run] >> (4 * FIELD) for run in ours._runs)  # the pass was needed


def test_special_case_pass_goes_to_spacy(reference_words: SpaCyTokenizer) -> None:
    """"x-e.g." splits to x - e.g . before spaCy's last pass joins "e.g." again."""
    rules = EnglishRules.load()
    assert rules.split_run("x-e.g.") == ["x", "-", "e.g", "."]
    assert rules.rewritten(rules.split_run("x-e.g.")) and not rules.rewritten(["e.g."])
    text = "see x-e.g. here, ok:) thanks"
    assert RunCachedWordTokenizer().word_tokenize(text) == reference_words.word_tokenize(text) \
        == ["see", "x", "-", "e.g.", "here", ",", "ok", ":)", "thanks"]


def test_alnum_word_count_is_the_sum_of_the_runs(corpus: list[str]) -> None:
    """ingest's min_words count (``[^\\W_]+`` words) from the per-run sums: no character is
    both whitespace (a run boundary) and a word character, so no word spans two runs."""
    assert not [c for c in map(chr, range(sys.maxunicode + 1))
                if c.isspace() and (c.isalnum() or c == "_")]
    from tasks.ingest import WORD

    ours = RunCachedWordTokenizer()
    for text in corpus:
        assert ours.analyse(text).alnum_words == len(WORD.findall(text)), text[:80]


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


def test_language_batch_decides_as_datatrove(corpus: list[str], home: Path) -> None:
    """One fastText call per batch for the 2 best labels: the same decision, language and
    score as datatrove's LanguageFilter (all 176 labels per record), on every record."""
    from datatrove.pipeline.filters import LanguageFilter

    from tasks.assets import ensure_lid_model
    from tasks.ingest import LocalLanguageFilter

    path = ensure_lid_model(home)
    texts = corpus + ["Wie kann ich mein Passwort zurücksetzen?", "¿Dónde está mi pedido?",
                      "ok", "12345", "Merci beaucoup pour votre aide, ça marche."]
    outcomes = set()
    for languages, threshold in ((["en"], 0.65), (["en", "de"], 0.3), (None, 0.5),
                                 (["fr"], 0.65), (["en"], 0.99)):
        ours = LocalLanguageFilter(path, languages, threshold)
        reference = LanguageFilter(languages=languages, language_threshold=threshold)
        reference.model._model = ours.model.model  # datatrove's own predict, same local model
        if languages == ["fr"]:
            ours.max_remembered = 7  # forgets along the way, batches straddling the clearing
        docs = [Document(text=t, id="x") for t in texts + texts[:9]]  # repeats: remembered
        expected_docs = [Document(text=t, id="x") for t in texts + texts[:9]]
        got = [r for k in range(0, len(docs), 5) for r in ours.filter_batch(docs[k:k + 5])]
        for doc, ref_doc, result in zip(docs, expected_docs, got):
            expected = reference.filter(ref_doc)
            assert (result, doc.metadata) == (expected, ref_doc.metadata), doc.text[:60]
            outcomes.add(bool(expected))
        assert sum(ours.seen.values()) == len(docs)
    assert outcomes == {True, False}


def test_plain_ascii_is_left_as_ftfy_leaves_it() -> None:
    """RepairEncoding skips ftfy on printable ASCII with tabs and line breaks: ftfy (with the
    stage's settings) returns such text unchanged, character by character and in context."""
    import ftfy

    from tasks.ingest import NOT_PLAIN_ASCII, RepairEncoding

    config = RepairEncoding()._config
    plain = [chr(c) for c in range(128) if NOT_PLAIN_ASCII.search(chr(c)) is None]
    assert len(plain) == 95 + 3
    rng = random.Random(5)
    texts = ["".join(pair) for pair in zip(plain, reversed(plain))] + [
        "".join(rng.choice(plain) for _ in range(rng.randint(1, 300))) for _ in range(500)] + [
        "&amp; &lt;b&gt; don't \"quoted\" -- ... \r\n\tend", "a\n\nb\r\r\nc"]
    for text in texts:
        assert NOT_PLAIN_ASCII.search(text) is None
        assert ftfy.fix_text(text, config) == text, repr(text)
    # and what is not plain ASCII still goes through ftfy
    assert NOT_PLAIN_ASCII.search("donâ€™t") and NOT_PLAIN_ASCII.search("\x1b[31mred")


def _reference_verdicts(steps: list, records: list) -> list:
    """datatrove's way: every step's run() chained over a stream of Documents."""
    import tasks.ingest as ingest

    for step in steps:
        if isinstance(step, ingest.BaseFilter):
            step.exclusion_writer.drops = {}
    docs = (Document(text=ingest._doc_text(rec), id=rec.id, metadata={"record": rec, "i": i})
            for i, rec in enumerate(records))
    for step in steps:
        docs = step.run(docs)
    kept = {doc.metadata["i"]: ingest._kept_record(doc) for doc in docs}
    drops = {i: d for step in steps if isinstance(step, ingest.BaseFilter)
             for i, d in step.exclusion_writer.drops.items()}
    return [kept[i] if i in kept else drops[i] for i in range(len(records))]


@pytest.mark.parametrize("prose_only", [False, True], ids=["whole-text", "prose-only"])
def test_judge_decides_as_datatrove_filters(tmp_path: Path, home: Path, prose_only: bool,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """ingest's judge (each step over the whole chunk, batched language id, our tokenizer and
    Gopher rules, ftfy skipped on plain ASCII) against datatrove's own pipeline (stream of
    Documents, datatrove's Gopher filters on spaCy, LanguageFilter, ftfy on every text): the
    same verdict, reason, rule and details for every record of the scale corpus's generator."""
    import copy

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_scale import write_corpus

    import tasks.ingest as ingest
    from tasks.io import Quarantined, iter_input

    corpus = write_corpus(tmp_path / "corpus.jsonl", 400, 17)
    technical = [{"id": f"t{i}", "messages": [
        {"role": "user", "content": "How do I pin the version?"},
        {"role": "assistant", "content": f"Pin it in requirements:\n\n```\nx=={i}.0\ny>=2\n```\n"
                                         "Then run the installer again and check the log."}]}
        for i in range(20)]
    with open(corpus, "a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in technical))
    records = [r for r in iter_input(str(corpus)) if not isinstance(r, Quarantined)]
    cfg = IngestConfig(workers=1, gopher_prose_only=prose_only)
    steps = ingest.build_steps(cfg, ingest.build_filters(cfg, home))
    got = []
    for k in range(0, len(records), ingest.CHUNK):
        got += ingest.judge(steps, copy.deepcopy(records[k:k + ingest.CHUNK]))[0]

    words = SpaCyTokenizer("en")
    reference_steps = []
    for step in ingest.build_steps(cfg, ingest.build_filters(cfg, home)):
        if isinstance(step, FastGopherQualityFilter | FastGopherRepetitionFilter):
            # the step's class with datatrove's Gopher filter() under it (ingest's chat rules,
            # tasks/prose.py, call it through super()), on spaCy's words
            fast, base = ((FastGopherQualityFilter, GopherQualityFilter)
                          if isinstance(step, FastGopherQualityFilter)
                          else (FastGopherRepetitionFilter, GopherRepetitionFilter))
            on_datatrove = type("OnDatatrove", (fast,), {"filter": base.filter})
            cls = on_datatrove if type(step) is fast else type(
                "Reference", (type(step), on_datatrove), {})
            reference = cls.__new__(cls)
            reference.__dict__.update(step.__dict__, language=words)
            step = reference
        elif isinstance(step, ingest.LocalLanguageFilter):
            step.filter_batch = lambda batch, step=step: list(map(step.filter, batch))
        elif isinstance(step, ingest.MinWordsFilter):
            step.words = None
        reference_steps.append(step)
    monkeypatch.setattr(ingest, "NOT_PLAIN_ASCII", __import__("re").compile(""))  # ftfy always
    expected = []
    for k in range(0, len(records), ingest.CHUNK):
        expected += _reference_verdicts(reference_steps, copy.deepcopy(records[k:k + ingest.CHUNK]))

    def plain(verdict):
        if isinstance(verdict, tuple):
            return verdict[0], verdict[1], verdict[2], verdict[3].model_dump()
        return verdict.model_dump()

    assert [plain(v) for v in got] == [plain(v) for v in expected]
    reasons = {v[0] for v in got if isinstance(v, tuple)}
    assert {"language", "min_words", "gopher_repetition"} <= reasons, reasons
