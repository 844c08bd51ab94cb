"""Stage 3: carve the held-out split, drop exact and MinHash near duplicates, decontaminate.

The stage entry: run_dedup resolves `dedup.executor` (auto: by the input's size) and hands the
input to an engine, in process (tasks.dedup_local) or datatrove's MinHash pipeline on local
processes, Ray or Slurm (tasks.dedup_datatrove). Both match, decide and write through
tasks.dedup_common, so they produce the same stage directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

from data_contracts.config import ConfigError, DedupConfig
from data_contracts.manifest import Manifest
from data_contracts.records import ChatSample
from tasks.dedup_common import CorpusIndex, stream_input
from tasks.dedup_local import run_dedup_local
from tasks.dedup_sketch import SCHEME
from tasks.io import is_stage_dir
from tasks.stage_dir import StageDir

logger = logging.getLogger(__name__)


def records_over(input_path: str | Path, limit: int) -> tuple[bool, int]:
    """Whether the input holds more than ``limit`` records, and how many were seen to tell.

    A stage directory's manifest says at once; other input is read until the limit is passed.
    """
    if not isinstance(input_path, list) and is_stage_dir(input_path):
        n = Manifest.read(input_path).kept
        return n > limit, n
    n = 0
    for _, item in stream_input(input_path):
        if isinstance(item, ChatSample):
            n += 1
            if n > limit:
                break
    return n > limit, n


def resolve_executor(input_path: str | Path, cfg: DedupConfig) -> tuple[DedupConfig, str]:
    """``executor: auto`` made concrete for this input: (config, why)."""
    if cfg.executor != "auto":
        return cfg, "configured"
    over, n = records_over(input_path, cfg.local_max_records)
    executor = "datatrove" if over else "local"
    count = f"at least {n:,}" if over else f"{n:,}"
    why = (f"auto: {count} records {'>' if over else '<='} local_max_records "
           f"{cfg.local_max_records:,}")
    logger.info("dedup: executor %s (%s)", executor, why)
    return cfg.model_copy(update={"executor": executor}), why


def run_dedup(input_path: str | Path, out_dir: str | Path, cfg: DedupConfig, *,
              home: str | Path, seed: int = 42, corpus: list[Path] | None = None) -> Manifest:
    """Carve the held-out split (or reuse it), remove exact/near duplicates and train records
    that leak held-out ones; with ``corpus`` (persisted indexes of the curated dataset's
    shards), also every record that duplicates the curated corpus of earlier runs."""
    if corpus is not None:
        if cfg.executor not in ("auto", "local"):
            raise ConfigError(f"dedup.executor={cfg.executor}: a run on newly arrived files "
                              "dedups in process against the curated corpus; use auto or local")
        cfg, why = cfg.model_copy(update={"executor": "local"}), "incremental: in process"
    else:
        cfg, why = resolve_executor(input_path, cfg)
    shards = {"corpus": ",".join(p.parent.name for p in corpus)} if corpus is not None else {}
    # SCHEME: a stage matched with other hashes (and its persisted index) is out of date.
    stage = StageDir(out_dir, "dedup", f"{cfg.digest()}:seed={seed}:{SCHEME}", input_path,
                     extra_digests=shards)
    if (done := stage.finished()) is not None:
        return done
    if corpus is not None:
        index = CorpusIndex(cfg)
        for path in corpus:
            index.add_file(path)
        return run_dedup_local(input_path, stage, cfg, seed=seed, executor_choice=why,
                               corpus=index)
    if cfg.executor == "local":
        return run_dedup_local(input_path, stage, cfg, seed=seed, executor_choice=why)
    # Imported here, one way: datatrove and Ray cost seconds of imports the local path skips.
    from tasks.dedup_datatrove import run_dedup_datatrove

    return run_dedup_datatrove(input_path, stage, cfg, seed=seed, executor_choice=why)
