"""Malformed-input benchmark: ingest must account for every line of broken input, with a reason.

    .venv/bin/python benchmarks/bench_malformed.py [--workdir DIR] [--huge-mb 2]

Builds a corpus of JSONL, JSONL.gz, CSV and Parquet files in which broken records (bad and
truncated JSON, invalid UTF-8, wrong types, unknown roles, empty conversations, a 2 MB line,
NUL bytes, a BOM, CRLF endings, deep nesting, duplicate keys, broken preference pairs, a
truncated gzip stream, a file that is not Parquet...) sit between valid ones, runs the ingest
stage alone through the CLI (`ftflow stage ingest`), and checks: exit status 0, the manifest's
counts add up (`Manifest.check()`), every non-blank input line (CSV/Parquet: row) has exactly
one outcome in the stage directory (kept, filtered with a reason, or quarantined with file,
line and error), and each outcome is the expected one. Prints a table, writes
benchmarks/results/malformed.md. tests/test_malformed.py runs the same corpus in-process.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import platform
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_contracts.manifest import Manifest  # noqa: E402
from sample_data.generate import TOPICS  # noqa: E402

BOM = b"\xef\xbb\xbf"
SNIPPET_MAX = 201  # tasks.io.MAX_SNIPPET + the ellipsis


@dataclass(frozen=True)
class Case:
    """One kind of input and what ingest must do with it.

    expect: "kept", "blank" (no record at all), "filtered:<reason>", "quarantined:<text the
    error must contain>" (for a bad record that text names the field, e.g. "field 'id'"), or
    "truncated" (a line of a cut-off file: kept if readable, else covered by one entry).
    """

    name: str
    expect: str


@dataclass(frozen=True)
class Unit:
    """One record-sized piece of input (a JSONL line, a CSV row, a Parquet row) and its case."""

    file: str
    line: int
    case: Case


# --------------------------------------------------------------------------- valid content


def chat(i: int, rid: str | None = None) -> dict[str, Any]:
    """A valid English support chat that passes every ingest filter."""
    topic = TOPICS[i % len(TOPICS)]
    q = topic["questions"][i // len(TOPICS) % len(topic["questions"])]
    rec: dict[str, Any] = {"messages": [{"role": "user", "content": q[0].upper() + q[1:]},
                                        {"role": "assistant", "content": topic["answer"]}]}
    return ({"id": rid} if rid else {}) | rec


def qa(i: int) -> tuple[str, str]:
    """The question and answer of chat(i)."""
    msgs = chat(i)["messages"]
    return msgs[0]["content"], msgs[1]["content"]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def _with(i: int, **changes: Any) -> bytes:
    """A valid chat with some keys replaced: the way to make one field wrong."""
    return _dumps(chat(i) | changes)


def _turns(*pairs: tuple[Any, Any]) -> list[dict[str, Any]]:
    return [{"role": r, "content": c} for r, c in pairs]


Q = "How do I download the invoice for my last payment?"
A = "Open Settings > Billing > Invoices and click the PDF icon next to the payment you need."


# --------------------------------------------------------------------------- the cases


def jsonl_cases(huge_bytes: int) -> list[tuple[Case, bytes]]:
    """The JSONL lines of malformed.jsonl, in order (each without its line ending)."""
    good = _dumps(chat(1))
    huge_text = ("The export keeps timing out when I download the full order history. " *
                 (huge_bytes // 70 + 1))
    deep_meta = json.loads('{"a":' * 900 + "1" + "}" * 900)
    pref = {"prompt": Q, "chosen": A, "rejected": "No idea, sorry."}
    return [
        (Case("valid chat", "kept"), _dumps(chat(0, "ok-first"))),
        (Case("truncated JSON (line cut off)", "quarantined:invalid JSON"), good[:-25]),
        (Case("Python dict repr (single quotes)", "quarantined:invalid JSON"),
         str(chat(2)).encode()),
        (Case("two objects on one line", "quarantined:invalid JSON: Extra data"), good + good),
        (Case("invalid UTF-8 bytes (0xFF 0xFE) in content", "quarantined:invalid UTF-8 bytes"),
         good.replace(b'"content": "', b'"content": "\xff\xfe', 1)),
        (Case("Latin-1 text (caf\\xe9), not UTF-8", "quarantined:invalid UTF-8 bytes"),
         _with(3, messages=_turns(("user", "Is the cafe open?"), ("assistant", "Yes, it is.")))
         .replace(b"cafe", b"caf\xe9")),
        (Case("unpaired surrogate escape \\udc80", "quarantined:unpaired UTF-16 surrogate"),
         _with(4, messages=_turns(("user", Q), ("assistant", A))).replace(
             b"invoice", b"inv\\udc80oice", 1)),
        (Case("raw NUL byte inside a string", "quarantined:invalid JSON: Invalid control"),
         good.replace(b'"content": "', b'"content": "\x00', 1)),
        # ftfy's repair strips C0 controls before the encoding filter sees them.
        (Case("escaped NUL (\\u0000) in content", "kept"),
         _with(5, messages=_turns(("user", Q + "\u0000"), ("assistant", A)))),
        (Case("BOM in the middle of a file", "quarantined:Unexpected UTF-8 BOM"), BOM + good),
        (Case("wrong type: content 5", "quarantined:field 'messages[0].content'"),
         _with(6, messages=_turns(("user", 5), ("assistant", A)))),
        (Case("wrong type: content as a list of parts",
              "quarantined:field 'messages[0].content'"),
         _with(6, messages=_turns(("user", [{"type": "text", "text": Q}]), ("assistant", A)))),
        (Case("wrong type: messages \"x\"", "quarantined:field 'messages'"), _with(7, messages="x")),
        (Case("wrong type: messages null", "quarantined:field 'messages'"),
         _with(7, messages=None)),
        (Case("wrong type: id [1]", "quarantined:field 'id'"), _with(8, id=[1])),
        (Case("wrong type: id true", "quarantined:field 'id'"), _with(8, id=True)),
        (Case("wrong type: text 42", "quarantined:field 'text'"), _dumps({"text": 42})),
        (Case("missing role", "quarantined:field 'messages[0].role'"),
         _with(9, messages=[{"content": Q}, {"role": "assistant", "content": A}])),
        (Case("unknown role 'bot'", "quarantined:field 'messages[1].role': unknown role"),
         _with(9, messages=_turns(("user", Q), ("bot", A)))),
        (Case("ShareGPT unknown speaker 'robot'", "quarantined:field 'conversations[1].from'"),
         _dumps({"conversations": [{"from": "human", "value": Q}, {"from": "robot", "value": A}]})),
        (Case("empty conversation: messages []", "quarantined:field 'messages'"),
         _with(10, messages=[])),
        (Case("empty conversation: conversations []", "quarantined:field 'conversations'"),
         _dumps({"conversations": []})),
        (Case("empty object {}", "quarantined:field '<record>': unrecognised form"), b"{}"),
        (Case("missing assistant turn",
              "quarantined:field 'messages': must end with an assistant turn"),
         _with(11, messages=_turns(("user", Q)))),
        (Case("empty assistant turn", "quarantined:field 'messages[1].content'"),
         _with(11, messages=_turns(("user", Q), ("assistant", "   ")))),
        (Case("two user turns in a row", "quarantined:field 'messages[1].role'"),
         _with(12, messages=_turns(("user", Q), ("user", Q), ("assistant", A)))),
        (Case("system prompt only", "quarantined:field 'messages': has no user/assistant"),
         _with(12, messages=_turns(("system", "You are a helpful support agent.")))),
        (Case(f"{huge_bytes / 2**20:g} MB line, valid JSON (one huge turn)",
              "filtered:max_chars"),
         _with(13, messages=_turns(("user", huge_text), ("assistant", A)))),
        (Case(f"{huge_bytes / 2**20:g} MB line, invalid JSON (unterminated string)",
              "quarantined:invalid JSON"),
         _with(13, messages=_turns(("user", huge_text), ("assistant", A)))[:-40]),
        (Case("deep nesting: 100,000 '['", "quarantined:nested too deeply"), b"[" * 100_000),
        (Case("deep nesting: messages 5,000 levels", "quarantined:nested too deeply"),
         b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        (Case("deep nesting: meta 900 levels (parses)", "quarantined:field 'meta'"),
         _with(14, meta=deep_meta)),
        (Case("nesting: messages [[[...]]] 50 levels", "quarantined:field 'messages[0]'"),
         b'{"messages": ' + b"[" * 50 + b"]" * 50 + b"}"),
        (Case("JSON array instead of object", "quarantined:field '<record>': must be a JSON "
              "object, got list"), _dumps(_turns(("user", Q), ("assistant", A)))),
        (Case("JSON string instead of object", "quarantined:got str"), b'"hello there"'),
        (Case("JSON null", "quarantined:got NoneType"), b"null"),
        (Case("duplicate key, last 'messages' invalid", "quarantined:field 'messages'"),
         good[:-1] + b', "messages": "x"}'),
        (Case("duplicate key, last 'messages' valid", "kept"),
         b'{"messages": "x", ' + good[1:]),
        (Case("valid preference pair", "kept"), _dumps(pref)),
        (Case("preference pair, rejected missing", "quarantined:field 'rejected': is missing"),
         _dumps({"prompt": Q, "chosen": A})),
        (Case("preference pair, rejected empty", "quarantined:field 'rejected': is empty"),
         _dumps(pref | {"rejected": " "})),
        (Case("preference pair, chosen 5", "quarantined:field 'chosen'"),
         _dumps(pref | {"chosen": 5})),
        (Case("preference prompt ends with assistant",
              "quarantined:field 'prompt': must end with a user turn"),
         _dumps(pref | {"prompt": _turns(("user", Q), ("assistant", A))})),
        (Case("Alpaca row without output", "quarantined:field 'output'"),
         _dumps({"instruction": Q})),
        (Case("empty text", "quarantined:field 'text': is empty"), _dumps({"text": "  "})),
        (Case("blank line", "blank"), b""),
        (Case("whitespace-only line", "blank"), b"  \t "),
        (Case("CR-only line", "blank"), b"\r"),
        (Case("stray CR between JSON tokens", "kept"), good.replace(b", ", b",\r ", 1)),
        (Case("valid but tiny chat (hi / ok)", "filtered:min_words"),
         _dumps({"messages": _turns(("user", "hi"), ("assistant", "ok"))})),
        (Case("valid chat after all of the above", "kept"), _dumps(chat(15, "ok-last"))),
    ]


def gz_cases() -> list[tuple[Case, bytes]]:
    good = _dumps(chat(16))
    return [
        (Case("gz: valid chat", "kept"), good),
        (Case("gz: invalid UTF-8 bytes", "quarantined:invalid UTF-8 bytes"),
         good.replace(b"the", b"th\xc3\x28", 1)),
        (Case("gz: truncated JSON", "quarantined:invalid JSON"), good[:40]),
        (Case("gz: blank line", "blank"), b""),
        (Case("gz: valid chat", "kept"), _dumps(chat(17))),
    ]


def bom_crlf_cases() -> list[tuple[Case, bytes]]:
    return [
        (Case("BOM at file start + CRLF endings", "kept"), _dumps(chat(18))),
        (Case("CRLF line", "kept"), _dumps(chat(19))),
        (Case("CRLF blank line", "blank"), b""),
        (Case("CRLF line after a blank one", "kept"), _dumps(chat(20))),
    ]


# --------------------------------------------------------------------------- file writers


def write_jsonl(path: Path, cases: list[tuple[Case, bytes]], eol: bytes = b"\n",
                bom: bool = False) -> list[Unit]:
    """One case per line; returns the units (line numbers as an editor counts them)."""
    body = eol.join(raw for _, raw in cases) + eol
    data = (BOM if bom else b"") + body
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return [Unit(path.name, i, case) for i, (case, _) in enumerate(cases, start=1)]


def write_truncated_gz(path: Path, lines: int = 40, keep: float = 0.6) -> list[Unit]:
    """A .jsonl.gz cut off at `keep` of its bytes: the lines that still decompress are kept."""
    body = b"".join(_dumps(chat(i, f"trunc-{i}")) + b"\n" for i in range(lines))
    packed = gzip.compress(body, mtime=0, compresslevel=1)
    cut = packed[: int(len(packed) * keep)]
    path.write_bytes(cut)
    readable = zlib.decompressobj(31).decompress(cut).count(b"\n")
    units = [Unit(path.name, i, Case("truncated .gz: readable line", "kept"))
             for i in range(1, readable + 1)]
    units.append(Unit(path.name, readable + 1, Case(
        "truncated .gz: the cut-off rest (one entry)", "quarantined:unreadable file from line")))
    return units


def write_csv(path: Path) -> list[Unit]:
    """Alpaca CSV with a BOM and CRLF endings; a row's line is the line it ends on."""
    q = [qa(30 + i)[0] for i in range(8)]
    a = qa(30)[1]
    rows: list[tuple[Case, bytes]] = [
        (Case("CSV: valid row (after a BOM header)", "kept"), _csv_row([q[0], "", a])),
        (Case("CSV: empty output cell", "quarantined:field 'output'"), _csv_row([q[1], "", ""])),
        (Case("CSV: more fields than the header", "quarantined:more fields than the header"),
         _csv_row([q[2], "", a, "surplus"])),
        (Case("CSV: invalid UTF-8 in output", "quarantined:field 'output': invalid UTF-8"),
         _csv_row([q[3], "", "x"]).replace(b",x", b",caf\xe9 menu", 1)),
        (Case("CSV: quoted field over 3 lines", "kept"),
         _csv_row([q[4], "", "Step one.\r\nStep two.\r\n" + a])),
        (Case("CSV: short row (instruction only)", "quarantined:field 'output'"),
         _csv_row([q[5]])),
        (Case("CSV: NUL byte inside a field (repaired)", "kept"),
         _csv_row([q[6] + "\x00", "", a])),
        (Case("CSV: valid row at the end", "kept"), _csv_row([q[7], "", a])),
    ]
    header = b"instruction,input,output\r\n"
    path.write_bytes(BOM + header + b"".join(raw for _, raw in rows))
    units, line = [], 1
    for case, raw in rows:
        line += raw.count(b"\n")
        units.append(Unit(path.name, line, case))
    return units


