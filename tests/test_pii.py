"""Stage 2: PII scrub with Presidio, offline, on small records written here."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from model_fixtures import write_stage_dir as _stage_dir

from data_contracts.config import PiiConfig
from data_contracts.records import ChatSample, Message
from tasks.io import read_records
from tasks.pii import SAMPLE_NAME, get_engine, run_pii

# (case id, placeholder, value): each value is planted in a sentence of its own record.
CASES = [
    ("email-plain", "<EMAIL>", "john.doe@example.com"),
    ("email-plus", "<EMAIL>", "JANE_X+tag@mail.co.uk"),
    ("email-sub", "<EMAIL>", "a.b-c@support.acme-corp.org"),
    ("phone-uk", "<PHONE>", "+44 20 7946 0958"),
    ("phone-de", "<PHONE>", "+49 30 123456"),
    ("phone-paren", "<PHONE>", "(555) 123-4567"),
    ("phone-dots", "<PHONE>", "555.123.4567"),
    ("phone-dash", "<PHONE>", "415-555-0199"),
    ("phone-us-intl", "<PHONE>", "+1 212 555 0100"),
    ("cc-spaces", "<CREDIT_CARD>", "4111 1111 1111 1111"),
    ("cc-dashes", "<CREDIT_CARD>", "5500-0000-0000-0004"),
    ("cc-amex", "<CREDIT_CARD>", "378282246310005"),
    ("cc-plain", "<CREDIT_CARD>", "4012888888881881"),
    ("cc-mc-2series", "<CREDIT_CARD>", "2223 0031 2200 3222"),  # bench_pii: Presidio missed 2xxx
    ("ssn-dashes", "<SSN>", "219-09-9999"),
    ("ssn-spaces", "<SSN>", "536 22 1234"),
    ("iban-gb", "<IBAN>", "GB82 WEST 1234 5698 7654 32"),
    ("iban-de", "<IBAN>", "DE89370400440532013000"),
    ("iban-fr", "<IBAN>", "FR14 2004 1010 0505 0001 3M02 606"),
    ("ipv4", "<IP>", "192.168.1.10"),
    ("ipv4-b", "<IP>", "10.20.30.254"),
    ("ipv6-full", "<IP>", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
    ("ipv6-short", "<IP>", "fe80::1ff:fe23:4567:890a"),
    ("url-creds", "<URL_CREDENTIALS>", "user:pa55word@example.org"),
    ("url-creds-db", "<URL_CREDENTIALS>", "admin:Sup3rS3cret@db.internal:5432"),
    ("aws-key-id", "<SECRET>", "AKIAIOSFODNN7EXAMPLE"),
    ("aws-secret", "<SECRET>", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("github", "<SECRET>", "ghp_1234567890abcdefghijABCDEFGHIJ123456"),
    ("github-pat", "<SECRET>", "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"),
    ("gitlab", "<SECRET>", "glpat-abcdefghij0123456789"),
    ("slack", "<SECRET>", "xoxb-123456789012-abcdefghijkl"),
    ("jwt", "<SECRET>", "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0"
                        ".dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"),
    ("private-key", "<SECRET>", "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA0123456789abcd"
                                "\nefGHijklMNOP==\n-----END RSA PRIVATE KEY-----"),
    ("api-key-quoted", "<SECRET>", "sk-live-abcdef123456"),
    ("password-bare", "<SECRET>", "hunter22"),
]
# How each value sits in its sentence (secrets need their assignment or URL around them).
CONTEXT = {
    "aws-secret": "aws_secret_access_key = {v}",
    "api-key-quoted": 'config: api_key = "{v}"',
    "password-bare": "login with password: {v} please",
    "url-creds": "clone https://{v}/repo.git now",
    "url-creds-db": "DATABASE_URL=postgres://{v}/app",
    "ssn-dashes": "my SSN is {v}.",
    "ssn-spaces": "social security number {v}",
}
LOOKALIKES = (
    "Upgrade to v2.14.3 before 2024-05-01 (or 05/01/2024). Request 123e4567-e89b-12d3-a456-"
    "426614174000 hit commit 3f786850e387550fdab836ed7e6dc881de23001b; order #48213 ships. "
    "Serve on localhost:8080 or port :8080. ISBN 978-3-16-148410-0, Python 3.11.7, "
    "costs $1,234.56, the token: required field, max_tokens=100000, ratio 16:9."
)


def _chat(rid: str, user: str, system: str | None = None) -> ChatSample:
    msgs = [Message(role="system", content=system)] if system else []
    msgs += [Message(role="user", content=user), Message(role="assistant", content="Noted.")]
    return ChatSample(id=rid, messages=msgs)


def _sentence(case: str, value: str) -> str:
    return "Please note " + CONTEXT.get(case, "{v}").format(v=value) + " for the record."


@pytest.fixture(scope="module")
def scrubbed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, ChatSample]]:
    base = tmp_path_factory.mktemp("pii")
    train = [_chat(case, _sentence(case, value)) for case, _, value in CASES]
    train += [
        _chat("lookalikes", LOOKALIKES),
        _chat("plain", "What is the capital of France?"),
        _chat("system", "Hi there.", system="Escalate to ops@corp.example.com if stuck."),
        ChatSample(id="text-doc", text="Server 172.16.0.5 is down, mail root@example.net."),
    ]
    heldout = [_chat("eval-1", "Reach me on +44 20 7946 0958 or eve@example.com.")]
    src = _stage_dir(base / "01-ingest", train, heldout)
    out = base / "02-pii"
    run_pii(src, out, PiiConfig(), home=base)
    recs = {r.id: r for r in read_records(out)}
    recs.update({r.id: r for r in read_records(out, "heldout")})
    return out, recs


@pytest.mark.parametrize("case,placeholder,value", CASES, ids=[c[0] for c in CASES])
def test_entity_replaced_by_placeholder(scrubbed, case: str, placeholder: str, value: str):
    _, recs = scrubbed
    text = recs[case].messages[0].content
    assert value not in text
    assert placeholder in text
    assert text.startswith("Please note ") and text.endswith(" for the record.")


def test_lookalikes_and_plain_text_unchanged(scrubbed):
    _, recs = scrubbed
    assert recs["lookalikes"].messages[0].content == LOOKALIKES
    assert recs["plain"].messages[0].content == "What is the capital of France?"
    assert "pii" not in recs["lookalikes"].meta


def test_system_prompt_text_records_and_heldout_are_scrubbed(scrubbed):
    out, recs = scrubbed
    assert recs["system"].messages[0].content == "Escalate to <EMAIL> if stuck."
    assert recs["text-doc"].text == "Server <IP> is down, mail <EMAIL>."
    heldout = list(read_records(out, "heldout"))
    assert [r.id for r in heldout] == ["eval-1"]
    assert heldout[0].messages[0].content == "Reach me on <PHONE> or <EMAIL>."
    assert heldout[0].meta["pii"] == {"EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1}


def test_ledger_metrics_and_meta(scrubbed):
    out, recs = scrubbed
    m = json.loads((out / "manifest.json").read_text())
    assert m["records_in"] == len(CASES) + 5 == m["kept"]
    assert m["splits"] == {"train": len(CASES) + 4, "heldout": 1}
    assert m["deduplicated"] == m["quarantined"] == 0 and m["filtered"] == {}
    metrics = m["metrics"]
    assert metrics["pii.EMAIL_ADDRESS"] == 3 + 1 + 1 + 1  # cases + system + text doc + eval
    assert metrics["pii.CREDIT_CARD"] == 5
    assert metrics["pii.records_with_pii"] == len(CASES) + 3
    # The "Noted." answers and the plain question never reach the analyzer.
    assert metrics["pii.texts_screened_out"] >= len(CASES) + 5
    assert recs["iban-gb"].meta["pii"] == {"IBAN_CODE": 1}
    assert m["info"]["redactions_sample"].endswith(SAMPLE_NAME)


# False positives benchmarks/bench_pii.py found: each was redacted before the fix.
BENCH_LOOKALIKES = [
    "Invoice for 04/05/2020 lists 0.0.0.0:4954, reference v2.4.18.",  # unspecified IP
    "It listens on 127.0.0.1:8080 and [::1]:8080 only.",  # loopback
    "After upgrading to 16.8.67.6153 on Monday, the build fails.",  # dotted version as DE phone
    "Log says 1631721904 at v4.14.11 then nothing else.",  # Unix timestamp as IN/BR phone
    "Can you check order number 4155550123? And ticket #2125550123 too.",  # references
    "Invoice dated 12.12.2016 (paid 23.1.2016 at (1541100059)).",  # dotted dates, IL/BR phones
    "Started 2020-11-16 20:46:16.414 on 0.0.0.0:1685.",  # time and port tails as DE phones
    "See port 16904 and localhost:16953.",  # short codes
    "Request 04370272-2931-5549-abb3-e90ef37aaaf2 and e49b3cfc-d331-ae1e-075a-052003586213 "
    "failed, see ticket INC-1698058.",  # pieces of UUIDs and hyphenated ids
]


def test_benchmark_lookalikes_unchanged_while_real_values_go(tmp_path: Path):
    real = _chat("real", "Call me on 4155550123 or (212) 555-0100, I'm at 192.168.1.10; "
                         "my number is 1-415-555-0123.")
    src = _stage_dir(tmp_path / "in", [_chat(f"la{i}", t) for i, t in enumerate(BENCH_LOOKALIKES)]
                     + [real])
    run_pii(src, tmp_path / "out", PiiConfig(), home=tmp_path)
    recs = {r.id: r.messages[0].content for r in read_records(tmp_path / "out")}
    for i, text in enumerate(BENCH_LOOKALIKES):
        assert recs[f"la{i}"] == text
    assert recs["real"] == "Call me on <PHONE> or <PHONE>, I'm at <IP>; my number is <PHONE>."


def test_sample_report_is_masked(scrubbed):
    out, _ = scrubbed
    rows = [json.loads(line) for line in (out / SAMPLE_NAME).read_text().splitlines()]
    assert 0 < len(rows) <= 50
    assert {"id", "entity", "replacement", "masked"} <= set(rows[0])
    raw = (out / SAMPLE_NAME).read_text()
    for _, _, value in CASES:
        assert value not in raw
        assert re.sub(r"\W", "", value) not in re.sub(r"\W", "", raw)
    emails = [r["masked"] for r in rows if r["entity"] == "EMAIL_ADDRESS"]
    assert "j***@e***.com" in emails
    # Nor does any stage file hold a raw value (only the scrubbed records are written).
    for file in out.glob("*.jsonl.gz"):
        with gzip.open(file, "rt") as fh:
            assert "john.doe@example.com" not in fh.read()


def test_prescreen_never_rejects_a_planted_value():
    screen = get_engine(PiiConfig()).screen
    for case, _, value in CASES:
        assert screen(_sentence(case, value)), case
    assert not screen("What is the capital of France?")
    assert screen(LOOKALIKES)  # so the look-alike test really goes through the analyzer


def test_pseudonyms_consistent_within_record_and_deterministic(tmp_path: Path):
    rec = ChatSample(id="r1", messages=[
        Message(role="user", content="Mail alice@corp.com and bob@corp.com, call 415-555-0199."),
        Message(role="assistant", content="I mailed ALICE@corp.com; 415 555 0199 was busy."),
    ])
    other = _chat("r2", "Write to bob@corp.com please.")
    src = _stage_dir(tmp_path / "in", [rec, other])
    cfg = PiiConfig(mode="pseudonym")
    outs = []
    for name in ("a", "b"):
        run_pii(src, tmp_path / name, cfg, home=tmp_path)
        outs.append({r.id: r for r in read_records(tmp_path / name)})
    assert outs[0] == outs[1]  # deterministic
    user, answer = (m.content for m in outs[0]["r1"].messages)
    fakes = re.findall(r"user\d+@example\.com", user)
    assert len(set(fakes)) == 2  # two different people, two different fakes
    alice_fake = fakes[0] if user.index(fakes[0]) < user.index(fakes[1]) else fakes[1]
    assert alice_fake in answer  # same person in the next message, same fake
    phone_fakes = re.findall(r"\+1-555-01\d\d", user + answer)
    assert len(phone_fakes) == 2 and len(set(phone_fakes)) == 1
    for raw in ("alice@", "bob@corp", "415-555-0199", "415 555 0199"):
        assert raw not in user + answer
    assert re.fullmatch(r"Write to user\d+@example\.com please\.",
                        outs[0]["r2"].messages[0].content)


def test_deny_list_persons(tmp_path: Path):
    src = _stage_dir(tmp_path / "in", [_chat("p", "Ask Jonathan Crane about Jonathan's plan.")])
    run_pii(src, tmp_path / "out", PiiConfig(deny_list_persons=["Jonathan Crane"]), home=tmp_path)
    text = next(read_records(tmp_path / "out")).messages[0].content
    assert text == "Ask <PERSON> about Jonathan's plan."


def test_spacy_ner_pipeline_enables_person(tmp_path: Path):
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("entity_ruler").add_patterns(
        [{"label": "PERSON", "pattern": [{"LOWER": "ada"}, {"LOWER": "lovelace"}]},
         {"label": "GPE", "pattern": "London"}])
    nlp.to_disk(tmp_path / "ner-model")
    src = _stage_dir(tmp_path / "in", [_chat("n", "Ada Lovelace was born in London in 1815.")])
    cfg = PiiConfig(spacy_model=str(tmp_path / "ner-model"))
    m = run_pii(src, tmp_path / "out", cfg, home=tmp_path)
    text = next(read_records(tmp_path / "out")).messages[0].content
    assert text == "<PERSON> was born in <LOCATION> in 1815."
    assert {"PERSON", "LOCATION"} <= set(m.info["entities"])


def test_missing_spacy_model_fails_loudly(tmp_path: Path):
    src = _stage_dir(tmp_path / "in", [_chat("n", "hello")])
    with pytest.raises(ValueError, match="spacy_model"):
        run_pii(src, tmp_path / "out", PiiConfig(spacy_model="en_core_web_nothing"),
                home=tmp_path)


def test_unchanged_input_is_skipped(tmp_path: Path):
    src = _stage_dir(tmp_path / "in", [_chat("a", "mail x@example.com")])
    first = run_pii(src, tmp_path / "out", PiiConfig(), home=tmp_path)
    again = run_pii(src, tmp_path / "out", PiiConfig(), home=tmp_path)
    assert again.started_at == first.started_at and again.output_files == first.output_files
    changed = run_pii(src, tmp_path / "out", PiiConfig(mode="pseudonym"), home=tmp_path)
    assert changed.config_digest != first.config_digest
