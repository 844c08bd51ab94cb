"""Dedup stage benchmark on real prose: recall/precision per true Jaccard band, throughput.

    .venv/bin/python benchmarks/bench_dedup.py [--share 0.7] [--repeats 3]

Source: the long descriptions in the venv's installed `*.dist-info/METADATA` files and the
docstrings of Python's standard library, split into paragraphs of >= 50 words,
exact-deduplicated, then pruned so that no two source paragraphs share a true word-5-gram
Jaccard >= 0.3. Near duplicates are planted by editing words (replace / delete / insert) until
the exact 5-gram Jaccard with the original (the stage's own `normalize_for_matching` +
`shingles`) falls in a target band. Ground truth for every record is its best exact Jaccard
with any earlier record. Throughput compares, on the same file, a bare read-parse-write pass
(the ceiling), `run_dedup`, and a naive datasketch loop (`MinHash()` + `update` per shingle,
`MinHashLSH.insert` / `query`). Prints a markdown report.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import random
import re
import statistics
import sys
import sysconfig
import tempfile
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datasketch import MinHash, MinHashLSH  # noqa: E402

from data_contracts.config import DedupConfig  # noqa: E402
from tasks.dedup import run_dedup  # noqa: E402
from tasks.dedup_sketch import normalize_for_matching, shingles  # noqa: E402
from tasks.io import iter_input  # noqa: E402
from tasks.stage_dir import StageWriter  # noqa: E402
from common import bare_pass  # noqa: E402  (benchmarks/common.py)

BANDS = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.85), (0.85, 0.9),
         (0.9, 1.0), (1.0, 1.01)]
NGRAM = 5


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def sh(text: str) -> set[bytes]:
    return shingles(normalize_for_matching(text), NGRAM)


def docstring_paragraphs(min_words: int) -> list[str]:
    """Prose paragraphs of the docstrings in Python's own standard library."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(stdlib.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node) or ""
                for block in re.split(r"\n\s*\n", doc):
                    if ">>>" in block or "::" in block:
                        continue
                    text = " ".join(block.split())
                    if len(text.split()) >= min_words:
                        out.append(text)
    return out


