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
    INDEX_NAME,
    CorpusIndex,
    HeldoutCarver,
    Removal,
    Signature,
    can_hold_out,
    decide,
    match_form,
    minhashes,
    save_index,
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
                    seed: int, executor_choice: str,
                    corpus: CorpusIndex | None = None) -> Manifest:
    """run_dedup in this process: every record's MinHash in memory, candidates from an LSH.
    Called by tasks.dedup.run_dedup once it has found the stage directory out of date."""
    # Pass 1: signatures only, so memory holds MinHashes, not records.
    records = ((o, r) for o, r in stream_input(input_path) if isinstance(r, ChatSample))
    sigs = list(signatures(records, cfg))
    # Records that duplicate the curated corpus of earlier runs go first, naming its record.
    removed: dict[int, Removal] = {}
    if corpus is not None:
        removed = {i: hit for i, s in enumerate(sigs) if (hit := corpus.match(s)) is not None}
    rest = [i for i in range(len(sigs)) if i not in removed]  # stream positions
    carver = HeldoutCarver(cfg, seed)
    for j, i in enumerate(rest):
        carver.add(j, sigs[i].origin, sigs[i].id, sigs[i].holdable)
    heldout_j, reused = carver.split()
    decisions = decide([sigs[i] for i in rest], heldout_j, cfg)
    removed.update({rest[j]: (d[0], sigs[rest[d[1]]].id, d[2])
                    for j, d in decisions.items() if d is not None})
    heldout_idx = {rest[j] for j in heldout_j}
    kept = [i for i in range(len(sigs)) if i not in removed]
    save_index(stage.dir / INDEX_NAME, [sigs[i] for i in kept],
               ["heldout" if i in heldout_idx else "train" for i in kept], cfg)
    info = stage_info(cfg, seed=seed, reused=reused, executor_choice=executor_choice)
    if corpus is not None:
        info["corpus_records"] = len(corpus)
    return write_stage(input_path, stage, heldout_idx, removed, info=info,
                       outputs=[stage.dir / INDEX_NAME])
