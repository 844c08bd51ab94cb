"""Rows that never passed the PII stage stay in the run folder, owner-only.

Ingest drops rows (filters) and quarantines lines before any PII scrub: those files are written
0600 and the stage's MLflow run (logged the way the flow logs every stage) holds none of them.
"""

from __future__ import annotations

import gzip
import json
import stat
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from data_contracts.config import IngestConfig
from data_contracts.manifest import Manifest
from tasks.tracking import Tracker

FILTERED_EMAIL = "hanna.vogel@beispiel-firma.de"  # in a German row: filtered (language)
FILTERED_KEY = "AKIAQWERTYUIOPASDFGH"
QUARANTINED_PHONE = "+1-415-555-0173"  # in a line that is not JSON
SHORT_EMAIL = "bo@tiny.io"  # in a row too short to keep (min_words=6)


def chat(user: str, answer: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user},
                                    {"role": "assistant", "content": answer}]})


def scan(root: Path, values: list[str]) -> dict[str, list[str]]:
    """Planted values found in any file under root (gzip files read decompressed)."""
    found: dict[str, list[str]] = {}
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        hits = [v for v in values if v.encode() in data]
        if hits:
            found[str(path.relative_to(root))] = hits
    return found


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory, session_home: Path
           ) -> tuple[Path, Path, MlflowClient, str]:
    from tasks.assets import ensure_lid_model
    from tasks.ingest import run_ingest

    ensure_lid_model(session_home)
    work = tmp_path_factory.mktemp("privacy")
    src = work / "raw.jsonl"
    src.write_text("\n".join([
        chat("How do I reset the password on my account page? I tried twice this morning and "
             "the page keeps telling me that the link has expired.",
             "Thanks for reaching out. Open the settings page, choose security and press reset; "
             "a new link arrives by email within a few minutes and it stays valid for a day."),
        chat(f"Ich kann mich nicht anmelden, bitte schreiben Sie an {FILTERED_EMAIL}, mein "
             f"Schlüssel ist {FILTERED_KEY} und das Passwort funktioniert nicht mehr.",
             "Bitte öffnen Sie die Einstellungen und setzen Sie das Passwort dort zurück."),
        f'{{"messages": [{{"role": "user", "content": "call {QUARANTINED_PHONE}"}}',
        chat(f"mail {SHORT_EMAIL}", "ok"),
    ]) + "\n")
    out = work / "01-ingest"
    manifest = run_ingest(str(src), out, IngestConfig(min_words=6), home=session_home)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    tracker = Tracker(uri, "privacy", work / "mlartifacts")
    parent = tracker.start_parent("privacy", {}, {})
    run = tracker.start_stage(parent, out.name, {})
    tracker.log_stage_result(run, manifest, out)
    tracker.end(run)
    return out, work, tracker.client, run


def test_ingest_wrote_the_planted_rows_as_filtered_and_quarantined(logged) -> None:
    out, _, _, _ = logged
    m = Manifest.read(out).check()
    assert m.quarantined == 1 and m.filtered == {"language": 1, "min_words": 1} and m.kept == 1
    found = scan(out, [FILTERED_EMAIL, FILTERED_KEY, QUARANTINED_PHONE, SHORT_EMAIL])
    assert set(found) == {"filtered.jsonl.gz", "quarantine.jsonl.gz"}  # kept in the run folder


def test_pre_pii_files_are_owner_only(logged) -> None:
    out, _, _, _ = logged
    for name in ("filtered.jsonl.gz", "quarantine.jsonl.gz"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name


def test_no_pre_pii_row_reaches_mlflow(logged) -> None:
    _, work, client, run = logged
    names = {a.path for a in client.list_artifacts(run)}
    assert "manifest.json" in names
    assert not names & {"filtered.jsonl.gz", "quarantine.jsonl.gz"}
    planted = [FILTERED_EMAIL, FILTERED_KEY, QUARANTINED_PHONE, SHORT_EMAIL]
    assert scan(work / "mlartifacts", planted) == {}
    assert [v for v in planted if v.encode() in (work / "mlflow.db").read_bytes()] == []
