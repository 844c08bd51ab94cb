"""The one reader and the one writer of records: raw inputs in any form, stage directories out."""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import fsspec

from data_contracts.manifest import MANIFEST_NAME, Manifest
from data_contracts.records import ChatSample, RecordError, Source, parse_record

TRAIN_GLOB = "train-*.jsonl.gz"
HELDOUT_GLOB = "heldout-*.jsonl.gz"
MAX_SNIPPET = 200
# Input `meta` is carried into every record; pydantic cannot serialise ~300 levels, and no real
# metadata needs more than a few.
MAX_META_DEPTH = 32
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
csv.field_size_limit(64 * 1024 * 1024)


@dataclass
class Quarantined:
    """A raw input that could not become a record: where it was and why."""

    source: Source
    error: str
    raw: str = ""


def _open_text(path: str, newline: str = "") -> io.TextIOBase:
    """Open a local path or fsspec URL as text, decompressing .gz/.zst by extension.

    Undecodable bytes become lone surrogates (``surrogateescape``) that the readers detect per
    line or field; a leading byte-order mark is dropped (``utf-8-sig``), or it would make the
    first JSON line invalid and the first CSV column's name start with U+FEFF.
    """
    f = fsspec.open(path, "rb", compression="infer").open()
    return io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline=newline)


def expand_inputs(patterns: Iterable[str]) -> list[str]:
    """Expand local globs (and fsspec globs for URLs) into a sorted list of files."""
    files: list[str] = []
    for pattern in patterns:
        if "://" in pattern:
            fs, _, paths = fsspec.get_fs_token_paths(pattern)
            if not paths:
                raise FileNotFoundError(f"input not found: {pattern}")
            files += [p if "://" in p else fs.unstrip_protocol(p) for p in sorted(paths)]
        elif any(ch in pattern for ch in "*?["):
            files += sorted(glob.glob(pattern, recursive=True))
        else:
            if not Path(pattern).exists():
                raise FileNotFoundError(f"input not found: {pattern}")
            files.append(pattern)
    return files


def _snippet(text: str) -> str:
    return text if len(text) <= MAX_SNIPPET else text[:MAX_SNIPPET] + "…"


@dataclass
class _Bad:
    """A raw line or row that is not a value at all; error says why."""

    error: str


def _has_surrogates(text: str) -> bool:
    """True when text holds lone surrogates: undecodable bytes, or \\udXXX escapes in JSON."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _parse_json_line(line: str) -> Any:
    """One JSON value, or a _Bad saying why the line is none."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        # "Invalid control character at" is one of json's messages: no second "at".
        return _Bad(f"invalid JSON: {err.msg.removesuffix(' at')} at column {err.colno}")
    except RecursionError:
        return _Bad("invalid JSON: nested too deeply to parse")
    # A \ud800-style escape decodes to a lone surrogate that no UTF-8 writer can write.
    if "\\u" in line and SURROGATE_ESCAPE.search(line):
        try:
            lone = _has_surrogates(json.dumps(obj, ensure_ascii=False))
        except RecursionError:
            return _Bad("invalid JSON: nested too deeply to parse")
        if lone:
            return _Bad("invalid JSON string: unpaired UTF-16 surrogate escape (\\udXXX)")
    return obj


def _iter_jsonl(path: str) -> Iterator[tuple[Source, Any]]:
    # Lines end at "\n" only: a stray "\r" inside a line must not split it (CRLF still works,
    # the "\r" is JSON whitespace), so line numbers match what an editor or `wc -l` shows.
    with _open_text(path, newline="\n") as fh:
        for lineno, line in enumerate(fh, start=1):
            src = Source(file=path, line=lineno)
            if not line.strip():
                continue
            if _has_surrogates(line):
                yield src, Quarantined(src, "invalid UTF-8 bytes in line",
                                       _snippet(line.encode("utf-8", "replace").decode()))
                continue
            obj = _parse_json_line(line)
            if isinstance(obj, _Bad):
                yield src, Quarantined(src, obj.error, _snippet(line.strip()))
            else:
                yield src, obj


def _maybe_json(value: str) -> Any:
    value = value.strip()
    if value[:1] in "[{":
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return value
    return value


def _iter_csv(path: str) -> Iterator[tuple[Source, Any]]:
    with _open_text(path) as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            # line_num is the line the row ended on; rows are 1 header + n.
            src = Source(file=path, line=reader.line_num)
            if None in row:
                yield src, Quarantined(src, "CSV row has more fields than the header",
                                       _snippet(str(row)))
                continue
            bad = [k for k, v in row.items() if v and _has_surrogates(v)]
            if bad:
                yield src, Quarantined(src, f"field '{bad[0]}': invalid UTF-8 bytes",
                                       _snippet(str(row).encode("utf-8", "replace").decode()))
                continue
            yield src, {k: _maybe_json(v) for k, v in row.items() if v not in (None, "")}