def _csv_row(fields: list[str]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(fields)
    return buf.getvalue().encode("utf-8")


def write_parquet(folder: Path) -> list[Unit]:
    """Chats with null/unknown fields, texts with invalid UTF-8, and a file that is no Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    chats = [
        (Case("Parquet: valid chat", "kept"), chat(21)),
        (Case("Parquet: messages null", "quarantined:field 'messages'"),
         {"messages": None}),
        (Case("Parquet: content null", "quarantined:field 'messages[0].content'"),
         {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": A}]}),
        (Case("Parquet: unknown role 'robot'", "quarantined:field 'messages[1].role'"),
         {"messages": _turns(("user", Q), ("robot", A))}),
        (Case("Parquet: valid chat", "kept"), chat(22)),
    ]
    pq.write_table(pa.Table.from_pylist([row for _, row in chats]), folder / "chats.parquet")
    units = [Unit("chats.parquet", i, c) for i, (c, _) in enumerate(chats, start=1)]
    texts = [
        (Case("Parquet: valid text", "kept"),
         b"Our support team answers every ticket within one business day, and urgent "
         b"billing questions are handled by the finance team within four hours."),
        (Case("Parquet: invalid UTF-8 in a string column", "quarantined:field 'text': invalid "
              "UTF-8"), b"The caf\xe9 menu is not valid UTF-8 at all, it is Latin-1."),
        (Case("Parquet: empty text", "quarantined:field 'text': is empty"), b""),
    ]
    # A writer that does not validate UTF-8 (binary viewed as string) makes such files.
    column = pa.array([raw for _, raw in texts], type=pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": column}), folder / "texts.parquet")
    units += [Unit("texts.parquet", i, c) for i, (c, _) in enumerate(texts, start=1)]
    (folder / "corrupt.parquet").write_bytes(b"PAR1" + b"\x00garbage, not a parquet file" * 9)
    units.append(Unit("corrupt.parquet", 1, Case("not a Parquet file",
                                                 "quarantined:not a readable Parquet file")))
    return units


def build_corpus(folder: Path, huge_bytes: int = 2 * 2**20) -> list[Unit]:
    """Write every file of the malformed corpus into folder; returns the expected units."""
    folder.mkdir(parents=True, exist_ok=True)
    units = write_jsonl(folder / "malformed.jsonl", jsonl_cases(huge_bytes))
    units += write_jsonl(folder / "malformed.jsonl.gz", gz_cases())
    units += write_jsonl(folder / "bom_crlf.jsonl", bom_crlf_cases(), eol=b"\r\n", bom=True)
    units += write_truncated_gz(folder / "truncated.jsonl.gz")
    units += write_csv(folder / "alpaca.csv")
    units += write_parquet(folder)
    return units


# --------------------------------------------------------------------------- checking


def _read_gz(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@dataclass
class Outcome:
    """Where one input unit ended: 'kept', 'filtered:<reason>' or 'quarantined:<error>'."""

    outcome: str
    entry: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.outcome.split(":", 1)[0]


def outcomes(stage_dir: Path) -> tuple[dict[tuple[str, int], Outcome], list[str]]:
    """Every (file, line) the stage directory mentions, and any unit mentioned twice."""
    found: dict[tuple[str, int], Outcome] = {}
    twice: list[str] = []

    def add(file: str, line: int, outcome: str, entry: dict[str, Any]) -> None:
        key = (Path(file).name, line)
        if key in found:
            twice.append(f"{key[0]}:{line}")
        found[key] = Outcome(outcome, entry)

    for data in sorted(stage_dir.glob("train-*.jsonl.gz")):
        for rec in _read_gz(data):
            add(rec["source"]["file"], rec["source"]["line"], "kept", rec)
    for row in _read_gz(stage_dir / "filtered.jsonl.gz"):
        src = row["record"]["source"]
        add(src["file"], src["line"], f"filtered:{row['reason']}", row)
    for row in _read_gz(stage_dir / "quarantine.jsonl.gz"):
        add(row["file"], row["line"], f"quarantined:{row['error']}", row)
    return found, twice


def matches(expect: str, got: Outcome | None) -> bool:
    if expect == "blank":
        return got is None
    if got is None:
        return False
    kind, _, detail = expect.partition(":")
    if kind in ("kept", "filtered"):
        return got.outcome == expect
    entry = got.entry
    return (got.kind == "quarantined" and detail in entry["error"] and bool(entry["file"])
            and entry["line"] >= 1 and len(entry.get("raw", "")) <= SNIPPET_MAX)


@dataclass
class Report:
    rows: list[tuple[Unit, Outcome | None, bool]]
    manifest: Manifest
    units: int  # non-blank input units
    unexpected: list[str]  # outcomes for (file, line) that are no unit, or units seen twice
    ledger_ok: bool
    ledger_error: str = ""

    @property
    def mismatches(self) -> list[tuple[Unit, Outcome | None, bool]]:
        return [r for r in self.rows if not r[2]]

    @property
    def ok(self) -> bool:
        return (self.ledger_ok and not self.mismatches and not self.unexpected
                and self.manifest.records_in == self.units)


def check(units: list[Unit], stage_dir: Path) -> Report:
    """Compare the stage directory with the expected outcome of every unit."""
    manifest = Manifest.read(stage_dir)
    try:
        manifest.check()
        ledger_ok, ledger_error = True, ""
    except AssertionError as err:
        ledger_ok, ledger_error = False, str(err)
    found, twice = outcomes(stage_dir)
    expected = {(u.file, u.line) for u in units if u.case.expect != "blank"}
    extra = [f"{f}:{line}" for f, line in sorted(set(found) - expected)]
    rows = [(u, found.get((u.file, u.line)), matches(u.case.expect, found.get((u.file, u.line))))
            for u in units]
    return Report(rows, manifest, len(expected), twice + extra, ledger_ok, ledger_error)


# --------------------------------------------------------------------------- running


def run_cli(corpus: Path, out: Path) -> tuple[int, float, str]:
    """`ftflow stage ingest` on every file of the corpus; (exit status, seconds, output)."""
    cmd = [str(REPO / ".venv" / "bin" / "ftflow"), "stage", "ingest",
           "--input", str(corpus / "*"), "--output", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    return proc.returncode, time.perf_counter() - t0, proc.stdout + proc.stderr


def _cell(text: str, width: int = 90) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[:width] + "…"


def markdown(report: Report, rc: int, seconds: float, command: str) -> str:
    m = report.manifest
    lines = [
        "# Malformed input through ingest (`benchmarks/bench_malformed.py`)",
        "",
        f"Machine: {platform.machine()} CPU ({_cores()} cores, shared with other jobs), "
        f"Python {platform.python_version()}. Date: 2026-11-23.",
        "",
        f"Command: `{command}` (ingest runs alone through `ftflow stage ingest --input "
        f"'CORPUS/*'`, {seconds:.1f} s including start-up).",
        "",
        "Corpus: 8 files (JSONL, JSONL.gz, a BOM+CRLF JSONL, a truncated JSONL.gz, an Alpaca CSV "
        "with a BOM and CRLF endings, two Parquet files, a file that is not Parquet). Every "
        "unit is a non-blank JSONL line, a CSV row (its line = the line it ends on) or a "
        "Parquet row.",
        "",
        "## Result",
        "",
        "| check | result |",
        "|---|---|",
        f"| exit status | {rc} ({'ok' if rc == 0 else 'FAILED'}) |",
        f"| ledger (`Manifest.check()`) | {'adds up' if report.ledger_ok else report.ledger_error}"
        f": {m.records_in} in = {m.kept} kept + {m.filtered_total} filtered {m.filtered} + "
        f"{m.quarantined} quarantined |",
        f"| non-blank input units | {report.units} (records_in {m.records_in}: "
        f"{'equal' if m.records_in == report.units else 'DIFFERENT'}) |",
        f"| every unit has exactly one outcome | "
        f"{'yes' if not report.unexpected else 'NO: ' + ', '.join(report.unexpected)} |",
        f"| outcome as expected | {len(report.rows) - len(report.mismatches)}/{len(report.rows)} "
        f"cases |",
        "",
        "## Case by case",
        "",
        "| file:line | case | expected | outcome (error as in quarantine.jsonl.gz) | |",
        "|---|---|---|---|---|",
    ]
    for first, last, got, ok in _runs(report.rows):
        where = f"{first.file}:{first.line}" + (f"-{last.line}" if last.line != first.line else "")
        shown = "(no record: blank)" if got is None else got.outcome
        lines.append(f"| {where} | {_cell(first.case.name, 60)} | "
                     f"{_cell(first.case.expect, 60)} | {_cell(shown)} | "
                     f"{'ok' if ok else '**MISMATCH**'} |")
    return "\n".join(lines) + "\n"


def _runs(rows: list[tuple[Unit, Outcome | None, bool]]
          ) -> list[tuple[Unit, Unit, Outcome | None, bool]]:
    """Consecutive rows of the same case and outcome as one (first, last, outcome, ok)."""
    out: list[tuple[Unit, Unit, Outcome | None, bool]] = []
    for unit, got, ok in rows:
        if out:
            first, _, prev, prev_ok = out[-1]
            same = (first.file == unit.file and first.case == unit.case and ok == prev_ok
                    and (prev is None) == (got is None)
                    and (got is None or prev is None or got.outcome == prev.outcome))
            if same:
                out[-1] = (first, unit, prev, prev_ok)
                continue
        out.append((unit, unit, got, ok))
    return out


def _cores() -> int:
    import os

    return os.cpu_count() or 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, help="where to build the corpus (default: a tmp dir)")
    ap.add_argument("--huge-mb", type=float, default=2.0, help="size of the huge lines, in MB")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "malformed.md")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ftflow-malformed-"))
    units = build_corpus(work / "corpus", int(args.huge_mb * 2**20))
    rc, seconds, output = run_cli(work / "corpus", work / "ingest")
    if rc != 0:
        print(output)
        print(f"ftflow stage ingest failed with exit status {rc}")
        return 1
    report = check(units, work / "ingest")
    command = "python benchmarks/bench_malformed.py" + (
        f" --huge-mb {args.huge_mb:g}" if args.huge_mb != 2.0 else "")
    text = markdown(report, rc, seconds, command)
    print(text)
    args.out.write_text(text)
    print(f"written to {args.out}; corpus and stage directory in {work}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
