"""Ingest throughput, this checkout against another (e.g. main), on bench_scale's corpus.

    .venv/bin/python benchmarks/bench_ingest.py --before /path/to/main/checkout [--records 20000]

Each run is a fresh subprocess of `run_ingest` (default config) on the same seeded support-chat
corpus (bench_scale.py's generator: ~6% junk, duplicates, PII, broken lines). It reports the
stage's wall time and its CPU time (this process + its worker processes): on a shared machine
the CPU time is the figure that does not depend on what else runs. Start-up (imports, loading
fastText and spaCy) cancels out as in bench_scale: rate = (N - warm) / (t_N - t_warm). The
decisions (kept, or the filter and rule that dropped it) are compared record for record.

    .venv/bin/python benchmarks/bench_ingest.py --steps [--records 10000]

times each step of this checkout's chain instead (CPU time per record, in this process, after
the warm-up records have filled the caches), and reading + parsing the corpus: what remains.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

CHILD = """
import json, resource, shutil, sys, time
from data_contracts.config import load_config
from tasks.ingest import run_ingest
inp, out = sys.argv[1], sys.argv[2]
cfg = load_config(None, sys.argv[3:])
shutil.rmtree(out, ignore_errors=True)
t0, c0 = time.perf_counter(), time.process_time()
m = run_ingest(inp, out, cfg.ingest, home=cfg.run.home)
kids = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall_s": time.perf_counter() - t0,
                  "cpu_s": time.process_time() - c0 + kids.ru_utime + kids.ru_stime,
                  "records_in": m.records_in, "kept": m.kept}))
"""


def run(repo: Path, corpus: Path, out: Path, overrides: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(out), *overrides],
                          cwd=repo, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def decisions(out: Path) -> dict[str, str]:
    found = {}
    for path in sorted(out.glob("train-*.jsonl.gz")):
        with gzip.open(path, "rt") as fh:
            found.update((json.loads(line)["id"], "kept") for line in fh)
    path = out / "filtered.jsonl.gz"
    if path.exists():
        with gzip.open(path, "rt") as fh:
            for line in fh:
                row = json.loads(line)
                found[row["record"]["id"]] = f"{row['reason']}.{row.get('rule')}"
    return found


def steps_profile(corpus: Path, warm: int) -> None:
    """CPU time per record of each step of judge()'s chain (see tasks.ingest.judge)."""
    from collections import Counter

    from data_contracts.config import load_config
    from tasks import ingest
    from tasks.io import Quarantined, iter_input

    cfg = load_config(None, ["ingest.workers=1"])
    t0 = time.process_time()
    records = [r for r in iter_input(str(corpus)) if not isinstance(r, Quarantined)]
    read = (time.process_time() - t0) / len(records)
    steps = ingest.build_steps(cfg.ingest, ingest.build_filters(cfg.ingest, cfg.run.home))
    spent: Counter[str] = Counter()
    for k in range(0, len(records), ingest.CHUNK):
        for step in steps:
            if isinstance(step, ingest.BaseFilter):
                step.exclusion_writer.drops = {}
        t = time.process_time()
        docs = [ingest.Document(text=ingest._doc_text(r), id=r.id, metadata={"record": r, "i": i})
                for i, r in enumerate(records[k:k + ingest.CHUNK])]
        spent["documents"] += (time.process_time() - t) * (k >= warm)
        for step in steps:
            t = time.process_time()
            docs = (ingest._run_filter(step, docs) if isinstance(step, ingest.BaseFilter)
                    else list(step.run(docs)))
            spent[type(step).__name__] += (time.process_time() - t) * (k >= warm)
        ingest._take_stats(steps)
    timed = len(records) - (warm + ingest.CHUNK - 1) // ingest.CHUNK * ingest.CHUNK
    total = sum(spent.values())
    print(f"Steps on {timed:,} records after {len(records) - timed:,} warm-up ones: "
          f"{total / timed * 1e6:,.0f} us CPU per record\n\n| step | us CPU per record | share |"
          "\n|---|---:|---:|")
    for name, cpu in spent.most_common():
        print(f"| {name} | {cpu / timed * 1e6:,.1f} | {cpu / total:.0%} |")
    print(f"| (reading + parsing the corpus, not in the total) | {read * 1e6:,.1f} | |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", type=Path, help="the checkout to compare with")
    ap.add_argument("--steps", action="store_true",
                    help="time each step of this checkout's chain instead (see above)")
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--warmup-records", type=int, default=1000)
    ap.add_argument("--workers", default="1,0", help="ingest.workers values for this checkout")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ftflow-bench-ingest"))
    args = ap.parse_args()
    from bench_scale import write_corpus

    args.workdir.mkdir(parents=True, exist_ok=True)
    sizes = (args.warmup_records, args.records)
    corpora = {n: write_corpus(args.workdir / f"corpus-{n}.jsonl", n, 7) for n in sizes}
    if args.steps:
        steps_profile(corpora[args.records], args.warmup_records)
        return
    if args.before is None:
        ap.error("--before is required (or --steps)")
    cases = [("before", args.before.resolve(), [])]
    cases += [(f"after, workers={w}", REPO, [f"ingest.workers={w}"])
              for w in args.workers.split(",")]
    rows, outs = [], {}
    for label, repo, overrides in cases:
        res = {}
        for n in sizes:
            out = args.workdir / f"out-{label.replace(' ', '').replace(',', '-')}-{n}"
            res[n] = run(repo, corpora[n], out, overrides)
            outs[label] = out
            print(f"{label:<20} N={n:>7} wall={res[n]['wall_s']:7.1f}s cpu={res[n]['cpu_s']:7.1f}s",
                  flush=True)
        big, warm = res[args.records], res[args.warmup_records]
        span = args.records - args.warmup_records
        rows.append((label, span / (big["wall_s"] - warm["wall_s"]),
                     span / (big["cpu_s"] - warm["cpu_s"]), big["kept"]))
    reference = decisions(outs["before"])
    lines = [f"Ingest on {args.records:,} records (steady state over {args.warmup_records:,}), "
             f"{time.strftime('%Y-%m-%d')}, `{' '.join(sys.argv)}`", "",
             "| run | records/s (wall) | records/s per CPU-second | kept | decisions differing "
             "from before |", "|---|---:|---:|---:|---:|"]
    for label, wall_rate, cpu_rate, kept in rows:
        ours = decisions(outs[label])
        differ = sum(ours.get(k) != reference.get(k) for k in set(ours) | set(reference))
        lines.append(f"| {label} | {wall_rate:,.0f} | {cpu_rate:,.0f} | {kept:,} | {differ} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
