"""The record contract and the config: every input form parses into one ChatSample shape."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_contracts.config import ConfigError, load_config
from data_contracts.records import ChatSample, RecordError, parse_record
from tasks.io import Quarantined, iter_input

CHAT = {"id": "c1", "messages": [
    {"role": "system", "content": "You are a support agent."},
    {"role": "user", "content": "How do I reset my password?"},
    {"role": "assistant", "content": "Click Forgot password on the sign-in page."}]}
SHAREGPT_FROM = {"id": "s1", "conversations": [
    {"from": "human", "value": "Where is my order?"},
    {"from": "gpt", "value": "Track it under Orders > Track shipment."}]}
SHAREGPT_ROLE = {"conversations": [
    {"role": "user", "content": "Where is my order?"},
    {"role": "assistant", "content": "Track it under Orders > Track shipment."}]}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _roles(rec: ChatSample) -> list[str]:
    return [m.role for m in rec.messages]


def test_openai_messages_keep_system_prompt_and_id() -> None:
    rec = parse_record(CHAT)
    assert rec.id == "c1"
    assert _roles(rec) == ["system", "user", "assistant"]
    assert rec.meta["format"] == "messages"


@pytest.mark.parametrize("obj", [SHAREGPT_FROM, SHAREGPT_ROLE], ids=["from-value", "role-content"])
def test_sharegpt_both_schemes(obj: dict) -> None:
    rec = parse_record(obj)
    assert _roles(rec) == ["user", "assistant"]
    assert rec.messages[1].content == "Track it under Orders > Track shipment."
    assert rec.meta["format"] == "sharegpt"


def test_alpaca_with_and_without_input() -> None:
    plain = parse_record({"instruction": "How do I get a refund?", "output": "Go to Orders."})
    assert plain.messages[0].content == "How do I get a refund?"
    with_input = parse_record({"instruction": "Answer the customer.", "input": "Order BB-1 broke.",
                               "output": "We will refund it."})
    assert with_input.messages[0].content == "Answer the customer.\n\nOrder BB-1 broke."
    assert _roles(with_input) == ["user", "assistant"]
    empty_input = parse_record({"instruction": "How do I get a refund?", "input": "",
                                "output": "Go to Orders."})
    assert empty_input.messages == plain.messages


def test_missing_id_gets_stable_content_hash() -> None:
    a = parse_record(SHAREGPT_ROLE)
    b = parse_record(json.loads(json.dumps(SHAREGPT_ROLE)))
    changed = json.loads(json.dumps(SHAREGPT_ROLE))
    changed["conversations"][0]["content"] = "Where is my parcel?"
    assert a.id == b.id and len(a.id) == 16
    assert parse_record(changed).id != a.id
    assert parse_record({"id": 7, **SHAREGPT_ROLE}).id == "7"


@pytest.mark.parametrize(("messages", "field"), [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
      {"role": "assistant", "content": "c"}], "messages[1].role"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}], "messages[0].role"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
     "messages[1].role"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}],
     "messages[1].content"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "messages[1].role"),
    ([{"role": "user"}, {"role": "assistant", "content": "b"}], "messages[0].content"),
])
def test_bad_turns_name_the_field(messages: list[dict], field: str) -> None:
    with pytest.raises(RecordError) as err:
        parse_record({"messages": messages})
    assert err.value.field == field
    assert field in str(err.value)


def test_every_input_form_parses(tmp_path: Path) -> None:
    _jsonl(tmp_path / "chat.jsonl", [CHAT])
    with gzip.open(tmp_path / "share.jsonl.gz", "wt") as fh:
        fh.write(json.dumps(SHAREGPT_FROM) + "\n")
    (tmp_path / "role.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress((json.dumps(SHAREGPT_ROLE) + "\n").encode()))
    with open(tmp_path / "alpaca.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "instruction", "input", "output"])
        writer.writeheader()
        writer.writerow({"id": "a1", "instruction": "Refund?", "input": "", "output": "Yes."})
        writer.writerow({"id": "", "instruction": "Reply.", "input": "Late parcel, line one\n"
                         "line two", "output": "Sorry."})
    pq.write_table(pa.Table.from_pylist([{"id": "k1", "text": "Passwords need 12 characters."}]),
                   tmp_path / "kb.parquet")
    (tmp_path / "notes.txt").write_text("A plain text document.")

    recs = list(iter_input(str(tmp_path / "*")))
    assert not [r for r in recs if isinstance(r, Quarantined)]
    by_file = {Path(r.source.file).name: r for r in recs if Path(r.source.file).suffix != ".csv"}
    assert by_file["chat.jsonl"].id == "c1"
    assert by_file["share.jsonl.gz"].id == "s1"
    assert _roles(by_file["role.jsonl.zst"]) == ["user", "assistant"]
    assert by_file["kb.parquet"].text == "Passwords need 12 characters."
    assert by_file["kb.parquet"].kind == "text"
    assert by_file["notes.txt"].text == "A plain text document."
    csv_recs = [r for r in recs if r.source.file.endswith(".csv")]
    assert [r.id for r in csv_recs][0] == "a1" and len(csv_recs[1].id) == 16
    assert csv_recs[1].messages[0].content == "Reply.\n\nLate parcel, line one\nline two"
    assert [r.source.line for r in csv_recs] == [2, 4]  # the line each row ends on

    both = list(iter_input([str(tmp_path / "chat.jsonl"), str(tmp_path / "*.parquet")]))
    assert [r.id for r in both] == ["c1", "k1"]


def test_malformed_lines_are_quarantined_with_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join([
        json.dumps(CHAT).encode(),
        b'{"messages": [',
        json.dumps({"messages": [{"role": "user", "content": "a"},
                                 {"role": "user", "content": "b"}]}).encode(),
        b'{"instruction": "Hi", "output": "ol\xe9"}',
    ]) + b"\n")
    out = list(iter_input(path))
    assert isinstance(out[0], ChatSample)
    bad = [q for q in out if isinstance(q, Quarantined)]
    assert [(Path(q.source.file).name, q.source.line) for q in bad] == [
        ("mixed.jsonl", 2), ("mixed.jsonl", 3), ("mixed.jsonl", 4)]
    assert bad[0].error.startswith("invalid JSON")
    assert "messages[1].role" in bad[1].error
    assert "UTF-8" in bad[2].error


def test_config_unknown_key_names_it(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ingest:\n  min_wrods: 3\n")
    with pytest.raises(ConfigError, match=r"ingest\.min_wrods: unknown key"):
        load_config(cfg)
    with pytest.raises(ConfigError, match=r"ingest\.nope: unknown key"):
        load_config(None, ["ingest.nope=1"])


def test_config_overrides_plain_and_nested(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ingest:\n  min_words: 3\ntrain:\n  lora:\n    r: 8\n")
    loaded = load_config(cfg, ["ingest.min_words=5", "train.lora.r=32",
                               "ingest.languages=[en, de]", "ingest.refusal_filter=true"])
    assert loaded.ingest.min_words == 5
    assert loaded.train.lora.r == 32
    assert loaded.ingest.languages == ["en", "de"]
    assert loaded.ingest.refusal_filter is True
    with pytest.raises(ConfigError, match=r"ingest\.min_words"):
        load_config(cfg, ["ingest.min_words=-1"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(cfg, ["ingest.min_words"])


def test_preference_pair_forms_normalise_to_one_record() -> None:
    plain = parse_record({"prompt": "Refund?", "chosen": "Within 30 days.", "rejected": "No."})
    conv = parse_record({
        "prompt": [{"role": "user", "content": "Refund?"}],
        "chosen": [{"role": "assistant", "content": "Within 30 days."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    })
    implicit = parse_record({  # trl's implicit prompt: both sides repeat the prompt turns
        "chosen": [{"role": "user", "content": "Refund?"},
                   {"role": "assistant", "content": "Within 30 days."}],
        "rejected": [{"role": "user", "content": "Refund?"},
                     {"role": "assistant", "content": "No."}],
    })
    for rec in (plain, conv, implicit):
        assert rec.kind == "preference"
        assert _roles(rec) == ["user"]
        assert (rec.chosen, rec.rejected) == ("Within 30 days.", "No.")
    assert plain.id == conv.id == implicit.id  # content id: same pair, same id
    assert [m.role for m in plain.conversation()] == ["user", "assistant"]
    assert plain.texts() == ["Refund?", "Within 30 days.", "No."]
    scrubbed = plain.with_texts(["Refund?", "<EMAIL>", "No <PHONE>"])
    assert (scrubbed.chosen, scrubbed.rejected) == ("<EMAIL>", "No <PHONE>")
    assert "rejected: No." in plain.joined_text()
    with_system = parse_record({"system": "Be brief.", "prompt": "Hi", "chosen": "Hello.",
                                "rejected": "What?"})
    assert _roles(with_system) == ["system", "user"]


@pytest.mark.parametrize(("obj", "field"), [
    ({"prompt": "Q", "chosen": "A"}, "rejected"),
    ({"prompt": "Q", "chosen": "", "rejected": "B"}, "chosen"),
    ({"prompt": "Q", "chosen": "A", "rejected": 3}, "rejected"),
    ({"chosen": "A", "rejected": "B"}, "prompt"),
    ({"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
      "chosen": "A", "rejected": "B"}, "prompt"),
    ({"chosen": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A"}],
      "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B"}]},
     "rejected"),
    ({"prompt": "Q", "chosen": [{"role": "user", "content": "A"}], "rejected": "B"},
     "chosen[0].role"),
])
def test_bad_preference_pairs_name_the_field(obj: dict, field: str) -> None:
    with pytest.raises(RecordError) as err:
        parse_record(obj)
    assert err.value.field == field


def test_fsspec_url_inputs_are_read(tmp_path: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    with fs.open("/bucket/inbox/a.jsonl", "w") as fh:
        fh.write(json.dumps(CHAT) + "\n")
    with fs.open("/bucket/inbox/b.jsonl.zst", "wb") as fh:
        fh.write(zstandard.ZstdCompressor().compress(
            (json.dumps({"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}) + "\n").encode()))
    _jsonl(tmp_path / "local.jsonl", [{"text": "A local document."}])
    recs = list(iter_input(["memory://bucket/inbox/*", f"file://{tmp_path}/local.jsonl"]))
    assert [r.kind for r in recs] == ["chat", "preference", "text"]
    assert recs[0].source.file.startswith("memory://")
    assert recs[0].source.file.endswith("/bucket/inbox/a.jsonl")
    assert recs[1].source.line == 1
    with pytest.raises(FileNotFoundError, match="memory://bucket/none"):
        list(iter_input(["memory://bucket/none/*.jsonl"]))
