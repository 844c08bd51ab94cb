"""Start the local stack: ``prefect server`` and ``mlflow server``, both on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

HOST = "127.0.0.1"  # never 0.0.0.0: the UIs have no authentication


@dataclass
class Stack:
    prefect_api_url: str
    mlflow_uri: str


def _bin(name: str) -> str:
    """The console script beside this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).with_name(name)
    return str(here) if here.exists() else (shutil.which(name) or name)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Poll url until it answers 200; fail with the server's log tail if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def local_servers(home: Path, prefect_port: int = 4200, mlflow_port: int = 5000,
                  mlflow_backend: str | None = None, prefect_db_url: str | None = None,
                  ) -> Iterator[Stack]:
    """Run prefect server and mlflow server for the duration of the block.

    Defaults are SQLite under ``home``; pass a ``postgresql://`` backend store for MLflow and
    a ``postgresql+asyncpg://`` URL for Prefect for the production-style setup.
    """
    home.mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(exist_ok=True)
    env = dict(os.environ, PREFECT_HOME=str(home / "prefect-server"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true",
               PREFECT_UI_API_URL=f"http://{HOST}:{prefect_port}/api")
    if prefect_db_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = prefect_db_url
    env.pop("PREFECT_API_URL", None)  # the server must not try to talk to another server
    backend = mlflow_backend or f"sqlite:///{(home / 'mlflow.db').absolute()}"
    procs: list[subprocess.Popen] = []
    try:
        plog = home / "logs" / "prefect-server.log"
        procs.append(subprocess.Popen(
            [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(prefect_port)],
            stdout=plog.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True))
        mlog = home / "logs" / "mlflow-server.log"
        procs.append(subprocess.Popen(
            [_bin("mlflow"), "server", "--backend-store-uri", backend,
             "--artifacts-destination", str((home / "mlartifacts").absolute()),
             "--host", HOST, "--port", str(mlflow_port), "--workers", "1"],
            stdout=mlog.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True))
        wait_healthy(f"http://{HOST}:{prefect_port}/api/health", procs[0], 120, plog)
        wait_healthy(f"http://{HOST}:{mlflow_port}/health", procs[1], 120, mlog)
        yield Stack(f"http://{HOST}:{prefect_port}/api", f"http://{HOST}:{mlflow_port}")
    finally:
        for proc in procs:
            _stop(proc)


def run_stack(home: Path, prefect_port: int, mlflow_port: int) -> int:
    """Start both servers, print how to use them, and stay up until Ctrl-C."""
    with local_servers(home, prefect_port, mlflow_port) as stack:
        print(f"Prefect UI/API : {stack.prefect_api_url.removesuffix('/api')}")
        print(f"MLflow UI      : {stack.mlflow_uri}")
        print("Point runs at them:")
        print(f"  export PREFECT_API_URL={stack.prefect_api_url}")
        print(f"  ftflow run configs/demo.yaml run.tracking_uri={stack.mlflow_uri}")
        print("Ctrl-C stops both.")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0
