"""The one reader and the one writer of records: raw inputs in any form, stage directories out."""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import itertools
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import fsspec
from fsspec.compression import compr
from fsspec.utils import infer_compression

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
MiB = 1 << 20
READ_BLOCK = 1 * MiB  # bytes decompressed and split at a time: no line is read whole first
# A compressed file may always decompress to this much before its ratio is judged: small files
# of repetitive JSON compress far better than 100:1 and are not bombs.
RATIO_GRACE_BYTES = 64 * MiB


@dataclass(frozen=True)
class ReadLimits:
    """Bounds that hold while raw inputs are read, before a line is in memory.

    ``max_record_bytes``: a line (JSONL, CSV), array element (.json) or whole text file over
    this many bytes is skipped to its end without being held and quarantined with its size.
    ``max_decompression_ratio``: a compressed file that decompresses to more than this many
    times the compressed bytes read (past ``RATIO_GRACE_BYTES``) is not read further. 0: off.
    """

    max_record_bytes: int = 8 * MiB
    max_decompression_ratio: float = 100.0


DEFAULT_LIMITS = ReadLimits()


@dataclass
class Quarantined:
    """A raw input that could not become a record: where it was and why."""

    source: Source
    error: str
    raw: str = ""


class _LimitExceeded(Exception):
    """Reading stops: a decompression-ratio bound was crossed (the message says which)."""


class _BoundedStream:
    """A raw input's decompressed bytes in blocks, with the decompression-ratio bound checked
    after every block (the compressed bytes read so far come from the file's position)."""

    def __init__(self, path: str, limits: ReadLimits) -> None:
        self.path, self.limits = path, limits
        self.raw = fsspec.open(path, "rb").open()
        codec = infer_compression(path)
        self.stream = compr[codec](self.raw, mode="rb") if codec else self.raw
        self.compressed = codec is not None
        self.out = 0  # decompressed bytes handed out

    def __enter__(self) -> "_BoundedStream":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stream is not self.raw:
            self.stream.close()
        self.raw.close()

    def blocks(self) -> Iterator[bytes]:
        ratio = self.limits.max_decompression_ratio
        # read1: what is decompressed so far, so a truncated stream still gives every line
        # before the cut, and the error comes only after them.
        read = getattr(self.stream, "read1", self.stream.read)
        while block := read(READ_BLOCK):
            self.out += len(block)
            if self.compressed and ratio and self.out > RATIO_GRACE_BYTES:
                compressed = max(self.raw.tell(), 1)
                if self.out > ratio * compressed:
                    raise _LimitExceeded(
                        f"decompression ratio over {ratio:g}:1 (ingest.max_decompression_ratio): "
                        f"{self.out} bytes from {compressed} compressed")
            yield block


@dataclass
class _OverSize:
    """A line or element over max_record_bytes: its size, never its content."""

    size: int
    stopped: str = ""  # why reading stopped inside it (then size is a lower bound)


def _bounded_lines(blocks: Iterable[bytes], limit: int
                   ) -> Iterator[tuple[int, bytes | _OverSize]]:
    """(line number, bytes without the newline) per line; a line over the bound comes as an
    _OverSize once its end is reached, and no more than the bound of it is ever buffered."""
    buf, lineno, over = bytearray(), 1, 0
    try:
        for block in blocks:
            parts = block.split(b"\n")
            for i, part in enumerate(parts):
                if over:
                    over += len(part)
                elif len(buf) + len(part) > limit:
                    over = len(buf) + len(part)
                    buf = bytearray()
                else:
                    buf += part
                if i == len(parts) - 1:
                    break  # the line goes on in the next block
                yield lineno, (_OverSize(over) if over else bytes(buf))
                buf, lineno, over = bytearray(), lineno + 1, 0
    except _LimitExceeded as err:
        if not over:
            raise
        yield lineno, _OverSize(over, stopped=str(err))  # the file ends inside this line
        return
    if over:
        yield lineno, _OverSize(over)
    elif buf:
        yield lineno, bytes(buf)


def _decode(line: bytes, first: bool) -> str:
    """Bytes as text: undecodable bytes become lone surrogates, a leading BOM is dropped."""
    text = line.decode("utf-8", "surrogateescape")
    return text[1:] if first and text.startswith("\ufeff") else text


def _over_size_error(what: str, over: _OverSize, limit: int) -> str:
    size = f"at least {over.size}" if over.stopped else str(over.size)
    error = f"{what} is {size} bytes, over ingest.max_record_bytes ({limit}); content not kept"
    stopped = f"; reading stopped: {over.stopped}; the file is not read past it"
    return error + (stopped if over.stopped else "")


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


