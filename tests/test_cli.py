"""The ftflow command as a user types it: one stage alone, overrides, clear config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_contracts.manifest import Manifest
from flows.cli import main
from flows.env import OFFLINE_ENV
from tasks.io import read_records

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def chat(i: int, user: str, answer: str) -> dict:
    return {"id": f"c{i}", "messages": [{"role": "user", "content": user},
                                        {"role": "assistant", "content": answer}]}


def test_stage_pii_runs_alone_on_a_raw_file(tmp_path: Path, session_home: Path) -> None:
    raw = write_jsonl(tmp_path / "raw.jsonl", [
        chat(1, "My email is jane.doe@example.org, please update it.",
             "Done, the address on file is now updated."),
        '{"messages": [broken json',
    ])
    out = tmp_path / "pii"
    rc = main(["stage", "pii", "--input", str(raw), "--output", str(out),
               f"run.home={session_home}"])
    assert rc == 0
    m = Manifest.read(out)
    assert (m.records_in, m.kept, m.quarantined) == (2, 1, 1)
    [rec] = list(read_records(out))
    assert rec.id == "c1" and "jane.doe@example.org" not in rec.messages[0].content
    assert "<EMAIL>" in rec.messages[0].content


def test_overrides_after_options_reach_the_stage(tmp_path: Path, session_home: Path) -> None:
    rows = [chat(i, f"Question number {i} about the billing page?",
                 "Open the billing page and pick a plan from the list there.") for i in range(20)]
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    out = tmp_path / "dedup"
    rc = main(["stage", "dedup", "--input", str(raw), "--output", str(out),
               f"run.home={session_home}", "dedup.eval_fraction=0.5", "dedup.eval_max=3"])
    assert rc == 0
    assert Manifest.read(out).splits.get("eval") == 3


def test_unknown_config_key_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["run", str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"),
               "train.lora.rank=8"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "train.lora.rank: unknown key" in err and "Traceback" not in err


def test_missing_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["stage", "ingest", "--input", str(tmp_path / "nope.jsonl"),
               "--output", str(tmp_path / "out")])
    assert rc == 2
    assert "input not found" in capsys.readouterr().err


def test_a_new_home_gets_prefect_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prefect makes its home without parents; on a new run.home its SQLite could not open and
    # the temporary server timed out (a stack trace instead of a run).
    from flows.cli import _set_home_env

    monkeypatch.delenv("PREFECT_HOME")
    _set_home_env(str(tmp_path / "new" / "home"))
    assert (tmp_path / "new" / "home" / "prefect").is_dir()


STAGE_MODULES = ("ingest", "pii", "dedup", "augment", "train", "evaluate", "export")


def test_stage_functions_import_without_prefect_and_the_pipeline_gets_its_tasks() -> None:
    """`ftflow stage` and each `accelerate launch` rank load the stage, not Prefect; the flow's
    `from tasks.X import X_task` still gets the task with its retries."""
    probe = (
        "import importlib, sys\n"
        f"mods = [importlib.import_module('tasks.' + m) for m in {STAGE_MODULES!r}]\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'prefect'}))\n"
        "from tasks.train import train_task\n"
        "from tasks.ingest import ingest_task\n"
        "print(train_task.name, train_task.retries, ingest_task.retries, "
        "mods[4].train_task is train_task)\n"
        "try:\n    mods[4].no_such_task\nexcept AttributeError as err:\n    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=REPO, env={**os.environ, **OFFLINE_ENV}).stdout
    assert out.splitlines() == ["[]", "train 1 2 True",
                                "module 'tasks.train' has no attribute 'no_such_task'"]
