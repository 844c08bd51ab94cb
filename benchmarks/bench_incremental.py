"""A run on one newly arrived file vs a full rebuild: the data stages (ingest, PII, dedup,
curate), side by side, on the same home.

The full rebuild reads the whole corpus plus the new file; the incremental run reads the new file
alone and dedups it against the curated corpus's persisted signatures. Prints a markdown table.

    .venv/bin/python benchmarks/bench_incremental.py --records 20000 --new 200
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_scale import write_corpus  # noqa: E402

from data_contracts.config import load_config  # noqa: E402
from flows.env import quiet_offline_env  # noqa: E402
from tasks.stages import CURATION_END, STAGES, StageContext, run_stage  # noqa: E402

DATA_STAGES = [s for s in STAGES[:[s.name for s in STAGES].index(CURATION_END) + 1]]


def data_stages(inputs: list[str], run_dir: Path, overrides: list[str],
                incremental: bool) -> dict[str, float]:
    """Run ingest -> curate; seconds per stage (and 'total')."""
    cfg = load_config(None, overrides)
    times: dict[str, float] = {}
    t_all = time.monotonic()
    for s in DATA_STAGES:
        ins = tuple(run_dir / r for r in s.reads) or (inputs,)
        t0 = time.monotonic()
        run_stage(s, StageContext(cfg, run_dir / s.name, ins, incremental=incremental,
                                  run_id=run_dir.name))
        times[s.name] = time.monotonic() - t0
    times["total"] = time.monotonic() - t_all
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=20_000, help="the curated corpus before")
    ap.add_argument("--new", type=int, default=200, help="records in the newly arrived file")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    quiet_offline_env()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ftflow-bench-incr-"))
    home = work / "home"
    (home / "assets").mkdir(parents=True, exist_ok=True)
    lid = HERE.parent / ".ftflow" / "assets" / "lid.176.ftz"
    if lid.exists():
        shutil.copy(lid, home / "assets" / lid.name)
    corpus = write_corpus(work / "corpus.jsonl", args.records, seed=7)
    new = write_corpus(work / "new.jsonl", args.new, seed=8)
    overrides = [f"run.home={home}", "curate.dataset=bench", "curate.min_new_records=1000000"]
    # The curated corpus as a full run leaves it, then the two ways to add the new file.
    full = data_stages([str(corpus), str(new)], work / "runs" / "full", overrides, False)
    data_stages([str(corpus)], work / "runs" / "reseed", overrides, incremental=False)
    incr = data_stages([str(new)], work / "runs" / "incremental", overrides, True)
    print(f"### Incremental vs full data stages ({date.today()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{args.records:,} curated + {args.new:,} new records)\n")
    print("| stage | full rebuild s | incremental s | incremental / full |")
    print("|---|---:|---:|---:|")
    for name in [*[s.name for s in DATA_STAGES], "total"]:
        print(f"| {name} | {full[name]:.1f} | {incr[name]:.1f} | "
              f"{100 * incr[name] / full[name]:.0f}% |")


if __name__ == "__main__":
    main()