def _batch_rows(batch: Any) -> list[Any]:
    """A batch's rows as dicts; a row Arrow cannot decode (invalid UTF-8) becomes a _Bad."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        rows: list[Any] = []
        for i in range(batch.num_rows):
            try:
                rows += batch.slice(i, 1).to_pylist()
            except UnicodeDecodeError:
                cols = [name for name in batch.schema.names
                        if _undecodable(batch.column(name).slice(i, 1))]
                rows.append(_Bad(f"field '{cols[0] if cols else '?'}': invalid UTF-8 bytes"))
        return rows


def _undecodable(column: Any) -> bool:
    try:
        column.to_pylist()
    except UnicodeDecodeError:
        return True
    return False


def _iter_parquet(path: str) -> Iterator[tuple[Source, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as f:
        row = 0
        try:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=1024):
                for obj in _batch_rows(batch):
                    row += 1
                    src = Source(file=path, line=row)
                    yield src, (Quarantined(src, obj.error) if isinstance(obj, _Bad) else obj)
        except pa.ArrowException as err:  # not Parquet, or a damaged page
            raise OSError(f"not a readable Parquet file ({err})") from err


def _iter_txt(path: str) -> Iterator[tuple[Source, Any]]:
    with _open_text(path) as fh:
        text = fh.read()
    src = Source(file=path, line=1)
    if _has_surrogates(text):
        yield src, Quarantined(src, "invalid UTF-8 bytes in text file",
                               _snippet(text.encode("utf-8", "replace").decode()))
    else:
        yield src, {"text": text}


# A file that breaks off part-way (truncated .gz, damaged Parquet, CSV the parser gives up on):
# what was read stays accounted for and the rest becomes one quarantine entry, not a crash.
UNREADABLE = (OSError, EOFError, zlib.error, csv.Error)


def iter_raw(path: str) -> Iterator[tuple[Source, Any]]:
    """Yield (source, raw object or Quarantined) for every record of one input file."""
    name = path.lower()
    for ext in (".gz", ".zst", ".bz2", ".xz"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    if name.endswith(".parquet"):
        records = _iter_parquet(path)
    elif name.endswith(".csv"):
        records = _iter_csv(path)
    elif name.endswith((".jsonl", ".json", ".ndjson")):
        records = _iter_jsonl(path)
    elif name.endswith(".txt"):
        records = _iter_txt(path)
    else:
        raise ValueError(f"{path}: unsupported input format (jsonl, json, parquet, csv, txt)")
    last = 0
    try:
        for src, obj in records:
            last = src.line
            yield src, obj
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # the input list is wrong: say so, do not bury it in the ledger
    except UNREADABLE as err:
        src = Source(file=path, line=last + 1)
        yield src, Quarantined(src, f"unreadable file from line {last + 1} on: "
                                    f"{type(err).__name__}: {err}")


def is_stage_dir(path: str | Path | list[str]) -> bool:
    """True for a stage directory; False for raw inputs (a file, a glob, a list of them)."""
    if isinstance(path, list):
        return False
    p = Path(path)
    return p.is_dir() and ((p / MANIFEST_NAME).exists() or any(p.glob(TRAIN_GLOB)))


def read_records(path: str | Path, split: str = "train") -> Iterator[ChatSample]:
    """Read the records a stage kept (split 'data') or its held-out split ('heldout')."""
    pattern = TRAIN_GLOB if split == "train" else HELDOUT_GLOB
    for file in sorted(Path(path).glob(pattern)):
        with gzip.open(file, "rt", encoding="utf-8") as fh:
            for line in fh:
                yield ChatSample.model_validate_json(line)


def iter_input(inputs: str | Path | list[str]) -> Iterator[ChatSample | Quarantined]:
    """Records from a stage directory, or parsed from raw files (bad ones as Quarantined)."""
    if not isinstance(inputs, list) and is_stage_dir(inputs):
        yield from read_records(inputs)
        return
    patterns = inputs if isinstance(inputs, list) else [str(inputs)]
    for path in expand_inputs(patterns):
        for src, obj in iter_raw(path):
            if isinstance(obj, Quarantined):
                yield obj
                continue
            if isinstance(obj, dict) and _nesting(obj.get("meta"), MAX_META_DEPTH) > MAX_META_DEPTH:
                yield Quarantined(src, f"field 'meta': nested deeper than {MAX_META_DEPTH} levels",
                                  _raw_snippet(obj))
                continue
            try:
                yield parse_record(obj, src)
            except RecordError as err:
                yield Quarantined(src, str(err), _raw_snippet(obj))
            except ValueError as err:  # the record contract's own checks (pydantic)
                msg = " ".join(str(err).split())
                yield Quarantined(src, f"invalid record: {msg}", _raw_snippet(obj))


def _nesting(value: Any, limit: int) -> int:
    """How deep lists/dicts nest in value, counted up to limit + 1 (iterative: no recursion)."""
    depth, level = 0, [value]
    while depth <= limit:
        level = [v for v in level if isinstance(v, (dict, list))]
        if not level:
            break
        depth += 1
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v)]
    return depth


def _raw_snippet(obj: Any) -> str:
    try:
        return _snippet(json.dumps(obj, default=str, ensure_ascii=False))
    except (RecursionError, ValueError):  # nested too deeply even to show
        return f"<{type(obj).__name__} too deeply nested to show>"


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with fsspec.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_digests(inputs: str | Path | list[str]) -> dict[str, str]:
    """Digests that identify a stage's input: a stage dir's output digests, or raw file hashes."""
    if not isinstance(inputs, list) and is_stage_dir(inputs):
        m = Manifest.read(inputs)
        name = Path(inputs).name
        # Its config too: a model retrained with other settings can select the same records.
        return {f"{name}/config": m.config_digest,
                **{f"{name}/{k}": v for k, v in m.output_files.items()}}
    patterns = inputs if isinstance(inputs, list) else [str(inputs)]
    return {p: file_digest(p) for p in expand_inputs(patterns)}
