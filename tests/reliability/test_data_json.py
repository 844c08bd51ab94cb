"""`.json` inputs: the usual Alpaca form (one JSON array of records) is read as records, a
`.json` file of JSON Lines as JSONL, and a file that is neither is one error naming it, with
none of its lines copied anywhere."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from data_contracts.config import IngestConfig
from data_contracts.manifest import Manifest
from tasks.io import iter_input

ALPACA = [
    {"instruction": "Explain how to reset a password on the account page.",
     "input": "", "output": "Open the settings page, choose security and press reset; the "
                            "link arrives by email within a few minutes."},
    {"instruction": "Summarise the refund policy for a customer.",
     "input": "Refunds, five business days, original card.",
     "output": "Refunds go back to the original card within five business days of approval."},
    {"instruction": "Tell the customer how to track an order [with brackets] and \"quotes\".",
     "input": "", "output": "Open the orders page and press track, {braces} are fine too."},
]
SECRET_IN_NEITHER = "neither.owner@example.com"


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory, session_home: Path) -> tuple[Path, Path]:
    from tasks.assets import ensure_lid_model
    from tasks.ingest import run_ingest

    ensure_lid_model(session_home)
    src = tmp_path_factory.mktemp("json-inputs")
    (src / "alpaca.json").write_text(json.dumps(ALPACA, indent=2))  # pretty-printed array
    (src / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in ALPACA[:2]))
    # A pretty-printed object: neither an array nor one record per line.
    (src / "neither.json").write_text(json.dumps(
        {"instruction": f"Write to {SECRET_IN_NEITHER} about the invoice.", "input": "",
         "output": "Sure, I will write to them today about the invoice."}, indent=2))
    out = tmp_path_factory.mktemp("json-ingest") / "out"
    run_ingest(str(src / "*.json"), out, IngestConfig(), home=session_home)
    return src, out


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_json_array_and_json_lines_are_read_as_records(ingested) -> None:
    src, out = ingested
    m = Manifest.read(out).check()
    records = [r for f in sorted(out.glob("train-*.jsonl.gz")) for r in _rows(f)]
    records += [r["record"] for r in _rows(out / "filtered.jsonl.gz")]
    by_file: dict[str, list[int]] = {}
    for rec in records:
        by_file.setdefault(Path(rec["source"]["file"]).name, []).append(rec["source"]["line"])
    # Each array element's line is the line its object starts on (indent=2: 2, 7, 12).
    assert sorted(by_file["alpaca.json"]) == [2, 7, 12]
    assert sorted(by_file["lines.json"]) == [1, 2]
    assert m.records_in == 6 and m.quarantined == 1


def test_a_file_that_is_neither_is_one_error_naming_it(ingested) -> None:
    src, out = ingested
    (entry,) = _rows(out / "quarantine.jsonl.gz")
    assert entry["file"] == str(src / "neither.json") and entry["line"] == 1
    assert entry["error"].startswith(f"{src / 'neither.json'}: neither a JSON array of records "
                                     "nor JSON Lines")
    assert entry["raw"] == ""
    for path in out.iterdir():  # its lines are copied nowhere
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        assert SECRET_IN_NEITHER.encode() not in data, path.name


def test_array_is_streamed_within_the_record_bound(tmp_path: Path) -> None:
    """An element over max_record_bytes is skipped with its size; the elements around it and
    a cut-off array's readable part are kept, the rest is one entry."""
    from tasks.io import ReadLimits  # the bound's settings (new with it)
    big = {"instruction": "x" * 5000, "output": "y"}
    path = tmp_path / "big.json"
    path.write_text(json.dumps([ALPACA[0], big, ALPACA[1]]))
    items = list(iter_input(str(path), ReadLimits(max_record_bytes=4096)))
    assert [type(i).__name__ for i in items] == ["ChatSample", "Quarantined", "ChatSample"]
    size = len(json.dumps(big)) + 1  # the element as written, with the space after its comma
    assert f"array element is {size} bytes, over ingest.max_record_bytes (4096)" in items[1].error
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps(ALPACA)[:-40])
    items = list(iter_input(str(cut)))
    assert [type(i).__name__ for i in items] == ["ChatSample", "ChatSample", "Quarantined"]
    assert items[-1].error.startswith("JSON array not closed")
