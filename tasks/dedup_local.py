"""Stage 3 in process (dedup.executor: local): every record's signature in memory (its text form
computed a batch at a time by tasks.dedup_sketch), candidates from an LSH over them, decided and
written by tasks.dedup_common."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

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
    candidate_lsh,
    decide,
    save_index,
    stage_info,
    stream_input,
    write_stage,
)
from tasks.dedup_sketch import sketch
from tasks.stage_dir import StageDir

BATCH = 1024  # records per sketch() call at most
BATCH_CHARS = 1_000_000  # and text characters (its numpy arrays take ~50 bytes per character)


def signatures(items: Iterable[tuple[str, ChatSample]], cfg: DedupConfig) -> Iterator[Signature]:
    """The Signature of each (origin, record), with its MinHash and LSH bands, in input order."""
    lsh = candidate_lsh(cfg)
    batch: list[tuple[str, str, bool, str]] = []  # (id, origin, holdable, text)
    chars = 0

    def flush() -> Iterator[Signature]:
        sk = sketch([text for *_, text in batch], cfg.ngram, cfg.num_perm)
        bands = lsh.band_keys(sk.sigs)
        for (rid, origin, holdable, _), key, grams, sig, band in zip(
                batch, sk.keys, sk.grams, sk.sigs, bands, strict=True):
            yield Signature(rid, origin, holdable, key, grams, sig, band)

    for origin, rec in items:
        text = rec.joined_text()
        batch.append((rec.id, origin, can_hold_out(rec), text))
        chars += len(text)
        if len(batch) >= BATCH or chars >= BATCH_CHARS:
            yield from flush()
            batch, chars = [], 0
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
