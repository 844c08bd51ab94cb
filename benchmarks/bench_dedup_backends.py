"""MinHash backends for in-process dedup, on bench_dedup.py's real-prose near duplicates.

    .venv/bin/python benchmarks/bench_dedup_backends.py [--share 0.7] [--copies 1]

Every backend runs the same rule on the same records in input order: candidates from an LSH
over MinHash signatures, each candidate confirmed with the exact word-5-gram Jaccard
(`tasks.dedup_common`'s normalization and shingles), a record removed when one confirmed
candidate reaches the threshold (0.8). Reported: signature time, LSH build + query time, recall
on records whose best true Jaccard with an earlier record is >= 0.85, removals of records whose
best true Jaccard is < 0.5 (false removals), and the speed-up over the naive datasketch loop
(`MinHash()` + `update` per shingle, `MinHashLSH` at the threshold, MinHash estimate decides).
Backends: datasketch naive; ftflow today (CRC-32 shingle hashes + `MinHash.bulk`, datasketch
`MinHashLSH` at the candidate floor); rensa `RMinHash` / `RMinHashLSH` (Rust) with 16 and 32
bands (bands must divide num_perm).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_dedup import best_earlier, build, source_paragraphs  # noqa: E402
from datasketch import LeanMinHash, MinHash, MinHashLSH  # noqa: E402

from data_contracts.config import DedupConfig  # noqa: E402
from tasks.dedup_common import (  # noqa: E402
    candidate_floor,
    exact_jaccard,
    exact_key,
    match_form,
    minhashes,
    normalize_for_matching,
    shingle_hashes,
    shingles,
)


def _decide(forms, candidates_of, insert, threshold: float) -> list[bool]:
    """The rule every backend shares: exact key, else LSH candidates confirmed exactly."""
    removed, exact, kept_grams = [], set(), {}
    for i, (key, grams) in enumerate(forms):
        if key in exact:
            removed.append(True)
            continue
        hit = any(exact_jaccard(grams, kept_grams[j]) >= threshold for j in candidates_of(i))
        removed.append(hit)
        if not hit:
            exact.add(key)
            kept_grams[i] = grams
            insert(i)
    return removed


def naive(texts: list[str], cfg: DedupConfig) -> tuple[list[bool], float, float]:
    t0 = time.perf_counter()
    sigs = []
    for t in texts:
        mh = MinHash(num_perm=cfg.num_perm)
        for g in shingles(normalize_for_matching(t), cfg.ngram):
            mh.update(g)
        sigs.append(mh)
    t1 = time.perf_counter()
    lsh, removed = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm), []
    for i, mh in enumerate(sigs):
        best = max((mh.jaccard(sigs[k]) for k in lsh.query(mh)), default=0.0)
        removed.append(best >= cfg.threshold)
        if not removed[-1]:
            lsh.insert(i, mh)
    return removed, t1 - t0, time.perf_counter() - t1


def ftflow(texts: list[str], cfg: DedupConfig) -> tuple[list[bool], float, float]:
    t0 = time.perf_counter()
    forms = [match_form(t, cfg.ngram) for t in texts]
    sigs = [LeanMinHash(m) for m in minhashes([g for _, g in forms], cfg.num_perm)]
    t1 = time.perf_counter()
    lsh = MinHashLSH(threshold=candidate_floor(cfg), num_perm=cfg.num_perm)
    removed = _decide(forms, lambda i: sorted(lsh.query(sigs[i])),
                      lambda i: lsh.insert(i, sigs[i]), cfg.threshold)
    return removed, t1 - t0, time.perf_counter() - t1


def rensa_backend(bands: int):
    def run(texts: list[str], cfg: DedupConfig) -> tuple[list[bool], float, float]:
        from rensa import RMinHash, RMinHashLSH

        t0 = time.perf_counter()
        forms, sigs = [], []
        for t in texts:
            norm = normalize_for_matching(t)
            grams = shingles(norm, cfg.ngram)
            forms.append((exact_key(norm), shingle_hashes(grams)))
            mh = RMinHash(num_perm=cfg.num_perm, seed=42)
            mh.update(list(grams))  # rensa hashes each shingle itself
            sigs.append(mh)
        t1 = time.perf_counter()
        lsh = RMinHashLSH(threshold=candidate_floor(cfg), num_perm=cfg.num_perm,
                          num_bands=bands)
        removed = _decide(forms, lambda i: sorted(lsh.query(sigs[i])),
                          lambda i: lsh.insert(i, sigs[i]), cfg.threshold)
        return removed, t1 - t0, time.perf_counter() - t1
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--share", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = DedupConfig()
    items = build(source_paragraphs(), args.share, args.seed)
    texts = [t for _, t, _ in items]
    truth = best_earlier(texts)
    high = [i for i, j in enumerate(truth) if j >= 0.85]
    low = [i for i, j in enumerate(truth) if j < 0.5]
    backends = [("datasketch, naive loop", naive), ("ftflow today (CRC-32 + MinHash.bulk)", ftflow),
                ("rensa RMinHash, 16 bands", rensa_backend(16)),
                ("rensa RMinHash, 32 bands", rensa_backend(32))]
    print(f"{len(texts):,} records, {len(high):,} with true J >= 0.85, {len(low):,} below 0.5")
    rows, base = [], None
    for name, fn in backends:
        removed, sig_s, lsh_s = fn(texts, cfg)
        total = sig_s + lsh_s
        base = base or total
        recall = sum(removed[i] for i in high) / len(high)
        false = sum(removed[i] for i in low)
        rows.append(f"| {name} | {len(texts) / sig_s:,.0f} | {len(texts) / lsh_s:,.0f} | "
                    f"{recall:.3f} | {false} | {base / total:.1f}x |")
        print(rows[-1], flush=True)
    print("\n| backend | signatures/s | LSH build+query+confirm, records/s | recall J>=0.85 | "
          "removed below J 0.5 | speed-up vs naive |\n|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
