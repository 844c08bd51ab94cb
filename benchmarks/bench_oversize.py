"""Peak RSS of `ftflow stage ingest` on a file of over-size lines (ingest.max_record_bytes).

    .venv/bin/python benchmarks/bench_oversize.py [--line-mb 200] [--lines 2] [--repo PATH]

Writes `oversize.jsonl.gz`: valid chats with `--lines` records of `--line-mb` MB each between
them (`{"text": "000..."}`: valid JSON, so a reader that holds the line also parses it), and
the same file with those records cut to 1 KB (the baseline). Runs `ftflow stage ingest` on each
in a fresh process and reports its peak RSS (`getrusage(RUSAGE_CHILDREN)` of a wrapper whose
only child is the stage) and the ledger. `--repo` runs another checkout's code (e.g. the main
branch before the bound) on the same files. `--ratio 0` turns the decompression-ratio bound
off, so every over-size line is skipped to its end (the default stops such a file at 100:1).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Run a command and print the peak RSS (KiB) of its process tree's largest process.
MEASURE = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)")


def chat(i: int) -> dict:
    return {"id": f"ok{i}", "messages": [
        {"role": "user", "content": f"How do I reset my password for account number {i}?"},
        {"role": "assistant", "content": "Open the settings page, choose security and press "
                                         "reset; the link arrives by email within minutes."}]}


def write_file(path: Path, lines: int, line_bytes: int) -> None:
    """Valid chats, with `lines` text records of `line_bytes` bytes between them."""
    with gzip.open(path, "wb", compresslevel=6) as fh:
        for i in range(lines):
            fh.write(json.dumps(chat(i)).encode() + b"\n")
            fh.write(b'{"text": "')
            left = line_bytes - 12
            block = b"0" * (1 << 20)
            while left > 0:
                fh.write(block[:left])
                left -= len(block)
            fh.write(b'"}\n')
        fh.write(json.dumps(chat(lines)).encode() + b"\n")


def home_with_assets(root: Path) -> Path:
    """An ftflow home holding the language-id model (copied from the project's home)."""
    home = root / "home"
    (home / "assets").mkdir(parents=True, exist_ok=True)
    src = Path(os.environ.get("FTFLOW_HOME", REPO / ".ftflow")) / "assets" / "lid.176.ftz"
    if src.exists():
        shutil.copy(src, home / "assets" / "lid.176.ftz")
    return home


def peak_rss_of_ingest(repo: Path, src: Path, out: Path, home: Path,
                       overrides: list[str] = ()) -> tuple[int, int, str]:
    """(peak RSS in bytes, exit code, the stage's last output line) of `ftflow stage ingest`."""
    env = {**os.environ, "PYTHONPATH": str(repo), "FTFLOW_HOME": str(home),
           "FTFLOW_NO_STACK": "1"}
    cmd = [sys.executable, "-c", MEASURE, sys.executable, "-m", "flows.cli", "stage", "ingest",
           "--input", str(src), "--output", str(out), *overrides]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    peak = [line for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KB")]
    if not peak:
        raise RuntimeError(f"measurement failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    _, kb, rc = peak[-1].split()
    lines = [line for line in (proc.stdout + proc.stderr).splitlines()
             if line and not line.startswith("PEAK_RSS_KB")]
    return int(kb) * 1024, int(rc), (lines[-1] if lines else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--line-mb", type=int, default=200)
    ap.add_argument("--lines", type=int, default=2)
    ap.add_argument("--ratio", default=None, help="ingest.max_decompression_ratio override")
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout whose code runs")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-oversize-"))
    home = home_with_assets(work)
    big, small = work / "oversize.jsonl.gz", work / "baseline.jsonl.gz"
    write_file(big, args.lines, args.line_mb << 20)
    write_file(small, args.lines, 1024)
    overrides = [f"ingest.max_decompression_ratio={args.ratio}"] if args.ratio else []
    rows = []
    for label, src in (("baseline (1 KB records)", small),
                       (f"{args.lines} x {args.line_mb} MB records", big)):
        rss, rc, last = peak_rss_of_ingest(args.repo, src, work / f"out-{src.stem}", home,
                                           overrides)
        rows.append((label, src.stat().st_size, rss, rc, last))
    print(f"### Over-size lines ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{platform.machine()}, {os.cpu_count()} cores)\n")
    print(f"Command: `.venv/bin/python benchmarks/bench_oversize.py --line-mb {args.line_mb} "
          f"--lines {args.lines}{f' --ratio {args.ratio}' if args.ratio else ''}"
          f"{f' --repo {args.repo}' if args.repo != REPO else ''}`\n")
    print("| input | .gz bytes | peak RSS | exit | stage output |\n|---|---:|---:|---:|---|")
    for label, size, rss, rc, last in rows:
        print(f"| {label} | {size:,} | {rss / 2**20:,.0f} MiB | {rc} | {last[:160]} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
