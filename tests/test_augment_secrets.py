"""The teacher's API key never lands anywhere: a whole `ftflow run` (augment against a real
OpenAI-compatible server on 127.0.0.1, training a few steps) and then every byte of the ftflow
home (MLflow's database and artifacts, the run folder, Prefect's database and logs, the
teacher cache) and of the command's output is searched for it."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from teacher_server import TeacherServer

from data_contracts.manifest import Manifest

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-live-SECRET-a81f2c9d4e7b"
KEY_ENV = "FTFLOW_E2E_TEACHER_KEY"
pytestmark = pytest.mark.slow


def _bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            return raw + gzip.decompress(raw)
        except OSError:
            return raw
    return raw


def test_a_whole_run_never_stores_the_teacher_key(tmp_path: Path, session_home: Path) -> None:
    import shutil

    home = tmp_path / "home"
    shutil.copytree(session_home / "assets", home / "assets")
    server = TeacherServer(tmp_path / "server", key=KEY).start()
    try:
        overrides = [
            f"run.home={home}", "run.experiment=secrets",
            f"ingest.inputs={json.dumps([str(REPO / 'sample_data' / 'support_chat.jsonl')])}",
            "augment.teacher.kind=openai", "augment.teacher.model=fake-gpt",
            f"augment.teacher.base_url={server.url}", f"augment.teacher.api_key_env={KEY_ENV}",
            "augment.strategies={fresh_reply: 4, evolve: 2}", "augment.judge.enabled=true",
            "train.max_steps=2", "train.eval_steps=2", "train.save_steps=2",
            "evaluate.max_samples=8", "export.model_name=ftflow-secrets",
        ]
        env = {**os.environ, KEY_ENV: KEY, "PYTHONPATH": str(REPO),
               "PREFECT_HOME": str(home / "prefect")}
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "run",
                               str(REPO / "configs" / "demo.yaml"), *overrides, "--run-id", "s1"],
                              cwd=tmp_path, env=env, capture_output=True, timeout=1500)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    # the teacher was really used, with the key
    statuses = [r["status"] for r in server.requests()]
    assert statuses and set(statuses) == {200}
    augment = Manifest.read(home / "runs" / "s1" / "05-augment")
    assert augment.info["strategies"]["fresh_reply"]["generated"] == 4
    assert augment.metrics["augment.teacher.requests"] == len(statuses)
    # where it could leak: every file in the home, and what the command printed
    files = [p for p in home.rglob("*") if p.is_file()]
    assert (home / "mlflow.db").exists() and (home / "prefect").exists()
    assert any(p.name == "synthetic_samples.json" for p in (home / "mlartifacts").rglob("*"))
    leaks = [str(p.relative_to(home)) for p in files if KEY.encode() in _bytes(p)]
    assert leaks == []
    assert KEY.encode() not in proc.stdout + proc.stderr
    # the key's variable name may be recorded (it is config), its value never
    prefect_db = b"".join(_bytes(p) for p in (home / "prefect").rglob("*") if p.is_file())
    # the generation progress artifact: rows done of total, rejections so far
    assert re.search(rb"augment generation: 6 of 6 rows, rejected \d+", prefect_db)
