"""Operations as a user does them: the installed ``ftflow`` script, outside the repository.

``ftflow up`` (prefect server + process worker + mlflow server, detached) -> ``status`` ->
``deploy`` -> the scheduler fires, the worker runs the pipeline to Completed -> a redeploy
keeps the schedule and parameters edited in the UI -> ``down`` leaves nothing running. Then
``down`` after ``up`` was killed (SIGTERM, SIGKILL), and the foreground ``ftflow stack`` on
PostgreSQL stopped by SIGTERM.

Run just these: ``pytest -m operations``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from conftest import PG
from model_fixtures import seed_home

REPO = Path(__file__).resolve().parents[1]
FTFLOW = Path(sys.executable).with_name("ftflow")  # the console script the install made
pytestmark = [pytest.mark.operations, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def user_env(home: Path) -> dict[str, str]:
    """The environment of a user's shell: their home, no Prefect/MLflow server of ours set."""
    env = dict(os.environ, FTFLOW_HOME=str(home),
               PREFECT_HOME=str(home.parent / "prefect-client"),
               # the scheduler looks every 5 s (default 60), the worker polls every 2 s
               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
               PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_PREFETCH_SECONDS="30")
    for key in ("PREFECT_API_URL", "FTFLOW_TRACKING_URI", "PREFECT_API_DATABASE_CONNECTION_URL",
                "FTFLOW_NO_STACK"):
        env.pop(key, None)
    return env


