"""Stage 3 in process (dedup.executor: local): datasketch MinHashes of every record in memory,
candidates from an LSH over them, decided and written by tasks.dedup_common."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from datasketch import LeanMinHash, MinHash

from data_contracts.config import DedupConfig
from data_contracts.manifest import Manifest
from data_contracts.records import ChatSample
from tasks.dedup_common import (
    Signature,
    can_hold_out,
    carve_heldout,
    decide,
    exact_key,
    normalize_for_matching,
    shingle_hashes,
    shingles,
    stream_input,
    write_stage,
)
from tasks.io import input_digests, up_to_date

BATCH = 1024  # records per MinHash.bulk call


def signatures(items: Iterable[tuple[str, ChatSample]], cfg: DedupConfig) -> Iterator[Signature]:
    """The Signature of each (origin, record), with its MinHash, in input order."""
    batch: list[tuple[str, ChatSample]] = []

    def flush() -> Iterator[Signature]:
        norms = [normalize_for_matching(rec.joined_text()) for _, rec in batch]
        grams = [shingle_hashes(shingles(t, cfg.ngram)) for t in norms]
        # The shingles are hashed already: int() hands their CRC-32 to MinHash as is.
        hashes = MinHash.bulk([g.tolist() for g in grams], num_perm=cfg.num_perm, hashfunc=int)
        for (origin, rec), norm, mh, g in zip(batch, norms, hashes, grams, strict=True):
            yield Signature(rec.id, origin, can_hold_out(rec), exact_key(norm), LeanMinHash(mh), g)

    for item in items:
        batch.append(item)
        if len(batch) >= BATCH:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def run_dedup_local(input_path: str | Path, out_dir: str | Path, cfg: DedupConfig, *,
                    home: str | Path, seed: int = 42,
                    executor_choice: str = "configured") -> Manifest:
    """run_dedup in this process: every record's MinHash in memory, candidates from an LSH."""
    digests = input_digests(input_path)
    cdig = cfg.digest()
    if up_to_date(out_dir, digests, f"{cdig}:seed={seed}"):
        return Manifest.read(out_dir)
    # Pass 1: signatures only, so memory holds MinHashes, not records.
    records = ((o, r) for o, r in stream_input(input_path) if isinstance(r, ChatSample))
    sigs = list(signatures(records, cfg))
    reused = any(s.origin == "heldout" for s in sigs)
    heldout_idx = ({i for i, s in enumerate(sigs) if s.origin == "heldout"} if reused
                else carve_heldout(sigs, cfg, seed))
    decisions = decide(sigs, heldout_idx, cfg)
    removed = {i: (d[0], sigs[d[1]].id, d[2]) for i, d in decisions.items() if d is not None}
    return write_stage(input_path, out_dir, heldout_idx, removed, digests=digests,
                       config_digest=f"{cdig}:seed={seed}",
                       info={"heldout": "reused" if reused else "carved", "seed": seed,
                             "executor": cfg.executor, "executor_choice": executor_choice})
