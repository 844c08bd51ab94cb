"""The server path: real `prefect server` and `mlflow server` on 127.0.0.1, PostgreSQL-backed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flows.stack import local_servers
from conftest import PG

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def test_pipeline_against_real_servers(tmp_path: Path, session_home: Path, pg_databases) -> None:
    prefect_db, mlflow_db = pg_databases
    with local_servers(tmp_path / "stack", free_port(), free_port(),
                       mlflow_backend=f"postgresql://{PG}/{mlflow_db}",
                       prefect_db_url=f"postgresql+asyncpg://{PG}/{prefect_db}") as stack:
        inputs = json.dumps([str(REPO / "sample_data" / "support_chat.jsonl")])
        env = dict(os.environ, PREFECT_API_URL=stack.prefect_api_url)
        cmd = [sys.executable, "-m", "flows.cli", "run", str(REPO / "configs" / "demo.yaml"),
               f"run.home={session_home}", f"run.tracking_uri={stack.mlflow_uri}",
               "run.experiment=server-path", f"ingest.inputs={inputs}",
               "augment.enabled=false", "train.max_steps=10", "evaluate.max_samples=8",
               "export.model_name=ftflow-server", "export.register_if_gate_fails=true",
               "export.gguf=[]",
               "--run-id", "server"]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

        from mlflow.tracking import MlflowClient
        client = MlflowClient(stack.mlflow_uri)
        version = client.get_model_version_by_alias("ftflow-server", "candidate")
        assert version.version
        exp = client.get_experiment_by_name("server-path")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) >= 10  # parent + nine stage runs, all in PostgreSQL

        # the flow run was recorded by the Prefect server, completed
        from prefect.client.orchestration import get_client
        import asyncio

        async def flow_runs():
            async with get_client() as c:
                return await c.read_flow_runs()

        os.environ["PREFECT_API_URL"] = stack.prefect_api_url
        try:
            from prefect.settings import PREFECT_API_URL, temporary_settings
            with temporary_settings({PREFECT_API_URL: stack.prefect_api_url}):
                states = [r.state_type.value for r in asyncio.run(flow_runs())]
        finally:
            os.environ.pop("PREFECT_API_URL", None)
        assert "COMPLETED" in states
