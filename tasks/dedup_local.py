"""Stage 3 in process (dedup.executor: local): datasketch MinHashes of every record in memory,
candidates from an LSH over them, decided and written by tasks.dedup_common."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from datasketch import LeanMinHash

from data_contracts.config import DedupConfig
from data_contracts.manifest import Manifest
from data_contracts.records import ChatSample
from tasks.dedup_common import (
    HeldoutCarver,
    Signature,
    can_hold_out,
    decide,
    match_form,
    minhashes,
    stage_info,
    stream_input,
    write_stage,
)
from tasks.stage_dir import StageDir

BATCH = 1024  # records per MinHash.bulk call


def signatures(items: Iterable[tuple[str, ChatSample]], cfg: DedupConfig) -> Iterator[Signature]:
    """The Signature of each (origin, record), with its MinHash, in input order."""
    batch: list[tuple[str, ChatSample]] = []

    def flush() -> Iterator[Signature]:
        forms = [match_form(rec.joined_text(), cfg.ngram) for _, rec in batch]
        hashes = minhashes([grams for _, grams in forms], cfg.num_perm)
        for (origin, rec), (key, grams), mh in zip(batch, forms, hashes, strict=True):
            yield Signature(rec.id, origin, can_hold_out(rec), key, LeanMinHash(mh), grams)

    for item in items:
        batch.append(item)
        if len(batch) >= BATCH:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def run_dedup_local(input_path: str | Path, stage: StageDir, cfg: DedupConfig, *,
                    seed: int, executor_choice: str) -> Manifest:
    """run_dedup in this process: every record's MinHash in memory, candidates from an LSH.
    Called by tasks.dedup.run_dedup once it has found the stage directory out of date."""
    # Pass 1: signatures only, so memory holds MinHashes, not records.
    records = ((o, r) for o, r in stream_input(input_path) if isinstance(r, ChatSample))
    sigs = list(signatures(records, cfg))
    carver = HeldoutCarver(cfg, seed)
    for i, s in enumerate(sigs):
        carver.add(i, s.origin, s.id, s.holdable)
    heldout_idx, reused = carver.split()
    decisions = decide(sigs, heldout_idx, cfg)
    removed = {i: (d[0], sigs[d[1]].id, d[2]) for i, d in decisions.items() if d is not None}
    return write_stage(input_path, stage, heldout_idx, removed,
                       info=stage_info(cfg, seed=seed, reused=reused,
                                       executor_choice=executor_choice))
