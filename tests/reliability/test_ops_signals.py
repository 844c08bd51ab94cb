"""A real run through an MLflow outage, a SIGTERM during training and a resume (issue 10,
items 3 and 4), against a real `mlflow server` the test stops and starts again.

1. The server stops for good after the PII stage: the run fails with one line naming the URI;
   the finished stages' data is intact on disk; its MLflow runs are left RUNNING (the server
   was gone when the run ended), as a SIGKILLed attempt leaves them.
2. The server is back; a rerun (same --run-id) marks the earlier attempt's runs KILLED, skips
   the finished stages (it only logs them again; an outage the run rides out is in
   test_ops_tracking.py), and is sent SIGTERM during training: it saves a checkpoint,
   marks its MLflow runs KILLED and the Prefect flow run crashed, stops the temporary Prefect
   server it started and exits within 30 s, with no train stage output that looks complete.
3. A rerun resumes training from that checkpoint and finishes.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from data_contracts.manifest import Manifest
from ops_helpers import REPO, MlflowServer, cli_env, small_run
from tasks.stage_dir import outputs_intact
from tasks.stages import STAGES

pytestmark = pytest.mark.slow
RUN_ID = "ops-signals"


def _wait_for(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before {what}:\n"
                        f"{log.read_text()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no {what} within {timeout} s")


def _children(pid: int) -> list[int]:
    """The processes whose parent is pid (Prefect's temporary server is one)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _attempts(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name(RUN_ID)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], f"tags.`ftflow.run_id` = '{RUN_ID}'",
                              order_by=["attributes.start_time ASC"])


def _runs_of(client: MlflowClient, parent) -> list:
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return [client.get_run(parent.info.run_id), *children]


def test_outage_sigterm_and_resume(tmp_path: Path, session_home: Path) -> None:
    server = MlflowServer(tmp_path / "mlflow")
    prefect_home = tmp_path / "prefect"
    cmd = small_run(session_home, f"run.tracking_uri={server.uri}", f"run.name={RUN_ID}",
                    f"run.experiment={RUN_ID}", f"export.model_name={RUN_ID}",
                    "export.register_if_gate_fails=true", "train.max_steps=60",
                    "train.save_steps=1000", "train.eval_steps=1000", "train.logging_steps=1",
                    "train.batch_size=2", "train.max_length=128", "--run-id", RUN_ID)
    run_dir = session_home / "runs" / RUN_ID
    try:
        server.start()
        client = MlflowClient(server.uri)

        # 1. the tracking server goes away for good after the PII stage
        log1 = tmp_path / "attempt1.log"
        with log1.open("w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                    env=cli_env(prefect_home, FTFLOW_TRACKING_OUTAGE_S="10"))
        _wait_for("the PII stage", (run_dir / "02-pii" / "manifest.json").exists, proc, log1)
        server.stop()
        assert proc.wait(timeout=600) == 1, log1.read_text()[-3000:]
        ours = [ln for ln in log1.read_text().splitlines() if ln.startswith("ftflow: ")]
        assert len(ours) == 1, ours
        assert ours[0].startswith(f"ftflow: error: MLflow tracking at {server.uri} unreachable")
        done = {s.name: Manifest.read(run_dir / s.name) for s in STAGES
                if (run_dir / s.name / "manifest.json").exists()}
        assert "01-ingest" in done and "02-pii" in done
        assert all(outputs_intact(run_dir / n, m) is None for n, m in done.items())

        # 2. back up; the rerun cleans up after attempt 1, survives an outage, gets SIGTERM
        server.start()
        first = _attempts(client)
        assert len(first) == 1 and first[0].info.status == "RUNNING"  # what a dead run leaves
        log2 = tmp_path / "attempt2.log"
        with log2.open("w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                    env=cli_env(prefect_home, FTFLOW_TRACKING_OUTAGE_S="60"))
        _wait_for("the second attempt's MLflow run", lambda: len(_attempts(client)) == 2, proc,
                  log2)
        earlier = {r.data.tags.get("ftflow.stage", "parent"): r.info.status
                   for r in _runs_of(client, first[0])}
        assert earlier["parent"] == "KILLED" and "RUNNING" not in earlier.values(), earlier
        _wait_for("training steps", lambda: "'loss'" in log2.read_text(), proc, log2)
        helpers = [p for p in _children(proc.pid) if _alive(p)]
        assert helpers, "local mode runs a temporary Prefect server"
        os.kill(proc.pid, signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the run did not exit within 30 s of SIGTERM:\n"
                        + log2.read_text()[-3000:])
        text = log2.read_text()
        assert rc == 128 + signal.SIGTERM, text[-3000:]
        assert f"ftflow: run stopped by SIGTERM at a safe point; rerun with --run-id {RUN_ID}" in text
        time.sleep(1)
        assert not [p for p in helpers if _alive(p)], "a server the run started outlived it"
        train = run_dir / "08-train"
        ckpts = [p for p in (train / "checkpoints").glob("checkpoint-*")
                 if (p / "trainer_state.json").exists()]
        assert len(ckpts) == 1, "training saved a checkpoint before it stopped"
        step = int(ckpts[0].name.split("-")[1])
        assert 0 < step < 60
        assert not (train / "manifest.json").exists()
        second = _attempts(client)[1]
        statuses = {r.data.tags.get("ftflow.stage", "parent"): r.info.status
                    for r in _runs_of(client, second)}
        assert statuses["parent"] == "KILLED" and statuses["08-train"] == "KILLED", statuses
        assert all(statuses[n] == "FINISHED" for n in done), statuses  # re-logged
        with sqlite3.connect(prefect_home / "prefect.db") as db:
            states = [r[0] for r in db.execute(
                "SELECT state_type FROM flow_run ORDER BY created")]
        assert states[-1] in ("CRASHED", "CANCELLED"), states

        # 3. the rerun resumes training from the checkpoint and finishes
        log3 = tmp_path / "attempt3.log"
        with log3.open("w") as out:
            rc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env=cli_env(prefect_home), timeout=1800).returncode
        assert rc == 0, log3.read_text()[-3000:]
        m = Manifest.read(train)
        assert m.info["resumed_from_step"] == step and m.metrics["steps"] == 60
        for name, before in done.items():  # finished stages were not computed again
            assert Manifest.read(run_dir / name).started_at == before.started_at
        assert _attempts(client)[-1].info.status == "FINISHED"
    finally:
        server.stop()
