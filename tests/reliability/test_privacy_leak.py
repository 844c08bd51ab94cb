"""End to end: a run on data with planted PII and secrets, then a scan of everything the run
left after its PII stage. Not one planted value may be found.

Planted in kept rows (the PII stage must scrub them): several forms of emails, phones (the
separator forms with unassigned area codes too), cards, IBANs, AWS and GitHub keys, JWTs and a
private key. Planted in rows ingest filters out and in lines it quarantines (they never reach
the PII stage): those may stay in `01-ingest` (the run folder, owner-only) and nowhere else.

Scanned: every stage directory after ingest (data, held-out files, evaluation task files, the
model card), the curated dataset, MLflow's database and artifact store, and Prefect's home
(its database: flow and task runs, artifacts, logs).

The same run augments against a real OpenAI-compatible server on 127.0.0.1 that requires an
API key (tests/teacher_server.py), and every byte of the ftflow home and of the command's
output is searched for that key too: one `ftflow run` (the CLI in a subprocess, as a user runs
it) serves both scans, training a few steps on the tiny model.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from model_fixtures import seed_home
from teacher_server import TeacherServer

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

PRIVATE_KEY = ("-----BEGIN RSA PRIVATE KEY-----\n"
               "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
               "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n"
               "-----END RSA PRIVATE KEY-----")
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6Ik"
       "pvaG4gRG9lIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
# (value as written, what must not be found anywhere after PII)
PLANTED: dict[str, list[tuple[str, str]]] = {
    "email": [(v, v) for v in ("maria.gonzalez@acme-corp.com", "j.smith+billing@mail.example.org",
                               "Okafor_T@Company.co.in")],
    "phone": [(v, v) for v in ("+1-999-555-0123", "999.555.0198", "(123) 456-7890",
                               "+44 20 7946 0958", "+1 (289) 000-4411")],
    "card": [("4111 1111 1111 1111", "4111 1111 1111 1111"),
             ("5500-0000-0000-0004", "5500-0000-0000-0004"),
             ("378282246310005", "378282246310005")],
    "iban": [(v, v) for v in ("DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432")],
    "aws": [(v, v) for v in ("AKIAIOSFODNN7EXAMPL3", "ASIAY34FZKBOKMUTVV7A")],
    "github": [(v, v) for v in ("ghp_R2d2C3poL1ke5ky4walkerHanSoloChewie0",
                                "github_pat_11ABCDEFG0123456789abc_" + "Zx9" * 19 + "Q0")],
    "jwt": [(JWT, JWT)],
    "private_key": [(PRIVATE_KEY, "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun")],
}
SENTENCES = [
    "Hi, my details are {v} and the account page still shows the old plan, please help me.",
    "I tried again this morning with {v} but the invoice download keeps failing for me.",
    "Could you update the billing profile? Use {v} from now on, the old one is gone.",
]
ANSWERS = [
    "Thanks for reaching out. I have updated the account and the change shows within an hour.",
    "Sorry about the trouble. Please sign out and in again; the invoice page should work now.",
    "Done: the billing profile is updated and the next invoice will use the new details.",
]
# A key block confuses language id: the row around it needs enough English to be kept.
KEY_SENTENCE = ("Our deploy job fails since the weekend and I do not understand why. The key that "
                "the job uses is below, it worked for months and nothing changed on our side:\n{v}"
                "\nCould you please check whether the account page still accepts this key for the "
                "deploy job?")
# Never reach the PII stage: a German row (filtered: language), a line that is not JSON.
FILTERED = ["hanna.vogel@beispiel-firma.de", "AKIAQWERTYUIOPASDFGH", "+1-415-555-0173"]
QUARANTINED = ["ghp_QuarantinedToken0000000000000000000x", "quarantined.user@example.net"]


def write_inputs(folder: Path) -> Path:
    from model_fixtures import support_chats

    rng = random.Random(3)
    rows = [c.model_dump(mode="json", exclude_none=True) for c in support_chats(60, seed=5)]
    for kind, values in PLANTED.items():
        for i, (value, _) in enumerate(values):
            for j, sentence in enumerate([KEY_SENTENCE] if kind == "private_key"
                                         else SENTENCES[:2]):
                rows.append({"messages": [
                    {"role": "user", "content": f"({kind} {i}.{j}) " + sentence.format(v=value)},
                    {"role": "assistant", "content": rng.choice(ANSWERS)}]})
    rng.shuffle(rows)
    german = {"messages": [
        {"role": "user", "content": f"Ich kann mich nicht anmelden. Schreiben Sie bitte an "
                                    f"{FILTERED[0]}, mein Schlüssel ist {FILTERED[1]} und meine "
                                    f"Nummer ist {FILTERED[2]}, danke für die schnelle Hilfe."},
        {"role": "assistant", "content": "Bitte öffnen Sie die Einstellungen und setzen Sie "
                                         "dort Ihr Passwort zurück, dann klappt es wieder."}]}
    path = folder / "planted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps(german) + "\n"
                    + f'{{"messages": [{{"role": "user", "content": "token {QUARANTINED[0]} '
                      f'mail {QUARANTINED[1]}"}}\n')
    return path


def scan(root: Path, values: list[str]) -> dict[str, list[str]]:
    """Planted values in any file under root (see scan_files)."""
    return scan_files(root.rglob("*"), values)


def scan_files(paths, values: list[str]) -> dict[str, list[str]]:
    """Planted values in these files: raw bytes, gzip read decompressed, and JSON's escaped
    form (a newline inside a value is written as \\n in JSON and in the databases)."""
    forms = {v: {v.encode(), json.dumps(v)[1:-1].encode()} for v in values}
    found: dict[str, list[str]] = {}
    for path in paths:
        if not path.is_file():
            continue
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        hits = [v for v, fs in forms.items() if any(f in data for f in fs)]
        if hits:
            found[str(path)] = hits
    return found


KEY = "sk-live-SECRET-a81f2c9d4e7b"
KEY_ENV = "FTFLOW_E2E_TEACHER_KEY"


@pytest.fixture(scope="module")
def leak_run(tmp_path_factory: pytest.TempPathFactory, session_home: Path) -> dict:
    home = seed_home(tmp_path_factory.mktemp("leak-home"), session_home)
    inputs = write_inputs(tmp_path_factory.mktemp("leak-inputs"))
    server = TeacherServer(tmp_path_factory.mktemp("teacher"), key=KEY).start()
    overrides = [f"run.home={home}", "run.experiment=leak", "run.name=leak",
                 f"ingest.inputs={json.dumps([str(inputs)])}",
                 "augment.teacher.kind=openai", "augment.teacher.model=fake-gpt",
                 f"augment.teacher.base_url={server.url}", f"augment.teacher.api_key_env={KEY_ENV}",
                 "augment.strategies={fresh_reply: 4, evolve: 2}", "augment.judge.enabled=true",
                 "train.max_steps=4", "train.eval_steps=4", "train.save_steps=4",
                 "evaluate.max_samples=8", "export.model_name=ftflow-leak",
                 "export.register_if_gate_fails=true"]
    env = {**os.environ, KEY_ENV: KEY, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PREFECT_HOME": str(home / "prefect")}
    try:
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "run",
                               str(REPO / "configs" / "demo.yaml"), *overrides, "--run-id", "leak"],
                              cwd=home.parent, env=env, capture_output=True, timeout=1500)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    return {"run_dir": home / "runs" / "leak", "home": home, "proc": proc,
            "teacher_requests": server.requests()}


def _after_pii(out: dict) -> list[Path]:
    """Every file the run wrote after ingest: stage directories, LEDGER.md, curated dataset,
    MLflow's artifact store."""
    run_dir, home = Path(out["run_dir"]), Path(out["home"])
    files = [p for p in run_dir.rglob("*") if "01-ingest" not in p.relative_to(run_dir).parts]
    files += [*(home / "curated").rglob("*"), *(home / "mlartifacts").rglob("*")]
    return files


