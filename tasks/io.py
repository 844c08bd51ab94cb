"""The one reader and the one writer of records: raw inputs in any form, stage directories out."""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import json
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import fsspec

from data_contracts.manifest import MANIFEST_NAME, Manifest
from data_contracts.records import ChatSample, RecordError, Source, parse_record

DATA_GLOB = "data-*.jsonl.gz"
HELDOUT_GLOB = "heldout-*.jsonl.gz"
MAX_SNIPPET = 200
csv.field_size_limit(64 * 1024 * 1024)


@dataclass
class Quarantined:
    """A raw input that could not become a record: where it was and why."""

    source: Source
    error: str
    raw: str = ""


def _open_text(path: str) -> io.TextIOBase:
    """Open a local path or fsspec URL as text, decompressing .gz/.zst by extension.

    Decoding errors are replaced (U+FFFD) here and detected per line by the reader.
    """
    compression = "infer"
    f = fsspec.open(path, "rb", compression=compression).open()
    return io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")


def expand_inputs(patterns: Iterable[str]) -> list[str]:
    """Expand local globs (and fsspec globs for URLs) into a sorted list of files."""
    files: list[str] = []
    for pattern in patterns:
        if "://" in pattern:
            fs, _, paths = fsspec.get_fs_token_paths(pattern)
            proto = pattern.split("://", 1)[0]
            files += [p if "://" in p else f"{proto}://{p}" for p in sorted(paths)]
        elif any(ch in pattern for ch in "*?["):
            files += sorted(glob.glob(pattern, recursive=True))
        else:
            if not Path(pattern).exists():
                raise FileNotFoundError(f"input not found: {pattern}")
            files.append(pattern)
    return files


def _snippet(text: str) -> str:
    return text if len(text) <= MAX_SNIPPET else text[:MAX_SNIPPET] + "…"


def _iter_jsonl(path: str) -> Iterator[tuple[Source, Any]]:
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            src = Source(file=path, line=lineno)
            if not line.strip():
                continue
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:
                yield src, Quarantined(src, "invalid UTF-8 bytes in line",
                                       _snippet(line.encode("utf-8", "replace").decode()))
                continue
            try:
                yield src, json.loads(line)
            except json.JSONDecodeError as err:
                yield src, Quarantined(src, f"invalid JSON: {err.msg} at column {err.colno}",
                                       _snippet(line.strip()))


def _maybe_json(value: str) -> Any:
    value = value.strip()
    if value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
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
            yield src, {k: _maybe_json(v) for k, v in row.items() if v not in (None, "")}


def _iter_parquet(path: str) -> Iterator[tuple[Source, Any]]:
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        row = 0
        for batch in pf.iter_batches(batch_size=1024):
            for obj in batch.to_pylist():
                row += 1
                yield Source(file=path, line=row), obj


def iter_raw(path: str) -> Iterator[tuple[Source, Any]]:
    """Yield (source, raw object or Quarantined) for every record of one input file."""
    name = path.lower()
    for ext in (".gz", ".zst", ".bz2", ".xz"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    if name.endswith(".parquet"):
        yield from _iter_parquet(path)
    elif name.endswith(".csv"):
        yield from _iter_csv(path)
    elif name.endswith((".jsonl", ".json", ".ndjson")):
        yield from _iter_jsonl(path)
    elif name.endswith(".txt"):
        with _open_text(path) as fh:
            text = fh.read()
        yield Source(file=path, line=1), {"text": text}
    else:
        raise ValueError(f"{path}: unsupported input format (jsonl, json, parquet, csv, txt)")


def is_stage_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / MANIFEST_NAME).exists() or any(p.glob(DATA_GLOB)))


def read_records(path: str | Path, split: str = "data") -> Iterator[ChatSample]:
    """Read the records a stage kept (split 'data') or its held-out split ('heldout')."""
    pattern = DATA_GLOB if split == "data" else HELDOUT_GLOB
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
            try:
                yield parse_record(obj, src)
            except RecordError as err:
                yield Quarantined(src, str(err), _snippet(json.dumps(obj, default=str)))


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
        return {f"{Path(inputs).name}/{k}": v for k, v in m.output_files.items()}
    patterns = inputs if isinstance(inputs, list) else [str(inputs)]
    return {p: file_digest(p) for p in expand_inputs(patterns)}


