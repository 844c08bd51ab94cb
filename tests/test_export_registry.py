"""The champion alias on a real `mlflow server` (127.0.0.1, started here): export moves it only
when the gate passed and the version beats the champion; `ftflow promote`/`rollback` move it,
recorded; two promotions at once both land, in order; models:/NAME@champion loads and chats."""

from __future__ import annotations

import getpass
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from data_contracts.config import ExportConfig
from tasks import export_registry as registry
from tasks.export import run_export
from test_export import CHAT, PPL, eval_dir

REPO = Path(__file__).resolve().parents[1]
NAME = "ftflow-team"
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_one_thread")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with a SQLite store and proxied artifacts."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
         f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # no GenAI job consumers (7 processes, ~2 GB): the registry needs none of them
        env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true",
                 MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # a busy 2-core machine takes minutes to import mlflow
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGTERM)
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def released(server: str, train_dir: Path, tmp_path_factory: pytest.TempPathFactory,
             ) -> tuple[MlflowClient, Path, Path]:
    """Version 1 (gate passed, word perplexity 5371) then version 2 (gate failed, registered
    because register_if_gate_fails) exported to the server; returns the client, home, out."""
    root = tmp_path_factory.mktemp("released")
    home = root / "home"
    cfg = ExportConfig(model_name=NAME, gguf=[], max_new_tokens=12)
    run_export(train_dir, eval_dir(root / "ev1", True), root / "out1", cfg, tracking_uri=server,
               home=home)
    m2 = run_export(train_dir, eval_dir(root / "ev2", False, score=4000.0), root / "out2",
                    cfg.model_copy(update={"register_if_gate_fails": True}),
                    tracking_uri=server, home=home)
    assert m2.info["champion"] == "champion unchanged: the gate failed"
    return MlflowClient(server, registry_uri=server), home, root / "out1"


def _alias(client: MlflowClient, alias: str) -> str | None:
    return registry.alias_version(client, NAME, alias)


def test_a_failed_gate_leaves_champion_and_only_a_better_score_moves_it(released) -> None:
    client, home, _ = released
    assert (_alias(client, "candidate"), _alias(client, "champion")) == ("2", "1")
    # version 2's score is better, but its gate failed: export would not move champion
    move, why = registry.offer_champion(client, home, NAME, "2", False, PPL, 4000.0, False)
    assert move is None and _alias(client, "champion") == "1"
    move, why = registry.offer_champion(client, home, NAME, "2", True, PPL, 6000.0, False)
    assert move is None and "does not beat champion 1's 5371" in why
    move, why = registry.offer_champion(client, home, NAME, "2", True, "other.metric", 1.0, True)
    assert move is None and "scored on" in why and "ftflow promote" in why
    assert _alias(client, "champion") == "1"
    assert [m.version for m in registry.history(client, NAME)] == ["1"]


def test_champion_loads_from_the_server_and_chats_with_the_saved_template(
        released, server: str) -> None:
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, out = released
    before = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(server)
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    finally:
        mlflow.set_tracking_uri(before)
    reply = model.predict([CHAT])[0]
    tok = AutoTokenizer.from_pretrained(out / "merged")
    lm = AutoModelForCausalLM.from_pretrained(out / "merged")
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")  # the saved template, not a default one
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    gen = lm.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert reply == tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _cli(server: str, home: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args, "--tracking-uri", server,
                             "--home", str(home)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _run(server: str, home: Path, *args: str) -> tuple[int, str]:
    proc = _cli(server, home, *args)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out + err


def test_promote_and_rollback_are_recorded(released, server: str) -> None:
    client, home, _ = released
    rc, out = _run(server, home, "promote", NAME, "2", "--reason", "reviewed the replies by hand")
    assert rc == 0, out
    assert "1 -> 2" in out and _alias(client, "champion") == "2"
    tags = client.get_model_version(NAME, "2").tags
    assert tags["ftflow.champion.who"] == getpass.getuser()
    assert tags["ftflow.champion.reason"] == "reviewed the replies by hand"
    assert tags["ftflow.champion.previous"] == "1" and tags["ftflow.champion.action"] == "promote"
    assert client.get_model_version(NAME, "1").tags["ftflow.champion.replaced_by"].startswith("2 ")

    rc, out = _run(server, home, "rollback", NAME, "--reason", "complaints about tone")
    assert rc == 0, out
    assert _alias(client, "champion") == "1"
    assert client.get_model_version(NAME, "1").tags["ftflow.champion.previous"] == "2"
    with pytest.raises(registry.RegistryError, match="no earlier champion"):
        registry.rollback(client, home, NAME, "again")
    with pytest.raises(MlflowException):
        registry.promote(client, home, NAME, "99", "typo")
    assert _alias(client, "champion") == "1"

    moves = registry.history(client, NAME)
    assert [(m.action, m.previous, m.version) for m in moves] == [
        ("export", None, "1"), ("promote", "1", "2"), ("rollback", "2", "1")]
    lines = registry.history_file(home, server, NAME).read_text().splitlines()
    assert [json.loads(line)["version"] for line in lines] == ["1", "2", "1"]
    # `ftflow history` and an error's exit status, in one process (each start costs seconds)
    rc, out = _run(server, home, "history", NAME)
    assert rc == 0 and "complaints about tone" in out and "now: champion 1, candidate 2" in out


def test_two_promotions_at_once_both_land_in_order(released, server: str) -> None:
    client, home, _ = released
    source = client.get_model_version(NAME, "1").source  # models:/<logged model id>
    for _ in range(2):  # versions 3 and 4, cheap copies of version 1
        v = client.create_model_version(NAME, source, model_id=source.split("/")[-1]).version
        registry.wait_ready(client, NAME, str(v))
    start = len(registry.history(client, NAME))
    procs = [_cli(server, home, "promote", NAME, v, "--reason", f"race {v}") for v in ("3", "4")]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    moves = registry.history(client, NAME)[start:]
    assert sorted(m.version for m in moves) == ["3", "4"]
    first, second = moves
    # each move saw the one before it: no lost update
    assert second.previous == first.version and first.previous == "1"
    assert _alias(client, "champion") == second.version
    lines = registry.history_file(home, server, NAME).read_text().splitlines()[-2:]
    assert [json.loads(line)["version"] for line in lines] == [first.version, second.version]