def test_the_run_saw_every_planted_value(leak_run: dict) -> None:
    """The planted values were really read: kept rows reached PII, the others were set aside."""
    from data_contracts.manifest import Manifest

    ingest_dir = Path(leak_run["run_dir"]) / "01-ingest"
    m = Manifest.read(ingest_dir)
    assert m.quarantined == 1 and m.filtered.get("language", 0) >= 1
    pii = Manifest.read(Path(leak_run["run_dir"]) / "02-pii")
    assert pii.metrics["pii.records_with_pii"] >= 20
    # Every value planted in a kept row was handed to the PII stage (ingest kept it) ...
    kept_values = [check for values in PLANTED.values() for _, check in values]
    handed = {v for hits in scan_files(ingest_dir.glob("train-*.jsonl.gz"), kept_values).values()
              for v in hits}
    assert handed == set(kept_values)
    # ... and the others stayed in ingest's private files.
    private = {v for hits in scan_files([ingest_dir / "filtered.jsonl.gz",
                                         ingest_dir / "quarantine.jsonl.gz"],
                                        FILTERED + QUARANTINED).values() for v in hits}
    assert private == set(FILTERED + QUARANTINED)


def test_no_planted_value_after_the_pii_stage(leak_run: dict) -> None:
    values = [check for vals in PLANTED.values() for _, check in vals] + FILTERED + QUARANTINED
    files = _after_pii(leak_run)
    names = {p.name for p in files}
    assert {"MODEL_CARD.md", "README.md", "ftflow_heldout_mc.jsonl"} <= names  # card, eval tasks
    assert any(p.name.startswith("heldout-") for p in files)
    assert scan_files(files, values) == {}