def _line_item(path: str, lineno: int, line: bytes | _OverSize,
               limit: int) -> tuple[Source, Any]:
    """One JSONL line as (source, value or Quarantined)."""
    src = Source(file=path, line=lineno)
    if isinstance(line, _OverSize):
        return src, Quarantined(src, _over_size_error("line", line, limit))
    text = _decode(line, lineno == 1)
    if _has_surrogates(text):
        return src, Quarantined(src, "invalid UTF-8 bytes in line",
                                _snippet(text.encode("utf-8", "replace").decode()))
    obj = _parse_json_line(text)
    if isinstance(obj, _Bad):
        return src, Quarantined(src, obj.error, _snippet(text.strip()))
    return src, obj


def _iter_jsonl(path: str, limits: ReadLimits, json_file: bool = False
                ) -> Iterator[tuple[Source, Any]]:
    """JSON Lines, one value per line. Lines end at "\\n" only: a stray "\\r" inside a line
    must not split it (CRLF still works, "\\r" is JSON whitespace), so line numbers match
    what an editor or `wc -l` shows.

    ``json_file``: a ``.json`` file, read as a JSON array of records when it is one; otherwise
    as JSONL, unless its first two non-blank lines are not JSON either: then it is neither, and
    the whole file is one quarantine entry naming it (its lines are not copied anywhere).
    """
    limit = limits.max_record_bytes
    with _BoundedStream(path, limits) as stream:
        blocks = stream.blocks()
        if json_file:
            seen: list[bytes] = []
            for block in blocks:  # up to the first byte that is not whitespace
                seen.append(block)
                if block.strip(b" \t\r\n\xef\xbb\xbf"):
                    break
            blocks = itertools.chain(seen, blocks)
            if b"".join(seen).lstrip(b" \t\r\n\xef\xbb\xbf").startswith(b"["):
                yield from _iter_json_array(path, blocks, limit)
                return
        lines = _bounded_lines(blocks, limit)
        if json_file:
            head = list(itertools.islice(
                ((n, line) for n, line in lines if not isinstance(line, bytes) or line.strip()),
                2))
            items = [_line_item(path, n, line, limit) for n, line in head]
            if items and all(isinstance(o, Quarantined) and o.error.startswith("invalid JSON")
                             for _, o in items):
                src = Source(file=path, line=items[0][0].line)
                yield src, Quarantined(src, f"{path}: neither a JSON array of records nor JSON "
                                            f"Lines (line {src.line}: {items[0][1].error}); "
                                            "nothing read from this file")
                return
            yield from items
        for lineno, line in lines:
            if isinstance(line, bytes) and not line.strip():
                continue
            yield _line_item(path, lineno, line, limit)


# Bytes that change the JSON scanner's state; everything else is skipped at C speed.
_ARRAY_TOKENS = re.compile(rb'[\[\]{}",\\\n]')


class _ArrayError(Exception):
    """The file stops being a JSON array here."""


def _iter_json_array(path: str, blocks: Iterable[bytes], limit: int
                     ) -> Iterator[tuple[Source, Any]]:
    """The elements of a top-level JSON array, one at a time: a small incremental scanner finds
    each element's end (strings, escapes and nesting tracked across blocks), so no more than
    ``limit`` bytes of one element are ever held. An element's line is the line it starts on."""
    depth, in_str, esc, done = 0, False, False, False
    line, start_line, count = 1, 0, 0
    buf, over = bytearray(), 0

    def element(piece: bytes) -> tuple[Source, Any] | None:
        nonlocal buf, over, start_line, count
        src = Source(file=path, line=start_line or line)
        size = over + len(piece) if over else len(buf) + len(piece)
        item: Any
        if over or size > limit:
            item = Quarantined(src, _over_size_error("array element", _OverSize(size), limit))
        else:
            raw = (bytes(buf) + piece).strip()
            if not raw and count == 0 and depth == 0:
                return None  # "[]": an empty array
            item = _line_item(path, src.line, raw, limit)[1]
            if isinstance(item, Quarantined):
                item = Quarantined(src, f"array element: {item.error}", item.raw)
        count += 1
        buf, over, start_line = bytearray(), 0, 0
        return src, item

    try:
        for data in blocks:
            if count == 0 and depth == 0 and line == 1:
                data = data.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark
            pos, i, n = 0, 0, len(data)
            while i < n:
                if esc:
                    esc, i = False, i + 1
                    continue
                m = _ARRAY_TOKENS.search(data, i)
                if m is None:
                    break
                j = m.start()
                c, i = data[j:j + 1], j + 1
                if c == b"\n":
                    line += 1
                elif done:
                    raise _ArrayError(f"text after the JSON array at line {line}")
                elif in_str:
                    if c == b"\\":
                        esc = True
                    elif c == b'"':
                        in_str = False
                elif depth == 0:
                    if c != b"[":
                        raise _ArrayError(f"invalid JSON array: {c.decode()!r} at line {line}")
                    depth, pos = 1, i
                else:
                    if depth == 1 and not start_line and c in b'"[{':
                        start_line = line
                    if c == b'"':
                        in_str = True
                    elif c in b"[{":
                        depth += 1
                    elif c in b"]}":
                        depth -= 1
                        if depth == 0:
                            if (item := element(data[pos:j])) is not None:
                                yield item
                            done, pos = True, i
                    elif c == b"," and depth == 1:
                        if (item := element(data[pos:j])) is not None:
                            yield item
                        pos = i
            rest = data[pos:]
            if done:
                if rest.strip():
                    raise _ArrayError(f"text after the JSON array at line {line}")
            elif over:
                over += len(rest)
            elif depth and len(buf) + len(rest) > limit:
                over, buf = len(buf) + len(rest), bytearray()
            elif depth:
                buf += rest
    except (_ArrayError, _LimitExceeded) as err:
        src = Source(file=path, line=start_line or line)
        yield src, Quarantined(src, f"{err}; the file is not read from line {src.line} on")
        return
    if not done:
        src = Source(file=path, line=start_line or line)
        yield src, Quarantined(src, f"JSON array not closed: the file ends at line {line} "
                                    "(truncated?); the rest of it is not read")


