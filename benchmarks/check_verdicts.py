"""Ingest's verdicts on fixed corpora, written to a file and compared with another checkout's.

    .venv/bin/python benchmarks/check_verdicts.py --out mine.json [--scale 10000]
    .venv/bin/python benchmarks/check_verdicts.py --out mine.json --against theirs.json

Corpora: sample_data/ (every record of every form, through the same reader as the stage),
bench_scale.py's corpus (--scale records, seed 1) and bench_technical.py's rows (every clean
answer of both halves, its 400 junk and 120 hard junk rows). A verdict is "kept" or the
filter, rule and details that dropped the record (tasks.ingest.judge, default config plus
--set overrides). Run it in each checkout (PYTHONPATH at that checkout) and compare: a change
meant to be faster must give the same verdicts everywhere; a rule change lists what moved.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from data_contracts.config import load_config  # noqa: E402


def _label(verdict: object) -> str:
    if isinstance(verdict, tuple):
        return " | ".join(str(x) for x in verdict[:3])
    return "kept"


def corpora(scale: int) -> dict[str, list]:
    """name -> records (ChatSample), in a fixed order."""
    import bench_technical as bt
    from bench_scale import write_corpus

    from tasks.io import Quarantined, iter_input

    sample = HERE.parent / "sample_data"
    found = {"sample_data": [r for pattern in ("*.jsonl", "*.csv", "*.parquet")
                             for path in sorted(sample.glob(pattern))
                             for r in iter_input(str(path)) if not isinstance(r, Quarantined)]}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp) / "scale.jsonl", scale, 1)
        found["scale"] = [r for r in iter_input(str(corpus)) if not isinstance(r, Quarantined)]
    found["technical"] = (bt.clean_rows(100_000, random.Random(0), "all")
                          + bt.junk_rows(400, 0) + [r for _, r in bt.hard_junk_rows(120, 0)])
    return found


def verdicts(records: list, sets: list[str]) -> list[str]:
    from tasks.ingest import CHUNK, build_filters, build_steps, judge

    cfg = load_config(None, sets)
    steps = build_steps(cfg.ingest, build_filters(cfg.ingest, cfg.run.home))
    out: list[str] = []
    for start in range(0, len(records), CHUNK):
        out += [_label(v) for v in judge(steps, records[start:start + CHUNK])[0]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--against", type=Path, help="another run's --out file: list what differs")
    ap.add_argument("--scale", type=int, default=10_000)
    ap.add_argument("--set", action="append", default=[], help="config override, key=value")
    args = ap.parse_args()
    got = {}
    for name, records in corpora(args.scale).items():
        got[name] = dict(zip([f"{i}:{r.id}" for i, r in enumerate(records)],
                             verdicts(records, args.set)))
        print(f"{name}: {len(records)} records, {sum(v == 'kept' for v in got[name].values())} "
              "kept")
    args.out.write_text(json.dumps(got))
    if not args.against:
        return
    theirs = json.loads(args.against.read_text())
    for name, mine in got.items():
        other = theirs.get(name, {})
        moved = [(k, other.get(k), v) for k, v in mine.items() if other.get(k) != v]
        print(f"{name}: {len(moved)} of {len(mine)} verdicts differ "
              f"(keys only on one side: {len(set(mine) ^ set(other))})")
        for how, n in Counter((a, b) for _, a, b in moved).most_common(12):
            print(f"    {n} x {how[0]} -> {how[1]}")


if __name__ == "__main__":
    main()
