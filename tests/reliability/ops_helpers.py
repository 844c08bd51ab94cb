"""Helpers of the reliability tests: the CLI as a user runs it, in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_data" / "support_chat.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ftflow(*args: str) -> list[str]:
    """The `ftflow` command line (the installed entry point is this module)."""
    return [sys.executable, "-m", "flows.cli", *args]


def cli_env(prefect_home: Path, **extra: str) -> dict[str, str]:
    """The environment of a CLI run: one thread (the machine is shared), its own Prefect home."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "PREFECT_HOME": str(prefect_home), **extra}


def small_run(home: Path, *extra: str, inputs: list[str] | None = None) -> list[str]:
    """`ftflow run` of the demo config on one sample file, sized for a test."""
    return ftflow("run", str(REPO / "configs" / "demo.yaml"), f"run.home={home}",
                  f"ingest.inputs={json.dumps(inputs or [str(SAMPLE)])}",
                  "augment.enabled=false", "evaluate.max_samples=8", *extra)