def _maybe_json(value: str) -> Any:
    value = value.strip()
    if value[:1] in "[{":
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return value
    return value


class _CsvOverSize(Exception):
    """A CSV line over max_record_bytes: the parser cannot resume after a dropped piece of a
    quoted field, so the file stops there."""


def _csv_lines(stream: _BoundedStream) -> Iterator[str]:
    limit = stream.limits.max_record_bytes
    for lineno, line in _bounded_lines(stream.blocks(), limit):
        if isinstance(line, _OverSize):
            raise _CsvOverSize(lineno, _over_size_error("line", line, limit))
        yield _decode(line, lineno == 1) + "\n"


def _iter_csv(path: str, limits: ReadLimits) -> Iterator[tuple[Source, Any]]:
    with _BoundedStream(path, limits) as stream:
        reader = csv.DictReader(_csv_lines(stream))
        try:
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
        except _CsvOverSize as err:
            lineno, error = err.args
            src = Source(file=path, line=lineno)
            yield src, Quarantined(src, f"{error}; a CSV row cannot be resumed after it, so "
                                        f"the file is not read from line {lineno} on")


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


def _iter_txt(path: str, limits: ReadLimits) -> Iterator[tuple[Source, Any]]:
    """A text file is one record: read up to max_record_bytes, only counted past it."""
    limit = limits.max_record_bytes
    src = Source(file=path, line=1)
    data, size, stopped = bytearray(), 0, ""
    with _BoundedStream(path, limits) as stream:
        try:
            for block in stream.blocks():
                size += len(block)
                if size <= limit:
                    data += block
                else:
                    data = bytearray()
        except _LimitExceeded as err:
            stopped = str(err)
    if size > limit or stopped:
        yield src, Quarantined(src, _over_size_error("text file", _OverSize(size, stopped),
                                                     limit))
        return
    text = _decode(bytes(data), True)
    if _has_surrogates(text):
        yield src, Quarantined(src, "invalid UTF-8 bytes in text file",
                               _snippet(text.encode("utf-8", "replace").decode()))
    else:
        yield src, {"text": text}


# A file that breaks off part-way (truncated .gz, damaged Parquet, CSV the parser gives up on):
# what was read stays accounted for and the rest becomes one quarantine entry, not a crash.
UNREADABLE = (OSError, EOFError, zlib.error, csv.Error)


def iter_raw(path: str, limits: ReadLimits = DEFAULT_LIMITS) -> Iterator[tuple[Source, Any]]:
    """Yield (source, raw object or Quarantined) for every record of one input file."""
    name = path.lower()
    for ext in (".gz", ".zst", ".bz2", ".xz"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    if name.endswith(".parquet"):
        records = _iter_parquet(path)
    elif name.endswith(".csv"):
        records = _iter_csv(path, limits)
    elif name.endswith((".jsonl", ".json", ".ndjson")):
        records = _iter_jsonl(path, limits, json_file=name.endswith(".json"))
    elif name.endswith(".txt"):
        records = _iter_txt(path, limits)
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
    except _LimitExceeded as err:
        src = Source(file=path, line=last + 1)
        yield src, Quarantined(src, f"{err}; the file is not read from line {last + 1} on")


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


def iter_input(inputs: str | Path | list[str], limits: ReadLimits = DEFAULT_LIMITS
               ) -> Iterator[ChatSample | Quarantined]:
    """Records from a stage directory, or parsed from raw files (bad ones as Quarantined);
    ``limits`` bound what one raw line or record may take while it is read."""
    if not isinstance(inputs, list) and is_stage_dir(inputs):
        yield from read_records(inputs)
        return
    patterns = inputs if isinstance(inputs, list) else [str(inputs)]
    for path in expand_inputs(patterns):
        for src, obj in iter_raw(path, limits):
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
