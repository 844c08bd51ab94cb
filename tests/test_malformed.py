"""Ingest on malformed input: no crash, every line accounted for, each bad line with its reason.

The corpus is benchmarks/bench_malformed.py's (JSONL, JSONL.gz, CSV, Parquet; bad JSON, invalid
UTF-8, wrong types, a 2 MB line, deep nesting, a truncated .gz ...); the benchmark runs it
through the CLI, this test through `run_ingest` in-process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from data_contracts.config import IngestConfig
from data_contracts.manifest import Manifest
from tasks.assets import ensure_lid_model
from tasks.ingest import run_ingest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_malformed as bm  # noqa: E402


@pytest.fixture(scope="module")
def ingested(session_home: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[list[bm.Unit], Path, bm.Report]:
    """The malformed corpus built and ingested once for the module."""
    ensure_lid_model(session_home)
    work = tmp_path_factory.mktemp("malformed")
    units = bm.build_corpus(work / "corpus")
    run_ingest(str(work / "corpus" / "*"), work / "ingest", IngestConfig(), home=session_home)
    return units, work / "ingest", bm.check(units, work / "ingest")


def test_ledger_adds_up_and_every_line_has_one_outcome(ingested) -> None:
    units, stage_dir, report = ingested
    manifest = Manifest.read(stage_dir).check()
    non_blank = [u for u in units if u.case.expect != "blank"]
    assert manifest.records_in == len(non_blank) == report.units
    assert manifest.kept + manifest.filtered_total + manifest.quarantined == len(non_blank)
    assert report.unexpected == []  # no outcome for a blank line, none twice
    found, _ = bm.outcomes(stage_dir)
    assert set(found) == {(u.file, u.line) for u in non_blank}


def test_every_case_has_its_expected_outcome(ingested) -> None:
    _, _, report = ingested
    wrong = [f"{u.file}:{u.line} {u.case.name}: expected {u.case.expect}, got "
             f"{got.outcome if got else 'nothing'}" for u, got, _ in report.mismatches]
    assert wrong == []


# (file, line) -> (case name, start of the quarantine error): the field is named first.
QUARANTINED = {
    ("malformed.jsonl", 2): ("truncated JSON (line cut off)", "invalid JSON: "),
    ("malformed.jsonl", 5): ("invalid UTF-8 bytes (0xFF 0xFE) in content",
                             "invalid UTF-8 bytes in line"),
    ("malformed.jsonl", 11): ("wrong type: content 5", "field 'messages[0].content': is a int"),
    ("malformed.jsonl", 13): ('wrong type: messages "x"', "field 'messages': must be a non-empty"),
    ("malformed.jsonl", 15): ("wrong type: id [1]", "field 'id': must be a string or integer"),
    ("malformed.jsonl", 19): ("unknown role 'bot'", "field 'messages[1].role': unknown role 'bot'"),
    ("malformed.jsonl", 21): ("empty conversation: messages []", "field 'messages': must be a non"),
    ("malformed.jsonl", 24): ("missing assistant turn", "field 'messages': must end with an "
                              "assistant turn"),
    ("malformed.jsonl", 25): ("empty assistant turn", "field 'messages[1].content': is an empty "
                              "assistant turn"),
    ("malformed.jsonl", 29): ("2 MB line, invalid JSON (unterminated string)", "invalid JSON: "),
    ("malformed.jsonl", 30): ("deep nesting: 100,000 '['", "invalid JSON: nested too deeply"),
    ("malformed.jsonl", 32): ("deep nesting: meta 900 levels (parses)", "field 'meta': nested"),
    ("malformed.jsonl", 34): ("JSON array instead of object",
                              "field '<record>': must be a JSON object, got list"),
    ("malformed.jsonl", 40): ("preference pair, rejected missing", "field 'rejected': is missing"),
    ("alpaca.csv", 5): ("CSV: invalid UTF-8 in output", "field 'output': invalid UTF-8 bytes"),
    ("texts.parquet", 2): ("Parquet: invalid UTF-8 in a string column",
                           "field 'text': invalid UTF-8 bytes"),
    ("corrupt.parquet", 1): ("not a Parquet file", "unreadable file from line 1 on: OSError"),
}


@pytest.mark.parametrize("where", sorted(QUARANTINED), ids=lambda w: f"{w[0]}:{w[1]}")
def test_quarantine_names_file_line_and_field(ingested, where: tuple[str, int]) -> None:
    units, stage_dir, _ = ingested
    name, error = QUARANTINED[where]
    assert next(u for u in units if (u.file, u.line) == where).case.name == name
    found, _ = bm.outcomes(stage_dir)
    entry = found[where].entry
    assert found[where].kind == "quarantined"
    assert Path(entry["file"]).name == where[0] and entry["line"] == where[1]
    assert entry["error"].startswith(error), entry["error"]
    assert len(entry["raw"]) <= bm.SNIPPET_MAX  # a 2 MB line leaves a short snippet


def test_truncated_gzip_keeps_what_it_can_and_quarantines_the_rest(ingested) -> None:
    units, stage_dir, _ = ingested
    found, _ = bm.outcomes(stage_dir)
    lines = sorted(line for file, line in found if file == "truncated.jsonl.gz")
    readable = sum(u.case.expect == "kept" for u in units if u.file == "truncated.jsonl.gz")
    assert 0 < readable < 40 and lines == list(range(1, readable + 2))
    assert all(found[("truncated.jsonl.gz", n)].kind == "kept" for n in range(1, readable + 1))
    rest = found[("truncated.jsonl.gz", readable + 1)].entry["error"]
    assert rest.startswith(f"unreadable file from line {readable + 1} on: EOFError")


def test_huge_valid_line_filtered_by_length_not_crashed(ingested) -> None:
    _, stage_dir, _ = ingested
    found, _ = bm.outcomes(stage_dir)
    huge = found[("malformed.jsonl", 28)]
    assert huge.outcome == "filtered:max_chars" and huge.entry["chars"] > 2_000_000


def test_bom_crlf_and_control_chars_are_repaired_not_lost(ingested) -> None:
    _, stage_dir, _ = ingested
    found, _ = bm.outcomes(stage_dir)
    bom = found[("bom_crlf.jsonl", 1)].entry  # a BOM would otherwise break the first line
    assert bom["messages"][0]["content"] == bm.chat(18)["messages"][0]["content"]
    csv_first = found[("alpaca.csv", 2)].entry  # ... and the first CSV column's name
    assert csv_first["messages"][0]["content"] == bm.qa(30)[0]
    assert found[("malformed.jsonl", 49)].kind == "kept"  # stray CR inside the line
    for where in (("malformed.jsonl", 9), ("alpaca.csv", 10)):  # NUL: stripped by ftfy
        rec = found[where].entry
        assert rec["meta"]["encoding_repaired"] is True
        assert not any("\x00" in m["content"] for m in rec["messages"])
