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
    assert Manifest.read(out).splits.get("heldout") == 3


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


def test_stages_import_without_prefect_and_the_flow_gets_each_stage_task() -> None:
    """`ftflow stage` and each `accelerate launch` rank load the stage, not Prefect; the flow
    builds each stage's task in one place, named after its stage directory, with its retries
    and the config's timeout."""
    probe = (
        "import importlib, sys\n"
        "from tasks.stages import COMMANDS, spec, stage_task\n"
        "mods = [importlib.import_module('tasks.' + m) for m in COMMANDS]\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'prefect'}))\n"
        "from data_contracts.config import load_config\n"
        "cfg = load_config(None, ['run.timeouts.train=120'])\n"
        "t, i = stage_task(spec('train'), cfg), stage_task(spec('06-pii-synthetic'), cfg)\n"
        "print(t.name, t.retries, t.timeout_seconds, i.name, i.retries)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=REPO, env={**os.environ, **OFFLINE_ENV}).stdout
    assert out.splitlines() == ["[]", "08-train 1 120.0 06-pii-synthetic 2"]
