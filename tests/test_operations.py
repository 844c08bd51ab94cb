"""Operations as a user does them: the installed ``ftflow`` script, outside the repository.

``ftflow up`` (prefect server + process worker + mlflow server, detached) -> ``status`` ->
``deploy`` -> the scheduler fires, the worker runs the pipeline to Completed -> a redeploy
keeps the schedule and parameters edited in the UI -> ``down`` leaves nothing running. The stacks of their own (``up`` killed half-way, the
foreground ``ftflow stack`` on PostgreSQL) are in test_operations_pg.py, so that a second
pytest worker runs them beside this module's stack.

Run just these: ``pytest -m operations``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

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
    """One Prefect/MLflow REST call. A read (GET, or a POST to a ``/filter`` or ``/search``
    endpoint) that times out is asked again, up to 3 times: on a loaded 2-core machine the
    SQLite-backed server can stall for 30 s, as a user's browser would simply retry."""
    data = None if body is None else json.dumps(body).encode()
    verb = method or ("POST" if data else "GET")
    reads = verb == "GET" or url.rstrip("/").endswith(("/filter", "/search"))
    for attempt in range(3 if reads else 1):
        req = urllib.request.Request(url, data=data, method=verb,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw = resp.read()
            break
        except TimeoutError:
            if not reads or attempt == 2:
                raise
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
         "export.register_if_gate_fails=true", "export.gguf=[]", "run.experiment=ops"]


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


def next_minute_cron(lead_s: float = 45) -> str:
    """A daily cron whose next firing is the first whole minute at least ``lead_s`` from now
    (UTC): the scheduler must make and start the run, and it fires once during the module
    (a per-minute cron kept the single worker busy with a second pipeline run)."""
    at = datetime.now(timezone.utc) + timedelta(seconds=lead_s + 60)
    return f"{at.minute} {at.hour} * * *"


def test_schedule_fires_and_worker_completes_the_pipeline(stack) -> None:
    config = small_config(stack.cwd)
    cron = next_minute_cron()
    r = ftflow("deploy", config, *SMALL, "--cron", cron, env=stack.env, cwd=stack.cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    dep = deployment(stack.api_url, "finetune-pipeline/nightly")
    assert dep["work_pool_name"] == "ftflow"
    assert dep["entrypoint"] == "flows.pipeline.finetune_pipeline"
    assert dep["parameters"]["config_path"] == str(stack.cwd / config)  # made absolute
    assert dep["parameters"]["overrides"] == SMALL
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == [cron]

    run = wait_for_run(stack.api_url, dep["id"], timeout=480)  # its minute + the pipeline
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
    # the worker runs one flow at a time: a run started earlier may still hold it
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
