"""Shared pieces of the benchmark scripts."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tasks.io import iter_input
from tasks.stage_dir import StageWriter


def bare_pass(src: Path, out: Path) -> int:
    """The ceiling: read, parse and write every record with no stage logic; returns the count."""
    writer = StageWriter(out, "bare")
    n = 0
    for rec in iter_input(str(src)):
        writer.keep(rec)
        n += 1
    writer.finish(n, input_digests={}, config_digest="bare")
    return n


def model_bench_args(ap: argparse.ArgumentParser, work: str, out: Path) -> argparse.ArgumentParser:
    """The options every model benchmark takes: its work folder, ftflow home and result file."""
    ap.add_argument("--work", default=work, help="models and stage dirs (kept)")
    ap.add_argument("--home", default=None, help="ftflow home (default: WORK/home)")
    ap.add_argument("--out", default=str(out))
    return ap


def model_bench_dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    """(work, home) from model_bench_args' options, with the hub and datasets offline."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    return work, Path(args.home) if args.home else work / "home"