def source_paragraphs(min_words: int = 50) -> list[str]:
    """Prose paragraphs from installed packages' long descriptions, deduplicated."""
    site = Path(sysconfig.get_paths()["purelib"])
    paras = []
    for meta in sorted(site.glob("*.dist-info/METADATA")):
        body = meta.read_text(errors="replace").split("\n\n", 1)[-1]  # after the headers
        for block in re.split(r"\n\s*\n", body):
            lines = [ln.strip() for ln in block.splitlines()]
            if any(ln.startswith((">>>", "$ ", "|", "+--", "..", "```", "    ")) for ln in lines):
                continue  # code, tables, directives: not prose
            text = " ".join(ln for ln in lines if ln)
            if len(text.split()) >= min_words and sum(c.isalpha() for c in text) > 0.7 * len(text):
                paras.append(text)
    paras += docstring_paragraphs(min_words)
    seen, unique = set(), []
    for p in paras:
        key = normalize_for_matching(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    # Drop paragraphs that already resemble a kept one (exact Jaccard >= 0.3, e.g. license
    # boilerplate repeated across packages): otherwise the ground truth would be muddied.
    index: dict[bytes, list[int]] = defaultdict(list)
    kept: list[tuple[str, set[bytes]]] = []
    for p in unique:
        s = sh(p)
        shared = Counter(j for g in s for j in index.get(g, ()))
        if any(n / (len(s) + len(kept[j][1]) - n) >= 0.3 for j, n in shared.items()):
            continue
        for g in s:
            index[g].append(len(kept))
        kept.append((p, s))
    return [p for p, _ in kept]


def plant(words: list[str], band: tuple[float, float], vocab: list[str],
          rng: random.Random) -> list[str] | None:
    """Edit words one at a time until the exact 5-gram Jaccard lies in band (None: overshot)."""
    lo, hi = band
    orig = sh(" ".join(words))
    if lo >= 1.0:
        return list(words)
    cur = list(words)
    for _ in range(len(words) * 3):
        op = rng.random()
        pos = rng.randrange(len(cur))
        if op < 0.6:
            cur[pos] = rng.choice(vocab)
        elif op < 0.8 and len(cur) > NGRAM + 1:
            del cur[pos]
        else:
            cur.insert(pos, rng.choice(vocab))
        j = jaccard(orig, sh(" ".join(cur)))
        if j < lo:
            return None
        if j < hi and (normalize_for_matching(" ".join(cur))
                       != normalize_for_matching(" ".join(words))):
            return cur
    return None


def build(paras: list[str], share: float, seed: int):
    """Records (originals + near duplicates placed after them) and each record's planted band."""
    rng = random.Random(seed)
    vocab = sorted({w for p in paras for w in p.split() if w.isalpha()})
    items: list[tuple[str, str, tuple[float, float] | None]] = []
    for i, p in enumerate(paras):
        items.append((f"p{i:05d}", p, None))
    dups = []
    for i, p in enumerate(paras):
        if rng.random() >= share:
            continue
        band = BANDS[i % len(BANDS)]
        for _ in range(20):
            edited = plant(p.split(), band, vocab, rng)
            if edited is not None:
                dups.append((f"p{i:05d}-d", " ".join(edited), band))
                break
    # Near duplicates come after every original, in shuffled order: the original is kept.
    rng.shuffle(dups)
    return items + dups


def best_earlier(texts: list[str]) -> list[float]:
    """Exact best Jaccard of each record with any earlier record (inverted shingle index)."""
    index: dict[bytes, list[int]] = defaultdict(list)
    sets, best = [], []
    for i, t in enumerate(texts):
        s = sh(t)
        shared = Counter(j for g in s for j in index.get(g, ()))
        best.append(max((n / (len(s) + len(sets[j]) - n) for j, n in shared.items()), default=0.0))
        for g in s:
            index[g].append(i)
        sets.append(s)
    return best


def naive_pass(src: Path, out: Path, cfg: DedupConfig) -> set[str]:
    """The textbook datasketch loop: one MinHash per record, update per shingle, query, insert."""
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    hashes: dict[str, MinHash] = {}
    writer = StageWriter(out, "naive")
    removed, n = set(), 0
    for rec in iter_input(str(src)):
        n += 1
        mh = MinHash(num_perm=cfg.num_perm)
        for g in shingles(normalize_for_matching(rec.joined_text()), cfg.ngram):
            mh.update(g)
        best = max(((mh.jaccard(hashes[k]), k) for k in lsh.query(mh)), default=(0.0, ""))
        if best[0] >= cfg.threshold:
            writer.duplicate(rec, dup_of=best[1], kind="near", jaccard=best[0])
            removed.add(rec.id)
        else:
            lsh.insert(rec.id, mh)
            hashes[rec.id] = mh
            writer.keep(rec)
    writer.finish(n, input_digests={}, config_digest="naive")
    return removed


def removed_ids(stage_dir: Path) -> dict[str, dict]:
    import gzip

    path = stage_dir / "deduplicated.jsonl.gz"
    if not path.exists():
        return {}
    with gzip.open(path, "rt") as fh:
        return {row["record"]["id"]: row for row in map(json.loads, fh)}


def band_of(j: float) -> str:
    for lo, hi in BANDS:
        if lo <= j < hi:
            return "1.0 (exact)" if lo >= 1.0 else f"[{lo:.2f}, {hi:.2f})"
    return "< 0.30"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--share", type=float, default=0.7, help="originals given a near duplicate")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    cfg = DedupConfig(eval_fraction=0.0)
    paras = source_paragraphs()
    items = build(paras, args.share, args.seed)
    truth = best_earlier([t for _, t, _ in items])
    work = Path(tempfile.mkdtemp(prefix="bench-dedup-"))
    src = work / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": rid, "text": t}) + "\n" for rid, t, _ in items))
    timing_src, n_timing = src, len(items)

    times: dict[str, list[float]] = defaultdict(list)
    naive_removed: set[str] = set()
    for rep in range(args.repeats):
        times["bare"].append(_timed(lambda: bare_pass(timing_src, work / f"bare{rep}")))
        times["ours"].append(_timed(lambda: run_dedup(timing_src, work / f"ours{rep}", cfg,
                                                      home=work)))
        times["naive"].append(_timed(lambda: naive_removed.update(
            naive_pass(timing_src, work / f"naive{rep}", cfg))))
    run_dedup(src, work / "quality", cfg, home=work)
    removed = removed_ids(work / "quality")
    naive_q = naive_pass(src, work / "naive-quality", cfg)

    rows: dict[str, Counter] = defaultdict(Counter)
    wrong_below_05 = []
    for (rid, _, planted), j in zip(items, truth, strict=True):
        b = band_of(j)
        rows[b]["n"] += 1
        rows[b]["ours"] += rid in removed
        rows[b]["naive"] += rid in naive_q
        if rid in removed and j < 0.5:
            wrong_below_05.append((rid, j))
    pos = [(rid, j) for (rid, _, _), j in zip(items, truth, strict=True) if j >= cfg.threshold]
    hi = [(rid, j) for rid, j in pos if j >= 0.85]
    tp = sum(rid in removed for rid, _ in pos)
    med = {k: statistics.median(v) for k, v in times.items()}
    rps = {k: n_timing / v for k, v in med.items()}

    print(f"### Dedup benchmark ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{platform.machine()}, {os.cpu_count()} cores)\n")
    print(f"Command: `.venv/bin/python benchmarks/bench_dedup.py --share {args.share} "
          f"--repeats {args.repeats} --seed {args.seed}`\n")
    print(f"{len(paras)} source paragraphs (>= 50 words, from installed METADATA files and "
          f"stdlib docstrings), {len(items) - len(paras)} planted near duplicates; config "
          f"threshold={cfg.threshold}, num_perm={cfg.num_perm}, ngram={cfg.ngram}, "
          f"eval_fraction=0.\n")
    print("Per band of the record's best exact 5-gram Jaccard with any earlier record:\n")
    print("| true Jaccard | records | removed (ours) | rate | removed (naive datasketch) |")
    print("|---|---:|---:|---:|---:|")
    order = ["< 0.30"] + [band_of(lo) for lo, _ in BANDS]
    for b in order:
        r = rows.get(b)
        if r:
            print(f"| {b} | {r['n']} | {r['ours']} | {r['ours'] / r['n']:.3f} | {r['naive']} |")
    precision = tp / max(len(removed), 1)
    print(f"\n- recall at J >= 0.85: {sum(rid in removed for rid, _ in hi)}/{len(hi)} = "
          f"{sum(rid in removed for rid, _ in hi) / max(len(hi), 1):.4f} (target >= 0.95)")
    print(f"- recall at J >= {cfg.threshold} (the threshold): {tp}/{len(pos)} = "
          f"{tp / max(len(pos), 1):.4f}")
    print(f"- precision (removed records whose true J >= {cfg.threshold}): {tp}/{len(removed)} = "
          f"{precision:.4f}")
    print(f"- removed with true J < 0.5: {len(wrong_below_05)} (target 0) {wrong_below_05[:5]}")
    print(f"\nThroughput on {n_timing} records, median of {args.repeats}:\n")
    print("| pass | median s | records/s | of ceiling |\n|---|---:|---:|---:|")
    for label, k in [("bare read-parse-write (ceiling)", "bare"), ("run_dedup (ours)", "ours"),
                     ("naive datasketch loop", "naive")]:
        print(f"| {label} | {med[k]:.2f} | {rps[k]:.0f} | {rps[k] / rps['bare']:.3f} |")
    print(f"\nSpeed-up vs naive: {rps['ours'] / rps['naive']:.1f}x")


if __name__ == "__main__":
    main()