def test_no_planted_value_in_mlflow_or_prefect(leak_run: dict) -> None:
    values = [check for vals in PLANTED.values() for _, check in vals] + FILTERED + QUARANTINED
    home = Path(leak_run["home"])
    found: dict[str, list[str]] = {}
    for path in sorted(home.glob("mlflow.db*")):
        data = path.read_bytes()
        hits = [v for v in values if v.encode() in data or json.dumps(v)[1:-1].encode() in data]
        if hits:
            found[str(path)] = hits
    found.update(scan(home / "mlartifacts", values))
    found.update(scan(home / "prefect", values))
    assert found == {}


def _bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            return raw + gzip.decompress(raw)
        except OSError:
            return raw
    return raw


def test_the_teacher_key_is_never_stored_or_printed(leak_run: dict) -> None:
    """The key went to the teacher with every request and is nowhere in the home (MLflow's
    database and artifacts, the run folder, Prefect's database and logs, the teacher cache)
    nor in what the command printed; its variable's name may be recorded (it is config)."""
    from data_contracts.manifest import Manifest

    home, proc = Path(leak_run["home"]), leak_run["proc"]
    statuses = [r["status"] for r in leak_run["teacher_requests"]]
    assert statuses and set(statuses) == {200}  # the teacher was really used, with the key
    augment = Manifest.read(Path(leak_run["run_dir"]) / "05-augment")
    assert augment.info["strategies"]["fresh_reply"]["generated"] == 4
    assert augment.metrics["augment.teacher.requests"] == len(statuses)
    files = [p for p in home.rglob("*") if p.is_file()]
    assert (home / "mlflow.db").exists() and (home / "prefect").exists()
    assert any(p.name == "synthetic_samples.json" for p in (home / "mlartifacts").rglob("*"))
    assert [str(p.relative_to(home)) for p in files if KEY.encode() in _bytes(p)] == []
    assert KEY.encode() not in proc.stdout + proc.stderr
    prefect_db = b"".join(_bytes(p) for p in (home / "prefect").rglob("*") if p.is_file())
    # the generation progress artifact: rows done of total, rejections so far
    assert re.search(rb"augment generation: 6 of 6 rows, rejected \d+", prefect_db)
