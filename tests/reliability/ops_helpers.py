"""Helpers of the reliability tests: the CLI as a user runs it, in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
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
    """`ftflow run` of the demo config on one sample file, sized for a test (no GGUF files:
    tests/test_export.py covers them)."""
    return ftflow("run", str(REPO / "configs" / "demo.yaml"), f"run.home={home}",
                  f"ingest.inputs={json.dumps(inputs or [str(SAMPLE)])}",
                  "augment.enabled=false", "evaluate.max_samples=8", "export.gguf=[]", *extra)


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (SQLite store under ``home``) that a test can stop
    and start again on the same port, as an outage would."""

    def __init__(self, home: Path) -> None:
        self.home, self.port = home, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "MlflowServer":
        from flows.stack import _mlflow_cmd, _spawn, wait_healthy

        log = self.home / "mlflow-server.log"
        # No job runner (GenAI jobs, 8 helper processes): the tests only track runs.
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = _spawn(_mlflow_cmd(self.home, self.port, None), env, log)
        wait_healthy(f"{self.uri}/health", self.proc, 600, log)  # slow on a busy machine
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its workers
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
