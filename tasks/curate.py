"""Stage 4: the curated dataset, versioned, that training reads.

A run's deduplicated records become one *shard* of the curated dataset in the ftflow home
(``<home>/curated/<dataset>/``). A full run starts a new version holding only its shard; a run
on newly arrived files (``incremental``) adds its shard to the latest version, after dedup has
compared the new records against every earlier shard (their persisted signatures, never the
records). Each version lists its shards and has a digest; the stage directory is that version
materialised (hard links), so the later stages read the whole curated corpus.

The stage also says whether to train: always on a full run; on an incremental run only once the
records added since the last trained version reach ``curate.min_new_records``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal

from data_contracts.config import CurateConfig
from data_contracts.manifest import Manifest
from tasks.dedup_common import INDEX_NAME
from tasks.io import TRAIN_GLOB, HELDOUT_GLOB
from tasks.stage_dir import StageDir, write_atomic

log = logging.getLogger(__name__)

Mode = Literal["full", "incremental"]
VERSIONS = "versions.json"


def dataset_dir(home: str | Path, name: str) -> Path:
    return Path(home) / "curated" / name


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One writer at a time per dataset (two runs on one home must not both append)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def versions(root: Path) -> list[dict[str, Any]]:
    path = root / VERSIONS
    return json.loads(path.read_text()) if path.exists() else []


def latest(home: str | Path, name: str) -> dict[str, Any] | None:
    """The newest version of a curated dataset, or None when it has none yet."""
    found = versions(dataset_dir(home, name))
    return found[-1] if found else None


def index_files(home: str | Path, name: str) -> list[Path]:
    """The persisted dedup signatures of every shard of the latest version."""
    root, last = dataset_dir(home, name), latest(home, name)
    if last is None:
        return []
    files = [root / "shards" / s / INDEX_NAME for s in last["shards"]]
    missing = [f.parent.name for f in files if not f.exists()]
    if missing:  # shards deduplicated by the datatrove engine persist no signatures
        log.warning("curated shards %s have no dedup index: new records are not compared with "
                    "them (rebuild with a full run on dedup.executor=local)", missing)
    return [f for f in files if f.exists()]


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem: copy
        shutil.copyfile(src, dst)


def _add_shard(root: Path, dedup_dir: Path, shard: str) -> None:
    """The dedup output's records and signatures, as one shard (idempotent)."""
    target = root / "shards" / shard
    if target.exists():
        return
    tmp = root / "shards" / f".{shard}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for pattern in (TRAIN_GLOB, HELDOUT_GLOB, INDEX_NAME, "manifest.json"):
        for f in dedup_dir.glob(pattern):
            _link(f, tmp / f.name)
    tmp.rename(target)


def _digest(shards: list[str]) -> str:
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]


def mark_trained(home: str | Path, name: str, version: int) -> None:
    """Record that a version was trained on (incremental runs count new records from there)."""
    root = dataset_dir(home, name)
    with _locked(root):
        found = versions(root)
        for v in found:
            if v["version"] == version:
                v["trained"] = True
        write_atomic(root / VERSIONS, json.dumps(found, indent=1) + "\n")


def _new_since_training(found: list[dict[str, Any]]) -> int:
    n = 0
    for v in reversed(found):
        if v.get("trained"):
            break
        n += v["added"]
    return n


def run_curate(dedup_dir: str | Path, out_dir: str | Path, cfg: CurateConfig, *,
               home: str | Path, dataset: str, mode: Mode = "full",
               run_id: str = "") -> Manifest:
    """Add the dedup output to the curated dataset and write the resulting version here."""
    dedup_dir, out = Path(dedup_dir), Path(out_dir)
    stage = StageDir(out, "curate", f"{cfg.digest()}:{mode}:{dataset}", dedup_dir,
                     heldout="own")
    if (done := stage.finished()) is not None:
        return done
    root = dataset_dir(home, dataset)
    new = Manifest.read(dedup_dir)
    # Named by content: a rerun after a crash between the append and the manifest finds it.
    shard = hashlib.sha256(json.dumps(stage.digests, sort_keys=True).encode()).hexdigest()[:12]
    with _locked(root):
        found = versions(root)
        previous = found[-1] if found else None
        already = previous is not None and previous["shards"][-1] == shard
        if already:  # a rerun after a crash between the append and this stage's manifest
            version = previous
        else:
            _add_shard(root, dedup_dir, shard)
            base = previous["shards"] if (previous and mode == "incremental") else []
            shards = [*base, shard]
            version = {"version": (previous["version"] + 1) if previous else 1,
                       "shards": shards, "digest": _digest(shards), "mode": mode,
                       "added": new.kept, "run_id": run_id, "trained": False,
                       "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            found.append(version)
            write_atomic(root / VERSIONS, json.dumps(found, indent=1) + "\n")
        since = _new_since_training(found)
    writer = stage.writer()
    counts = {"train": 0, "heldout": 0}
    for i, name in enumerate(version["shards"]):
        m = Manifest.read(root / "shards" / name)
        for split in counts:
            counts[split] += m.splits.get(split, 0)
        for f in sorted((root / "shards" / name).glob("*.jsonl.gz")):
            kind, _, rest = f.name.partition("-")
            _link(f, out / f"{kind}-{i:05d}-{rest}")
    for split, n in counts.items():
        writer.adopt(n, split)
    train = mode == "full" or since >= cfg.min_new_records
    why = ("full run" if mode == "full" else
           f"{since} new records since the last trained version "
           f"{'>=' if train else '<'} curate.min_new_records {cfg.min_new_records}")
    log.info("curate: %s version %d (%d shards, %d train + %d held-out); train: %s (%s)",
             dataset, version["version"], len(version["shards"]), counts["train"],
             counts["heldout"], train, why)
    earlier = counts["train"] + counts["heldout"] - new.kept
    return writer.finish(
        new.kept + earlier,
        metrics={"curate.new_records": float(new.kept), "curate.version": version["version"],
                 "curate.new_since_training": float(since)},
        info={"dataset": str(root), "version": version["version"],
              "version_digest": version["digest"], "shards": len(version["shards"]),
              "mode": mode, "from_earlier_versions": earlier, "train": train,
              "train_reason": why})
