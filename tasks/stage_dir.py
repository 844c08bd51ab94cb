"""A stage directory: what every stage does with its output, written once.

- **Up to date?** A stage is skipped when its manifest records the same input digests and config
  digest *and* every output file it lists still has the digest recorded for it.
- **Never half-written.** The old manifest goes first; data files are written as ``*.partial``
  and renamed when complete; the manifest is written last, atomically. A kill at any point
  leaves a directory without a manifest, which is never "up to date".
- **The held-out split carried.** A stage that does not transform the held-out split copies it
  through untouched (``heldout="carry"``), so a new stage cannot drop the evaluation data by
  forgetting it; the flow checks the count after every stage.
- **The ledger and progress.** Every kept, filtered, deduplicated or quarantined record is
  written with its reason and counted, and shown as progress.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Literal

from data_contracts.manifest import MANIFEST_NAME, Manifest
from data_contracts.records import ChatSample
from data_contracts.stage_outputs import StageOutput, output_info
from tasks.io import HELDOUT_GLOB, Quarantined, file_digest, input_digests, is_stage_dir
from tasks.progress import Progress

log = logging.getLogger(__name__)

PARTIAL = ".partial"
# Rows that may never have passed the PII stage (dropped by a filter before it, or raw lines
# that did not parse): written owner-only, and never logged to MLflow or Prefect
# (tasks/tracking.py skips them). They stay in the run folder for the owner to inspect.
PRIVATE_FILES = ("filtered.jsonl.gz", "quarantine.jsonl.gz")
PRIVATE_MODE = 0o600
# The held-out split: "carry" copies it through untouched; "own" means the stage reads and
# writes it itself (PII scrubs it, dedup carves it, train and evaluate use it).
Heldout = Literal["carry", "own"]


def write_atomic(path: Path, text: str) -> None:
    """Write text to path so that a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + PARTIAL)
    tmp.write_text(text)
    os.replace(tmp, path)


def _relative_files(root: Path, paths: Iterable[Path]) -> list[str]:
    out: list[str] = []
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        out += [str(f.relative_to(root)) for f in files]
    return out


def outputs_intact(out_dir: Path, manifest: Manifest) -> str | None:
    """None when every output file listed in the manifest has its recorded digest, else why not."""
    for name, digest in manifest.output_files.items():
        path = out_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if file_digest(str(path)) != digest:
            return f"{name} does not match its recorded digest"
    return None


class StageDir:
    """One stage's output directory for one set of inputs and one config."""

    def __init__(self, out_dir: str | Path, stage: str, config_digest: str,
                 *inputs: str | Path | list[str], heldout: Heldout = "own",
                 extra_digests: dict[str, str] | None = None) -> None:
        self.dir = Path(out_dir)
        self.stage = stage
        self.config_digest = config_digest
        self.inputs = inputs
        self.heldout = heldout
        self.digests: dict[str, str] = {}
        for item in inputs:
            self.digests.update(input_digests(item))
        self.digests.update(extra_digests or {})

    def finished(self) -> Manifest | None:
        """The manifest of a finished, intact run on these inputs and config; else None."""
        try:
            m = Manifest.read(self.dir)
        except (FileNotFoundError, ValueError):
            return None
        if m.input_digests != self.digests or m.config_digest != self.config_digest:
            return None
        problem = outputs_intact(self.dir, m)
        if problem:
            log.warning("%s: %s; running the stage again", self.dir, problem)
            return None
        log.info("%s: up to date (same inputs, config and outputs), skipping", self.dir)
        return m

    def writer(self, total: int | None = None, into: str | Path | None = None) -> "StageWriter":
        """A writer for a fresh run of the stage (``into``: another directory, for the ranks of a
        distributed run that only the main one writes)."""
        carry = self.inputs[0] if self.heldout == "carry" and self.inputs else None
        if total is None and self.inputs and is_stage_dir(self.inputs[0]):
            try:
                total = Manifest.read(self.inputs[0]).kept  # every record read is written once
            except (FileNotFoundError, ValueError):
                total = None
        return StageWriter(into or self.dir, self.stage, input_digests=self.digests,
                           config_digest=self.config_digest, carry_heldout_from=carry,
                           total=total)