def ftflow(*args: str, env: dict[str, str], cwd: Path, timeout: float = 300,
           ) -> subprocess.CompletedProcess:
    return subprocess.run([str(FTFLOW), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def api(url: str, body: Any = None, method: str | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def deployment(api_url: str, full_name: str) -> dict[str, Any]:
    return api(f"{api_url}/deployments/name/{full_name}")


def wait_for_run(api_url: str, deployment_id: str, timeout: float) -> dict[str, Any]:
    """The deployment's first flow run to reach a final state; fails on Failed/Crashed."""
    deadline = time.monotonic() + timeout
    runs: list = []
    while time.monotonic() < deadline:
        runs = api(f"{api_url}/flow_runs/filter", {
            "deployments": {"id": {"any_": [deployment_id]}}, "sort": "START_TIME_ASC"})
        done = [r for r in runs if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")]
        if done:
            return done[0]
        time.sleep(3)
    raise AssertionError(f"no run finished in {timeout:.0f}s: "
                         f"{[(r['name'], r['state_type']) for r in runs]}")


def run_logs(api_url: str, run_id: str) -> str:
    logs = api(f"{api_url}/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}})
    return "\n".join(log["message"] for log in logs)[-4000:]


def small_config(cwd: Path) -> str:
    """A config beside a data file, both relative to cwd (as a user's project has them)."""
    (cwd / "data").mkdir(exist_ok=True)
    shutil.copy(REPO / "sample_data" / "support_chat.jsonl", cwd / "data" / "chat.jsonl")
    (cwd / "small.yaml").write_text(
        (REPO / "configs" / "demo.yaml").read_text()
        + "\n# the smallest real run: no augmentation, two training steps\n")
    return "small.yaml"


SMALL = ['ingest.inputs=["data/chat.jsonl"]', "augment.enabled=false", "train.max_steps=2",
         "train.eval_steps=2", "train.save_steps=2", "evaluate.max_samples=4",
         "export.register_if_gate_fails=true", "run.experiment=ops"]


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def recorded(home: Path) -> dict[str, Any]:
    return json.loads((home / "stack.json").read_text())


def assert_all_gone(state: dict[str, Any], ports: list[int]) -> None:
    for port in ports:
        assert not listening(port), f"port {port} still listening"
    for name in ("prefect", "mlflow", "worker"):
        if name in state:
            stat = Path(f"/proc/{state[name]['pid']}/stat")
            alive = stat.exists() and stat.read_text().split(")")[-1].split()[0] not in "ZX"
            assert not alive or int(stat.read_text().split(")")[-1].split()[19]) != \
                state[name]["start"], f"{name} pid {state[name]['pid']} still runs"


def server_errors(home: Path) -> list[str]:
    text = (home / "logs" / "prefect-server.log").read_text(errors="replace")
    return [line for line in text.splitlines() if "| ERROR" in line or "Traceback" in line
            or line.startswith("ERROR")]


# ------------------------------------------------------------------ one stack for the module

def up_stack(root: Path, session_home: Path) -> SimpleNamespace:
    """`ftflow up` as a user runs it: a new home (with the fastText asset the session fetched)
    and a project folder outside the repository, on free ports."""
    home, cwd = seed_home(root / "home", session_home), root / "project"
    cwd.mkdir()
    env = user_env(home)
    ports = [free_port(), free_port()]
    started = time.monotonic()
    r = ftflow("up", "--prefect-port", str(ports[0]), "--mlflow-port", str(ports[1]),
               env=env, cwd=cwd, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    print(f"ftflow up: {time.monotonic() - started:.0f}s")
    st = recorded(home)
    return SimpleNamespace(home=home, cwd=cwd, env=env, ports=ports, state=st,
                           api_url=st["prefect"]["api_url"],
                           prefect=st["prefect"]["api_url"].removesuffix("/api"),
                           mlflow=st["mlflow"]["url"], started=started)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, session_home: Path):
    s = up_stack(tmp_path_factory.mktemp("ops"), session_home)
    env, cwd = s.env, s.cwd
    try:
        yield s
    finally:
        ftflow("down", env=env, cwd=cwd, timeout=120)


def test_up_records_and_status_reports(stack) -> None:
    st = stack.state
    assert st["ready"] and st["pool"] == "ftflow"
    assert st["prefect"]["port"] == stack.ports[0] and st["mlflow"]["port"] == stack.ports[1]
    assert all(st[c]["pid"] == st[c]["pgid"] for c in ("prefect", "mlflow", "worker"))
    # MLflow's server without its GenAI job consumers (7 processes, ~2 GB)
    from flows.stack import _members  # what `down` stops: the component's live processes

    mlflow_group = [Path(f"/proc/{pid}") for pid in _members(st["mlflow"])]
    assert mlflow_group and not [p for p in mlflow_group if b"huey" in _cmdline(p)]
    r = ftflow("status", env=stack.env, cwd=stack.cwd, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert stack.api_url.removesuffix("/api") in r.stdout and stack.mlflow in r.stdout
    assert r.stdout.count("running") == 3
    again = ftflow("up", env=stack.env, cwd=stack.cwd, timeout=60)  # default ports: ignored
    assert again.returncode == 0 and "already running" in again.stdout
    assert recorded(stack.home)["prefect"]["pid"] == st["prefect"]["pid"]


def test_deploy_validates_before_registering(stack) -> None:
    config = small_config(stack.cwd)
    r = ftflow("deploy", config, "train.no_such_key=1", env=stack.env, cwd=stack.cwd)
    assert r.returncode == 2 and "no_such_key" in r.stderr
    assert api(f"{stack.api_url}/deployments/filter", {}) == []


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


def test_schedule_fires_and_worker_completes_the_pipeline(stack) -> None:
    config = small_config(stack.cwd)
    r = ftflow("deploy", config, *SMALL, "--cron", "* * * * *", env=stack.env, cwd=stack.cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    dep = deployment(stack.api_url, "finetune-pipeline/nightly")
    assert dep["work_pool_name"] == "ftflow"
    assert dep["entrypoint"] == "flows.pipeline.finetune_pipeline"
    assert dep["parameters"]["config_path"] == str(stack.cwd / config)  # made absolute
    assert dep["parameters"]["overrides"] == SMALL
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["* * * * *"]

    run = wait_for_run(stack.api_url, dep["id"], timeout=480)  # next minute + the pipeline
    assert run["state_type"] == "COMPLETED", run_logs(stack.api_url, run["id"])
    assert "auto-scheduled" in run["tags"]  # the scheduler made it, not us
    # the run logged to the stack's MLflow server (not a SQLite file in the worker's cwd)
    exp = api(f"{stack.mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ops")
    runs = api(f"{stack.mlflow}/api/2.0/mlflow/runs/search",
               {"experiment_ids": [exp["experiment"]["experiment_id"]]})
    assert runs["runs"], "no MLflow run on the stack's server"
    assert not (stack.cwd / ".ftflow").exists()  # the worker used the stack's home
    assert (stack.home / "runs").is_dir()
    assert server_errors(stack.home) == []


def test_redeploy_keeps_what_the_user_edited_in_the_ui(stack) -> None:
    config = small_config(stack.cwd)
    dep = deployment(stack.api_url, "finetune-pipeline/nightly")
    # what the UI does: edit the schedule in place, edit the parameters
    (sched,) = dep["schedules"]
    api(f"{stack.api_url}/deployments/{dep['id']}/schedules/{sched['id']}",
        {"schedule": {"cron": "30 4 * * *", "timezone": "UTC"}}, method="PATCH")
    edited = dict(dep["parameters"], overrides=SMALL + ["train.max_steps=3"])
    api(f"{stack.api_url}/deployments/{dep['id']}", {"parameters": edited}, method="PATCH")

    r = ftflow("deploy", config, *SMALL, "--cron", "0 6 * * *", env=stack.env, cwd=stack.cwd)
    assert r.returncode == 0 and "kept the parameters and schedules" in r.stdout, r.stdout
    now = deployment(stack.api_url, "finetune-pipeline/nightly")
    assert [s["schedule"]["cron"] for s in now["schedules"]] == ["30 4 * * *"]
    assert now["parameters"] == edited

    inbox = stack.cwd / "inbox"
    r = ftflow("deploy", config, *SMALL, "--cron", "0 6 * * *", "--replace", "--watch",
               "inbox", env=stack.env, cwd=stack.cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    now = deployment(stack.api_url, "finetune-pipeline/nightly")
    assert [s["schedule"]["cron"] for s in now["schedules"]] == ["0 6 * * *"]
    assert now["parameters"]["overrides"] == SMALL
    trigger = deployment(stack.api_url, "finetune-pipeline/on-new-data")
    assert trigger["schedules"] == [] and trigger["work_pool_name"] == "ftflow"
    poll = deployment(stack.api_url, "watch-inbox/poll")
    assert poll["parameters"]["inbox"] == str(inbox)
    # the watcher's runs queue behind the pipeline's: a backlog of them never delays a run
    assert (poll["work_queue_name"], trigger["work_queue_name"]) == ("watch", "default")
    queues = {q["name"]: q["priority"] for q in api(
        f"{stack.api_url}/work_pools/ftflow/queues/filter", {})}
    assert queues["watch"] > queues["default"], queues  # a larger number runs later
    automations = api(f"{stack.api_url}/automations/filter", {})
    assert any("ftflow.data.arrived" in a["trigger"]["expect"] for a in automations)


def test_down_stops_everything_up_started(stack) -> None:
    state = recorded(stack.home)
    # a run in flight when the stack stops ends Crashed, saying why, not Running forever
    dep = deployment(stack.api_url, "finetune-pipeline/nightly")
    long = dict(dep["parameters"], overrides=SMALL + ["train.max_steps=100000"])
    run = api(f"{stack.api_url}/deployments/{dep['id']}/create_flow_run", {"parameters": long})
    # the worker runs one flow at a time: a run the per-minute cron made earlier may hold it
    deadline = time.monotonic() + 600
    while api(f"{stack.api_url}/flow_runs/{run['id']}")["state_type"] != "RUNNING":
        assert time.monotonic() < deadline, "the worker never started the run"
        time.sleep(2)
    r = ftflow("down", env=stack.env, cwd=stack.cwd, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"marked run {run['name']} Crashed" in r.stdout, r.stdout
    assert_all_gone(state, stack.ports)
    db = sqlite3.connect(f"file:{stack.home / 'prefect-server' / 'prefect.db'}?mode=ro", uri=True)
    (row,) = db.execute("select state_type, state_name from flow_run where id = ?",
                        (run["id"],)).fetchall()
    assert row == ("CRASHED", "Crashed")
    assert not (stack.home / "stack.json").exists()
    assert ftflow("status", env=stack.env, cwd=stack.cwd, timeout=60).returncode == 1


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
                   "export.gguf=[]", "--watch", "inbox", env=env, cwd=cwd)
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
