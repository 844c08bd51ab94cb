"""A stage killed while it rewrites its directory never looks complete (issue 10, item 1).

The issue's scenario: ingest a file, rerun with a changed config and SIGKILL once the new data
files exist, rerun the first config. The old manifest listed files that the killed run had
deleted or half-rewritten; the up-to-date check only asked whether they existed, said "up to
date, skipping", and the next stage died on a corrupt gzip. Now the manifest goes first and
every listed file's digest is verified (tasks/stage_dir.py)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from data_contracts.manifest import Manifest
from ops_helpers import REPO, cli_env, ftflow
from tasks.stage_dir import outputs_intact

pytestmark = pytest.mark.slow  # four ingest runs of 2,000 records (~1 min on an idle machine)
TOPICS = ["password", "invoice", "refund", "delivery", "coupon", "account", "shipping", "login"]


def _big_input(path: Path, n: int = 2000) -> Path:
    with path.open("w") as fh:
        for i in range(n):
            topic = TOPICS[i % len(TOPICS)]
            fh.write(json.dumps({"messages": [
                {"role": "user", "content": f"How do I fix the {topic} problem number {i} on "
                                            f"my account, order {i * 7919 % 100000}?"},
                {"role": "assistant", "content": f"Open the {topic} page, choose case {i} and "
                                                 "follow the steps shown there to finish it."}]})
                     + "\n")
    return path


def _ingest(src: Path, out: Path, home: Path, *overrides: str) -> list[str]:
    return ftflow("stage", "ingest", "--input", str(src), "--output", str(out),
                  f"run.home={home}", *overrides)


def _gzip_ok(path: Path) -> bool:
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 20):
                pass
        return True
    except (OSError, EOFError):
        return False


def test_killed_rewrite_then_first_config_is_not_up_to_date(tmp_path: Path,
                                                            session_home: Path) -> None:
    src, out = _big_input(tmp_path / "big.jsonl"), tmp_path / "01-ingest"
    env = cli_env(tmp_path / "prefect")
    first = subprocess.run(_ingest(src, out, session_home), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    assert outputs_intact(out, Manifest.read(out)) is None

    # Changed config; SIGKILL as soon as the new run's data files exist.
    proc = subprocess.Popen(_ingest(src, out, session_home, "ingest.min_words=4"), cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if list(out.glob("*.partial")):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the second run ended before it could be killed"
    assert not (out / "manifest.json").exists(), "a killed rewrite left a manifest behind"

    # The first config again: the stage runs, never "up to date" on what the kill left.
    again = subprocess.run(_ingest(src, out, session_home), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "up to date" not in again.stdout + again.stderr
    m = Manifest.read(out)
    assert outputs_intact(out, m) is None
    assert all(_gzip_ok(f) for f in out.glob("*.jsonl.gz"))
    assert not list(out.glob("*.partial"))
    assert m.records_in == 2000
    m.check()  # every record accounted for

    # A finished stage whose data file is damaged afterwards is not up to date either.
    shard = sorted(out.glob("train-*.jsonl.gz"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    third = subprocess.run(_ingest(src, out, session_home), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=900)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "does not match its recorded digest" in third.stdout + third.stderr
    assert outputs_intact(out, Manifest.read(out)) is None and _gzip_ok(shard)