class StageWriter:
    """Writes a stage directory: kept records, every drop with its reason, and the manifest."""

    def __init__(self, out_dir: str | Path, stage: str, shard_size: int = 100_000, *,
                 input_digests: dict[str, str] | None = None, config_digest: str = "",
                 carry_heldout_from: str | Path | list[str] | None = None,
                 total: int | None = None) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        # The manifest first: from here on the directory is not a finished stage.
        (self.dir / MANIFEST_NAME).unlink(missing_ok=True)
        for old in [*self.dir.glob("*.jsonl.gz"), *self.dir.glob(f"*{PARTIAL}")]:
            old.unlink()
        self.manifest = Manifest(
            stage=stage, started_at=datetime.now(timezone.utc).isoformat(timespec="seconds")
        )
        self.input_digests = input_digests or {}
        self.config_digest = config_digest
        self._carry = carry_heldout_from
        self._t0 = time.monotonic()
        self._shard_size = shard_size
        self._files: dict[str, Any] = {}
        self._counts: Counter[str] = Counter()
        self.filtered: Counter[str] = Counter()
        self.progress = Progress(stage, total)

    def _write(self, name: str, line: str) -> None:
        fh = self._files.get(name)
        if fh is None:
            path = self.dir / (name + PARTIAL)
            if name in PRIVATE_FILES:  # owner-only from its first byte
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE))
                os.chmod(path, PRIVATE_MODE)
            fh = self._files[name] = gzip.open(path, "wt", encoding="utf-8")
        fh.write(line + "\n")
        self.progress.update()

    def keep(self, rec: ChatSample, split: str = "train") -> None:
        """Keep a record; split 'train' goes to train-*, 'heldout' to heldout-*."""
        n = self._counts[split]
        prefix = split
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

    def adopt(self, n: int, split: str = "train") -> None:
        """Count n records of a split that the stage placed in the directory itself (hard links
        to files another stage wrote and verified), as kept."""
        self._counts[split] += n
        self.progress.update(n)

    def _carry_heldout(self) -> int:
        """Copy the input's held-out files through byte for byte; the number of records."""
        src = self._carry
        if src is None or not is_stage_dir(src):
            return 0
        if self._counts.get("heldout"):
            raise RuntimeError(f"stage {self.manifest.stage} both carries and writes held-out "
                               "records")
        for file in sorted(Path(src).glob(HELDOUT_GLOB)):
            shutil.copyfile(file, self.dir / file.name)
        n = Manifest.read(src).splits.get("heldout", 0)
        self._counts["heldout"] += n
        self.progress.update(n)
        return n

    def finish(self, records_in: int, generated: int = 0, *,
               input_digests: dict[str, str] | None = None, config_digest: str | None = None,
               metrics: dict[str, float] | None = None, info: dict[str, Any] | None = None,
               output: StageOutput | None = None, outputs: Iterable[Path] = ()) -> Manifest:
        """Close and publish the files, then write and return the checked manifest.

        ``records_in`` counts the records the stage itself read; carried held-out records are
        added here. ``output`` is the typed hand-off later stages read; ``outputs`` are further
        files or directories (a model) whose digests the up-to-date check verifies.
        """
        for fh in self._files.values():
            fh.close()
        for name in self._files:
            os.replace(self.dir / (name + PARTIAL), self.dir / name)
        records_in += self._carry_heldout()
        m = self.manifest
        m.records_in, m.generated = records_in, generated
        m.kept = sum(self._counts.values())
        m.splits = {k: v for k, v in self._counts.items() if v or k == "train"}
        if set(m.splits) == {"train"}:
            m.splits = {"train": m.kept}
        m.filtered = dict(sorted(self.filtered.items()))
        m.input_digests = input_digests if input_digests is not None else self.input_digests
        m.config_digest = config_digest if config_digest is not None else self.config_digest
        names = [p.name for p in sorted(self.dir.glob("*.jsonl.gz"))]
        names += _relative_files(self.dir, [Path(p) for p in outputs])
        m.output_files = {name: file_digest(str(self.dir / name)) for name in names}
        m.duration_s = round(time.monotonic() - self._t0, 3)
        m.metrics.update(metrics or {})
        m.info.update(output_info(output, **(info or {})) if output else (info or {}))
        write_atomic(self.dir / MANIFEST_NAME, m.check().model_dump_json(indent=2) + "\n")
        self.progress.close()
        return m