def up_to_date(out_dir: str | Path, digests: dict[str, str], config_digest: str) -> bool:
    """True when out_dir already holds this stage's result for the same input and config."""
    try:
        m = Manifest.read(out_dir)
    except (FileNotFoundError, ValueError):
        return False
    if m.input_digests != digests or m.config_digest != config_digest:
        return False
    return all((Path(out_dir) / name).exists() for name in m.output_files)


class StageWriter:
    """Writes a stage directory: kept records, every drop with its reason, and the manifest."""

    def __init__(self, out_dir: str | Path, stage: str, shard_size: int = 100_000) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.dir.glob("*.jsonl.gz"):
            old.unlink()
        self.manifest = Manifest(
            stage=stage, started_at=datetime.now(timezone.utc).isoformat(timespec="seconds")
        )
        self._t0 = time.monotonic()
        self._shard_size = shard_size
        self._files: dict[str, Any] = {}
        self._counts: Counter[str] = Counter()
        self.filtered: Counter[str] = Counter()

    def _write(self, name: str, line: str) -> None:
        fh = self._files.get(name)
        if fh is None:
            fh = self._files[name] = gzip.open(self.dir / name, "wt", encoding="utf-8")
        fh.write(line + "\n")

    def keep(self, rec: ChatSample, split: str = "train") -> None:
        """Keep a record; split 'train' goes to data-*, 'eval' to heldout-*."""
        n = self._counts[split]
        prefix = "data" if split == "train" else "heldout"
        self._write(f"{prefix}-{n // self._shard_size:05d}.jsonl.gz", rec.model_dump_json())
        self._counts[split] += 1

    def drop(self, rec: ChatSample, reason: str, **details: Any) -> None:
        """Filter a record out, with the filter's name as reason."""
        self.filtered[reason] += 1
        self._write("filtered.jsonl.gz", json.dumps(
            {"reason": reason, **details, "record": rec.model_dump(mode="json")},
            ensure_ascii=False))

    def duplicate(self, rec: ChatSample, dup_of: str, kind: str, **details: Any) -> None:
        """Remove a record as a duplicate of the record with id dup_of."""
        self.manifest.deduplicated += 1
        self._write("deduplicated.jsonl.gz", json.dumps(
            {"dup_of": dup_of, "kind": kind, **details, "record": rec.model_dump(mode="json")},
            ensure_ascii=False))

    def quarantine(self, q: Quarantined) -> None:
        """Set aside an input that could not be parsed, with file, line and error."""
        self.manifest.quarantined += 1
        self._write("quarantine.jsonl.gz", json.dumps(
            {"file": q.source.file, "line": q.source.line, "error": q.error, "raw": q.raw},
            ensure_ascii=False))

    def finish(self, records_in: int, generated: int = 0, *, input_digests: dict[str, str],
               config_digest: str, metrics: dict[str, float] | None = None,
               info: dict[str, Any] | None = None) -> Manifest:
        """Close the files, write and return the checked manifest."""
        for fh in self._files.values():
            fh.close()
        m = self.manifest
        m.records_in, m.generated = records_in, generated
        m.kept = sum(self._counts.values())
        m.splits = {k: v for k, v in self._counts.items()}
        if set(m.splits) == {"train"}:
            m.splits = {"train": m.kept}
        m.filtered = dict(sorted(self.filtered.items()))
        m.input_digests, m.config_digest = input_digests, config_digest
        m.output_files = {p.name: file_digest(str(p)) for p in sorted(self.dir.glob("*.jsonl.gz"))}
        m.duration_s = round(time.monotonic() - self._t0, 3)
        m.metrics.update(metrics or {})
        m.info.update(info or {})
        m.write(self.dir)
        return m
