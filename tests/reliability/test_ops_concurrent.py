"""Two runs on one ftflow home at once (issue 10, item 5): the second run's temporary Prefect
server used to fail on a schema race on the shared SQLite database and come back a minute later
on another port. Now the server start is serialised by a lock in the home (tasks/locks.py), as
are the tiny base model's first build and the curated dataset's append (tasks/curate.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ops_helpers import REPO, cli_env, small_run

pytestmark = pytest.mark.slow


def test_two_runs_on_one_new_home_both_finish(tmp_path: Path, session_home: Path) -> None:
    home = tmp_path / "home"
    (home / "assets").mkdir(parents=True)
    (home / "assets" / "lid.176.ftz").symlink_to(session_home / "assets" / "lid.176.ftz")
    env = cli_env(home / "prefect")  # one Prefect home, new: both runs create its database
    procs = []
    for name in ("one", "two"):
        log = (tmp_path / f"{name}.log").open("w")
        cmd = small_run(home, f"run.name=conc-{name}", "run.experiment=concurrent",
                        "train.max_steps=3", "evaluate.max_samples=4",
                        f"export.model_name=conc-{name}", "export.register_if_gate_fails=true",
                        "--run-id", name)
        procs.append((name, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                             stderr=subprocess.STDOUT), log))
    for name, proc, log in procs:
        proc.wait(timeout=1800)
        log.close()
    for name, proc, _ in procs:
        text = (tmp_path / f"{name}.log").read_text()
        assert proc.returncode == 0, f"run {name}:\n{text[-4000:]}"
        for race in ("already exists", "database is locked", "Timed out while attempting",
                     "Traceback"):
            assert race not in text, f"run {name}: {race!r}\n{text[-4000:]}"
        assert text.count("Starting temporary server") == 1
        assert (home / "runs" / name / "10-export" / "manifest.json").exists()
