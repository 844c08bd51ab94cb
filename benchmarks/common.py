"""Shared pieces of the benchmark scripts."""

from __future__ import annotations

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
