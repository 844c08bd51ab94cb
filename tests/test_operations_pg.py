"""Stacks of their own, as a user runs them: ``deploy`` with no server to talk to, ``down``
after ``up`` was killed half-way (SIGTERM, SIGKILL), and the foreground ``ftflow stack`` on
PostgreSQL (Prefect's database and MLflow's store) running a data-triggered deployment to a
registered model, stopped by SIGTERM. The shared ``ftflow up`` stack is in test_operations.py.

Run just these: ``pytest tests/test_operations_pg.py``.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import PG
from model_fixtures import seed_home
from test_operations import (FTFLOW, REPO, SMALL, api, assert_all_gone, deployment, free_port,
                             ftflow, listening, recorded, run_logs, user_env, wait_for_run)

pytestmark = [pytest.mark.operations, pytest.mark.slow]


def test_deploy_without_server_fails_fast(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    env = user_env(tmp_path / "home")
    url = f"http://127.0.0.1:{free_port()}/api"
    started = time.monotonic()
    r = ftflow("deploy", str(REPO / "configs" / "demo.yaml"), env=dict(env, PREFECT_API_URL=url),
               cwd=tmp_path)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert url in r.stderr and "ftflow up" in r.stderr
    r = ftflow("deploy", env=env, cwd=tmp_path)  # no PREFECT_API_URL, no stack in the home
    assert r.returncode == 2 and "ftflow up" in r.stderr, r.stderr
    assert time.monotonic() - started < 60


# ------------------------------------------------------------------ up killed half-way

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
def test_down_after_up_was_killed(tmp_path: Path, sig: signal.Signals) -> None:
    home = tmp_path / "home"
    env, ports = user_env(home), [free_port(), free_port()]
    proc = subprocess.Popen([str(FTFLOW), "up", "--prefect-port", str(ports[0]),
                             "--mlflow-port", str(ports[1])], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not listening(ports[0]):
        time.sleep(0.3)  # both servers spawned and recorded, prefect answering
    assert listening(ports[0]), "prefect server never listened"
    state = recorded(home)
    assert {"prefect", "mlflow"} <= set(state)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    if sig == signal.SIGTERM:  # up stops what it started itself
        assert proc.returncode == 128 + signal.SIGTERM, out
    r = ftflow("down", env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_all_gone(state, ports)
    assert not (home / "stack.json").exists()


# ------------------------------------------------------------------ foreground, PostgreSQL



def test_foreground_stack_on_postgresql_runs_a_deployment_and_stops_on_sigterm(
        tmp_path: Path, pg_databases: list[str], session_home: Path) -> None:
    """The production backends: `ftflow stack` on PostgreSQL (Prefect's database and MLflow's
    store), a file dropped in the watched inbox, the triggered run trains, evaluates and
    registers a model that MLflow serves from PostgreSQL; SIGTERM stops it all."""
    prefect_db, mlflow_db = pg_databases
    home, cwd = seed_home(tmp_path / "home", session_home), tmp_path / "project"
    cwd.mkdir()
    env, ports = user_env(home), [free_port(), free_port()]
    state: dict[str, Any] = {}
    proc = subprocess.Popen(
        [str(FTFLOW), "stack", "--prefect-port", str(ports[0]), "--mlflow-port", str(ports[1]),
         "--backend", f"postgresql://{PG}/{mlflow_db}",
         "--prefect-db", f"postgresql+asyncpg://{PG}/{prefect_db}"],
        env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not recorded_ready(home):
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(1)
        assert recorded_ready(home), "the stack never became ready"
        state = recorded(home)
        assert state["prefect"]["database"].startswith("postgresql+asyncpg://")
        assert state["mlflow"]["backend"].startswith("postgresql://")
        api_url = state["prefect"]["api_url"]

        # a deployment run on the worker, against PostgreSQL: the inbox poller (light) emits
        # the data event, and the automation starts the pipeline's on-new-data deployment
        (cwd / "inbox").mkdir()
        shutil.copy(REPO / "sample_data" / "support_chat.jsonl", cwd / "inbox" / "chat.jsonl")
        # the whole pipeline, small: it trains, evaluates and registers on the PostgreSQL stack
        r = ftflow("deploy", str(REPO / "configs" / "demo.yaml"), "curate.min_new_records=1",
                   *SMALL[1:-1], "run.experiment=pg", "export.model_name=ftflow-pg",
                   "--watch", "inbox", env=env, cwd=cwd)
        assert r.returncode == 0, r.stdout + r.stderr
        poll = deployment(api_url, "watch-inbox/poll")
        api(f"{api_url}/deployments/{poll['id']}/create_flow_run", {})
        run = wait_for_run(api_url, poll["id"], timeout=240)
        assert run["state_type"] == "COMPLETED", run_logs(api_url, run["id"])
        time.sleep(6)  # the file has settled: the next poll announces it
        api(f"{api_url}/deployments/{poll['id']}/create_flow_run", {})
        on_data = deployment(api_url, "finetune-pipeline/on-new-data")
        done = wait_for_run(api_url, on_data["id"], timeout=600)
        assert done["state_type"] == "COMPLETED", run_logs(api_url, done["id"])
        inbox_file = str((cwd / "inbox" / "chat.jsonl").absolute())
        assert done["parameters"]["files"] == [inbox_file], "the run got the event's files"
        triggered = api(f"{api_url}/flow_runs/filter",
                        {"deployments": {"id": {"any_": [on_data["id"]]}}})
        assert len(triggered) == 1, "one file, one run"
        ingest = json.loads(next(home.glob("runs/*/01-ingest/manifest.json")).read_text())
        assert list(ingest["input_digests"]) == [inbox_file], "it read that file, nothing else"
        arrivals = json.loads((home / "arrivals.json").read_text())
        assert arrivals[inbox_file]["status"] == "consumed"
        # MLflow answers from PostgreSQL: the parent run and a run per stage, the registered
        # version behind its alias
        mlflow_api = f"{state['mlflow']['url']}/api/2.0/mlflow"
        exp = api(f"{mlflow_api}/experiments/get-by-name?experiment_name=pg")["experiment"]
        runs = api(f"{mlflow_api}/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                                 "max_results": 100})["runs"]
        stages = {t["value"] for r in runs for t in r["data"].get("tags", [])
                  if t["key"] == "ftflow.stage"}
        assert {"01-ingest", "08-train", "09-evaluate", "10-export"} <= stages, stages
        alias = api(f"{mlflow_api}/registered-models/alias?name=ftflow-pg&alias=candidate")
        assert alias["model_version"]["version"] == str(json.loads(
            next(home.glob("runs/*/10-export/manifest.json")).read_text())["info"]["version"])
        with psycopg.connect(f"postgresql://{PG}/{mlflow_db}") as conn:
            assert conn.execute("SELECT count(*) FROM registered_models").fetchone()[0] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert_all_gone(state, ports)
    assert not (home / "stack.json").exists()


def recorded_ready(home: Path) -> bool:
    try:
        return bool(recorded(home).get("ready"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False
